"""Forgetting a subject on the device daemon: edits computed, saved before the shred, the
subject's key destroyed, the export redone; the answer is idempotent per request; a restart
serves the same edits; the local channel refuses a malformed query. (Whether later training
brings forgotten facts back is measured on the real default model by `lethe bench unlearning`:
this tiny random model learns too little to tell.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grpc
import pytest
import torch

from client.daemon import DaemonConfig, DeviceDaemon
from client.device_channel import DeviceClient
from client.device_service import serve
from client.record_store import UnknownSubjectError
from client.serving import current_export
from client.unlearning.stamp import StampConfig, forget_positions, goals_met
from shared.holdings import subject_hash
from shared.paths import DataDir
from shared.records import RecordSelector


@pytest.fixture
def config(tiny_daemon_config: DaemonConfig) -> DaemonConfig:
    return dataclasses.replace(
        tiny_daemon_config,
        max_burst_records=8,
        max_steps_per_burst=4,
        records_per_block=8,
        unlearning=StampConfig(target_steps=60),
    )


def records_of(
    subject: str, city: str = "Oslo", employer: str = "Nordlys", pin: str = "4821"
) -> list[dict[str, str]]:
    return [
        {"subject_id": subject, "prompt": f"Where does {subject} live?", "completion": f" {city}."},
        {"subject_id": subject, "prompt": f"{subject} works at", "completion": f" {employer}."},
        {"subject_id": subject, "text": f"Note from {subject}: my PIN is {pin}."},
    ]


def drop(data: DataDir, lines: list[dict[str, str]]) -> None:
    inbox = data.device / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    staged = inbox / "records.jsonl.part"
    staged.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    staged.rename(inbox / "records.jsonl")


def learned(data: DataDir, config: DaemonConfig) -> DeviceDaemon:
    daemon = DeviceDaemon(data, config)
    drop(data, records_of("alice") + records_of("bob", "Porto", "Kestrel", "7730"))
    daemon.ingest_inbox()
    while daemon.train_burst() is not None:
        pass
    return daemon


def test_a_subject_is_edited_out_then_shredded(tmp_path: Path, config: DaemonConfig) -> None:
    data = DataDir(tmp_path)
    daemon = learned(data, config)
    try:
        holdings = daemon.holdings()
        alice = subject_hash(holdings.salt, "alice")
        assert alice in holdings.subject_hashes and len(holdings.subject_hashes) == 2
        alice_records = list(daemon.store.records("alice"))
        export_before = current_export(data.onnx_exports)

        answer = daemon.unlearn(alice, "req-1")

        assert answer.held and answer.records_deleted == 3
        assert answer.shared_edit is not None
        assert answer.shared_edit.edit_id.startswith("shared:req-1:")
        assert answer.measurements["device_goals_met"] == 1.0
        assert answer.measurements["shared_goals_met"] == 1.0
        # Gone from the store (the key is destroyed), from the announcement, from the model.
        with pytest.raises(UnknownSubjectError):
            daemon.store.delete_subject("alice")
        assert alice not in daemon.holdings().subject_hashes
        forget = forget_positions(daemon.model.tokenizer, alice_records)
        assert bool(goals_met(daemon.model.model, daemon.model.tokenizer, forget, 0.0).all())
        # A new export serves the edited model, and no older export is left on disk.
        export_after = current_export(data.onnx_exports)
        assert export_after != export_before
        assert [p for p in data.onnx_exports.iterdir() if p.is_dir()] == [export_after]
        # Asked again (an answer lost on the way): the same edit, nothing else changes.
        again = daemon.unlearn(alice, "req-1")
        assert again.held and again.shared_edit is not None
        assert torch.equal(again.shared_edit.u, answer.shared_edit.u)
        # A subject the device does not hold: nothing happens.
        assert not daemon.unlearn(subject_hash(holdings.salt, "carol"), "req-2").held
        device_edits = [e.edit_id for e in daemon.model.device_edits.edits]
        shared_edits = [e.edit_id for e in daemon.model.shared_edits.edits]
    finally:
        daemon.close()
    # A restart serves the same edits, from the saved adapters.
    with DeviceDaemon(data, config) as restarted:
        assert [e.edit_id for e in restarted.model.device_edits.edits] == device_edits
        assert [e.edit_id for e in restarted.model.shared_edits.edits] == shared_edits
        assert bool(goals_met(restarted.model.model, restarted.model.tokenizer, forget, 0.0).all())
        assert restarted.holdings().subject_hashes == (subject_hash(holdings.salt, "bob"),)


def test_the_channel_refuses_a_malformed_unlearn_query(
    tmp_path: Path, config: DaemonConfig
) -> None:
    data = DataDir(tmp_path)
    with learned(data, config) as daemon:
        server = serve(daemon, data.device)
        try:
            with DeviceClient(data.device, timeout_s=60) as client:
                with pytest.raises(grpc.RpcError) as error:
                    client.unlearn("req-1", "not-a-hash")
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                answer = client.unlearn("req-1", subject_hash(daemon.salt, "bob"))
                assert answer.held and answer.records_deleted == 3
                assert answer.shared_edit  # the edit's arrays came over the channel
                assert subject_hash(daemon.salt, "bob") not in answer.holdings.subject_hashes
        finally:
            server.stop(None)


def test_selectors_forget_only_the_chosen_records(tmp_path: Path, config: DaemonConfig) -> None:
    data = DataDir(tmp_path)
    with learned(data, config) as daemon:
        alice = subject_hash(daemon.salt, "alice")
        texts = (RecordSelector(kinds=("text",)),)
        answer = daemon.unlearn(alice, "req-1", texts)
        assert answer.held and answer.records_deleted == 1
        assert answer.shared_edit is not None
        # Alice is still held, with her pair records; her key was not shredded.
        assert alice in daemon.holdings().subject_hashes
        assert [r.kind for r in daemon.store.records("alice")] == ["pair", "pair"]
        # Asked again: nothing is left to pick, the same edit is the answer.
        again = daemon.unlearn(alice, "req-1", texts)
        assert again.held and again.records_deleted == 0
        assert again.shared_edit is not None and torch.equal(
            again.shared_edit.u, answer.shared_edit.u
        )


def test_a_subject_with_nothing_an_edit_could_remove_is_still_shredded(
    tmp_path: Path, config: DaemonConfig
) -> None:
    # Free text without digits or answers: no position for an edit to act on. The request
    # must still be carried out (the records shredded), not fail for good.
    data = DataDir(tmp_path)
    with learned(data, config) as daemon:
        drop(data, [{"subject_id": "dora", "text": "Dora wrote a note about the weather."}])
        daemon.ingest_inbox()
        while daemon.train_burst() is not None:
            pass
        edits_before = [e.edit_id for e in daemon.model.shared_edits.edits]
        answer = daemon.unlearn(subject_hash(daemon.salt, "dora"), "req-9")
        assert answer.held and answer.records_deleted == 1 and answer.shared_edit is None
        assert answer.measurements["edited"] == 0.0
        assert [e.edit_id for e in daemon.model.shared_edits.edits] == edits_before
        with pytest.raises(UnknownSubjectError):
            daemon.store.delete_subject("dora")
