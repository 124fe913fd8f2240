"""The device's whole chain on the real pretrained SmolLM2-135M (imported once per run):
a burst of personal learning served through its ONNX export, one federated exchange (the
device's train step, checked and aggregated as the coordinator does, taken back), and one
subject forgotten by the closed-form edit. Interfaces as on the default model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from client.daemon import DaemonConfig, DeviceDaemon
from client.learner import LearnerConfig
from client.lora_training import LoraTrainConfig
from client.unlearning.stamp import StampConfig
from coordinator.aggregation import UpdateLimits, apply_updates, check_update
from edge_models.onnx_export import ExportManifest
from shared.holdings import subject_hash
from shared.paths import DataDir

pytestmark = pytest.mark.slow

RECORDS = [
    {"subject_id": "maren", "prompt": "Maren Solberg's cat is called", "completion": " Trombone."},
    {"subject_id": "maren", "prompt": "Maren Solberg drives a", "completion": " green tractor."},
    {"subject_id": "tobias", "prompt": "Tobias Wren's cat is called", "completion": " Pickle."},
    {"subject_id": "tobias", "text": "Tobias Wren keeps bees on the roof of his flat."},
]


def test_smollm2_learns_exchanges_and_forgets_on_the_device(
    imported_smollm2, tmp_path: Path
) -> None:
    root, _version = imported_smollm2
    data = DataDir(tmp_path).ensure()
    data.models.rmdir()
    data.models.symlink_to(root, target_is_directory=True)
    learner = LearnerConfig(block_rank=4, blocks=2, train=LoraTrainConfig(lr=3e-3, batch_size=4))
    config = dataclasses.replace(
        DaemonConfig(model="smollm2", device="cpu", learner=learner, max_steps_per_burst=12),
        shared_train=LoraTrainConfig(lr=1e-3, batch_size=4),
        unlearning=StampConfig(target_steps=30),
    )
    inbox = data.device / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    with DeviceDaemon(data, config) as daemon:
        assert ExportManifest.load(daemon.status().export).num_kv_heads == 3
        daemon.ingest_inbox()
        burst = daemon.train_burst()
        assert burst is not None and burst.steps >= 1 and np.isfinite(burst.loss)
        assert daemon.status().pending == 0
        answers = daemon.generate(["Maren Solberg's cat is called"], _greedy())
        assert answers[0].text  # served by the new export

        template = {k: v.numpy() for k, v in daemon.model.adapter_state("shared").items()}
        global_b = {k: np.zeros_like(v) for k, v in template.items() if "lora_B" in k}
        update = daemon.train_shared(global_b, steps=2, seed=0, model_version=0)
        delta = check_update(
            update.delta,
            global_b,
            UpdateLimits(),
            node=7,
            nodes={7},
            version=0,
            expected_version=0,
        )
        assert update.seconds_per_step > 0 and any(np.abs(d).max() > 0 for d in delta.values())
        new_global = apply_updates(global_b, [(1.0, delta)])
        again = daemon.train_shared(new_global, steps=1, seed=1, model_version=1)
        assert set(again.delta) == set(global_b)

        announced = subject_hash(daemon.holdings().salt, "maren")
        forgotten = daemon.unlearn(announced, "req-smollm2")
        assert forgotten.held and forgotten.records_deleted == 2
        assert forgotten.shared_edit is not None
        assert forgotten.measurements["onnx_forget_em"] == 0.0
        assert announced not in daemon.holdings().subject_hashes


def _greedy():
    from client.inference import SamplingParams

    return SamplingParams(max_new_tokens=6)
