"""The daemon's side of its local channel: gRPC on a Unix socket in the device directory.

The Flower ClientApp (a new process per message) and local apps reach the
warm daemon here instead of loading the model themselves. The socket lives
in a 0700 directory and every call must carry the daemon's bearer token
(`shared.auth`), read from a 0600 file: only the device's own user gets in.
Bad requests end with INVALID_ARGUMENT and change nothing.
"""

from __future__ import annotations

import os
from concurrent import futures
from pathlib import Path

import grpc

from client.daemon import DaemonError, DeviceDaemon
from client.device_channel import (
    MAX_MESSAGE_BYTES,
    holdings_to_proto,
    message_limits,
    socket_path,
    token_path,
)
from client.inference import SamplingParams
from client.unlearning.edits import edits_from_arrays, edits_to_arrays
from shared.auth import TokenAuthInterceptor, ensure_token
from shared.holdings import is_subject_hash
from shared.proto import device_pb2, device_pb2_grpc
from shared.records import selectors_from_json
from shared.tensors import TensorPayloadError, arrays_from_bytes, arrays_to_bytes

MAX_PROMPTS = 64
MAX_NEW_TOKENS = 512
MAX_TRAIN_STEPS = 10_000


class DeviceServicer(device_pb2_grpc.DeviceServicer):
    """Answers the local channel from one daemon."""

    def __init__(self, daemon: DeviceDaemon) -> None:
        self.daemon = daemon

    def Status(  # noqa: N802 (gRPC's method names)
        self, request: device_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> device_pb2.StatusReply:
        status = self.daemon.status()
        return device_pb2.StatusReply(
            records=status.records,
            subjects=status.subjects,
            pending=status.pending,
            trained_through=status.trained_through,
            block=status.block,
            bursts=status.bursts,
            export="" if status.export is None else status.export.name,
            personal_version=status.personal_version,
            shared_version=status.shared_version,
        )

    def Generate(  # noqa: N802
        self, request: device_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> device_pb2.GenerateReply:
        if not 0 < len(request.prompts) <= MAX_PROMPTS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"send 1 to {MAX_PROMPTS} prompts")
        if not 0 <= request.max_new_tokens <= MAX_NEW_TOKENS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"max_new_tokens must be 0 to {MAX_NEW_TOKENS}"
            )
        try:
            params = SamplingParams(
                max_new_tokens=request.max_new_tokens or SamplingParams.max_new_tokens,
                temperature=request.temperature,
                top_k=request.top_k,
                top_p=request.top_p or 1.0,
                seed=request.seed if request.HasField("seed") else None,
            )
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        completions = self.daemon.generate(list(request.prompts), params)
        return device_pb2.GenerateReply(
            texts=[c.text for c in completions],
            finish_reasons=[c.finish_reason for c in completions],
        )

    def TrainShared(  # noqa: N802
        self, request: device_pb2.TrainSharedRequest, context: grpc.ServicerContext
    ) -> device_pb2.TrainSharedReply:
        if not 0 < request.steps <= MAX_TRAIN_STEPS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"steps must be 1 to {MAX_TRAIN_STEPS}")
        try:
            adapter = arrays_from_bytes(request.adapter, MAX_MESSAGE_BYTES)
            ledger = (
                edits_from_arrays(arrays_from_bytes(request.ledger, MAX_MESSAGE_BYTES))
                if request.ledger
                else []
            )
            update = self.daemon.train_shared(
                adapter, request.steps, request.seed, request.model_version, ledger
            )
        except (TensorPayloadError, ValueError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except DaemonError as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return device_pb2.TrainSharedReply(
            delta=arrays_to_bytes(update.delta),
            seconds_per_step=update.seconds_per_step,
            samples=update.samples,
            tokens=update.tokens,
            loss=update.loss,
            model_version=request.model_version,
            holdings=self._holdings(),
        )

    def Unlearn(  # noqa: N802
        self, request: device_pb2.UnlearnRequest, context: grpc.ServicerContext
    ) -> device_pb2.UnlearnReply:
        if not is_subject_hash(request.subject_hash):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "subject_hash must be 64 hex digits")
        if not 0 < len(request.request_id) <= 128 or "|" in request.request_id:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "request_id must be 1 to 128 characters, no '|'"
            )
        try:
            selectors = selectors_from_json(request.selectors_json)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"selectors: {error}")
        try:
            answer = self.daemon.unlearn(request.subject_hash, request.request_id, selectors)
        except (DaemonError, ValueError) as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        edit = b"" if answer.shared_edit is None else edits_to_arrays([answer.shared_edit])
        return device_pb2.UnlearnReply(
            held=answer.held,
            shared_edit=arrays_to_bytes(edit) if edit else b"",
            measurements=answer.measurements,
            personal_version_before=answer.personal_version_before,
            personal_version_after=answer.personal_version_after,
            shared_version=answer.shared_version,
            records_deleted=answer.records_deleted,
            holdings=self._holdings(),
        )

    def Announce(  # noqa: N802
        self, request: device_pb2.AnnounceRequest, context: grpc.ServicerContext
    ) -> device_pb2.Holdings:
        return self._holdings()

    def _holdings(self) -> device_pb2.Holdings:
        return holdings_to_proto(self.daemon.holdings())


def serve(daemon: DeviceDaemon, device_dir: Path, workers: int = 4) -> grpc.Server:
    """Start the local channel for `daemon`; the caller stops the returned server."""
    run_dir = socket_path(device_dir).parent
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if run_dir.stat().st_uid != os.getuid():  # a shared temp folder someone else made first
        raise PermissionError(f"{run_dir} belongs to another user; remove it")
    os.chmod(run_dir, 0o700)
    token_path(device_dir).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = ensure_token(token_path(device_dir))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=[TokenAuthInterceptor(token)],
        options=message_limits(),
    )
    device_pb2_grpc.add_DeviceServicer_to_server(DeviceServicer(daemon), server)
    path = socket_path(device_dir)
    path.unlink(missing_ok=True)  # left by a daemon that was killed
    server.add_insecure_port(f"unix:{path}")
    server.start()
    os.chmod(path, 0o600)
    return server
