"""The device daemon: records dropped in the inbox are learned in bursts, saved, exported and
served; a restart goes on where the last saved burst ended; the local channel answers only
callers with the token and refuses bad requests without changing anything."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.numpy import save

from client.adapters import PERSONAL, SHARED, is_lora_b
from client.daemon import DaemonConfig, DaemonError, DeviceDaemon
from client.device_channel import MAX_SOCKET_PATH, DeviceClient, socket_path, token_path
from client.device_service import serve
from client.learner import LearnerConfig
from client.serving import current_export
from shared.auth import bearer_metadata
from shared.paths import DataDir
from shared.proto import device_pb2, device_pb2_grpc
from shared.tensors import TensorPayloadError, arrays_to_bytes


@pytest.fixture
def config(tiny_daemon_config: DaemonConfig) -> DaemonConfig:
    return tiny_daemon_config


def drop(data: DataDir, name: str, subject: str, count: int) -> None:
    inbox = data.device / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "subject_id": subject,
                "prompt": f"{subject} keeps item {i} in",
                "completion": f" box {i}.",
            }
        )
        for i in range(count)
    ]
    staged = inbox / f"{name}.jsonl.part"
    staged.write_text("\n".join(lines) + "\n", encoding="utf-8")
    staged.rename(inbox / f"{name}.jsonl")


def test_dropped_records_are_learned_saved_and_served(tmp_path: Path, config: DaemonConfig) -> None:
    data = DataDir(tmp_path)
    with DeviceDaemon(data, config) as daemon:
        first_export = current_export(data.onnx_exports)
        assert daemon.train_burst() is None  # nothing stored yet
        drop(data, "a", "ann", 6)
        [result] = daemon.ingest_inbox()
        assert result.accepted and daemon.pending() == 6

        burst = daemon.train_burst()
        assert burst is not None and burst.records == 4 and burst.block == 0
        assert burst.export == current_export(data.onnx_exports) != first_export
        second = daemon.train_burst()
        assert second is not None and second.records == 2
        assert daemon.train_burst() is None and daemon.pending() == 0
        status = daemon.status()
        assert status.trained_through == second.trained_through and status.personal_version == 2
        assert daemon.generate(["ann keeps item 1 in"], daemon_params())[0].finish_reason
        learned = daemon.model.adapter_state(PERSONAL)
        assert any(v.abs().max() > 0 for k, v in learned.items() if "lora_B" in k)


def test_records_stay_pending_until_the_served_export_has_learned_them(
    tmp_path: Path, config: DaemonConfig
) -> None:
    # A caller that waits for 0 pending and then asks a question must get the new model's
    # answer: while a burst's export is still being built, its records are pending.
    pending_while_exporting: list[int] = []

    class Watched(DeviceDaemon):
        def _export(self, keep: int = 2) -> Path:
            pending_while_exporting.append(self.pending())
            return super()._export(keep)

    data = DataDir(tmp_path)
    with Watched(data, config) as daemon:
        drop(data, "a", "ann", 3)
        daemon.ingest_inbox()
        daemon.train_burst()
        assert pending_while_exporting == [0, 3] and daemon.pending() == 0


def daemon_params():
    from client.inference import SamplingParams

    return SamplingParams(max_new_tokens=4)


def test_a_restart_goes_on_from_the_last_saved_burst(tmp_path: Path, config: DaemonConfig) -> None:
    data = DataDir(tmp_path)
    drop(data, "a", "ann", 4)
    with DeviceDaemon(data, config) as daemon:
        daemon.ingest_inbox()
        burst = daemon.train_burst()
        assert burst is not None
        saved = daemon.model.adapter_state(PERSONAL)
        sketch = {k: v.clone() for k, v in daemon.learner.history.sums.items()}
    drop(data, "b", "bob", 3)
    with DeviceDaemon(data, config) as daemon:
        for key, value in daemon.model.adapter_state(PERSONAL).items():
            assert torch.equal(value, saved[key])
        for key, value in daemon.learner.history.sums.items():
            assert torch.equal(value, sketch[key])
        assert daemon.status().trained_through == burst.trained_through
        daemon.ingest_inbox()
        assert daemon.pending() == 3  # only bob's records are new
        after = daemon.train_burst()
        assert after is not None and after.records == 3
        assert after.block == 1  # ann's 4 records filled block 0


def test_when_every_block_is_used_the_daemon_consolidates(
    tmp_path: Path, config: DaemonConfig
) -> None:
    data = DataDir(tmp_path)
    with DeviceDaemon(data, config) as daemon:
        errors = []
        for index, subject in enumerate(("ann", "bob", "cyd")):
            drop(data, str(index), subject, 4)
            daemon.ingest_inbox()
            burst = daemon.train_burst()
            assert burst is not None
            errors.append(burst.consolidation_error)
        assert errors[:2] == [None, None]
        assert errors[2] is not None and 0 <= errors[2] < 1
        assert daemon.learner.block == 1 and daemon.learner.state.consolidations == 1


def test_a_saved_adapter_that_does_not_fit_stops_the_daemon_with_a_reason(
    tmp_path: Path, config: DaemonConfig
) -> None:
    data = DataDir(tmp_path)
    drop(data, "a", "ann", 4)
    with DeviceDaemon(data, config) as daemon:
        daemon.ingest_inbox()
        daemon.train_burst()
    other = LearnerConfig(block_rank=3, blocks=2, train=config.learner.train)
    bigger = DaemonConfig(model=config.model, device="cpu", learner=other)
    with pytest.raises(DaemonError, match="does not fit"):
        DeviceDaemon(data, bigger)


def test_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonError, match="lethe model build"):
        DeviceDaemon(DataDir(tmp_path), DaemonConfig(model="default", device="cpu"))


def test_the_local_channel_serves_its_owner_only(tmp_path: Path, config: DaemonConfig) -> None:
    data = DataDir(tmp_path)
    drop(data, "a", "ann", 4)
    with DeviceDaemon(data, config) as daemon:
        daemon.ingest_inbox()
        server = serve(daemon, data.device)
        try:
            with DeviceClient(data.device) as client:
                assert client.status().records == 4
                reply = client.generate(["ann keeps item 2 in"], max_new_tokens=3)
                assert len(reply.texts) == 1

                shared = {
                    k: v.numpy()
                    for k, v in daemon.model.adapter_state(SHARED).items()
                    if is_lora_b(k)
                }
                answer = client.train_shared(shared, steps=2, seed=3, model_version=7)
                assert answer.model_version == 7
                assert set(answer.delta) == set(shared)
                assert answer.samples > 0 and answer.seconds_per_step > 0
                assert any(np.abs(d).max() > 0 for d in answer.delta.values())
                assert client.status().shared_version == 1

                before = daemon.model.adapter_state(SHARED)
                poisoned = dict(shared)
                key = next(iter(poisoned))
                poisoned[key] = np.full_like(poisoned[key], np.nan)
                with pytest.raises(TensorPayloadError):  # the client never sends it
                    client.train_shared(poisoned, steps=2, seed=3, model_version=8)
                stub = device_pb2_grpc.DeviceStub(client._channel)
                metadata = bearer_metadata(token_path(data.device).read_text().strip())
                for adapter, steps in ((save(poisoned), 2), (save(shared), 0), (b"junk", 1)):
                    request = device_pb2.TrainSharedRequest(adapter=adapter, steps=steps)
                    with pytest.raises(grpc.RpcError) as refused:
                        stub.TrainShared(request, metadata=metadata, timeout=60)
                    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                for name, value in daemon.model.adapter_state(SHARED).items():
                    assert torch.equal(value, before[name])

            channel = grpc.insecure_channel(f"unix:{data.device / 'run' / 'daemon.sock'}")
            stub = device_pb2_grpc.DeviceStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Status(device_pb2.StatusRequest(), metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            request = device_pb2.TrainSharedRequest(
                adapter=arrays_to_bytes({"x": np.zeros(2, np.float32)}), steps=1
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub.TrainShared(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            channel.close()
            assert token_path(data.device).stat().st_mode & 0o077 == 0
        finally:
            server.stop(grace=None)


def test_a_deep_data_directory_still_gets_a_usable_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "device"
    path = socket_path(deep)
    assert len(str(path)) <= MAX_SOCKET_PATH and path != deep / "run" / "daemon.sock"
    assert socket_path(deep) == path  # both sides of the channel find the same one
    assert socket_path(tmp_path / "device") == tmp_path / "device" / "run" / "daemon.sock"
