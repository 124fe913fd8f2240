"""The deletion propagation, with real device daemons answering in this process: holders are
found by salted hash only after every connected device announced, an offline holder is asked
when it returns, edits join the ledger once, failures are retried, the receipt verifies."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from client.daemon import DaemonConfig, DeviceDaemon
from client.unlearning.edits import edits_to_arrays
from client.unlearning.stamp import StampConfig
from coordinator.deletions.propagation import Answer, Propagator
from coordinator.deletions.status import RetryPolicy, Status
from coordinator.deletions.store import DeletionStore
from coordinator.shared_model import SharedModel, SharedModelConfig
from coordinator.state import StateStore
from shared.fl_messages import UnlearnQuery, UnlearnResult
from shared.paths import DataDir
from shared.receipts import generate_signing_key, verify_receipt
from shared.records import RecordSelector


class LocalQueries:
    """Queries answered by daemons in this process (the Grid's part in the ServerApp)."""

    def __init__(self, daemons: dict[int, DeviceDaemon]) -> None:
        self.daemons = daemons
        self.online = set(daemons)
        self.failing: set[int] = set()
        self.answers: list[tuple[str, int, Answer, str]] = []
        self.sent: list[int] = []

    def connected(self) -> set[int]:
        return set(self.online)

    def send(self, node: int, query: UnlearnQuery) -> str:
        handle = f"m{len(self.sent)}"
        self.sent.append(node)
        if node in self.failing:
            self.answers.append((handle, node, None, "the device's channel is down"))
            return handle
        answer = self.daemons[node].unlearn(query.subject_hash, query.request_id, query.selectors)
        edit = {} if answer.shared_edit is None else edits_to_arrays([answer.shared_edit])
        result = UnlearnResult(
            query.request_id,
            answer.held,
            edit,
            answer.measurements,
            {},
            self.daemons[node].holdings(),
        )
        self.answers.append((handle, node, result, ""))
        return handle

    def announce(self, node: int) -> str:
        handle = f"m{len(self.sent)}"
        self.sent.append(node)
        self.answers.append((handle, node, self.daemons[node].holdings(), ""))
        return handle

    def poll(self) -> list[tuple[str, int, Answer, str]]:
        out, self.answers = self.answers, []
        return out


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def device(root: Path, config: DaemonConfig, subjects: list[str]) -> DeviceDaemon:
    config = dataclasses.replace(
        config, max_burst_records=8, max_steps_per_burst=2, unlearning=StampConfig(target_steps=40)
    )
    data = DataDir(root)
    daemon = DeviceDaemon(data, config)
    lines = [
        {"subject_id": s, "prompt": f"Where does {s} live?", "completion": f" {city}."}
        for s, city in zip(subjects, ("Oslo", "Porto", "Lyon"), strict=False)
    ]
    inbox = data.device / "inbox"
    (inbox / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    daemon.ingest_inbox()
    daemon.train_burst()
    return daemon


def test_a_request_reaches_every_holder_and_ends_verified(
    tmp_path: Path, tiny_model_dir: Path, tiny_daemon_config: DaemonConfig
) -> None:
    daemons = {
        11: device(tmp_path / "d11", tiny_daemon_config, ["alice", "bob"]),
        22: device(tmp_path / "d22", tiny_daemon_config, ["alice"]),
        33: device(tmp_path / "d33", tiny_daemon_config, ["carol"]),
    }
    clock = Clock()
    deletions = DeletionStore(f"sqlite:///{tmp_path / 'deletions.db'}", clock=clock)
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}", tmp_path / "files", "run")
    shared = SharedModel(SharedModelConfig(str(tiny_model_dir), "cpu"))
    state.start("fedcompass", {}, shared.initial_b())
    channel = LocalQueries(daemons)
    channel.online = {11, 33}  # 22 is offline for now
    key = generate_signing_key(tmp_path / "signing.key")
    propagator = Propagator(deletions, state, channel, shared, key, clock)
    try:
        request, _ = deletions.submit("notes", "alice", [], "k1")
        nobody, _ = deletions.submit("notes", "zed", [], "k2")
        # Nobody has announced yet: the request waits and the connected devices are asked.
        propagator.step()
        assert deletions.get(request.request_id).status is Status.RECEIVED
        assert sorted(channel.sent) == [11, 33] and set(state.holdings()) == set()
        state.record_holdings(22, daemons[22].holdings())  # 22 announced before it went away
        assert not propagator.step()  # announcements in, holders found, node 11 asked
        assert propagator.step()  # node 11 answered: its edit joined the ledger
        assert deletions.get(request.request_id).status is Status.DISPATCHED
        assert channel.sent[2:] == [11]
        assert [e.edit_id.split(":")[1] for e in state.ledger()] == [request.request_id]
        # Node 22, offline, still owes the forgetting: it may not train until it has answered.
        assert propagator.owes(22) and not propagator.owes(11) and not propagator.owes(33)
        # Node 22 comes back and is asked; both edits are in, the request goes through.
        channel.online.add(22)
        for _ in range(4):
            propagator.step()
        done = deletions.get(request.request_id)
        assert done.status is Status.VERIFIED, done
        assert channel.sent[2:] == [11, 22]
        assert not propagator.owes(22)  # answered: it may train again
        assert len(state.ledger()) == 2
        assert done.subject_id is None  # the coordinator forgets the raw id once done
        assert done.receipt is not None
        body = verify_receipt(done.receipt, key.public_key())
        assert body["request_id"] == request.request_id
        assert body["subject_hash"] == done.subject_hash
        assert body["measurements"]["devices"] == 2.0
        assert body["model_versions_after"]["ledger"] == 2
        # The devices no longer hold alice; node 33 never did and was not asked.
        assert "alice" not in daemons[11].store.subject_ids()
        assert "alice" not in daemons[22].store.subject_ids()
        # A subject nobody holds is verified with no device involved.
        unheld = deletions.get(nobody.request_id)
        assert unheld.status is Status.VERIFIED
        assert verify_receipt(unheld.receipt, key.public_key())["measurements"]["devices"] == 0.0
    finally:
        deletions.close()
        state.close()
        for daemon in daemons.values():
            daemon.close()


def test_a_device_error_fails_the_request_and_it_is_retried(
    tmp_path: Path, tiny_model_dir: Path, tiny_daemon_config: DaemonConfig
) -> None:
    daemons = {11: device(tmp_path / "d11", tiny_daemon_config, ["alice"])}
    clock = Clock()
    deletions = DeletionStore(
        f"sqlite:///{tmp_path / 'deletions.db'}", clock=clock, retry=RetryPolicy(max_attempts=3)
    )
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}", tmp_path / "files", "run")
    shared = SharedModel(SharedModelConfig(str(tiny_model_dir), "cpu"))
    state.start("fedcompass", {}, shared.initial_b())
    channel = LocalQueries(daemons)
    channel.failing = {11}
    key = generate_signing_key(tmp_path / "signing.key")
    propagator = Propagator(deletions, state, channel, shared, key, clock)
    try:
        request, _ = deletions.submit("notes", "alice", [], "k1")
        state.record_holdings(11, daemons[11].holdings())
        propagator.step()
        propagator.step()
        failed = deletions.get(request.request_id)
        assert failed.status is Status.RECEIVED and failed.attempts == 2  # the second attempt
        assert any(
            "channel is down" in (c.reason or "") for c in deletions.events(request.request_id)
        )
        propagator.step()  # the retry waits for its time
        assert channel.sent == [11]
        channel.failing.clear()
        clock.now += 3600
        for _ in range(4):
            propagator.step()
        assert deletions.get(request.request_id).status is Status.VERIFIED
        assert len(state.ledger()) == 1
    finally:
        deletions.close()
        state.close()
        daemons[11].close()


def test_selectors_reach_the_device(
    tmp_path: Path, tiny_model_dir: Path, tiny_daemon_config
) -> None:
    daemons = {11: device(tmp_path / "d11", tiny_daemon_config, ["alice", "bob"])}
    clock = Clock()
    deletions = DeletionStore(f"sqlite:///{tmp_path / 'deletions.db'}", clock=clock)
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}", tmp_path / "files", "run")
    shared = SharedModel(SharedModelConfig(str(tiny_model_dir), "cpu"))
    state.start("fedcompass", {}, shared.initial_b())
    key = generate_signing_key(tmp_path / "signing.key")
    propagator = Propagator(deletions, state, LocalQueries(daemons), shared, key, clock)
    try:
        state.record_holdings(11, daemons[11].holdings())
        # Alice holds pair records only: a request for her text records picks nothing.
        texts, _ = deletions.submit("notes", "alice", [RecordSelector(kinds=("text",))], "k1")
        for _ in range(5):
            propagator.step()
        assert deletions.get(texts.request_id).status is Status.VERIFIED
        assert state.ledger() == [] and daemons[11].store.count("alice") == 1
        pairs, _ = deletions.submit("notes", "alice", [RecordSelector(kinds=("pair",))], "k2")
        for _ in range(5):
            propagator.step()
        assert deletions.get(pairs.request_id).status is Status.VERIFIED
        assert len(state.ledger()) == 1 and "alice" not in daemons[11].store.subject_ids()
    finally:
        deletions.close()
        state.close()
        daemons[11].close()
