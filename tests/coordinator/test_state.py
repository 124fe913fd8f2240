"""The coordinator's durable state on SQLite and on a real PostgreSQL: every event in one
transaction, a resumable run, damaged files refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from coordinator.core import Coordinator
from coordinator.fedcompass import FedCompass
from coordinator.simulation.task import B_KEY
from coordinator.state import StateError, StateStore

MODEL = {B_KEY: np.zeros((3, 2), np.float32)}


def ones(value: float = 1.0) -> dict[str, np.ndarray]:
    return {B_KEY: np.full((3, 2), value, np.float32)}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    url = request.getfixturevalue("postgres_url")
    return url


def test_a_run_is_journaled_and_resumed(store_url: str, tmp_path: Path) -> None:
    run = f"run-{tmp_path.name}"  # PostgreSQL is shared by the session: one run per test
    store = StateStore(store_url, tmp_path / "files", run)
    assert store.start("fedcompass", {"policy": "fedcompass"}, MODEL) is None
    core = Coordinator(FedCompass(), MODEL, journal=store)
    works = core.join(0, 0.0) + core.join(1, 0.0)
    assert [w.steps for w in works] == [100, 100]
    core.arrive(0, 0, ones(), 5, 100.0)  # first return: version 1
    core.arrive(1, 0, ones(2.0), 5, 300.0)  # version 2
    rejected = core.arrive(1, 2, {B_KEY: np.full((3, 2), np.nan, np.float32)}, 5, 301.0)
    assert rejected == []
    store.record_metric(2, "accuracy", 0.5)

    versions = store.versions()
    assert [v.version for v in versions] == [0, 1, 2]
    assert versions[2].nodes == [1] and versions[2].staleness == [1]
    assert [(u.update_id, u.applied_in, u.steps) for u in store.updates()] == [
        (1, 1, 100),
        (2, 2, 100),
    ]
    nodes = {n.node: n for n in store.nodes()}
    assert nodes[0].seconds_per_step == pytest.approx(1.0) and nodes[1].rejected == 1
    # Node 1 answered its work badly: the work is over until it joins again.
    assert nodes[1].training_version is None and not nodes[1].active and nodes[0].active
    assert store.groups() and store.metrics()[0].value == 0.5
    assert "NaN" in store.rejections()[0].reason
    assert np.array_equal(store.model(2)[B_KEY], core.model[B_KEY])
    store.close()

    again = StateStore(store_url, tmp_path / "files", run)
    saved = again.start("fedcompass", {"policy": "fedcompass"}, MODEL)
    assert saved is not None and saved.pending == {} and saved.next_update_id == 3
    resumed = Coordinator(FedCompass(), MODEL, journal=again)
    resumed.restore(saved)
    assert resumed.version == 2 and np.array_equal(resumed.model[B_KEY], core.model[B_KEY])
    assert sorted(w.node for w in resumed.reissue(400.0)) == [0]
    with pytest.raises(StateError, match="uses policy"):
        again.start("fedavg", {}, MODEL)
    again.close()


def test_a_pending_update_survives_and_a_damaged_file_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(url, tmp_path / "files", "r")
    store.start("fedcompass", {}, MODEL)
    core = Coordinator(FedCompass(), MODEL, journal=store)
    for node in range(3):
        core.join(node, 0.0)
    for node in range(3):
        core.arrive(node, 0, ones(), 5, 100.0 + node)  # first returns
    # Nodes 0 and 1 were put in one group: node 0 arrives, its update waits there.
    group = store.groups()[0]
    member = group.training[0]
    version = core.in_flight[member].version
    core.arrive(member, version, ones(3.0), 5, 150.0)
    saved = store.start("fedcompass", {}, MODEL)
    assert saved is not None and len(saved.pending) == 1
    [(node, delta)] = saved.pending.values()
    assert node == member and np.array_equal(delta[B_KEY], ones(3.0)[B_KEY])

    path = Path(store.updates()[-1].path)
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(StateError, match="checksum"):
        store.start("fedcompass", {}, MODEL)
    store.close()


def test_closed_groups_stay_with_who_arrived_and_who_was_late(tmp_path: Path) -> None:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}", tmp_path / "files", "r")
    store.start("fedcompass", {}, MODEL)
    core = Coordinator(FedCompass(), MODEL, journal=store)
    for node in range(3):
        core.join(node, 0.0)
    for node in range(3):
        core.arrive(node, 0, ones(), 5, 100.0 + node)
    [group] = store.groups()  # all three train for one group
    first, *others = group.training
    core.arrive(first, core.in_flight[first].version, ones(), 5, group.expected)
    deadline = core.deadline()
    assert deadline is not None
    core.tick(deadline + 1.0)  # the others miss the group's latest arrival time
    closed = next(g for g in store.groups() if g.group == group.group)
    assert closed.closed_at == deadline + 1.0
    assert closed.arrived == [first] and closed.late == others and closed.opened_at < 102.0
    store.close()


def test_flower_sized_node_ids_are_stored_and_read_back(tmp_path: Path) -> None:
    node = 2**64 - 12345  # Flower node ids use all 64 bits
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}", tmp_path / "files", "r")
    store.start("fedcompass", {}, MODEL)
    core = Coordinator(FedCompass(), MODEL, journal=store)
    core.join(node, 0.0)
    core.arrive(node, 0, ones(), 5, 10.0)
    assert [n.node for n in store.nodes()] == [node]
    assert [u.node for u in store.updates()] == [node]
    saved = store.start("fedcompass", {}, MODEL)
    assert saved is not None and list(saved.in_flight) == [node]
    store.close()


def test_an_older_database_is_upgraded_in_place(tmp_path: Path) -> None:
    # A database written before the group timeline existed: the columns added since are
    # put in place on open, and what it held is kept.
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(url, tmp_path / "files", "r")
    store.start("fedcompass", {}, MODEL)
    store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        for column in ("opened_at", "closed_at", "late"):
            db.execute(f"ALTER TABLE coordinator_groups DROP COLUMN {column}")
        db.execute(
            'INSERT INTO coordinator_groups (run, "group", expected, latest, training, arrived)'
            " VALUES ('r', 7, 1.0, 2.0, '[1]', '[]')"
        )
    upgraded = StateStore(url, tmp_path / "files", "r")
    [group] = upgraded.groups()
    assert group.group == 7 and group.training == [1] and group.late is None
    assert upgraded.start("fedcompass", {}, MODEL) is not None  # the run is still there
    upgraded.close()
