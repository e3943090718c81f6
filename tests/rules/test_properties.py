"""Property tests: the parser only ever fails with RuleSyntaxError, at a real
position, and generated rules mean what usbguard says they mean, before and
after a round trip through ``Rule.to_text()``."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.devices import DEVICES
from vmplug.model import AltSetting, Interface, UsbDevice
from vmplug.rules import RuleSyntaxError, parse_rule

BOUNDED = settings(max_examples=300, deadline=None)


def _check_error(text: str) -> None:
    try:
        parse_rule(text)
    except RuleSyntaxError as err:
        assert 0 <= err.column <= len(text)
        assert 1 <= err.line <= text.count("\n") + 1
        line = text.split("\n")[err.line - 1]
        assert err.column <= len(line)
        assert err.length >= 1
        assert err.message
        rendered = err.render("f")
        assert rendered.startswith(f"f:{err.line}:{err.column + 1}: error: ")
        assert rendered.count("\n") == 2


@BOUNDED
@given(st.text())
def test_arbitrary_text_fails_only_with_rule_syntax_error(text: str) -> None:
    _check_error(text)


TOKENS = [
    "id", "serial", "name", "hash", "via-port", "with-interface", "with-connect-type",
    "label", "parent-hash", "if", "allow", "match", "one-of", "all-of", "none-of",
    "equals", "equals-ordered", "match-all", "any-of", "{", "}", "#", "# c\n", "*",
    "1235:821a", "1235:*", "*:*", "*:821a", "12g5:0001", "1235", "01:*:*", "03:01:01",
    "01:*:02", "*:*:*", "01:02", '"x"', '""', '"a b"', '"\\x41"', '"\\q"', '"\\x4"', '"',
    '"unterminated', "\\", '"\\', ":", "é", "\t", "\r\n",
]  # fmt: skip


@BOUNDED
@given(
    st.lists(
        st.tuples(st.sampled_from(TOKENS), st.sampled_from(["", " ", " ", "  ", "\t", "\n"])),
        max_size=12,
    )
)
def test_near_valid_token_sequences(parts: list[tuple[str, str]]) -> None:
    _check_error("".join(tok + sep for tok, sep in parts))


# --------------------------------------------------------------------------- generated rules

OPERATORS = ["one-of", "all-of", "none-of", "equals", "equals-ordered", "match-all"]
STRING_FIELDS = {
    "serial": "serial",
    "name": "product",
    "hash": "descriptors_sha256",
    "via-port": "port",
    "with-connect-type": "connect_type",
    "label": None,
}
VENDORS = [0x1235, 0x0627, 0x46F4]
PRODUCTS = [0x821A, 0x0001, 0x0002]
CLASSES = [0x01, 0x03, 0x08]
SUBCLASSES = [0x00, 0x01, 0x02]
PROTOCOLS = [0x00, 0x01, 0x04]
STRINGS = ["", "1-1.2", "hotplug", "QEMU USB Audio", 'we"ird\\', "café", "\x01\t"]

IdSpec = tuple[int | None, int | None]
IfaceSpec = tuple[int, int | None, int | None]
Value = str | IdSpec | IfaceSpec


@dataclass(frozen=True)
class AttrSpec:
    name: str
    operator: str | None  # None: no operator written (equals)
    values: tuple[Value, ...]
    braces: bool


id_values = st.one_of(
    st.just((None, None)),
    st.tuples(st.sampled_from(VENDORS), st.one_of(st.none(), st.sampled_from(PRODUCTS))),
)
iface_values = st.one_of(
    st.tuples(st.sampled_from(CLASSES), st.none(), st.none()),
    st.tuples(st.sampled_from(CLASSES), st.sampled_from(SUBCLASSES), st.none()),
    st.tuples(st.sampled_from(CLASSES), st.sampled_from(SUBCLASSES), st.sampled_from(PROTOCOLS)),
)
string_values = st.one_of(st.sampled_from(STRINGS), st.text(max_size=4))


# Strategies are built once: building them inside a draw costs more than the test.
operators = st.one_of(st.none(), st.sampled_from(OPERATORS))
value_lists: dict[str, st.SearchStrategy[list[Value]]] = {
    name: st.lists(values, min_size=1, max_size=4)
    for name, values in [
        ("id", id_values),
        ("with-interface", iface_values),
        *((n, string_values) for n in STRING_FIELDS),
    ]
}
attribute_names = st.lists(
    st.sampled_from(["id", "with-interface", *STRING_FIELDS]), min_size=1, max_size=4, unique=True
)


@st.composite
def rule_specs(draw: st.DrawFn) -> list[AttrSpec]:
    specs = []
    for name in draw(attribute_names):
        values = tuple(draw(value_lists[name]))
        operator = draw(operators)
        braces = operator is not None or len(values) > 1 or draw(st.booleans())
        specs.append(AttrSpec(name, operator, values, braces))
    return specs


# Cosmetic choices (hex case, escapes, spacing) come from one seeded Random per
# example: drawing each from Hypothesis would cost more than the test itself.


def _hex(rnd: random.Random, value: int, width: int) -> str:
    text = f"{value:0{width}x}"
    return text.upper() if rnd.random() < 0.5 else text


def _quote(rnd: random.Random, value: str) -> str:
    out = ['"']
    for c in value:
        if c not in '"\\\r\n' and rnd.random() < 0.5:
            out.append(c)
        elif c in '"\\':
            out.append("\\" + c)
        else:
            out.extend(f"\\x{b:02x}" for b in c.encode())
    out.append('"')
    return "".join(out)


def _render_value(rnd: random.Random, value: Value) -> str:
    if isinstance(value, str):
        return _quote(rnd, value)
    if len(value) == 2:
        vendor, product = value
        v = "*" if vendor is None else _hex(rnd, vendor, 4)
        p = "*" if product is None else _hex(rnd, product, 4)
        return f"{v}:{p}"
    return ":".join("*" if b is None else _hex(rnd, b, 2) for b in value)


def render(spec: list[AttrSpec], rnd: random.Random) -> str:
    def sep() -> str:
        return rnd.choice([" ", "  ", "\t", "\n", " \n "])

    parts: list[str] = []
    for attr in spec:
        vals = [_render_value(rnd, v) for v in attr.values]
        text = attr.name + sep()
        if attr.braces:
            if attr.operator is not None:
                text += attr.operator + sep()
            inner = "".join(v + sep() for v in vals)
            text += "{" + rnd.choice(["", " "]) + inner + "}"
        else:
            text += vals[0]
        parts.append(text)
    return "".join(p + sep() for p in parts) + rnd.choice(["", "# note"])


# A literal reading of usbguard's Rule::Attribute::setSolve* (src/Library/public/
# usbguard/Rule.hpp), kept apart from vmplug's compiled matcher on purpose.


def _item(r: Value, x: Value) -> bool:
    if isinstance(r, str):
        return r == x
    if len(r) == 2:  # USBDeviceID::isSubsetOf
        return (r[0] is None or r[0] == x[0]) and (r[1] is None or r[1] == x[1])
    return all(b is None or b == x[i] for i, b in enumerate(r))  # USBInterfaceType::appliesTo


def _solve(op: str, rule: tuple[Value, ...], dev: list[Value]) -> bool:
    if op == "one-of":
        return any(_item(r, x) for r in rule for x in dev)
    if op == "all-of":
        return all(any(_item(r, x) for x in dev) for r in rule)
    if op == "none-of":
        return not any(_item(r, x) for r in rule for x in dev)
    if op == "equals":
        return len(rule) == len(dev) and all(any(_item(r, x) for x in dev) for r in rule)
    if op == "equals-ordered":
        return len(rule) == len(dev) and all(_item(r, x) for r, x in zip(rule, dev, strict=True))
    assert op == "match-all"
    return all(any(_item(r, x) for r in rule) for x in dev)


def _device_values(name: str, device: UsbDevice) -> list[Value]:
    if name == "id":
        if device.vendor_id is None or device.product_id is None:
            return []
        return [(device.vendor_id, device.product_id)]
    if name == "with-interface":
        out: list[Value] = []
        for iface in device.interfaces:
            alts = iface.alt_settings or (AltSetting(0, iface.cls, iface.subclass, iface.protocol),)
            out.extend((a.cls, a.subclass, a.protocol) for a in alts)
        return out
    return [getattr(device, STRING_FIELDS[name] or "") or ""]


def reference(spec: list[AttrSpec], device: UsbDevice) -> bool:
    return all(
        attr.name == "label"
        or _solve(attr.operator or "equals", attr.values, _device_values(attr.name, device))
        for attr in spec
    )


triples = st.tuples(
    st.sampled_from(CLASSES), st.sampled_from(SUBCLASSES), st.sampled_from(PROTOCOLS)
)


interface_lists = st.lists(st.lists(triples, min_size=1, max_size=2), max_size=3)
maybe_strings = st.one_of(st.none(), st.sampled_from(STRINGS))
ports = st.sampled_from(["1-1.2", "3-1", "2-4"])
maybe_vendors = st.one_of(st.none(), st.sampled_from(VENDORS))
products = st.sampled_from(PRODUCTS)


@st.composite
def devices(draw: st.DrawFn) -> UsbDevice:
    interfaces = tuple(
        Interface(
            number=n,
            cls=alts[0][0],
            subclass=alts[0][1],
            protocol=alts[0][2],
            alt_settings=tuple(AltSetting(i, *t) for i, t in enumerate(alts)),
        )
        for n, alts in enumerate(draw(interface_lists))
    )
    maybe = maybe_strings
    return UsbDevice(
        port=draw(ports),
        vendor_id=draw(maybe_vendors),
        product_id=draw(products),
        product=draw(maybe),
        serial=draw(maybe),
        connect_type=draw(maybe),
        descriptors_sha256=draw(maybe),
        interfaces=interfaces,
    )


device_lists = st.lists(devices(), min_size=1, max_size=3)
specs = rule_specs()


@BOUNDED
@given(st.data())
def test_generated_rules_round_trip_and_mean_what_usbguard_means(data: st.DataObject) -> None:
    spec = data.draw(specs)
    text = render(spec, data.draw(st.randoms(use_true_random=False)))
    rule = parse_rule(text)
    again = parse_rule(rule.to_text())
    assert again.attributes == rule.attributes
    assert again.to_text() == rule.to_text()
    pool = [*DEVICES.values(), *data.draw(device_lists)]
    for device in pool:
        expected = reference(spec, device)
        assert rule.matches(device) is expected, (text, device)
        assert again.matches(device) is expected
