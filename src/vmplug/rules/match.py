"""Attributes x UsbDevice -> bool, with usbguard's set-operator semantics.

usbguard (``Rule::Attribute::appliesTo`` and ``setSolve*`` in
``src/Library/public/usbguard/Rule.hpp``) matches a rule attribute's values R
(the "source set") against the device's values D (the "target set") with a
per-item relation ``matches(r, d)`` (``Predicates::isSubsetOf``: equality for
strings, ``USBDeviceID::isSubsetOf`` and ``USBInterfaceType::appliesTo`` for the
wildcard forms):

* ``one-of``:  some r matches some d
* ``all-of``:  every r matches some d
* ``none-of``: no r matches any d
* ``equals`` (the default): ``len(R) == len(D)`` and every r matches some d
  (duplicates are not counted: ``{ 03:*:* 03:*:* }`` equals ``[03:01:01 08:06:50]``)
* ``equals-ordered``: ``len(R) == len(D)`` and ``r[i]`` matches ``d[i]`` for every i
* ``match-all``: every d is matched by some r (the man page's "subset of the
  specified values"; usbguard's own code for it reverses the wildcard relation
  for IDs and is a stub that always answers true for strings, so vmplug follows
  the documented meaning, which agrees with usbguard's code for with-interface)

Every attribute but ``with-interface`` has one device value.  A string the
device does not report counts as ``""`` (usbguard reads a missing sysfs
attribute as an empty string); a device without vendor/product IDs has no
``id`` value at all.

Rules are compiled once into closures so that matching a device is a few
attribute reads and comparisons.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from vmplug.model import UsbDevice
from vmplug.rules.grammar import (
    Attribute,
    DeviceIdPattern,
    InterfacePattern,
    SetOperator,
    format_attributes,
    parse,
)

__all__ = ["Rule", "first_match", "parse_rule"]

Triple = tuple[int, int, int]
#: A compiled test: the device, and its interface triples when the rule needs them.
Predicate = Callable[[UsbDevice, tuple[Triple, ...]], bool]

_ONE_OF = SetOperator.ONE_OF
_ALL_OF = SetOperator.ALL_OF
_NONE_OF = SetOperator.NONE_OF
_EQUALS = SetOperator.EQUALS
_EQUALS_ORDERED = SetOperator.EQUALS_ORDERED
_MATCH_ALL = SetOperator.MATCH_ALL

#: UsbDevice field behind each single-valued string attribute.
_STRING_FIELDS = {
    "serial": "serial",
    "name": "product",  # usbguard's name is the product string the device reports
    "hash": "descriptors_sha256",
    "parent-hash": "parent_hash",
    "via-port": "port",
    "via-host": "host",  # vmplug's own: the device host of a remote device
    "with-connect-type": "connect_type",
}


def _always(_device: UsbDevice, _triples: tuple[Triple, ...]) -> bool:
    return True


def _never(_device: UsbDevice, _triples: tuple[Triple, ...]) -> bool:
    return False


def _strings(name: str, op: SetOperator, values: tuple[str, ...]) -> Predicate:
    """A single-valued string attribute: D is ``(value or "",)``."""
    get = attrgetter(_STRING_FIELDS[name])
    choices = frozenset(values)
    if op in (_ONE_OF, _MATCH_ALL):  # for one device value both mean "it is listed"
        return lambda d, _t: (get(d) or "") in choices
    if op is _NONE_OF:
        return lambda d, _t: (get(d) or "") not in choices
    if (op is _ALL_OF and len(choices) != 1) or (op is not _ALL_OF and len(values) != 1):
        # all-of: every listed value must equal the one device value;
        # equals/equals-ordered: as many listed values as device values (one).
        return _never
    value = values[0]
    if not value:
        return lambda d, _t: not get(d)
    return lambda d, _t: get(d) == value


def _ids(op: SetOperator, patterns: tuple[DeviceIdPattern, ...]) -> Predicate:
    """``id``: D is ``((vendor, product),)``, or empty when the device has no IDs."""
    if op in (_ALL_OF, _EQUALS, _EQUALS_ORDERED):
        if op is not _ALL_OF and len(patterns) != 1:
            return _never  # several listed values vs the device's one
        # Every pattern must match the one device ID: intersect them.
        vendors = {p.vendor for p in patterns if p.vendor is not None}
        products = {p.product for p in patterns if p.product is not None}
        if len(vendors) > 1 or len(products) > 1:
            return _never
        if not vendors:
            return lambda d, _t: d.vendor_id is not None and d.product_id is not None
        (vendor,) = vendors
        if not products:
            return lambda d, _t: d.vendor_id == vendor and d.product_id is not None
        (product,) = products
        return lambda d, _t: d.vendor_id == vendor and d.product_id == product

    # one-of, none-of, match-all: is the device's ID matched by some pattern?
    exact = frozenset((p.vendor, p.product) for p in patterns if p.product is not None)
    by_vendor = frozenset(p.vendor for p in patterns if p.vendor is not None and p.product is None)
    any_id = any(p.vendor is None for p in patterns)
    # With no ID the device's set is empty: one-of fails, none-of and match-all hold.
    absent = op is not _ONE_OF
    hit = op is not _NONE_OF

    def pred(d: UsbDevice, _t: tuple[Triple, ...]) -> bool:
        vendor, product = d.vendor_id, d.product_id
        if vendor is None or product is None:
            return absent
        if any_id or vendor in by_vendor or (vendor, product) in exact:
            return hit
        return not hit

    return pred


def _interfaces(op: SetOperator, patterns: tuple[InterfacePattern, ...]) -> Predicate:
    """``with-interface``: D is every interface descriptor, alternate settings included.

    A pattern is a prefix of the (class, subclass, protocol) triple, since usbguard
    only allows ``cc:*:*``, ``cc:ss:*`` and ``cc:ss:pp``.
    """
    prefixes = tuple((len(p.prefix), p.prefix) for p in patterns)
    full = frozenset(p for n, p in prefixes if n == 3)
    two = frozenset(p for n, p in prefixes if n == 2)
    one = frozenset(p[0] for n, p in prefixes if n == 1)

    if two:

        def listed(x: Triple) -> bool:  # some pattern matches x
            return x[0] in one or x in full or x[:2] in two
    else:

        def listed(x: Triple) -> bool:
            return x[0] in one or x in full

    def one_of(_d: UsbDevice, triples: tuple[Triple, ...]) -> bool:
        for x in triples:  # noqa: SIM110 - no generator on the hot path
            if listed(x):
                return True
        return False

    def none_of(d: UsbDevice, triples: tuple[Triple, ...]) -> bool:
        return not one_of(d, triples)

    def match_all(_d: UsbDevice, triples: tuple[Triple, ...]) -> bool:
        for x in triples:  # noqa: SIM110 - no generator on the hot path
            if not listed(x):
                return False
        return True

    def all_of(_d: UsbDevice, triples: tuple[Triple, ...]) -> bool:
        for n, r in prefixes:
            for x in triples:
                if x[:n] == r:
                    break
            else:
                return False
        return True

    count = len(prefixes)

    def equals(d: UsbDevice, triples: tuple[Triple, ...]) -> bool:
        return len(triples) == count and all_of(d, triples)

    def equals_ordered(_d: UsbDevice, triples: tuple[Triple, ...]) -> bool:
        if len(triples) != count:
            return False
        for (n, r), x in zip(prefixes, triples, strict=True):  # noqa: SIM110 - no generator on the hot path
            if x[:n] != r:
                return False
        return True

    preds: dict[SetOperator, Predicate] = {
        _ONE_OF: one_of,
        _NONE_OF: none_of,
        _MATCH_ALL: match_all,
        _ALL_OF: all_of,
        _EQUALS: equals,
        _EQUALS_ORDERED: equals_ordered,
    }
    return preds[op]


def _compile(attr: Attribute) -> Predicate | None:
    values = attr.values
    if attr.name == "label":  # usbguard: "not used when testing if a rule applies"
        return None
    if attr.name == "id":
        return _ids(attr.operator, tuple(v for v in values if isinstance(v, DeviceIdPattern)))
    if attr.name == "with-interface":
        return _interfaces(
            attr.operator, tuple(v for v in values if isinstance(v, InterfacePattern))
        )
    return _strings(attr.name, attr.operator, tuple(v for v in values if isinstance(v, str)))


def _conjunction(preds: list[Predicate]) -> Predicate:
    if not preds:
        return _always  # like a usbguard rule with a target only: every device
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        first, second = preds
        return lambda d, t: first(d, t) and second(d, t)
    tests = tuple(preds)

    def every(d: UsbDevice, t: tuple[Triple, ...]) -> bool:
        for test in tests:  # noqa: SIM110 - no generator on the hot path
            if not test(d, t):
                return False
        return True

    return every


@dataclass(frozen=True, slots=True)
class Rule:
    """A parsed rule.  ``Rule("id 1235:821a")`` parses its source; see :func:`parse_rule`."""

    source: str
    attributes: tuple[Attribute, ...] = ()
    _test: Predicate = field(init=False, repr=False, compare=False)
    _needs_interfaces: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.attributes:
            object.__setattr__(self, "attributes", parse(self.source))
        preds = [p for p in map(_compile, self.attributes) if p is not None]
        object.__setattr__(self, "_test", _conjunction(preds))
        needs = any(a.name == "with-interface" for a in self.attributes)
        object.__setattr__(self, "_needs_interfaces", needs)

    def matches(self, device: UsbDevice) -> bool:
        """Whether every attribute of the rule holds for ``device``."""
        return self._test(device, device.interface_triples if self._needs_interfaces else ())

    def to_text(self) -> str:
        """Canonical text: lower-case hex, ``id`` spelled out, strings re-escaped."""
        return format_attributes(self.attributes)


def parse_rule(text: str) -> Rule:
    """Parse and compile one rule; raises :class:`RuleSyntaxError` on bad text."""
    return Rule(text, parse(text))


def first_match(rules: Sequence[Rule], device: UsbDevice) -> int | None:
    """Index of the first rule that matches ``device``, or None."""
    triples: tuple[Triple, ...] | None = None
    for index, rule in enumerate(rules):
        if rule._needs_interfaces:
            if triples is None:
                triples = device.interface_triples  # computed once for all rules
            if rule._test(device, triples):
                return index
        elif rule._test(device, ()):
            return index
    return None
