"""The device's link to the coordinator: a Flower SuperNode that `lethe client run` keeps alive.

The SuperNode is Flower's own process; it starts a ClientApp per message,
which talks to this daemon over the local channel. It exits when the
SuperLink refuses it (a key not registered yet, or revoked) and may die with
the network, so the daemon restarts it with a growing pause (1 s doubling to a
minute, back to 1 s once it has stayed up a minute), and starts it only once
the SuperLink's port answers: a device enrolled after it started, or one whose
coordinator was away for a while, joins without anyone touching it. Each
start picks a free loopback port for Flower's local runtime API, so several
devices can share a host.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shared.flower_cli import flower_environment, free_port

log = logging.getLogger(__name__)

FIRST_PAUSE_S = 1.0
LONGEST_PAUSE_S = 60.0
STABLE_S = 60.0
STOP_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1


class SuperNodeKeeper:
    """Runs `command(port)` as a child, restarting it when it exits, until `stop()`."""

    def __init__(
        self, command: Callable[[int], list[str]], superlink: tuple[str, int], log_path: Path
    ) -> None:
        self._command = command
        self._superlink = superlink
        self.log_path = log_path
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._thread = threading.Thread(target=self._keep, name="supernode", daemon=True)

    def start(self) -> SuperNodeKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(timeout=STOP_GRACE_S)

    def _keep(self) -> None:
        pause = FIRST_PAUSE_S
        while not self._stopping.is_set():
            if not self._reachable():
                self._stopping.wait(FIRST_PAUSE_S)
                continue
            began = time.monotonic()
            with self._lock, self.log_path.open("ab") as output:
                if self._stopping.is_set():
                    return
                try:
                    self._process = subprocess.Popen(
                        self._command(free_port()),
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        env=flower_environment(),
                        preexec_fn=_die_with_parent,
                    )
                    self.starts += 1
                except OSError as error:
                    self._process = None
                    log.error("cannot start the SuperNode: %s", error)
            code = None if self._process is None else self._process.wait()
            if self._stopping.is_set():
                return
            pause = FIRST_PAUSE_S if time.monotonic() - began > STABLE_S else pause
            log.warning(
                "SuperNode exited (code %s; see %s); restarting in %.0f s",
                code,
                self.log_path,
                pause,
            )
            self._stopping.wait(pause)
            pause = min(LONGEST_PAUSE_S, pause * 2)

    def _reachable(self) -> bool:
        try:
            socket.create_connection(self._superlink, timeout=2).close()
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    """In the SuperNode, before it runs: end with the daemon, even one killed with SIGKILL,
    so a restarted daemon never finds its predecessor's SuperNode still holding the node."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
