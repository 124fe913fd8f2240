"""Forgetting a person end to end, with every part real and started here on loopback.

Three device daemons behind three flower-supernodes, a flower-superlink, `lethe coordinator`
running FedCompass, and `lethe api serve`. A separate process (`lethe api submit`, a client
generated from the protos) asks to forget one subject and another follows the request until
it is VERIFIED. Then: the device's ONNX export and the shared model no longer complete the
subject's facts or canary, the device's store cannot open the subject, and the signed receipt
verifies against the coordinator's public key.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from edge_models.corpus import Subject, build_corpus, device_stream, fact_pairs, partition
from edge_models.evaluation import normalise_answer

OTHER_RECORDS = 24  # records of other subjects on each device
TARGET_DEVICE_OTHERS = 8  # on the device that holds the subject: few, so it learns them well


def inbox_lines(subject: Subject | None, others: list[dict]) -> str:
    lines = list(others)
    if subject is not None:
        lines = [
            {"subject_id": subject.subject_id, "prompt": pair.prompt, "completion": pair.completion}
            for _, pair in fact_pairs((subject,))
        ]
        lines += [{"subject_id": subject.subject_id, "text": m.text} for m in subject.messages]
        lines += others
    return "".join(json.dumps(line) + "\n" for line in lines)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_deletion_request_is_carried_out_and_verified(
    built_default_model, tmp_path: Path, processes
) -> None:
    from client.device_channel import DeviceClient
    from client.record_store import RecordStore, UnknownSubjectError
    from coordinator.shared_model import SharedModel, SharedModelConfig
    from coordinator.state import StateStore
    from edge_models.evaluation import greedy_answers
    from edge_models.model_store import resolve_model
    from shared.paths import DataDir

    models_root, _, _ = built_default_model
    bin_dir = processes.BIN
    corpus = build_corpus(0)
    parts = partition(corpus, 3, seed=0)
    target = next(
        corpus.subject(s) for s in parts[0].subject_ids if corpus.subject(s).canary is not None
    )
    assert target.canary is not None
    devices = []
    for index, part in enumerate(parts):
        root = tmp_path / f"device{index}"
        shutil.copytree(models_root, root / "models")
        inbox = root / "device" / "inbox"
        inbox.mkdir(parents=True)
        others = [
            r for r in device_stream(corpus, part, seed=0) if r["subject_id"] != target.subject_id
        ][: OTHER_RECORDS if index else TARGET_DEVICE_OTHERS]
        (inbox / "records.jsonl").write_text(
            inbox_lines(target if index == 0 else None, others), encoding="utf-8"
        )
        # Many passes: the device must know the subject well before it is asked to forget.
        burst = ("--epochs-per-burst", "400", "--max-steps-per-burst", "800")
        processes.start_daemon(f"daemon{index}", root, *burst)
        devices.append(root)

    def trained(root: Path) -> bool:
        with DeviceClient(root / "device", timeout_s=5) as client:
            status = client.status()
        return status.records > 0 and status.pending == 0

    for root in devices:
        processes.wait_until(lambda root=root: trained(root), f"{root.name} to learn", 400)

    facts = [(pair.prompt, fact.answer) for fact, pair in fact_pairs((target,))]
    prompts = [p for p, _ in facts] + [target.canary.prefix]

    def served_answers() -> list[str]:
        with DeviceClient(devices[0] / "device", timeout_s=120) as client:
            return list(client.generate(prompts, max_new_tokens=12).texts)

    def known(answers: list[str]) -> tuple[int, bool]:
        hits = sum(
            normalise_answer(a) == normalise_answer(b)
            for a, (_, b) in zip(answers, facts, strict=False)
        )
        return hits, target.canary.secret in answers[-1]

    answers_before = served_answers()
    facts_before, _canary_before = known(answers_before)
    assert facts_before > 0, f"the device must know the subject first: {answers_before}"

    port = processes.free_port()
    processes.start_superlink(port)
    for index, root in enumerate(devices):
        processes.start_supernode(f"supernode{index}", port, f"data-dir='{root}'")
    coordinator_dir = tmp_path / "coordinator"
    shutil.copytree(models_root, coordinator_dir / "models")
    processes.start(
        "coordinator",
        str(bin_dir / "lethe"),
        "coordinator",
        "--superlink",
        f"127.0.0.1:{port}",
        "--insecure",
        "--policy",
        "fedcompass",
        "--run-name",
        "forget",
        "--time-limit",
        "600",
        "--data-dir",
        str(coordinator_dir),
        "--run-config",
        "q-min=4",
        "--run-config",
        "q-max=12",
        "--run-config",
        "device='cpu'",
    )
    added = processes.run(
        str(bin_dir / "lethe"),
        "api",
        "token",
        "add",
        "--data-dir",
        str(coordinator_dir),
        "--app",
        "notes",
        "--scope",
        "app",
        "--subjects",
        "p*",
    )
    assert added.returncode == 0, added.stderr
    token = re.search(r"[A-Za-z0-9_\-]{40,}", added.stdout).group(0)
    api_port = processes.free_port()
    address = f"127.0.0.1:{api_port}"
    processes.start(
        "api",
        str(bin_dir / "lethe"),
        "api",
        "serve",
        "--data-dir",
        str(coordinator_dir),
        "--address",
        address,
    )
    client_args = ("--address", address, "--token", token)

    def submitted() -> dict | None:
        done = processes.run(
            str(bin_dir / "lethe"),
            "api",
            "submit",
            target.subject_id,
            "--idempotency-key",
            "e2e-1",
            *client_args,
        )
        return json.loads(done.stdout) if done.returncode == 0 else None

    request = processes.wait_until(submitted, "the API to take the request", 60)
    request_id = request["request_id"]
    watched = processes.run(
        str(bin_dir / "lethe"), "api", "watch", request_id, *client_args, timeout=600
    )
    assert watched.returncode == 0, watched.stdout[-3000:] + watched.stderr[-3000:]
    assert "VERIFIED" in watched.stdout

    receipt = tmp_path / "receipt.json"
    got = processes.run(
        str(bin_dir / "lethe"),
        "api",
        "get",
        request_id,
        "--receipt-out",
        str(receipt),
        *client_args,
    )
    assert got.returncode == 0, got.stderr
    verified = processes.run(
        str(bin_dir / "lethe"),
        "receipt",
        "verify",
        str(receipt),
        "--public-key",
        str(coordinator_dir / "coordinator" / "receipt-signing.key.pub"),
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    body = json.loads(receipt.read_text())["receipt"]
    assert body["request_id"] == request_id and body["measurements"]["devices"] == 1.0

    # The device's ONNX export answers none of the subject's facts and not the canary.
    # At the moment it forgot, the device measured exact match 0 in its model, in the shared
    # model and in its new ONNX export (the receipt carries the worst of each).
    for name in ("device_forget_em", "shared_forget_em", "onnx_forget_em"):
        assert body["measurements"][f"{name}.max"] == 0.0, body["measurements"]
    # Later rounds have run since. The device's ONNX export does not complete the canary, and
    # answers fewer facts than before: some come back as the weights under the edits drift
    # (relapse, measured by `lethe bench unlearning`; see the closing note of issue 5).
    answers_after = served_answers()
    facts_after, canary_after = known(answers_after)
    assert not canary_after, answers_after
    assert facts_after < facts_before, (answers_before, answers_after)

    # The shared model with the edit ledger does not either.
    state = StateStore(
        f"sqlite:///{coordinator_dir / 'coordinator' / 'coordinator.db'}",
        coordinator_dir / "coordinator",
        "forget",
    )
    ledger = state.ledger()
    assert len(ledger) == 1 and ledger[0].edit_id.startswith(f"shared:{request_id}:")
    latest = state.versions()[-1]
    shared = SharedModel(
        SharedModelConfig(str(resolve_model("default", coordinator_dir / "models")), "cpu")
    )
    shared.load(latest.version, state.model(latest.version), ledger)
    state.close()
    model, tokenizer = shared.device_model.model, shared.device_model.tokenizer
    shared_facts, shared_canary = known(greedy_answers(model, tokenizer, prompts))
    assert shared_facts == 0 and not shared_canary

    # The device's store no longer holds the subject, and cannot open it.
    daemon = processes.running[0]
    daemon.terminate()
    daemon.wait(timeout=60)
    data = DataDir(devices[0])
    with RecordStore.open(data.record_db, data.master_key) as store:
        assert target.subject_id not in store.subject_ids()
        assert store.count() == TARGET_DEVICE_OTHERS
        with pytest.raises(UnknownSubjectError):
            store.delete_subject(target.subject_id)
