"""`lethe bench clientapp`: what a federated train message costs on top of the training.

A SuperNode runs the ClientApp in a new process for every message. Lethe
keeps the model warm in the device daemon, so the ClientApp process only
starts Python, imports the ClientApp (flwr, grpc; no torch), and asks the
daemon over its Unix socket. This measures, for Q local steps of the shared
adapter on the default model:
- `train_s`: the daemon's `train_shared` called in process (the work itself);
- `message_s`: a fresh process that imports `client.client_app` and runs its
  device path (`_train_on_device`) against the same daemon, timed from the
  process start to its exit, as a SuperNode would pay it;
- `cold_s`: for comparison, a fresh process that loads the model itself and
  trains (what the ClientApp would pay without the daemon; it reads the same
  records from a JSON-lines file, as the daemon holds the store's lock).
Medians of `repeats` runs, each run of the three interleaved. Flower's own
polling (about 1.5 to 4.5 s per round trip, FLOWER_NOTES.md) comes on top
whichever path is taken, and is not measured here.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lethe.bench.report import machine_facts, write_report

_MESSAGE = """
import sys, time
started = time.perf_counter()
from flwr.app import Context, RecordDict
from client.client_app import _train_on_device
from shared.fl_messages import TrainRequest
from shared.tensors import arrays_from_bytes
model = arrays_from_bytes(open(sys.argv[2], "rb").read())
context = Context(run_id=1, node_id=1, node_config={"data-dir": sys.argv[1]},
                  state=RecordDict(), run_config={})
reply = _train_on_device(TrainRequest(model, int(sys.argv[3]), 0, 1), context)
print(time.perf_counter() - started)
"""

_COLD = """
import sys, time
started = time.perf_counter()
import torch
from client.adapters import DeviceModel, SHARED, is_lora_b
from client.lora_training import LoraTrainConfig
from client.train_step import train_shared
from edge_models.loading import load_causal_lm
from edge_models.training_data import examples_from_records
from shared.records import parse_jsonl
loaded = load_causal_lm(sys.argv[2], "cpu")
device = DeviceModel(loaded.model, loaded.tokenizer, device="cpu")
examples = examples_from_records(parse_jsonl(open(sys.argv[1], "rb").read()))
start_b = {k: v for k, v in device.adapter_state(SHARED).items() if is_lora_b(k)}
train_shared(device, start_b, examples, int(sys.argv[3]), LoraTrainConfig(batch_size=16), 1)
print(time.perf_counter() - started)
"""


def run_clientapp_bench(
    json_path: Path,
    model_dir: Path,
    steps: int = 10,
    repeats: int = 5,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    from client.adapters import SHARED, is_lora_b
    from client.daemon import DaemonConfig, DeviceDaemon
    from client.device_service import serve
    from edge_models.corpus import build_corpus, device_stream, partition
    from shared.paths import DataDir
    from shared.records import parse_record
    from shared.tensors import arrays_to_bytes

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as directory:
        data = DataDir(Path(directory)).ensure()
        shutil.copytree(model_dir, data.models / "bench")
        corpus = build_corpus(0)
        stream = device_stream(corpus, partition(corpus, 4, seed=0)[0], seed=0)[:60]
        records = [parse_record(json.dumps(r).encode()) for r in stream]
        config = DaemonConfig(model=str(data.models / "bench"), device="cpu")
        with DeviceDaemon(data, config) as daemon:
            daemon.store.ingest(records)
            server = serve(daemon, data.device)
            start_b = {
                k: v.numpy() for k, v in daemon.model.adapter_state(SHARED).items() if is_lora_b(k)
            }
            records_file = Path(directory) / "records.jsonl"
            records_file.write_text("".join(json.dumps(r) + "\n" for r in stream))
            model_file = Path(directory) / "model.safetensors"
            model_file.write_bytes(arrays_to_bytes(start_b))
            train, message, cold = [], [], []
            try:
                for run in range(repeats):
                    started = time.perf_counter()
                    daemon.train_shared(start_b, steps, seed=run, model_version=0)
                    train.append(time.perf_counter() - started)
                    message.append(_timed(_MESSAGE, str(data.root), str(model_file), steps))
                    cold.append(_timed(_COLD, records_file, data.models / "bench", steps))
                    log(
                        f"run {run}: train {train[-1]:.2f} s, message {message[-1]:.2f} s, "
                        f"cold {cold[-1]:.2f} s"
                    )
            finally:
                server.stop(grace=None)
    train_s, message_s, cold_s = (statistics.median(v) for v in (train, message, cold))
    report = {
        "steps": steps,
        "train_s": round(train_s, 3),
        "message_s": round(message_s, 3),
        "overhead_s": round(message_s - train_s, 3),
        "cold_s": round(cold_s, 3),
        "cold_overhead_s": round(cold_s - train_s, 3),
        "runs": {"train_s": train, "message_s": message, "cold_s": cold},
        **machine_facts("cpu", load_before),
    }
    return write_report(json_path, report)


def _timed(script: str, *args: object) -> float:
    """Wall time of a fresh interpreter running `script`, from spawn to exit."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return time.perf_counter() - started
