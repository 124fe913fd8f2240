"""The deletion API over real gRPC on loopback: calls, scopes, bad input, watch, health,
reflection and TLS."""

from __future__ import annotations

import datetime
import json
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator.deletions.access import Scope, add_token
from coordinator.deletions.client import DeletionClient, signed_receipt
from coordinator.deletions.limits import RateLimit, RateLimiter
from coordinator.deletions.service import serve
from coordinator.deletions.status import RetryPolicy, Status
from coordinator.deletions.store import DeletionStore
from shared.auth import bearer_metadata
from shared.pki import CertFiles, init_folder
from shared.proto.lethe.v1 import deletion_pb2, deletion_pb2_grpc
from shared.receipts import generate_signing_key, sign_receipt, verify_receipt

Stub = deletion_pb2_grpc.DeletionServiceStub
pb = deletion_pb2


def submit(
    stub: Stub, token: str, subject_id: str, key: str, *selectors: pb.RecordSelector
) -> pb.SubmitDeletionResponse:
    request = pb.SubmitDeletionRequest(
        subject_id=subject_id, selectors=list(selectors), idempotency_key=key
    )
    return stub.SubmitDeletion(request, metadata=bearer_metadata(token))


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    """The status a call ended with (it must fail)."""
    with pytest.raises(grpc.RpcError) as failure:
        if isinstance(call, Iterator):
            list(call)
        else:
            call()  # type: ignore[operator]
    error = failure.value
    return error.code(), error.details()  # type: ignore[attr-defined]


def count(store: DeletionStore) -> int:
    return len(store.list(None, None, 500).records)


def test_submit_then_get_returns_the_stored_request(
    stub: Stub, tokens: dict[str, str], store: DeletionStore
) -> None:
    selector = pb.RecordSelector(kinds=["pair"], from_ts=10.0, to_ts=20.0)
    reply = submit(stub, tokens["notes"], "notes:alice", "first", selector)
    assert uuid.UUID(reply.request_id).version == 4
    request = reply.request
    assert request.status == pb.RECEIVED and request.app == "notes"
    assert request.subject_hash == store.subject_hash("notes:alice")
    assert [h.status for h in request.history] == [pb.RECEIVED]
    assert request.selectors[0].kinds == ["pair"] and request.selectors[0].to_ts == 20.0
    assert not request.HasField("receipt") and not request.HasField("next_attempt_at")

    got = stub.GetDeletion(
        pb.GetDeletionRequest(request_id=reply.request_id),
        metadata=bearer_metadata(tokens["notes"]),
    )
    assert got == request
    assert store.get(reply.request_id).subject_id == "notes:alice"


def test_the_fleet_side_of_a_request_is_shown_to_operators_only(
    stub: Stub, tokens: dict[str, str], store: DeletionStore
) -> None:
    rid = submit(stub, tokens["notes"], "notes:alice", "fleet").request_id
    store.merge_detail(rid, {"targets": {"17": {"state": "asked"}}})
    get = pb.GetDeletionRequest(request_id=rid)
    app_view = stub.GetDeletion(get, metadata=bearer_metadata(tokens["notes"]))
    ops_view = stub.GetDeletion(get, metadata=bearer_metadata(tokens["ops"]))
    assert json.loads(app_view.details_json) == {}
    assert json.loads(ops_view.details_json)["targets"] == {"17": {"state": "asked"}}
    listed = stub.ListDeletions(
        pb.ListDeletionsRequest(), metadata=bearer_metadata(tokens["notes"])
    )
    assert [json.loads(r.details_json) for r in listed.requests] == [{}]


def test_the_same_idempotency_key_returns_the_first_request_or_conflicts(
    stub: Stub, tokens: dict[str, str], store: DeletionStore
) -> None:
    first = submit(stub, tokens["notes"], "notes:alice", "once")
    again = submit(stub, tokens["notes"], "notes:alice", "once")
    assert again.request_id == first.request_id and count(store) == 1

    code, details = code_of(lambda: submit(stub, tokens["notes"], "notes:bob", "once"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency key 'once'" in details and "use a new key" in details
    assert count(store) == 1


def test_an_app_reaches_only_its_own_subjects_and_requests(
    stub: Stub, tokens: dict[str, str], store: DeletionStore
) -> None:
    notes, mail, ops = (bearer_metadata(tokens[name]) for name in ("notes", "mail", "ops"))
    code, details = code_of(lambda: submit(stub, tokens["notes"], "mail:bob", "x"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'notes'" in details
    assert count(store) == 0

    theirs = submit(stub, tokens["mail"], "mail:bob", "m1").request_id
    shared = submit(stub, tokens["mail"], "shared-7", "m2").request_id  # the `shared-?` glob
    ours = submit(stub, tokens["notes"], "notes:alice", "n1").request_id
    assert code_of(lambda: submit(stub, tokens["mail"], "shared-77", "m3"))[0] == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    by_ops = submit(stub, tokens["ops"], "anyone", "o1").request
    assert by_ops.app == "ops"

    foreign = code_of(
        lambda: stub.GetDeletion(pb.GetDeletionRequest(request_id=theirs), metadata=notes)
    )
    missing_id = str(uuid.uuid4())
    unknown = code_of(
        lambda: stub.GetDeletion(pb.GetDeletionRequest(request_id=missing_id), metadata=notes)
    )
    assert foreign[0] == unknown[0] == grpc.StatusCode.NOT_FOUND
    assert foreign[1].replace(theirs, "ID") == unknown[1].replace(missing_id, "ID")
    watch = stub.WatchDeletion(pb.WatchDeletionRequest(request_id=theirs), metadata=notes)
    assert code_of(watch)[0] == grpc.StatusCode.NOT_FOUND

    listed = stub.ListDeletions(pb.ListDeletionsRequest(), metadata=notes)
    assert [r.request_id for r in listed.requests] == [ours]
    listed = stub.ListDeletions(pb.ListDeletionsRequest(), metadata=mail)
    assert [r.request_id for r in listed.requests] == [theirs, shared]
    everything = stub.ListDeletions(pb.ListDeletionsRequest(), metadata=ops)
    assert [r.request_id for r in everything.requests] == [theirs, shared, ours, by_ops.request_id]
    got = stub.GetDeletion(pb.GetDeletionRequest(request_id=theirs), metadata=ops)
    assert got.app == "mail" and got.subject_id == "mail:bob"


@pytest.mark.parametrize(
    "metadata",
    [(), bearer_metadata("not-a-token"), (("authorization", "Basic abc"),)],
    ids=["none", "unknown", "other-scheme"],
)
def test_without_a_valid_token_every_call_is_unauthenticated(
    stub: Stub, store: DeletionStore, tokens: dict[str, str], metadata: tuple
) -> None:
    rid = store.submit("notes", "notes:alice", [], "k")[0].request_id
    calls = [
        lambda: stub.SubmitDeletion(
            pb.SubmitDeletionRequest(subject_id="notes:bob", idempotency_key="u"),
            metadata=metadata,
        ),
        lambda: stub.GetDeletion(pb.GetDeletionRequest(request_id=rid), metadata=metadata),
        lambda: stub.ListDeletions(pb.ListDeletionsRequest(), metadata=metadata),
        stub.WatchDeletion(pb.WatchDeletionRequest(request_id=rid), metadata=metadata),
    ]
    for call in calls:
        code, details = code_of(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details
    assert count(store) == 1


@pytest.mark.parametrize(
    ("subject_id", "selectors", "key", "message"),
    [
        ("", [], "k", "subject_id is empty"),
        ("notes:" + "x" * 251, [], "k", "257 characters"),
        ("notes:a\tb", [], "k", "control characters"),
        ("notes:a", [], "", "idempotency_key"),
        ("notes:a", [], "k" * 129, "idempotency_key"),
        ("notes:a", [pb.RecordSelector(kinds=["audio"])], "k", "unknown record kind"),
        ("notes:a", [pb.RecordSelector(from_ts=9.0, to_ts=3.0)], "k", "range is empty"),
    ],
)
def test_a_bad_submission_is_invalid_and_writes_nothing(
    stub: Stub,
    tokens: dict[str, str],
    store: DeletionStore,
    subject_id: str,
    selectors: list[pb.RecordSelector],
    key: str,
    message: str,
) -> None:
    code, details = code_of(lambda: submit(stub, tokens["notes"], subject_id, key, *selectors))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details
    assert count(store) == 0


def test_bad_listings_and_lookups_say_what_is_wrong(
    stub: Stub, tokens: dict[str, str], store: DeletionStore
) -> None:
    ops = bearer_metadata(tokens["ops"])
    for request, message in [
        (pb.ListDeletionsRequest(page_size=-1), "page_size must be 1 to 500"),
        (pb.ListDeletionsRequest(page_size=501), "page_size must be 1 to 500"),
        (pb.ListDeletionsRequest(page_token="bm90IGEgdG9rZW4="), "page_token"),
        (pb.ListDeletionsRequest(page_token="%%%"), "page_token"),
        (pb.ListDeletionsRequest(status=99), "unknown status 99"),
    ]:
        code, details = code_of(lambda r=request: stub.ListDeletions(r, metadata=ops))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details
    code, _ = code_of(lambda: stub.GetDeletion(pb.GetDeletionRequest(), metadata=ops))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, details = code_of(
        lambda: stub.GetDeletion(pb.GetDeletionRequest(request_id="nope"), metadata=ops)
    )
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    assert count(store) == 0


def test_listing_pages_through_every_request_once(
    stub: Stub, tokens: dict[str, str], store: DeletionStore
) -> None:
    ids = [submit(stub, tokens["notes"], f"notes:{n}", f"k{n}").request_id for n in range(7)]
    store.transition(ids[4], Status.DISPATCHED)
    notes = bearer_metadata(tokens["notes"])
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = stub.ListDeletions(
            pb.ListDeletionsRequest(page_size=3, page_token=token), metadata=notes
        )
        seen += [r.request_id for r in page.requests]
        assert all(not r.history for r in page.requests)
        pages += 1
        token = page.next_page_token
        if not token:
            break
        assert not token.isdigit()  # opaque, not a plain offset
    assert seen == ids and pages == 3
    dispatched = stub.ListDeletions(pb.ListDeletionsRequest(status=pb.DISPATCHED), metadata=notes)
    assert [r.request_id for r in dispatched.requests] == [ids[4]]


def watch_in_background(
    stub: Stub, token: str, request_id: str
) -> tuple[queue.Queue[pb.StatusChange | None], threading.Thread]:
    """Stream a watch into a queue (None once the stream has ended by itself)."""
    changes: queue.Queue[pb.StatusChange | None] = queue.Queue()

    def run() -> None:
        request = pb.WatchDeletionRequest(request_id=request_id)
        for change in stub.WatchDeletion(request, metadata=bearer_metadata(token)):
            changes.put(change)
        changes.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return changes, thread


def test_watch_streams_the_history_then_changes_written_by_another_process(
    stub: Stub, tokens: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    reply = submit(stub, tokens["notes"], "notes:alice", "watched")
    rid = reply.request_id
    changes, thread = watch_in_background(stub, tokens["notes"], rid)
    assert changes.get(timeout=5).status == pb.RECEIVED

    loop = DeletionStore(sqlite_url)  # the propagation loop: its own engine and connections
    key = generate_signing_key(tmp_path / "receipt.key")
    for status in (Status.DISPATCHED, Status.APPLIED_ON_DEVICES, Status.APPLIED_GLOBALLY):
        loop.transition(rid, status, detail={"step": status.value})
        change = changes.get(timeout=5)
        assert (change.status, json.loads(change.detail_json)) == (
            pb.Status.Value(status.value),
            {"step": status.value},
        )
    record = loop.get(rid)
    fields = {
        "request_id": rid,
        "subject_hash": record.subject_hash,
        "model_versions_before": {"shared": 7, "devices": {"d1": 2}},
        "model_versions_after": {"shared": 8, "devices": {"d1": 3}},
        "measurements": {"canary_exposure": 0.02, "forget_accuracy": 0.0},
        "timestamps": {"received": record.created_at, "verified": time.time(), "issued": 1.0},
    }
    signed = sign_receipt(fields, key)
    loop.attach_receipt(rid, signed.body, signed.signature, signed.key_id)
    loop.transition(rid, Status.VERIFIED)
    assert changes.get(timeout=5).status == pb.VERIFIED
    assert changes.get(timeout=5) is None  # the stream ended after VERIFIED
    thread.join(timeout=5)
    loop.close()

    done = stub.GetDeletion(
        pb.GetDeletionRequest(request_id=rid), metadata=bearer_metadata(tokens["notes"])
    )
    assert done.status == pb.VERIFIED and done.subject_id == ""
    assert [h.seq for h in done.history] == [1, 2, 3, 4, 5]
    receipt = signed_receipt(done)
    assert receipt == signed
    assert verify_receipt(receipt, key.public_key())["measurements"]["canary_exposure"] == 0.02


def test_watch_ends_on_a_final_failure_only(
    stub: Stub, tokens: dict[str, str], sqlite_url: str, retry: RetryPolicy
) -> None:
    rid = submit(stub, tokens["notes"], "notes:alice", "doomed").request_id
    changes, thread = watch_in_background(stub, tokens["notes"], rid)
    loop = DeletionStore(sqlite_url)
    for attempt in range(1, retry.max_attempts + 1):
        loop.transition(rid, Status.FAILED, reason=f"attempt {attempt} failed")
        if attempt < retry.max_attempts:
            loop.transition(rid, Status.RECEIVED)
    loop.close()
    seen = []
    while (change := changes.get(timeout=5)) is not None:
        seen.append((pb.Status.Name(change.status), change.attempt))
    assert seen == [
        ("RECEIVED", 1),
        ("FAILED", 1),
        ("RECEIVED", 2),
        ("FAILED", 2),
        ("RECEIVED", 3),
        ("FAILED", 3),
    ]
    thread.join(timeout=5)


def test_a_cancelled_watch_frees_its_slot_and_extra_watches_are_refused(
    store: DeletionStore, tokens: dict[str, str], tokens_file: Path, unused_address: str
) -> None:
    server = serve(store, unused_address, tokens_file, workers=2, poll_s=0.05)  # one watch slot
    try:
        with grpc.insecure_channel(unused_address) as channel:
            stub = Stub(channel)
            rid = submit(stub, tokens["notes"], "notes:alice", "slot").request_id
            request = pb.WatchDeletionRequest(request_id=rid)
            notes = bearer_metadata(tokens["notes"])
            first = stub.WatchDeletion(request, metadata=notes)
            assert next(first).status == pb.RECEIVED
            code, details = code_of(stub.WatchDeletion(request, metadata=notes))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many watches" in details
            first.cancel()
            deadline = time.monotonic() + 5
            while True:  # the server notices the cancellation within a poll
                second = stub.WatchDeletion(request, metadata=notes)
                try:
                    assert next(second).status == pb.RECEIVED
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "the cancelled watch kept its slot"
                    time.sleep(0.05)
            second.cancel()
            # Unary calls still find a thread while a watch is open.
            assert stub.GetDeletion(pb.GetDeletionRequest(request_id=rid), metadata=notes)
    finally:
        server.stop(None)


def test_health_is_open_and_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lethe.v1.DeletionService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    code, _ = code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope")))
    assert code == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service_to_token_holders_only(
    channel: grpc.Channel, tokens: dict[str, str]
) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(metadata: tuple) -> list[reflection_pb2.ServerReflectionResponse]:
        requests = iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="lethe.v1.DeletionService"
                ),
            ]
        )
        return list(reflection.ServerReflectionInfo(requests, metadata=metadata))

    services, files = ask(bearer_metadata(tokens["mail"]))
    names = {s.name for s in services.list_services_response.service}
    assert {"lethe.v1.DeletionService", "grpc.health.v1.Health"} <= names
    assert files.file_descriptor_response.file_descriptor_proto
    code, _ = code_of(lambda: ask(()))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_added_while_serving_works_and_a_loosened_file_locks_everyone_out(
    stub: Stub, tokens: dict[str, str], tokens_file: Path, store: DeletionStore
) -> None:
    fresh = add_token(tokens_file, "photos", Scope.APP, ["photos:*"])
    assert submit(stub, fresh, "photos:1", "p").request.app == "photos"
    os.chmod(tokens_file, 0o644)
    code, _ = code_of(lambda: submit(stub, tokens["notes"], "notes:x", "n"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    os.chmod(tokens_file, 0o600)
    assert submit(stub, tokens["notes"], "notes:x", "n").request.app == "notes"
    assert count(store) == 2


def test_calls_over_tls(
    store: DeletionStore,
    tokens: dict[str, str],
    tokens_file: Path,
    unused_address: str,
    tmp_path: Path,
) -> None:
    certs = CertFiles(tmp_path / "certs")
    init_folder(certs, [], [], datetime.datetime.now(datetime.UTC))
    other = CertFiles(tmp_path / "other")  # a CA the server's certificate is not from
    init_folder(other, [], [], datetime.datetime.now(datetime.UTC))
    tls = (certs.server_cert.read_bytes(), certs.server_key.read_bytes())
    server = serve(store, unused_address, tokens_file, tls=tls)
    try:
        trusted = certs.ca_cert.read_bytes()
        with DeletionClient(unused_address, tokens["notes"], root_certificates=trusted) as c:
            request = c.submit("notes:alice", "over-tls")
            assert c.get(request.request_id).status == pb.RECEIVED
        stranger = other.ca_cert.read_bytes()
        with DeletionClient(unused_address, tokens["notes"], root_certificates=stranger) as c:
            with pytest.raises(grpc.RpcError) as refused:
                c.submit("notes:bob", "wrong-ca")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(unused_address) as plain:
            code, _ = code_of(lambda: submit(Stub(plain), tokens["notes"], "notes:a", "plain"))
            assert code == grpc.StatusCode.UNAVAILABLE
        assert count(store) == 1
    finally:
        server.stop(None)


def test_each_token_has_its_own_rate_limit(
    store: DeletionStore, tokens: dict[str, str], tokens_file: Path, unused_address: str
) -> None:
    server = serve(store, unused_address, tokens_file, rate_limit=RateLimit(rate=0.5, burst=3))
    try:
        with grpc.insecure_channel(unused_address) as channel:
            stub = Stub(channel)
            for n in range(3):
                submit(stub, tokens["notes"], f"notes:{n}", f"k{n}")
            code, message = code_of(lambda: submit(stub, tokens["notes"], "notes:9", "k9"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in message
            assert count(store) == 3  # the refused call stored nothing
            submit(stub, tokens["mail"], "mail:1", "m1")  # another token is not slowed
            assert count(store) == 4
    finally:
        server.stop(None)


def test_a_token_bucket_refills_at_its_rate_and_never_beyond_its_burst() -> None:
    now = [0.0]
    limiter = RateLimiter(RateLimit(rate=2.0, burst=3), clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # buckets are per key
    now[0] = 0.5  # one call's worth refilled
    assert limiter.allow("a") and not limiter.allow("a")
    now[0] = 100.0  # a long pause refills only up to the burst
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    with pytest.raises(ValueError):
        RateLimit(rate=0.0)
