"""The deletion store on SQLite and on a real PostgreSQL: durable, idempotent submissions,
the status order, retries, listings, and two processes sharing one database."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.deletions.records import InvalidDeletion, RecordSelector
from coordinator.deletions.status import IllegalTransition, RetryPolicy, Status
from coordinator.deletions.store import (
    DeletionStore,
    IdempotencyConflict,
    UnexpectedStatus,
    UnknownRequest,
)
from shared.receipts import (
    ReceiptError,
    SignedReceipt,
    generate_signing_key,
    sign_receipt,
    verify_receipt,
)

TEXT_2024 = RecordSelector(kinds=("text",), from_ts=1_704_067_200.0, to_ts=1_735_689_600.0)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def receipt_for(
    store: DeletionStore, request_id: str, tmp_path: Path
) -> tuple[SignedReceipt, Ed25519PrivateKey]:
    key = generate_signing_key(tmp_path / f"key-{request_id}")
    record = store.get(request_id)
    fields = {
        "request_id": record.request_id,
        "subject_hash": record.subject_hash,
        "model_versions_before": {"shared": 3},
        "model_versions_after": {"shared": 4},
        "measurements": {"canary_exposure": 0.01},
        "timestamps": {"received": record.created_at, "verified": 2.0, "issued": 3.0},
    }
    return sign_receipt(fields, key), key


def test_a_submission_is_committed_and_repeating_it_changes_nothing(any_url: str) -> None:
    first = DeletionStore(any_url)
    record, created = first.submit("notes", "notes:alice", [TEXT_2024], "req-1")
    assert created and record.status is Status.RECEIVED and record.attempts == 1
    assert record.subject_id == "notes:alice" and record.selectors == (TEXT_2024,)
    first.close()

    second = DeletionStore(any_url)  # another connection, as after a restart
    assert second.get(record.request_id) == record
    again, created = second.submit("notes", "notes:alice", [TEXT_2024], "req-1")
    assert not created and again.request_id == record.request_id
    with pytest.raises(IdempotencyConflict, match="'req-1' was used for another request"):
        second.submit("notes", "notes:bob", [TEXT_2024], "req-1")
    with pytest.raises(IdempotencyConflict):
        second.submit("notes", "notes:alice", [], "req-1")
    other_app, created = second.submit("mail", "notes:alice", [TEXT_2024], "req-1")
    assert created and other_app.request_id != record.request_id
    assert other_app.subject_hash == record.subject_hash == second.subject_hash("notes:alice")
    assert second.subject_hash("notes:bob") != record.subject_hash
    assert len(second.list(None, None, 10).records) == 2
    assert [c.status for c in second.events(record.request_id)] == [Status.RECEIVED]
    second.close()


@pytest.mark.parametrize(
    ("subject_id", "selectors", "key", "message"),
    [
        ("", [], "k", "subject_id is empty"),
        ("   ", [], "k", "subject_id is empty"),
        ("n" * 257, [], "k", "257 characters"),
        ("notes:a\nb", [], "k", "control characters"),
        ("notes:a\x00", [], "k", "control characters"),
        ("notes:a", [], "", "idempotency_key must have 1 to 128"),
        ("notes:a", [], "k" * 129, "idempotency_key must have 1 to 128"),
        ("notes:a", [], "clé", "printable ASCII"),
        ("notes:a", [{"kinds": ("image",)}], "k", "unknown record kind"),
        ("notes:a", [{"kinds": ("text", "text")}], "k", "repeated"),
        ("notes:a", [{"from_ts": 5.0, "to_ts": 5.0}], "k", "range is empty"),
        ("notes:a", [{"from_ts": float("nan")}], "k", "finite"),
        ("notes:a", [{}] * 33, "k", "over the limit of 32"),
    ],
)
def test_a_bad_submission_is_refused_and_stores_nothing(
    store: DeletionStore, subject_id: str, selectors: list[dict], key: str, message: str
) -> None:
    with pytest.raises(InvalidDeletion, match=message):
        store.submit("notes", subject_id, [RecordSelector(**s) for s in selectors], key)
    assert store.list(None, None, 10).records == ()


def test_a_request_walks_to_verified_and_then_forgets_the_subject_id(
    any_url: str, tmp_path: Path
) -> None:
    store = DeletionStore(any_url)
    record, _ = store.submit("notes", "notes:alice", [], "walk")
    rid = record.request_id
    store.transition(rid, Status.DISPATCHED, detail={"devices": ["d1", "d2"]})
    store.merge_detail(rid, {"devices": ["d1", "d2"], "model_versions": {"before": 3}})
    store.transition(rid, Status.APPLIED_ON_DEVICES, expect={Status.DISPATCHED})
    store.merge_detail(rid, {"model_versions": {"before": 3, "after": 4}})
    store.transition(rid, Status.APPLIED_GLOBALLY)
    signed, key = receipt_for(store, rid, tmp_path)
    store.attach_receipt(rid, signed.body, signed.signature, signed.key_id)
    done = store.transition(rid, Status.VERIFIED, detail={"exposure": 0.01})

    assert done.status is Status.VERIFIED and done.final and done.subject_id is None
    assert done.subject_hash == record.subject_hash
    assert done.details == {"devices": ["d1", "d2"], "model_versions": {"before": 3, "after": 4}}
    assert done.receipt == signed
    assert verify_receipt(done.receipt, key.public_key())["request_id"] == rid
    history = store.events(rid)
    assert [c.seq for c in history] == [1, 2, 3, 4, 5]
    assert [c.status for c in history] == [
        Status.RECEIVED,
        Status.DISPATCHED,
        Status.APPLIED_ON_DEVICES,
        Status.APPLIED_GLOBALLY,
        Status.VERIFIED,
    ]
    assert history[1].detail == {"devices": ["d1", "d2"]} and history[4].detail["exposure"] == 0.01
    assert [c.seq for c in store.events(rid, after_seq=3)] == [4, 5]
    assert store.due(done.updated_at + 1e6) == ()
    store.close()


def test_an_illegal_move_raises_and_changes_nothing(any_url: str, tmp_path: Path) -> None:
    store = DeletionStore(any_url)
    record, _ = store.submit("notes", "notes:alice", [], "illegal")
    rid = record.request_id
    with pytest.raises(IllegalTransition, match="may go to DISPATCHED or FAILED, not APPLIED"):
        store.transition(rid, Status.APPLIED_GLOBALLY)
    with pytest.raises(IllegalTransition, match="FAILED with a reason"):
        store.transition(rid, Status.FAILED)
    with pytest.raises(UnexpectedStatus, match="is RECEIVED, not one of"):
        store.transition(rid, Status.DISPATCHED, expect={Status.APPLIED_ON_DEVICES})
    with pytest.raises(InvalidDeletion, match="not a JSON object"):
        store.transition(rid, Status.DISPATCHED, detail={"when": object()})
    with pytest.raises(IllegalTransition, match="APPLIED_GLOBALLY request, not a RECEIVED one"):
        signed, _key = receipt_for(store, rid, tmp_path)
        store.attach_receipt(rid, signed.body, signed.signature, signed.key_id)
    with pytest.raises(UnknownRequest):
        store.transition("no-such-request", Status.DISPATCHED)
    assert store.get(rid) == record
    assert len(store.events(rid)) == 1

    for status in (Status.DISPATCHED, Status.APPLIED_ON_DEVICES, Status.APPLIED_GLOBALLY):
        store.transition(rid, status)
    before = store.get(rid)
    with pytest.raises(IllegalTransition, match="attach the signed receipt"):
        store.transition(rid, Status.VERIFIED)
    other, _ = store.submit("notes", "notes:bob", [], "other")
    foreign, _key = receipt_for(store, other.request_id, tmp_path)
    with pytest.raises(InvalidDeletion, match="names another request"):
        store.attach_receipt(rid, foreign.body, foreign.signature, foreign.key_id)
    with pytest.raises(ReceiptError):
        store.attach_receipt(rid, b'{"not": "a receipt"}', b"sig", "k")
    assert store.get(rid) == before and len(store.events(rid)) == 4
    store.close()


def test_failures_are_retried_after_growing_pauses_until_final(any_url: str) -> None:
    clock = Clock()
    store = DeletionStore(
        any_url, retry=RetryPolicy(max_attempts=3, base_s=10, cap_s=15), clock=clock
    )
    record, _ = store.submit("notes", "notes:alice", [], "retry")
    rid = record.request_id
    assert [r.request_id for r in store.due()] == [rid]
    store.transition(rid, Status.DISPATCHED)
    failed = store.transition(rid, Status.FAILED, reason="device d1 unreachable")
    assert failed.reason == "device d1 unreachable" and not failed.final
    assert failed.subject_id == "notes:alice"  # the retry still needs it
    assert store.due(clock.now + 1e6) == ()  # a failed request waits for its retry

    retried = store.transition(rid, Status.RECEIVED)
    assert retried.attempts == 2 and retried.next_attempt_at == clock.now + 10
    assert retried.reason is None
    assert store.due(clock.now + 9.9) == ()
    assert [r.request_id for r in store.due(clock.now + 10)] == [rid]

    clock.now += 10
    store.transition(rid, Status.FAILED, reason="again")
    third = store.transition(rid, Status.RECEIVED)
    assert third.attempts == 3 and third.next_attempt_at == clock.now + 15  # 20 s, capped
    clock.now += 15
    final = store.transition(rid, Status.FAILED, reason="for good")
    assert final.final and final.reason == "for good"
    assert final.subject_id is None and final.subject_hash == record.subject_hash
    with pytest.raises(IllegalTransition, match="failed for good after 3 of 3"):
        store.transition(rid, Status.RECEIVED)
    assert store.get(rid) == final
    history = store.events(rid)
    assert [(c.status, c.attempt) for c in history] == [
        (Status.RECEIVED, 1),
        (Status.DISPATCHED, 1),
        (Status.FAILED, 1),
        (Status.RECEIVED, 2),
        (Status.FAILED, 2),
        (Status.RECEIVED, 3),
        (Status.FAILED, 3),
    ]
    assert history[4].reason == "again"
    store.close()


def test_listings_page_in_a_stable_order_by_app_and_status(any_url: str) -> None:
    store = DeletionStore(any_url)
    ids = [store.submit("notes", f"notes:{n}", [], f"k{n}")[0].request_id for n in range(7)]
    store.submit("mail", "mail:x", [], "k0")
    store.transition(ids[2], Status.DISPATCHED)

    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = store.list("notes", None, 3, after)
        seen += [r.request_id for r in page.records]
        pages += 1
        if pages == 1:  # a request arriving meanwhile comes after, without repeats
            ids.append(store.submit("notes", "notes:late", [], "late")[0].request_id)
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == ids and pages == 3
    assert len(store.list(None, None, 500).records) == 9
    dispatched = store.list("notes", Status.DISPATCHED, 10)
    assert [r.request_id for r in dispatched.records] == [ids[2]] and dispatched.next_after is None
    for size in (0, 501):
        with pytest.raises(InvalidDeletion, match="page_size must be 1 to 500"):
            store.list(None, None, size)
    store.close()


def race(stores: list[DeletionStore], request_id: str, target: Status, at: Status) -> list[str]:
    """Both stores try the same move at once; what each of them got."""
    outcomes: list[str] = []
    start = threading.Barrier(len(stores))

    def move(store: DeletionStore) -> None:
        start.wait()
        try:
            store.transition(request_id, target, reason="race", expect={at})
            outcomes.append("moved")
        except IllegalTransition:
            outcomes.append("refused")

    threads = [threading.Thread(target=move, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(outcomes)


def test_two_processes_never_both_make_the_same_move(any_url: str) -> None:
    stores = [DeletionStore(any_url), DeletionStore(any_url)]
    for n in range(3):
        rid = stores[0].submit("notes", "notes:alice", [], f"race-{n}")[0].request_id
        assert race(stores, rid, Status.DISPATCHED, Status.RECEIVED) == ["moved", "refused"]
        assert race(stores, rid, Status.FAILED, Status.DISPATCHED) == ["moved", "refused"]
        history = stores[1].events(rid)
        assert [(c.seq, c.status) for c in history] == [
            (1, Status.RECEIVED),
            (2, Status.DISPATCHED),
            (3, Status.FAILED),
        ]

    def annotate(store: DeletionStore, prefix: str) -> None:
        for n in range(10):
            store.merge_detail(rid, {f"{prefix}{n}": n})

    writers = [
        threading.Thread(target=annotate, args=(s, p)) for s, p in zip(stores, "ab", strict=True)
    ]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    assert len(stores[0].get(rid).details) == 20  # no update lost
    for store in stores:
        store.close()
