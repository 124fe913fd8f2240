"""docs/api.md's example session, played through server reflection alone: the client has
no generated code, only what the server describes (as grpcurl works)."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from shared.auth import bearer_metadata

SERVICE = "lethe.v1.DeletionService"


class WithToken(grpc.StreamStreamClientInterceptor):
    """Sends the bearer token on reflection's stream too (as `grpcurl -H` does)."""

    def __init__(self, token: str) -> None:
        self.metadata = bearer_metadata(token)

    def intercept_stream_stream(self, continuation, details, requests):  # noqa: ANN001, ANN201
        details = details._replace(metadata=[*(details.metadata or ()), *self.metadata])
        return continuation(details, requests)


def test_the_documented_session_works_from_reflection_only(
    channel: grpc.Channel, tokens: dict[str, str]
) -> None:
    # Reflection answers callers with a token only, like every call but health.
    anonymous = ProtoReflectionDescriptorDatabase(channel)
    try:
        anonymous.get_services()
        raise AssertionError("reflection answered without a token")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    database = ProtoReflectionDescriptorDatabase(
        grpc.intercept_channel(channel, WithToken(tokens["notes"]))
    )
    assert SERVICE in database.get_services()
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName(SERVICE)

    def call(method: str, body: dict, stream: bool = False) -> list[dict]:
        described = service.FindMethodByName(method)
        request_type = message_factory.GetMessageClass(described.input_type)
        reply_type = message_factory.GetMessageClass(described.output_type)
        path = f"/{SERVICE}/{method}"
        kind = channel.unary_stream if stream else channel.unary_unary
        invoke = kind(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply_type.FromString,
        )
        request = json_format.ParseDict(body, request_type())
        replies = invoke(request, metadata=bearer_metadata(tokens["notes"]))
        return [json_format.MessageToDict(r) for r in (replies if stream else [replies])]

    [submitted] = call(
        "SubmitDeletion", {"subject_id": "notes:alice", "idempotency_key": "alice-2026-11-22"}
    )
    request_id = submitted["requestId"]
    assert submitted["request"]["status"] == "RECEIVED"
    [got] = call("GetDeletion", {"request_id": request_id})
    assert got["requestId"] == request_id and got["history"][0]["status"] == "RECEIVED"
    [page] = call("ListDeletions", {"page_size": 10})
    assert [r["requestId"] for r in page["requests"]] == [request_id]
    selected = call(
        "SubmitDeletion",
        {
            "subject_id": "notes:alice",
            "idempotency_key": "alice-notes-since-2026",
            "selectors": [{"kinds": ["text"], "from_ts": 1767225600}],
        },
    )[0]
    assert selected["request"]["selectors"] == [{"kinds": ["text"], "fromTs": 1767225600.0}]
