"""A real fleet on loopback: flower-superlink, three flower-supernodes of different speed, a
device daemon behind each, and `lethe coordinator` running FedCompass until it stops."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

SLOWDOWNS = (1.0, 3.0, 9.0)
RECORDS_PER_DEVICE = 40
VERSIONS = 7


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fedcompass_on_a_real_fleet(built_default_model, tmp_path: Path, processes) -> None:
    from client.device_channel import DeviceClient
    from client.unlearning.measures import encoded_log_probs
    from coordinator.shared_model import SharedModel, SharedModelConfig
    from coordinator.state import StateStore
    from edge_models.corpus import build_corpus, device_stream, partition
    from edge_models.model_store import resolve_model
    from edge_models.training_data import encode_example, examples_from_records
    from shared.records import record_from_json

    models_root, _, _ = built_default_model
    corpus = build_corpus(0)
    parts = partition(corpus, len(SLOWDOWNS), seed=0)
    port = processes.free_port()
    devices = []
    held = []  # every record the fleet holds
    for index, part in enumerate(parts):
        root = tmp_path / f"device{index}"
        shutil.copytree(models_root, root / "models")
        inbox = root / "device" / "inbox"
        inbox.mkdir(parents=True)
        records = device_stream(corpus, part, seed=0)[:RECORDS_PER_DEVICE]
        held += [record_from_json(r) for r in records]
        (inbox / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        processes.start_daemon(f"daemon{index}", root)
        devices.append(root)

    def trained(root: Path) -> bool:
        with DeviceClient(root / "device", timeout_s=5) as client:
            status = client.status()
        return status.records == RECORDS_PER_DEVICE and status.pending == 0

    for root in devices:
        processes.wait_until(lambda root=root: trained(root), f"{root.name} to learn", 400)

    processes.start_superlink(port)
    for index, (root, slowdown) in enumerate(zip(devices, SLOWDOWNS, strict=True)):
        processes.start_supernode(
            f"supernode{index}", port, f"data-dir='{root}' slowdown={slowdown}"
        )
    node_of = {}
    for index in range(len(devices)):
        found = processes.wait_until(
            lambda index=index: re.search(
                r"SuperNode ID: (\d+)", processes.log(f"supernode{index}")
            ),
            f"supernode {index}",
            60,
        )
        node_of[int(found.group(1))] = index

    coordinator_dir = tmp_path / "coordinator"
    shutil.copytree(models_root, coordinator_dir / "models")
    done = subprocess.run(
        [
            str(processes.BIN / "lethe"),
            "coordinator",
            "--superlink",
            f"127.0.0.1:{port}",
            "--insecure",
            "--policy",
            "fedcompass",
            "--run-name",
            "fleet",
            "--max-versions",
            str(VERSIONS),
            "--time-limit",
            "500",
            "--data-dir",
            str(coordinator_dir),
            "--run-config",
            "q-min=4",
            "--run-config",
            "q-max=24",
            "--run-config",
            "device='cpu'",
        ],
        capture_output=True,
        text=True,
        timeout=700,
        env=processes.env,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    url = f"sqlite:///{coordinator_dir / 'coordinator' / 'coordinator.db'}"
    store = StateStore(url, coordinator_dir / "coordinator", "fleet")
    versions = store.versions()
    assert versions[-1].version >= VERSIONS
    # Arrival groups formed: some versions applied updates of several devices at once.
    assert any(len(set(v.nodes)) >= 2 for v in versions)
    # The scheduler sees the speeds, and Q_i follow them: after its first (Q_max) piece
    # of work, the fastest device is given more steps than the slowest. The work each
    # device was given is what it sent back, then what it was training when the run ended
    # (the slowest device may have finished only its first piece by then).
    nodes = store.nodes()
    speed = {node_of[n.node]: n.seconds_per_step for n in nodes}
    assert speed[0] < speed[2], speed
    steps = defaultdict(list)
    for update in store.updates():
        steps[node_of[update.node]].append(update.steps)
    for node in nodes:
        if node.steps is not None:
            steps[node_of[node.node]].append(node.steps)
    later = {index: values[1:] for index, values in steps.items() if len(values) > 1}
    assert 0 in later and 2 in later, steps
    assert np.mean(later[0]) > np.mean(later[2]), steps
    # The shared model improved at what federated training minimises: the loss of the
    # fleet's records (all devices' together) under each version's shared adapter.
    shared = SharedModel(SharedModelConfig(str(resolve_model("default", models_root)), "cpu"))
    rows = [encode_example(shared.device_model.tokenizer, e) for e in examples_from_records(held)]
    fleet_loss = {}
    for version in (0, versions[-1].version):
        shared.load(version, store.model(version), [])
        sums, counts = encoded_log_probs(
            shared.device_model.model, shared.device_model.tokenizer.pad_token_id, rows
        )
        fleet_loss[version] = -sums.sum() / counts.sum()
    assert fleet_loss[versions[-1].version] < fleet_loss[0], fleet_loss
    # Text no device holds is not what the devices train for (their records are people's
    # facts and notes, the base model already knows the domains' language); it must not be
    # damaged by it either (the coordinator's held-out loss, within 5%).
    loss = {m.version: m.value for m in store.metrics() if m.name == "heldout_loss"}
    assert loss[max(loss)] < 1.05 * loss[0], loss
    store.close()
