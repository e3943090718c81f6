"""[heal] and [[alert]] in the config: defaults, and clear errors naming the line."""

from __future__ import annotations

import pytest

from vmplug.config import ConfigError, parse_config
from vmplug.engine.remedy import LADDER, Rung

BASE = '[vm.a]\nqmp = "/x"\n[[rule]]\nattach = "a"\nmatch = \'id 1235:821a\'\n'


def test_defaults_and_values() -> None:
    c = parse_config(BASE)
    assert c.heal.enabled and not c.heal.dry_run and c.heal.rungs == LADDER and c.alerts == ()
    c = parse_config(
        BASE + '[heal]\nrungs = ["reset"]\nsettle_s = 2\n'
        '[[alert]]\nname = "x"\ndrops = 2\ncommand = ["/bin/true"]\n'
    )
    assert c.heal.rungs == (Rung.RESET,) and c.heal.settle_s == 2.0
    assert c.alerts[0].drops == 2 and c.alerts[0].command == ("/bin/true",)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[heal]\nbogus = 1\n", "unknown key 'bogus' in [heal]"),
        ('[heal]\nrungs = ["controller"]\n', "rungs: each one of"),
        ("[heal]\ndrops = 0\n", "drops must be > 0"),
        ("[heal]\ndry_run = 1\n", "dry_run has the wrong type"),
        ('[[alert]]\nname = "x"\n', "no condition"),
        ('[[alert]]\ndrops = 2\nwebhook = "ftp://x"\n', "http:// or https://"),
        ("[[alert]]\ndrops = 2\ncommand = []\n", "command must be a list of strings"),
        ('[[alert]]\nname = "x"\ndrops = 1\n[[alert]]\nname = "x"\ndrops = 2\n', "same name"),
        ("heal = 1\n", "heal must be a table"),
    ],
)
def test_bad_settings_are_config_errors(extra: str, message: str) -> None:
    text = extra + BASE if extra.startswith("heal =") else BASE + extra
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert message in err.value.render()


def test_heal_false_on_rule_and_vm() -> None:
    c = parse_config(BASE.replace('qmp = "/x"', 'qmp = "/x"\nheal = false') + "heal = false\n")
    assert c.vms["a"].heal is False and c.rules[0].heal is False
