"""kill -9 of the coordinator in the middle of a group, then a restart: the run resumes from the
last committed version, and every accepted update is applied exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sqlmodel import Session, select

from coordinator.state import StateStore
from coordinator.state_tables import GroupRow, RunRow

SCRIPT = Path(__file__).with_name("crash_run.py")


def start(state_dir: Path, versions: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(state_dir), str(versions)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def mid_group(store: StateStore) -> bool:
    """Some group holds an arrived update while others still train, and versions exist."""
    with Session(store.engine) as session:
        run = session.get(RunRow, store.run)
        groups = session.exec(select(GroupRow).where(GroupRow.run == store.run)).all()
        return bool(
            run is not None and run.version >= 8 and any(g.arrived and g.training for g in groups)
        )


def test_kill_9_mid_group_then_resume(tmp_path: Path) -> None:
    process = start(tmp_path, 400)
    caught_mid_group = False
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("START 0"), process.stderr.read()
        store = StateStore(f"sqlite:///{tmp_path / 'state.db'}", tmp_path, "crash")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if mid_group(store):
                caught_mid_group = True
                break
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert caught_mid_group, process.stderr.read()[-3000:] if process.stderr else ""
    at_kill = store.versions()[-1].version
    pending_at_kill = [u.update_id for u in store.updates() if u.applied_in is None]
    assert at_kill >= 5

    resumed = start(tmp_path, at_kill + 6)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-3000:]
    first_line = out.splitlines()[0].split()
    assert first_line[:2] == ["START", str(at_kill)]  # from the last committed version
    assert int(first_line[2]) == len(pending_at_kill)

    versions = store.versions()
    assert [v.version for v in versions] == list(range(len(versions)))
    assert versions[-1].version >= at_kill + 6
    updates = {u.update_id: u for u in store.updates()}
    applied = [i for v in versions for i in v.update_ids]
    assert len(applied) == len(set(applied)), "an update was applied twice"
    for update_id in pending_at_kill:  # accepted before the kill: applied after it
        assert updates[update_id].applied_in is not None
    for version in versions:
        for update_id in version.update_ids:
            assert updates[update_id].applied_in == version.version

    # Replaying the journal gives the stored model: nothing lost, nothing twice.
    model = store.model(0)
    for version in versions[1:]:
        for update_id, weight in zip(version.update_ids, version.weights, strict=True):
            delta = store._read(updates[update_id].path, updates[update_id].sha256)
            model = {k: model[k].astype(np.float64) + weight * delta[k] for k in model}
        stored = store.model(version.version)
        for key in stored:
            assert np.allclose(model[key], stored[key], atol=1e-5)
        model = stored
    store.close()
