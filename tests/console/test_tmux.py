"""The console as a person uses it: `lethe tui` in a real terminal (tmux, 80x24), keys
sent, the screen read back."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

LETHE = str(Path(sys.executable).parent / "lethe")


def screen(session: str) -> str:
    done = subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=False
    )
    return done.stdout


def wait_for(session: str, seen: Callable[[str], bool], what: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    shown = ""
    while time.monotonic() < deadline:
        shown = screen(session)
        if seen(shown):
            return shown
        time.sleep(0.3)
    raise AssertionError(f"the console never showed {what}; the screen was:\n{shown}")


def keys(session: str, *sent: str) -> None:
    subprocess.run(["tmux", "send-keys", "-t", session, *sent], check=True)


def test_an_operator_browses_the_console_in_a_terminal(coordinator_dir: Path) -> None:
    assert shutil.which("tmux"), "tmux is needed (./run installs it where apt-get can)"
    session = f"lethe-tui-{time.monotonic_ns()}"
    command = f"{LETHE} tui --data-dir {coordinator_dir}"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command],
        check=True,
    )
    try:
        first = wait_for(session, lambda s: "run console" in s, "the run's title")
        assert "3 devices" in first and "Traceback" not in first
        keys(session, "4")
        wait_for(session, lambda s: "VERIFIED" in s and "FAILED" in s, "the deletion requests")
        keys(session, "/")
        time.sleep(1.0)  # a person's pause: the search field takes focus, then the typing
        keys(session, "-l", "residual")
        shown = wait_for(
            session, lambda s: "edit residual" in s and "VERIFIED" not in s, "the search result"
        )
        assert "FAILED" in shown
        keys(session, "C-q")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and screen(session):
            time.sleep(0.2)
        alive = subprocess.run(["tmux", "has-session", "-t", session], check=False)
        assert alive.returncode != 0, "ctrl+q did not end the console"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
