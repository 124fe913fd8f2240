"""Real processes started on this machine, and stopped together.

The local fleet (`lethe demo`) and the end-to-end tests start SuperLinks,
SuperNodes, device daemons, the coordinator and the deletion API as separate
processes. Each runs in its own session (so a SuperNode's ClientApp children
go with it) with its output in a log file, and `stop_all` ends every group:
SIGTERM first, SIGKILL for whatever lingers. Used as a context manager, it
stops them on the way out, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

BIN = Path(sys.executable).parent  # where this environment's console scripts are
STOP_GRACE_S = 30.0
STRAY_GRACE_S = 5.0

T = TypeVar("T")


class ProcessGroup:
    """Processes started with logs under `logs`, all stopped by `stop_all`."""

    def __init__(self, logs: Path, env: Mapping[str, str] | None = None) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.running: list[subprocess.Popen[bytes]] = []
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "PATH": path, **(env or {})}

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_all()

    def start(self, name: str, *command: str, **env: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **env},
                start_new_session=True,
            )
        self.running.append(process)
        return process

    def start_daemon(
        self, name: str, root: Path, *options: str, device: str = "cpu", poll_s: float = 0.2
    ) -> subprocess.Popen[bytes]:
        """`lethe client run` on the data directory `root`, one training thread (several
        daemons and Flower share the machine's cores)."""
        common = ("--poll", str(poll_s), "--threads", "1", "--device", device)
        return self.start(
            name, str(BIN / "lethe"), "client", "run", *common, *options, LETHE_DATA_DIR=str(root)
        )

    def run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command to its end (output captured), with this group's environment."""
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=self.env, check=False
        )

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        """SIGTERM every group (a SuperNode's ClientApp processes too) and every process that
        one of ours started in a session of its own; SIGKILL what lingers."""
        ours = {process.pid for process in self.running}
        # Their children too (a device daemon's SuperNode): whatever names one of them.
        strays = _started_by(ours | _in_sessions(ours))
        known = ours | strays  # a stray's own strays name it, even once it has gone
        for process in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        # Flower's ServerApp process ignores SIGTERM: a short wait, then it is killed.
        patience = min(deadline, time.monotonic() + STRAY_GRACE_S)
        while (strays := _started_by(known)) and time.monotonic() < patience:
            time.sleep(0.2)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        gone_by = time.monotonic() + STRAY_GRACE_S  # SIGKILL lands asynchronously
        while any(_running(pid) for pid in strays) and time.monotonic() < gone_by:
            time.sleep(0.05)

    def exited(self) -> list[tuple[str, int]]:
        """(command, exit code) of every process that has ended."""
        return [
            (" ".join(map(str, p.args[:3])), p.returncode)  # type: ignore[index]
            for p in self.running
            if p.poll() is not None
        ]


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _in_sessions(leaders: set[int]) -> set[int]:
    """Processes in the sessions that `leaders` lead (Linux: read from /proc; else none)."""
    members: set[int] = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after the command, which may hold spaces
        if len(fields) > 3 and int(fields[3]) in leaders:
            members.add(int(entry.name))
    return members


def _started_by(parents: set[int]) -> set[int]:
    """Processes that name one of `parents` as `--parent-pid`, and theirs in turn: Flower's
    SuperLink starts a SuperExec so, which starts the ServerApp so, each in a session of
    its own, where a group kill does not reach. (Linux: read from /proc; elsewhere none.)"""
    named: dict[int, int] = {}  # pid -> the parent pid it names
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for flag, value in itertools.pairwise(words):
            if flag == b"--parent-pid" and value.isdigit():
                named[int(entry.name)] = int(value)
    found: set[int] = set()
    frontier = set(parents)
    while frontier:
        frontier = {pid for pid, parent in named.items() if parent in frontier} - found
        found |= frontier
    return found


def wait_until(check: Callable[[], T | None], what: str, timeout: float, every_s: float = 0.5) -> T:
    """The first truthy value of `check()` (exceptions count as not yet), or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # noqa: BLE001 (a service that is not up yet)
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every_s)
