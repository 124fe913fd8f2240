"""Processes started together stop together, including what they start in sessions of their
own (as Flower's SuperLink starts a SuperExec, which starts a ServerApp that ignores SIGTERM)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lethe.fleet.processes import ProcessGroup, wait_until

# Starts a child in a new session that names it with --parent-pid; the child (which
# ignores SIGTERM, as Flower's ServerApp does) does the same once more; all wait. Each
# writes its pid to a file.
SPAWNER = """
import os, signal, subprocess, sys, time
depth, folder = int(sys.argv[1]), sys.argv[2]
if "--parent-pid" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(os.path.join(folder, f"{os.getpid()}.pid"), "w").close()
if depth:
    subprocess.Popen(
        [sys.executable, "-c", sys.argv[3], str(depth - 1), folder, sys.argv[3],
         "--parent-pid", str(os.getpid())],
        start_new_session=True,
    )
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/status")
    return not (state.exists() and "State:\tZ" in state.read_text())


def test_stop_all_reaches_processes_started_in_their_own_sessions(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    group = ProcessGroup(tmp_path / "logs")
    group.start("spawner", sys.executable, "-c", SPAWNER, "2", str(pids), SPAWNER)
    started = wait_until(lambda: len(list(pids.iterdir())) == 3 or None, "the chain", 30)
    assert started
    chain = [int(p.stem) for p in pids.iterdir()]
    assert all(alive(pid) for pid in chain)
    begun = time.monotonic()
    group.stop_all()
    assert not [pid for pid in chain if alive(pid)], "a process outlived stop_all"
    assert time.monotonic() - begun < 20  # the strays ignore SIGTERM: killed after a short wait
