"""The usbguard-compatible rule language: ``parse_rule(text).matches(device)``.

A rule is the attribute part of a usbguard rule (``id 1235:821a``,
``with-interface one-of { 01:*:* }`` …); its target lives in the config.
See :mod:`vmplug.rules.grammar` for the syntax and :mod:`vmplug.rules.match`
for the set-operator semantics.
"""

from vmplug.rules.grammar import (
    Attribute,
    DeviceIdPattern,
    InterfacePattern,
    RuleSyntaxError,
    SetOperator,
)
from vmplug.rules.match import Rule, first_match, parse_rule

__all__ = [
    "Attribute",
    "DeviceIdPattern",
    "InterfacePattern",
    "Rule",
    "RuleSyntaxError",
    "SetOperator",
    "first_match",
    "parse_rule",
]
