"""A small client of the deletion API, for operators' commands and scripts.

It holds one channel (TLS when given the server's CA certificate) and sends
the bearer token with every call; errors come back as `grpc.RpcError` with
the server's status code and message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from coordinator.deletions import wire
from coordinator.deletions.records import RecordSelector
from shared.auth import bearer_metadata
from shared.proto.lethe.v1 import deletion_pb2, deletion_pb2_grpc
from shared.receipts import SignedReceipt, parse_body


class DeletionClient:
    """Calls `lethe.v1.DeletionService` at `address` as the app that owns `token`."""

    def __init__(self, address: str, token: str, *, root_certificates: bytes | None = None) -> None:
        if root_certificates is None:
            self.channel = grpc.insecure_channel(address)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(address, credentials)
        self.stub = deletion_pb2_grpc.DeletionServiceStub(self.channel)
        self.metadata = bearer_metadata(token)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DeletionClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def submit(
        self, subject_id: str, idempotency_key: str, selectors: Iterable[RecordSelector] = ()
    ) -> deletion_pb2.DeletionRequest:
        reply = self.stub.SubmitDeletion(
            deletion_pb2.SubmitDeletionRequest(
                subject_id=subject_id,
                selectors=[wire.selector_to_proto(s) for s in selectors],
                idempotency_key=idempotency_key,
            ),
            metadata=self.metadata,
        )
        return reply.request

    def get(self, request_id: str) -> deletion_pb2.DeletionRequest:
        request = deletion_pb2.GetDeletionRequest(request_id=request_id)
        return self.stub.GetDeletion(request, metadata=self.metadata)

    def list(
        self,
        status: int = deletion_pb2.STATUS_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
    ) -> deletion_pb2.ListDeletionsResponse:
        request = deletion_pb2.ListDeletionsRequest(
            status=status, page_size=page_size, page_token=page_token
        )
        return self.stub.ListDeletions(request, metadata=self.metadata)

    def watch(self, request_id: str) -> Iterator[deletion_pb2.StatusChange]:
        request = deletion_pb2.WatchDeletionRequest(request_id=request_id)
        yield from self.stub.WatchDeletion(request, metadata=self.metadata)


def signed_receipt(request: deletion_pb2.DeletionRequest) -> SignedReceipt | None:
    """The request's signed receipt, if the coordinator has attached one."""
    if not request.HasField("receipt"):
        return None
    receipt = request.receipt
    return SignedReceipt(body=receipt.body, signature=receipt.signature, key_id=receipt.key_id)


def as_json(message: deletion_pb2.DeletionRequest | deletion_pb2.StatusChange) -> dict[str, Any]:
    """A message as people read it: enum names, JSON fields and the receipt body as objects."""
    shown = MessageToDict(message, preserving_proto_field_name=True)
    for field in ("details_json", "detail_json"):
        if field in shown:
            shown[field.removesuffix("_json")] = json.loads(shown.pop(field))
    if isinstance(message, deletion_pb2.DeletionRequest):
        shown["history"] = [as_json(change) for change in message.history]
        receipt = signed_receipt(message)
        if receipt is not None:
            shown["receipt"] = {"body": parse_body(receipt.body), "key_id": receipt.key_id}
    return shown
