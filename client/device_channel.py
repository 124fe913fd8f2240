"""The caller's side of the device daemon's local channel (`client.device_service`).

Kept free of torch and transformers: the Flower ClientApp is a new process
per message and imports this, so what it imports is paid on every message.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from shared.auth import bearer_metadata
from shared.holdings import Holdings
from shared.proto import device_pb2, device_pb2_grpc
from shared.tensors import arrays_from_bytes, arrays_to_bytes

SOCKET_NAME = "daemon.sock"
TOKEN_NAME = "daemon.token"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


MAX_SOCKET_PATH = 100  # bytes: a Unix socket's path holds 108 on Linux, 104 on macOS


def socket_path(device_dir: Path) -> Path:
    """Where the daemon listens: DEVICE_DIR/run/daemon.sock, or, when a deep data directory
    makes that path too long for a Unix socket, a short per-user folder in the system's
    temp directory, the socket named by the digest of the device directory (both sides
    compute the same name; the token beside DEVICE_DIR still guards every call)."""
    path = device_dir / "run" / SOCKET_NAME
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(device_dir.resolve())).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"lethe-{os.getuid()}" / f"{digest}.sock"


def token_path(device_dir: Path) -> Path:
    return device_dir / "run" / TOKEN_NAME


def message_limits() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


@dataclass(frozen=True)
class SharedTrainAnswer:
    """A TrainShared answer as plain data, the delta checked."""

    delta: dict[str, np.ndarray]
    seconds_per_step: float
    samples: int
    tokens: int
    loss: float
    model_version: int
    holdings: Holdings


@dataclass(frozen=True)
class UnlearnAnswer:
    """An Unlearn answer as plain data; `shared_edit` holds the edit's arrays (checked)."""

    held: bool
    shared_edit: dict[str, np.ndarray]
    measurements: dict[str, float]
    personal_version_before: int
    personal_version_after: int
    shared_version: int
    records_deleted: int
    holdings: Holdings


class DeviceClient:
    """The local channel from the caller's side (the ClientApp, `lethe client ask`)."""

    def __init__(self, device_dir: Path, timeout_s: float = 600.0) -> None:
        path = socket_path(device_dir)
        if not path.exists():
            raise ConnectionError(
                f"no device daemon is listening at {path}: start `lethe client run`"
            )
        self._metadata = bearer_metadata(token_path(device_dir).read_text(encoding="ascii").strip())
        self._channel = grpc.insecure_channel(f"unix:{path}", options=message_limits())
        self._stub = device_pb2_grpc.DeviceStub(self._channel)
        self._timeout = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def status(self) -> device_pb2.StatusReply:
        return self._stub.Status(
            device_pb2.StatusRequest(), metadata=self._metadata, timeout=self._timeout
        )

    def generate(self, prompts: list[str], max_new_tokens: int = 0) -> device_pb2.GenerateReply:
        request = device_pb2.GenerateRequest(prompts=prompts, max_new_tokens=max_new_tokens)
        return self._stub.Generate(request, metadata=self._metadata, timeout=self._timeout)

    def train_shared(
        self,
        adapter: dict[str, np.ndarray],
        steps: int,
        seed: int,
        model_version: int,
        ledger: dict[str, np.ndarray] | None = None,
    ) -> SharedTrainAnswer:
        request = device_pb2.TrainSharedRequest(
            adapter=arrays_to_bytes(adapter),
            steps=steps,
            seed=seed,
            model_version=model_version,
            ledger=arrays_to_bytes(ledger) if ledger else b"",
        )
        reply = self._stub.TrainShared(request, metadata=self._metadata, timeout=self._timeout)
        return SharedTrainAnswer(
            delta=arrays_from_bytes(reply.delta, MAX_MESSAGE_BYTES),
            seconds_per_step=reply.seconds_per_step,
            samples=reply.samples,
            tokens=reply.tokens,
            loss=reply.loss,
            model_version=reply.model_version,
            holdings=holdings_from_proto(reply.holdings),
        )

    def announce(self) -> Holdings:
        """Which subjects the device holds now (salted hashes)."""
        reply = self._stub.Announce(
            device_pb2.AnnounceRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return holdings_from_proto(reply)

    def unlearn(
        self, request_id: str, subject_hash: str, selectors_json: str = ""
    ) -> UnlearnAnswer:
        request = device_pb2.UnlearnRequest(
            request_id=request_id, subject_hash=subject_hash, selectors_json=selectors_json
        )
        reply = self._stub.Unlearn(request, metadata=self._metadata, timeout=self._timeout)
        return UnlearnAnswer(
            held=reply.held,
            shared_edit=(
                arrays_from_bytes(reply.shared_edit, MAX_MESSAGE_BYTES) if reply.shared_edit else {}
            ),
            measurements=dict(reply.measurements),
            personal_version_before=reply.personal_version_before,
            personal_version_after=reply.personal_version_after,
            shared_version=reply.shared_version,
            records_deleted=reply.records_deleted,
            holdings=holdings_from_proto(reply.holdings),
        )


def holdings_from_proto(message: device_pb2.Holdings) -> Holdings:
    return Holdings(message.salt, tuple(message.subject_hashes))


def holdings_to_proto(holdings: Holdings) -> device_pb2.Holdings:
    return device_pb2.Holdings(salt=holdings.salt, subject_hashes=list(holdings.subject_hashes))
