"""``vmplug generate prometheus-rules``: promtool accepts the file, and every
series its expressions read is one a daemon's /metrics really exports."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.fakekernel import FakeKernel
from vmplug.api.metrics import Metrics
from vmplug.cli.app import cli
from vmplug.config import parse_config
from vmplug.daemon.reconciler import Daemon
from vmplug.generate import prometheus
from vmplug.history.store import ActionKind, EventKind, Result, Store
from vmplug.host.events import ReplayEventSource


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["generate", "prometheus-rules", *args])
    return res.exit_code, res.output


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    code, out = _run("--job", "studio", "--drops", "5")
    assert code == 0
    (tmp_path / "rules.yml").write_text(out)
    res = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / "rules.yml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 7 rules found" in res.stdout
    assert 'job=\\"studio\\"' in out and ">= 5" in out


def test_bad_input_is_exit_2_and_json_is_one_document() -> None:
    assert _run("--job", "a b")[0] == 2
    assert _run("--drops-window", "ten")[0] == 2
    code, out = _run("--json")
    assert code == 0 and len(json.loads(out)["rules"]) == 7


async def test_every_series_the_rules_read_is_exported(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path, "mixed")
    store = Store(tmp_path / "vmplug.db")
    try:
        config = parse_config(
            '[vm.a]\nqmp = "/nonexistent"\n[[rule]]\nattach = "a"\nmatch = \'via-port "1-3"\'\n'
        )
        d = Daemon(config, sysfs_root=kernel.root, source=ReplayEventSource(kernel.fifo),
                   store=store)  # fmt: skip
        metrics = Metrics(d.view)
        d.rescan()
        dev = d.inventory["1-3"]
        # what the daemon journals as it runs (the journal publishes to the metrics)
        d.journal.event(EventKind.VM_UP, vm="a")
        d.journal.action(ActionKind.ATTACH, identity=dev.identity, qemu_id=dev.qemu_id,
                         vm="a", result=Result.OK, latency_s=0.05)  # fmt: skip
        d.journal.event(EventKind.HEAL_FAILED, identity=dev.identity, port=dev.port)
        d.vms["a"] = _Disconnected()  # type: ignore[assignment]
        await asyncio.sleep(0.1)  # some time wanted and up: an uptime ratio
        text = metrics.render()[0].decode()
        exported = set(re.findall(r"^([a-z_:]+)(?:\{|\s)", text, re.M))
        for name in prometheus.METRICS:
            assert name in exported, (name, sorted(exported))
        for rule in prometheus.rules(prometheus.RuleOptions()):
            for name in re.findall(r"\b(vmplug_[a-z_]+)", str(rule["expr"])):
                assert name in exported, (rule["alert"], name)
        metrics.close()
    finally:
        store.close()
        kernel.close()


class _Disconnected:
    connected = False
    name = "a"
