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
    from coordinator.state import StateStore
    from edge_models.corpus import build_corpus, device_stream, partition

    models_root, _, _ = built_default_model
    corpus = build_corpus(0)
    parts = partition(corpus, len(SLOWDOWNS), seed=0)
    port = processes.free_port()
    devices = []
    for index, part in enumerate(parts):
        root = tmp_path / f"device{index}"
        shutil.copytree(models_root, root / "models")
        inbox = root / "device" / "inbox"
        inbox.mkdir(parents=True)
        records = device_stream(corpus, part, seed=0)[:RECORDS_PER_DEVICE]
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
    # The shared model improved on text no device holds (held-out loss went down).
    loss = {m.version: m.value for m in store.metrics() if m.name == "heldout_loss"}
    assert loss[max(loss)] < loss[0], loss
    store.close()
