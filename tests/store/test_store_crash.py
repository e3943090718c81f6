"""kill -9 at random moments: the store stays intact and loses nothing it acknowledged.

A child process writes in a tight loop (events, actions, device summaries,
some batches) with frequent WAL checkpoints, and prints the id of every
committed write.  It is SIGKILLed at a random moment, ten times.  After each
kill the database must pass ``PRAGMA integrity_check``, hold at least every id
the child acknowledged (a committed transaction survives a process kill in
WAL, with synchronous=NORMAL too), never shrink, and reopen as a Store.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from vmplug.history.store import Store

GADGETS = Path(__file__).parents[1] / "fixtures" / "sysfs" / "gadgets"

CHILD = r"""
import dataclasses
import sys
from vmplug.host.sysfs import scan
from vmplug.history.store import Store

# a device captured from the lab kernel, remembered under changing serials
base = next(d for d in scan(sys.argv[2]) if d.port == "4-1")

store = Store(sys.argv[1])
# Checkpoint every few pages so kills also land inside checkpoints.
store._db.execute("PRAGMA wal_autocheckpoint = 8")
print("ready", flush=True)
i = 0
while True:
    i += 1
    ident = f"1235:821a/serial={i % 7}"
    if i % 50 == 0:
        with store.batch():
            for j in range(20):
                last = store.record_event("rescan", detail={"i": i, "j": j, "pad": "x" * 200})
        print(last, flush=True)
        continue
    if i % 3 == 0:
        last = store.record_action(
            "attach", identity=ident, qemu_id="vmplug-0", vm="w", result="ok", attempt=i
        )
    else:
        last = store.record_event("device-add", identity=ident, port="3-1", vm="w",
                                  detail={"i": i, "pad": "y" * 100})
    if i % 5 == 0:
        store.remember_device(dataclasses.replace(base, port=f"3-{i % 4}", serial=str(i % 7)))
    print(last, flush=True)
"""


def _run_and_kill(path: Path, rng: random.Random) -> int:
    """Start the writer, SIGKILL it at a random moment; return the last acked id."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(GADGETS)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    # At least one commit before the kill, however loaded the machine is.
    acked = [int(proc.stdout.readline())]

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            acked[0] = int(line)

    reader = threading.Thread(target=drain)
    reader.start()
    time.sleep(rng.uniform(0.02, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    reader.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    return acked[0]


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    seed = int(os.environ.get("VMPLUG_CRASH_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    print(f"VMPLUG_CRASH_SEED={seed}")  # shown on failure, to replay the kill times
    deadline = time.monotonic() + 60
    previous_rows = 0
    previous_max = 0
    for _round in range(10):
        assert time.monotonic() < deadline, "crash test ran out of time"
        acked = _run_and_kill(path, rng)
        db = sqlite3.connect(path)
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            rows, max_id = db.execute(
                "SELECT count(*), coalesce(max(id), 0) FROM journal"
            ).fetchone()
            devices = db.execute("SELECT count(*) FROM devices").fetchone()[0]
        finally:
            db.close()
        assert acked > 0, "the writer never committed before the kill"
        assert max_id >= acked, f"acknowledged id {acked} lost (max id {max_id})"
        assert rows >= previous_rows and max_id >= previous_max
        assert rows > previous_rows, "no progress in this round"
        assert 1 <= devices <= 7
        previous_rows, previous_max = rows, max_id
        with Store(path) as store:  # reopens, recovers the WAL, schema intact
            assert store.count() == rows
            last = store.history(limit=1)[0]
            assert last.id == max_id
