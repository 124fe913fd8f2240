"""Hostile input against the deletion API over real gRPC: fuzzed fields, oversized
messages, unknown ids, bad credentials and floods.

Whatever a caller sends, the server must end the call with the status the API
documents (never UNKNOWN or INTERNAL: those mean a handler crashed), change
nothing when it refuses, and keep answering. The oracles here are written from
docs/api.md and deletion.proto, not from the server's code, so a check the
server forgets (or a crash in the store below it) fails a test.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import math
import re
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import Session, col, select

from coordinator.deletions import wire
from coordinator.deletions.access import TOKEN_ID_CHARS, revoke_token, token_digest
from coordinator.deletions.limits import RateLimit
from coordinator.deletions.records import (
    MAX_KEY_CHARS,
    MAX_SELECTORS,
    MAX_SUBJECT_CHARS,
    DeletionRecord,
    StatusChange,
)
from coordinator.deletions.service import MAX_REQUEST_BYTES, serve
from coordinator.deletions.status import RetryPolicy, Status
from coordinator.deletions.store import DeletionStore
from coordinator.deletions.tables import DeletionRow
from shared.auth import bearer_metadata
from shared.proto.lethe.v1 import deletion_pb2, deletion_pb2_grpc

Stub = deletion_pb2_grpc.DeletionServiceStub
pb = deletion_pb2
Code = grpc.StatusCode
T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

# What the documents promise (api.md, deletion.proto); the constants must agree.
SUBJECT_MAX = 256
KEY_MAX = 128
PAGE_MAX = 500
DEFAULT_PAGE = 50
KINDS = frozenset({"text", "pair"})
CRASHES = frozenset({Code.UNKNOWN, Code.INTERNAL})
# The `tokens` fixture's grants (tests/deletions/conftest.py); None: an operator.
PATTERNS: dict[str, tuple[str, ...] | None] = {
    "notes": ("notes:*",),
    "mail": ("mail:*", "shared-?"),
    "ops": None,
}
CALL_TIMEOUT_S = 10.0
# Fuzzing makes hundreds of calls from one token; the limiter has its own tests below.
UNLIMITED = RateLimit(rate=1e9, burst=10**9)

FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,  # no replays of old failures: every run draws afresh (and prints its failure)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_the_documented_limits_are_the_enforced_ones() -> None:
    """The oracles below use the documented numbers; they must be the server's."""
    assert (MAX_SUBJECT_CHARS, MAX_KEY_CHARS) == (SUBJECT_MAX, KEY_MAX)


# -- the server and what to look at ---------------------------------------------------------


@dataclass
class Api:
    """A running server, a channel to it, its store, and what the fuzzers stored so far."""

    stub: Stub
    channel: grpc.Channel
    store: DeletionStore
    tokens: dict[str, str]
    # (app, idempotency key) -> (body as sent, request id) of every accepted submission
    accepted: dict[tuple[str, str], tuple[tuple[Any, ...], str]] = field(default_factory=dict)

    def md(self, who: str) -> Metadata:
        return bearer_metadata(self.tokens[who])


def start(
    store: DeletionStore, tokens_file: Path, address: str, rate_limit: RateLimit
) -> grpc.Server:
    return serve(store, address, tokens_file, workers=8, poll_s=0.05, rate_limit=rate_limit)


@pytest.fixture
def api(
    store: DeletionStore, tokens: dict[str, str], tokens_file: Path, unused_address: str
) -> Iterator[Api]:
    """One server for all the examples of a test (starting one per example would be slow)."""
    server = start(store, tokens_file, unused_address, UNLIMITED)
    try:
        with grpc.insecure_channel(unused_address) as channel:
            yield Api(Stub(channel), channel, store, tokens)
    finally:
        server.stop(None)


@pytest.fixture
def seeded(api: Api, retry: RetryPolicy) -> dict[str, list[DeletionRecord]]:
    """Two requests per app: one still open, one FAILED for good (a watch of it ends)."""
    made: dict[str, list[DeletionRecord]] = {}
    for app in PATTERNS:
        subject = f"{app}:seed"
        open_one = api.store.submit(app, subject, [], f"{app}-open")[0]
        done = api.store.submit(app, subject + "-done", [], f"{app}-done")[0]
        for attempt in range(1, retry.max_attempts + 1):
            api.store.transition(done.request_id, Status.FAILED, reason=f"try {attempt}")
            if attempt < retry.max_attempts:
                api.store.transition(done.request_id, Status.RECEIVED)
        made[app] = [api.store.get(open_one.request_id), api.store.get(done.request_id)]
    return made


Snapshot = tuple[tuple[DeletionRecord, ...], tuple[tuple[StatusChange, ...], ...]]


def snapshot(store: DeletionStore) -> Snapshot:
    """Every stored request and its history: what a refused call must leave alone."""
    records = store.list(None, None, 500).records
    return records, tuple(store.events(r.request_id) for r in records)


def outcome(call: Callable[[], T]) -> tuple[T | None, grpc.RpcError | None]:
    """The call's reply, or the error it ended with."""
    try:
        return call(), None
    except grpc.RpcError as error:
        return None, error


def refused_with(error: grpc.RpcError | None, expected: Code, what: object) -> str:
    """Assert the call ended with `expected` (and did not crash); its details."""
    assert error is not None, f"{what!r} succeeded; expected {expected}"
    code, details = error.code(), error.details() or ""  # type: ignore[attr-defined]
    assert code not in CRASHES, f"the server crashed on {what!r}: {code} {details[:300]}"
    assert code == expected, f"{what!r}: got {code} ({details[:300]}), expected {expected}"
    return details


def assert_serving(api: Api) -> None:
    """The server still answers health checks and authenticated calls."""
    health = health_pb2_grpc.HealthStub(api.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    api.stub.ListDeletions(
        pb.ListDeletionsRequest(page_size=1), metadata=api.md("ops"), timeout=CALL_TIMEOUT_S
    )


# -- the documented rules, as oracles ----------------------------------------------------------


def subject_problem(subject_id: str) -> bool:
    """1 to 256 characters, not blank, no control characters."""
    return (
        not subject_id.strip()
        or len(subject_id) > SUBJECT_MAX
        or any(unicodedata.category(c) == "Cc" for c in subject_id)
    )


def key_problem(key: str) -> bool:
    """1 to 128 printable ASCII characters."""
    return not 0 < len(key) <= KEY_MAX or not all(0x20 <= ord(c) <= 0x7E for c in key)


def selector_problem(selector: pb.RecordSelector) -> bool:
    """Known, distinct kinds; finite times; a non-empty [from_ts, to_ts)."""
    kinds = list(selector.kinds)
    times = [getattr(selector, name) for name in ("from_ts", "to_ts") if selector.HasField(name)]
    return (
        not set(kinds) <= KINDS
        or len(set(kinds)) != len(kinds)
        or not all(math.isfinite(t) for t in times)
        or (
            selector.HasField("from_ts")
            and selector.HasField("to_ts")
            and selector.from_ts >= selector.to_ts
        )
    )


def body_of(request: pb.SubmitDeletionRequest) -> tuple[Any, ...]:
    """What makes two submissions 'the same body' (times as spelled: -0.0 is not 0.0)."""
    return (
        request.subject_id,
        tuple(
            (
                tuple(s.kinds),
                repr(s.from_ts) if s.HasField("from_ts") else None,
                repr(s.to_ts) if s.HasField("to_ts") else None,
            )
            for s in request.selectors
        ),
    )


def may_submit(who: str, subject_id: str) -> bool:
    patterns = PATTERNS[who]
    return patterns is None or any(fnmatch.fnmatchcase(subject_id, p) for p in patterns)


def expected_submission(
    api: Api, who: str, request: pb.SubmitDeletionRequest
) -> tuple[Code | None, set[str]]:
    """The code the call must end with (None: it succeeds), and for INVALID_ARGUMENT the
    words of which at least one must name a bad field in the message."""
    if request.ByteSize() > MAX_REQUEST_BYTES:
        return Code.RESOURCE_EXHAUSTED, set()
    fields: set[str] = set()
    if subject_problem(request.subject_id):
        fields.add("subject_id")
    if key_problem(request.idempotency_key):
        fields.add("idempotency_key")
    if len(request.selectors) > MAX_SELECTORS or any(map(selector_problem, request.selectors)):
        fields |= {"selector", "kind"}
    if fields:
        return Code.INVALID_ARGUMENT, fields
    if not may_submit(who, request.subject_id):
        return Code.PERMISSION_DENIED, set()
    earlier = api.accepted.get((who, request.idempotency_key))
    if earlier is not None and earlier[0] != body_of(request):
        return Code.ALREADY_EXISTS, set()
    return None, set()


def page_cursor(token: str) -> int | None | bool:
    """The cursor of a page token this server could have given out (None: the first page),
    or False for anything else. Row ids are SQLite/PostgreSQL integers: at most 2**63 - 1."""
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        return False
    found = re.fullmatch(r"lethe\.v1:after=(0|[1-9][0-9]*)", text)
    if found is None or int(found.group(1)) > 2**63 - 1:
        return False
    canonical = base64.urlsafe_b64encode(text.encode()).decode("ascii")
    return int(found.group(1)) if canonical == token else False


# -- strategies -----------------------------------------------------------------------------

# Hypothesis' text never holds lone surrogates, which protobuf cannot even send.
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
NO_CONTROLS = st.characters(blacklist_categories=("Cc", "Cs"))
PREFIXES = st.sampled_from(["notes:", "mail:", "shared-", "ops:", "", "NOTES:"])
callers = st.sampled_from(sorted(PATTERNS))
long_text = st.text(min_size=1000, max_size=4000)

subject_ids = st.one_of(
    st.text(),  # any unicode: control characters, blanks, empty
    st.builds(str.__add__, PREFIXES, st.text(max_size=12)),
    st.builds(str.__add__, PREFIXES, st.text(NO_CONTROLS, min_size=1, max_size=30)),
    st.builds(str.__add__, PREFIXES, st.text(NO_CONTROLS, min_size=245, max_size=255)),
    st.sampled_from(["", " ", "\t", "\u3000", "shared-1", "shared-12", "notes:\x00"]),
    long_text,
)
any_times = st.one_of(st.none(), st.floats())  # NaN, infinities, -0.0, negatives too
any_kinds = st.lists(
    st.one_of(st.sampled_from(sorted(KINDS)), st.text(max_size=8), long_text), max_size=3
)
good_kinds = st.sampled_from([(), ("text",), ("pair",), ("text", "pair"), ("pair", "text")])
finite = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False))


def _ordered(times: tuple[float | None, float | None]) -> tuple[float | None, float | None]:
    low, high = times
    if low is not None and high is not None and not low < high:
        return (high, low) if high < low else (low, None)
    return low, high


def _selector(kinds: Sequence[str], times: tuple[float | None, float | None]) -> Any:
    return pb.RecordSelector(kinds=list(kinds), from_ts=times[0], to_ts=times[1])


selectors = st.one_of(
    st.builds(_selector, good_kinds, st.tuples(finite, finite).map(_ordered)),
    st.builds(_selector, any_kinds, st.tuples(any_times, any_times)),
)
selector_lists = st.one_of(
    st.lists(selectors, max_size=3),
    st.lists(selectors, min_size=MAX_SELECTORS - 2, max_size=MAX_SELECTORS + 3),
)
keys = st.one_of(
    st.sampled_from(["k1", "k2", " ", "~"]),  # reused keys: replays and conflicts
    st.text(PRINTABLE, min_size=1, max_size=KEY_MAX),
    st.text(PRINTABLE, min_size=KEY_MAX - 2, max_size=KEY_MAX + 3),
    st.text(max_size=20),  # non-ASCII, control characters, empty
    st.text(min_size=200, max_size=400),
)


@dataclass(frozen=True)
class Seeded:
    """Stands for the id of a seeded request (resolved once the fixture has made it)."""

    app: str
    index: int


request_ids = st.one_of(
    st.text(),
    st.uuids().map(str),
    st.builds(Seeded, callers, st.integers(0, 1)),
    st.builds(
        lambda seeded, tail: (seeded, tail),
        st.builds(Seeded, callers, st.just(0)),
        st.sampled_from([" ", "\x00", "%", "'", "\n"]),
    ),
    long_text,
    st.builds(str.__mul__, st.sampled_from(["x", "é", "😀", "\x00"]), st.integers(2_000, 40_000)),
)


def resolve(drawn: object, seeded: dict[str, list[DeletionRecord]]) -> str:
    """The request id an example means: text as drawn, or a seeded request's id (+ junk)."""
    if isinstance(drawn, Seeded):
        return seeded[drawn.app][drawn.index].request_id
    if isinstance(drawn, tuple):
        return resolve(drawn[0], seeded) + drawn[1]
    assert isinstance(drawn, str)
    return drawn


def visible_record(api: Api, who: str, request_id: str) -> DeletionRecord | None:
    """The request `who` may see under this id (apps: their own only; operators: any)."""
    for record in snapshot(api.store)[0]:
        if record.request_id == request_id and (PATTERNS[who] is None or record.app == who):
            return record
    return None


# repr() quotes with ' or "; a long id is cut short with "..."
NOT_FOUND_SHAPE = re.compile(r"no deletion request (['\"]).*(\1|\.\.\.)", re.DOTALL)


# -- 1. every RPC's fields, fuzzed ---------------------------------------------------------------


@FUZZ
@given(who=callers, subject_id=subject_ids, chosen=selector_lists, key=keys)
def test_fuzzed_submissions_succeed_only_when_valid_and_refusals_change_nothing(
    api: Api, who: str, subject_id: str, chosen: list[pb.RecordSelector], key: str
) -> None:
    """SubmitDeletion either stores exactly one valid request (or replays the earlier one of
    the same key and body) or ends with the documented code and leaves the store alone."""
    request = pb.SubmitDeletionRequest(subject_id=subject_id, selectors=chosen, idempotency_key=key)
    expected, fields = expected_submission(api, who, request)
    before = snapshot(api.store)
    reply, error = outcome(
        lambda: api.stub.SubmitDeletion(request, metadata=api.md(who), timeout=CALL_TIMEOUT_S)
    )
    after = snapshot(api.store)
    if expected is not None:
        details = refused_with(error, expected, request)
        if fields:
            assert any(word in details for word in fields), (details, fields)
        assert after == before, "a refused submission changed the store"
    else:
        assert error is None, f"valid {request!r} refused: {error.code()} {error.details()}"
        assert reply is not None
        shown = reply.request
        assert (shown.app, shown.subject_id, shown.idempotency_key) == (who, subject_id, key)
        assert list(shown.selectors) == list(request.selectors)
        earlier = api.accepted.get((who, key))
        if earlier is None:  # new: one more row, with its first history entry
            assert after[0][:-1] == before[0] and after[1][:-1] == before[1]
            assert after[0][-1].request_id == reply.request_id
            assert after[0][-1].subject_id == subject_id
            assert [(c.seq, c.status) for c in after[1][-1]] == [(1, Status.RECEIVED)]
            api.accepted[(who, key)] = (body_of(request), reply.request_id)
        else:  # a replay: the first request again, nothing new stored
            assert reply.request_id == earlier[1]
            assert after == before
    assert_serving(api)


@FUZZ
@given(who=callers, drawn=request_ids)
def test_fuzzed_get_finds_only_the_callers_own_requests(
    api: Api, seeded: dict[str, list[DeletionRecord]], who: str, drawn: object
) -> None:
    """GetDeletion of any id: the caller's request, INVALID_ARGUMENT for none, NOT_FOUND
    for the rest (unknown or another app's, in the same words); reads write nothing."""
    request_id = resolve(drawn, seeded)
    request = pb.GetDeletionRequest(request_id=request_id)
    mine = visible_record(api, who, request_id)
    before = snapshot(api.store)
    reply, error = outcome(
        lambda: api.stub.GetDeletion(request, metadata=api.md(who), timeout=CALL_TIMEOUT_S)
    )
    if not request_id:
        refused_with(error, Code.INVALID_ARGUMENT, request_id)
    elif mine is None:
        details = refused_with(error, Code.NOT_FOUND, request_id[:200])
        assert NOT_FOUND_SHAPE.fullmatch(details), details[:300]
    else:
        assert error is None, f"{who} cannot get its own {request_id}: {error.details()}"
        assert reply is not None and reply.request_id == request_id
        assert [h.seq for h in reply.history] == list(range(1, mine.seq + 1))
    assert snapshot(api.store) == before
    assert_serving(api)


@FUZZ
@given(who=callers, drawn=request_ids)
def test_fuzzed_watch_streams_only_the_callers_own_requests(
    api: Api, seeded: dict[str, list[DeletionRecord]], who: str, drawn: object
) -> None:
    """WatchDeletion of any id: the caller's history (a final one ends the stream), else the
    same codes as GetDeletion, before any message is sent."""
    request_id = resolve(drawn, seeded)
    mine = visible_record(api, who, request_id)
    before = snapshot(api.store)
    call = api.stub.WatchDeletion(
        pb.WatchDeletionRequest(request_id=request_id),
        metadata=api.md(who),
        timeout=CALL_TIMEOUT_S,
    )
    if mine is None or mine.final:
        changes, error = outcome(lambda: list(call))
    else:  # an open request streams until it ends: take its history so far, then hang up
        changes, error = outcome(lambda: [next(call)])
        call.cancel()
    if not request_id:
        refused_with(error, Code.INVALID_ARGUMENT, request_id)
    elif mine is None:
        details = refused_with(error, Code.NOT_FOUND, request_id[:200])
        assert NOT_FOUND_SHAPE.fullmatch(details), details[:300]
    else:
        assert error is None, f"{who} cannot watch its own {request_id}: {error.details()}"
        assert changes is not None and changes[0].seq == 1
        assert {c.request_id for c in changes} == {request_id}
        if mine.final:
            assert [c.seq for c in changes] == list(range(1, mine.seq + 1))
            assert changes[-1].status == pb.FAILED
    assert snapshot(api.store) == before
    assert_serving(api)


int32 = st.integers(-(2**31), 2**31 - 1)
page_tokens = st.one_of(
    st.just(""),
    st.text(),
    st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")),
    st.integers(0, 10**19 - 1).map(wire.encode_page_token),  # well formed, any cursor
    st.integers(2**63 - 3, 10**19 - 1).map(wire.encode_page_token),  # past a row id
    st.integers(0, 12).map(wire.encode_page_token),  # cursors of real rows
    st.integers(0, 12).map(lambda n: wire.encode_page_token(n).rstrip("=")),
    st.integers(0, 12).map(lambda n: wire.encode_page_token(n) + "="),
    st.integers(-5, 5).map(lambda n: base64.b64encode(f"lethe.v1:after={n}".encode()).decode()),
    st.text(max_size=40).map(lambda t: base64.urlsafe_b64encode(t.encode()).decode()),
)


@FUZZ
@given(
    who=callers,
    page_size=st.one_of(st.integers(0, 3), st.integers(-2, PAGE_MAX + 2), int32),
    page_token=page_tokens,
    status=st.one_of(st.integers(0, 6), st.integers(-1, 8), int32),
)
def test_fuzzed_listings_page_exactly_through_the_callers_requests(
    api: Api,
    seeded: dict[str, list[DeletionRecord]],
    who: str,
    page_size: int,
    page_token: str,
    status: int,
) -> None:
    """ListDeletions: a bad size, status or token is INVALID_ARGUMENT; otherwise exactly the
    caller's requests in that status after the cursor, oldest first, one page of them."""
    request = pb.ListDeletionsRequest(page_size=page_size, page_token=page_token, status=status)
    cursor = page_cursor(page_token)
    before = snapshot(api.store)
    reply, error = outcome(
        lambda: api.stub.ListDeletions(request, metadata=api.md(who), timeout=CALL_TIMEOUT_S)
    )
    bad_status = status not in pb.Status.values()
    if not 0 <= page_size <= PAGE_MAX or bad_status or cursor is False:
        details = refused_with(error, Code.INVALID_ARGUMENT, request)
        assert any(word in details for word in ("page_size", "page_token", "status")), details
    else:
        assert error is None, f"valid {request!r} refused: {error.code()} {error.details()}"
        assert reply is not None
        with Session(api.store.engine) as session:
            rows = session.exec(select(DeletionRow).order_by(col(DeletionRow.id))).all()
        wanted = [
            row.request_id
            for row in rows
            if (PATTERNS[who] is None or row.app == who)
            and (status == pb.STATUS_UNSPECIFIED or row.status == pb.Status.Name(status))
            and (cursor is None or (row.id or 0) > cursor)
        ]
        size = page_size or DEFAULT_PAGE
        assert [r.request_id for r in reply.requests] == wanted[:size]
        assert all(not r.history for r in reply.requests)
        assert bool(reply.next_page_token) == (len(wanted) > size)
    assert snapshot(api.store) == before
    assert_serving(api)


@pytest.fixture
def any_api(
    any_url: str,
    tokens: dict[str, str],
    tokens_file: Path,
    unused_address: str,
    retry: RetryPolicy,
) -> Iterator[Api]:
    """The server over SQLite, then over PostgreSQL: each database refuses other strings."""
    with DeletionStore(any_url, retry=retry) as store:
        server = start(store, tokens_file, unused_address, UNLIMITED)
        try:
            with grpc.insecure_channel(unused_address) as channel:
                yield Api(Stub(channel), channel, store, tokens)
        finally:
            server.stop(None)


hostile_ids = st.one_of(
    st.text(),
    st.builds(str.__add__, st.uuids().map(str), st.text(max_size=3)),
    st.text().map(lambda t: t + "\x00"),  # PostgreSQL text cannot hold NUL
    long_text,
)


@settings(FUZZ, max_examples=25)
@given(who=callers, drawn=hostile_ids, rpc=st.sampled_from(["get", "watch"]))
def test_hostile_ids_are_not_found_on_every_database(
    any_api: Api, who: str, drawn: str, rpc: str
) -> None:
    """An id the database cannot even store (NUL for PostgreSQL) is as unknown as any other:
    NOT_FOUND from Get and Watch, never a driver error surfacing as UNKNOWN."""
    api = any_api
    mine = api.store.submit("notes", "notes:x", [], "x")[0].request_id  # replays after the first
    for request_id in (drawn, mine + "\x00"):
        if rpc == "get":
            request = pb.GetDeletionRequest(request_id=request_id)
            _, error = outcome(lambda r=request: api.stub.GetDeletion(r, metadata=api.md(who)))
        else:
            watch = pb.WatchDeletionRequest(request_id=request_id)
            _, error = outcome(
                lambda w=watch: list(
                    api.stub.WatchDeletion(w, metadata=api.md(who), timeout=CALL_TIMEOUT_S)
                )
            )
        expected = Code.INVALID_ARGUMENT if not request_id else Code.NOT_FOUND
        refused_with(error, expected, (rpc, request_id[:100]))
    assert_serving(api)


def test_a_well_formed_page_token_past_any_row_id_is_invalid_not_a_crash(
    api: Api, seeded: dict[str, list[DeletionRecord]]
) -> None:
    """Row ids are 64-bit: a forged token naming a larger cursor is a bad token, not an
    error from the database driver (SQLite cannot even bind such an int)."""
    for cursor, shown in [(0, 6), (2**63 - 1, 0), (2**63, None), (10**19 - 1, None)]:
        request = pb.ListDeletionsRequest(page_token=wire.encode_page_token(cursor))
        reply, error = outcome(lambda r=request: api.stub.ListDeletions(r, metadata=api.md("ops")))
        if shown is not None:
            assert error is None, (cursor, error)
            assert reply is not None and len(reply.requests) == shown
        else:
            assert "page_token" in refused_with(error, Code.INVALID_ARGUMENT, cursor)
    assert_serving(api)


# -- 2. oversized messages ---------------------------------------------------------------------

HUGE = MAX_REQUEST_BYTES + 1024


def test_a_request_over_the_size_limit_is_resource_exhausted_and_stores_nothing(
    api: Api, seeded: dict[str, list[DeletionRecord]]
) -> None:
    """gRPC itself refuses a message over MAX_REQUEST_BYTES on every RPC, before a handler
    sees it; nothing is stored and the server carries on."""
    md = api.md("notes")
    calls: dict[str, Callable[[], object]] = {
        "SubmitDeletion": lambda: api.stub.SubmitDeletion(
            pb.SubmitDeletionRequest(subject_id="notes:" + "a" * HUGE, idempotency_key="big"),
            metadata=md,
        ),
        "SubmitDeletion:selectors": lambda: api.stub.SubmitDeletion(
            pb.SubmitDeletionRequest(
                subject_id="notes:a",
                idempotency_key="many",
                selectors=[pb.RecordSelector(kinds=["text"], from_ts=1.0)] * (HUGE // 10),
            ),
            metadata=md,
        ),
        "GetDeletion": lambda: api.stub.GetDeletion(
            pb.GetDeletionRequest(request_id="x" * HUGE), metadata=md
        ),
        "ListDeletions": lambda: api.stub.ListDeletions(
            pb.ListDeletionsRequest(page_token="A" * HUGE), metadata=md
        ),
        "WatchDeletion": lambda: list(
            api.stub.WatchDeletion(pb.WatchDeletionRequest(request_id="x" * HUGE), metadata=md)
        ),
    }
    before = snapshot(api.store)
    for rpc, call in calls.items():
        _, error = outcome(call)
        refused_with(error, Code.RESOURCE_EXHAUSTED, rpc)
        assert snapshot(api.store) == before
        assert_serving(api)


def test_fields_just_over_their_documented_limits_are_invalid(api: Api) -> None:
    """The limits are exact: the longest allowed value is stored, one more is refused."""
    cases: list[tuple[str, str, int, str | None]] = [
        ("notes:" + "s" * (SUBJECT_MAX - 6), "b1", 0, None),
        ("notes:" + "😀" * (SUBJECT_MAX - 6), "b2", 0, None),  # characters, not bytes
        ("notes:" + "s" * (SUBJECT_MAX - 5), "b3", 0, "subject_id"),
        ("notes:" + "😀" * (SUBJECT_MAX - 5), "b4", 0, "subject_id"),
        ("notes:a", "k" * KEY_MAX, 0, None),
        ("notes:a", "k" * (KEY_MAX + 1), 0, "idempotency_key"),
        ("notes:a", "é", 0, "idempotency_key"),
        ("notes:a", "k\x7f", 0, "idempotency_key"),
        ("notes:b", "b5", MAX_SELECTORS, None),
        ("notes:b", "b6", MAX_SELECTORS + 1, "selectors"),
    ]
    for subject_id, key, count, expected in cases:
        selectors = [pb.RecordSelector(from_ts=float(n), to_ts=n + 0.5) for n in range(count)]
        request = pb.SubmitDeletionRequest(
            subject_id=subject_id, idempotency_key=key, selectors=selectors
        )
        case = (subject_id[:12], len(subject_id), key[:12], count)
        before = snapshot(api.store)
        reply, error = outcome(
            lambda r=request: api.stub.SubmitDeletion(r, metadata=api.md("notes"))
        )
        if expected is None:
            assert error is None and reply is not None, (case, error)
            assert len(snapshot(api.store)[0]) == len(before[0]) + 1, case
        else:
            assert expected in refused_with(error, Code.INVALID_ARGUMENT, case)
            assert snapshot(api.store) == before, case


def test_a_long_echoed_value_still_gets_its_own_code(api: Api) -> None:
    """Refusals quote what was sent (an unknown id, a bad kind); a long one must not turn the
    answer into a transport error: status details travel in an HTTP/2 header, which a
    client drops beyond its metadata limit (8 KiB soft, 16 KiB hard)."""
    value = ("é😀" * 30_000)[:50_000]  # 150 kB of UTF-8: within the request size limit
    md = api.md("notes")
    submission = pb.SubmitDeletionRequest(
        subject_id="notes:a", idempotency_key="k", selectors=[pb.RecordSelector(kinds=[value])]
    )
    calls: list[tuple[str, Callable[[], object], Code]] = [
        (
            "GetDeletion",
            lambda: api.stub.GetDeletion(pb.GetDeletionRequest(request_id=value), metadata=md),
            Code.NOT_FOUND,
        ),
        (
            "WatchDeletion",
            lambda: list(
                api.stub.WatchDeletion(pb.WatchDeletionRequest(request_id=value), metadata=md)
            ),
            Code.NOT_FOUND,
        ),
        (
            "SubmitDeletion",
            lambda: api.stub.SubmitDeletion(submission, metadata=md),
            Code.INVALID_ARGUMENT,
        ),
    ]
    for rpc, call, expected in calls:
        _, error = outcome(call)
        details = refused_with(error, expected, rpc)
        assert len(details) < 1000, rpc
    assert snapshot(api.store) == ((), ())
    assert_serving(api)


# -- 3. unknown and foreign ids ------------------------------------------------------------------


def test_unknown_and_foreign_ids_are_refused_in_the_same_words(
    api: Api, seeded: dict[str, list[DeletionRecord]]
) -> None:
    """An app must not learn that another app's request exists: Get and Watch of it answer
    exactly as for an id nobody made (code, message, trailers)."""
    md = api.md("notes")
    foreign = [r.request_id for app in ("mail", "ops") for r in seeded[app]]
    unknown = [str(uuid.uuid4()) for _ in foreign]
    shapes: dict[str, set[tuple[Code, str, tuple[str, ...]]]] = {}
    for label, ids in (("foreign", foreign), ("unknown", unknown)):
        for request_id in ids:
            for rpc in ("get", "watch"):
                if rpc == "get":
                    request = pb.GetDeletionRequest(request_id=request_id)
                    _, error = outcome(lambda r=request: api.stub.GetDeletion(r, metadata=md))
                else:
                    watch = pb.WatchDeletionRequest(request_id=request_id)
                    _, error = outcome(lambda w=watch: list(api.stub.WatchDeletion(w, metadata=md)))
                details = refused_with(error, Code.NOT_FOUND, request_id)
                assert request_id in details
                trailers = tuple(sorted(k for k, _ in error.trailing_metadata() or ()))  # type: ignore[union-attr]
                shapes.setdefault(label, set()).add(
                    (error.code(), details.replace(request_id, "ID"), trailers)  # type: ignore[union-attr]
                )
    assert shapes["foreign"] == shapes["unknown"] and len(shapes["unknown"]) == 1
    # the owner (and an operator) do see them
    for app in ("mail", "ops"):
        for record in seeded[app]:
            got = api.stub.GetDeletion(
                pb.GetDeletionRequest(request_id=record.request_id), metadata=api.md(app)
            )
            assert got.app == app


# -- 4. authentication ---------------------------------------------------------------------------


def every_rpc(api: Api, metadata: Metadata, request_id: str) -> dict[str, Callable[[], object]]:
    """One call of each RPC (a valid one, for notes' own subject and request)."""
    return {
        "submit": lambda: api.stub.SubmitDeletion(
            pb.SubmitDeletionRequest(subject_id="notes:auth", idempotency_key="auth"),
            metadata=metadata,
            timeout=CALL_TIMEOUT_S,
        ),
        "get": lambda: api.stub.GetDeletion(
            pb.GetDeletionRequest(request_id=request_id), metadata=metadata, timeout=CALL_TIMEOUT_S
        ),
        "list": lambda: api.stub.ListDeletions(
            pb.ListDeletionsRequest(), metadata=metadata, timeout=CALL_TIMEOUT_S
        ),
        "watch": lambda: list(
            api.stub.WatchDeletion(
                pb.WatchDeletionRequest(request_id=request_id),
                metadata=metadata,
                timeout=CALL_TIMEOUT_S,
            )
        ),
    }


BAD_CREDENTIALS: dict[str, Callable[[str], Metadata]] = {
    "none": lambda token: (),
    "empty": lambda token: (("authorization", ""),),
    "bare-token": lambda token: (("authorization", token),),
    "no-space": lambda token: (("authorization", "Bearer" + token),),
    "lowercase-scheme": lambda token: (("authorization", "bearer " + token),),
    "other-scheme": lambda token: (("authorization", "Basic " + token),),
    "scheme-only": lambda token: (("authorization", "Bearer "),),
    "two-spaces": lambda token: (("authorization", "Bearer  " + token),),
    "truncated": lambda token: bearer_metadata(token[:-1]),
    "extended": lambda token: bearer_metadata(token + "A"),
    "other-header": lambda token: (("x-authorization", "Bearer " + token),),
    "wrong": lambda token: bearer_metadata("not-a-token"),
    "digest-as-token": lambda token: bearer_metadata(token_digest(token)),
    "huge-7k": lambda token: bearer_metadata("A" * 7_000),  # under the 8 KiB limit
}


def test_bad_credentials_are_unauthenticated_on_every_rpc(
    api: Api, seeded: dict[str, list[DeletionRecord]]
) -> None:
    """No token, a malformed header or a wrong token: UNAUTHENTICATED, whatever the call,
    nothing stored; the server serves the right token right after."""
    request_id = seeded["notes"][1].request_id
    before = snapshot(api.store)
    for how, credentials in BAD_CREDENTIALS.items():
        metadata = credentials(api.tokens["notes"])
        for rpc, call in every_rpc(api, metadata, request_id).items():
            _, error = outcome(call)
            assert "bearer token" in refused_with(error, Code.UNAUTHENTICATED, (how, rpc))
        assert snapshot(api.store) == before, how
        assert_serving(api)
    for call in every_rpc(api, api.md("notes"), request_id).values():
        call()


def test_an_authorization_header_over_the_metadata_limit_is_refused_by_the_transport(
    api: Api, seeded: dict[str, list[DeletionRecord]]
) -> None:
    """A header beyond gRPC's metadata limit never reaches the interceptor: gRPC refuses it
    (RESOURCE_EXHAUSTED), the connection survives and other callers carry on."""
    metadata = bearer_metadata("A" * 100_000)
    before = snapshot(api.store)
    for rpc, call in every_rpc(api, metadata, seeded["notes"][1].request_id).items():
        _, error = outcome(call)
        refused_with(error, Code.RESOURCE_EXHAUSTED, rpc)
    assert snapshot(api.store) == before
    assert_serving(api)


def test_an_app_token_reaches_no_other_apps_subjects_or_requests(
    api: Api, seeded: dict[str, list[DeletionRecord]]
) -> None:
    """A wrong-scope token: another app's subject is PERMISSION_DENIED (stores nothing), and
    every page of its listing, in any status, holds only its own requests."""
    before = snapshot(api.store)
    for subject in ("mail:bob", "shared-1", "ops:x", "Notes:x", " notes:x", "notes"):
        request = pb.SubmitDeletionRequest(subject_id=subject, idempotency_key="scope")
        _, error = outcome(lambda r=request: api.stub.SubmitDeletion(r, metadata=api.md("notes")))
        assert "'notes'" in refused_with(error, Code.PERMISSION_DENIED, subject)
    assert snapshot(api.store) == before
    for app in ("notes", "mail"):
        for status in [pb.STATUS_UNSPECIFIED, pb.RECEIVED, pb.FAILED]:
            seen: list[str] = []
            token = ""
            while True:
                page = api.stub.ListDeletions(
                    pb.ListDeletionsRequest(page_size=1, page_token=token, status=status),
                    metadata=api.md(app),
                )
                assert all(r.app == app for r in page.requests)
                seen += [r.request_id for r in page.requests]
                token = page.next_page_token
                if not token:
                    break
            own = [r for r in seeded[app] if status in (0, pb.Status.Value(r.status.value))]
            assert seen == [r.request_id for r in own]


def test_a_token_revoked_while_serving_is_refused_on_its_next_call(
    api: Api, tokens_file: Path, seeded: dict[str, list[DeletionRecord]]
) -> None:
    """revoke_token on the live tokens file: the very next call of that token, on any RPC, is
    UNAUTHENTICATED and stores nothing; the other tokens keep working."""
    request_id = seeded["notes"][1].request_id
    api.stub.ListDeletions(pb.ListDeletionsRequest(), metadata=api.md("notes"))  # works now
    revoked = revoke_token(tokens_file, token_digest(api.tokens["notes"])[:TOKEN_ID_CHARS])
    assert revoked.grant.app == "notes"
    before = snapshot(api.store)
    for rpc, call in every_rpc(api, api.md("notes"), request_id).items():
        _, error = outcome(call)
        refused_with(error, Code.UNAUTHENTICATED, rpc)
    assert snapshot(api.store) == before
    mail = api.stub.SubmitDeletion(
        pb.SubmitDeletionRequest(subject_id="mail:after", idempotency_key="after"),
        metadata=api.md("mail"),
    )
    assert mail.request.app == "mail"
    got = api.stub.GetDeletion(pb.GetDeletionRequest(request_id=request_id), metadata=api.md("ops"))
    assert got.app == "notes"
    assert_serving(api)


# -- 5. rate limits --------------------------------------------------------------------------------


@pytest.fixture
def limited(
    store: DeletionStore,
    tokens: dict[str, str],
    tokens_file: Path,
    unused_address: str,
    retry: RetryPolicy,
) -> Iterator[tuple[Api, str]]:
    """A server allowing bursts of 4 calls per token and next to no refill; and a notes
    request that has ended (so watching it ends too)."""
    done = store.submit("notes", "notes:done", [], "done")[0].request_id
    for attempt in range(1, retry.max_attempts + 1):
        store.transition(done, Status.FAILED, reason="no")
        if attempt < retry.max_attempts:
            store.transition(done, Status.RECEIVED)
    server = start(store, tokens_file, unused_address, RateLimit(rate=0.001, burst=4))
    try:
        with grpc.insecure_channel(unused_address) as channel:
            yield Api(Stub(channel), channel, store, tokens), done
    finally:
        server.stop(None)


def test_every_rpc_spends_the_tokens_burst_and_refused_calls_store_nothing(
    limited: tuple[Api, str],
) -> None:
    """Reads count like writes (a List/Get/Watch flood is limited too), refused and failed calls
    count as well, and a limited call is refused before its input is even looked at."""
    api, done = limited
    md = api.md("notes")
    calls = every_rpc(api, md, done)
    calls["list"]()
    calls["get"]()
    calls["watch"]()
    _, error = outcome(lambda: api.stub.GetDeletion(pb.GetDeletionRequest(), metadata=md))
    refused_with(error, Code.INVALID_ARGUMENT, "the fourth call, invalid, still counts")
    before = snapshot(api.store)
    for rpc, call in calls.items():
        _, error = outcome(call)
        assert "rate limit" in refused_with(error, Code.RESOURCE_EXHAUSTED, rpc)
    bad = pb.SubmitDeletionRequest(subject_id="", idempotency_key="")
    _, error = outcome(lambda: api.stub.SubmitDeletion(bad, metadata=md))
    refused_with(error, Code.RESOURCE_EXHAUSTED, "an invalid submission over the limit")
    assert snapshot(api.store) == before
    # Unknown tokens are not limited by (or charged to) the flooding token's bucket.
    _, error = outcome(every_rpc(api, bearer_metadata("nope"), done)["list"])
    refused_with(error, Code.UNAUTHENTICATED, "an unknown token")
    # Other tokens keep their own, full bursts: mail may submit, operators read.
    mail = api.stub.SubmitDeletion(
        pb.SubmitDeletionRequest(subject_id="mail:x", idempotency_key="m"), metadata=api.md("mail")
    )
    ops = api.md("ops")
    assert api.stub.GetDeletion(pb.GetDeletionRequest(request_id=done), metadata=ops).app == "notes"
    assert [
        c.seq
        for c in api.stub.WatchDeletion(pb.WatchDeletionRequest(request_id=done), metadata=ops)
    ][-1] == 6
    listed = api.stub.ListDeletions(pb.ListDeletionsRequest(), metadata=ops)
    assert [r.request_id for r in listed.requests] == [done, mail.request_id]
    health = health_pb2_grpc.HealthStub(api.channel)  # health is open, never limited
    for _ in range(10):
        health.Check(health_pb2.HealthCheckRequest(service=""))


def test_a_concurrent_flood_gets_exactly_the_burst_through(limited: tuple[Api, str]) -> None:
    """Twenty submissions at once from one token: exactly the burst is stored, the rest are
    RESOURCE_EXHAUSTED (never a crash), while another token's call in the middle succeeds."""
    api, _ = limited
    before = len(snapshot(api.store)[0])
    codes: list[Code] = []
    lock = threading.Lock()
    go = threading.Barrier(21)

    def flood(n: int) -> None:
        request = pb.SubmitDeletionRequest(subject_id=f"notes:{n}", idempotency_key=f"f{n}")
        go.wait()
        _, error = outcome(
            lambda: api.stub.SubmitDeletion(
                request, metadata=api.md("notes"), timeout=CALL_TIMEOUT_S
            )
        )
        with lock:
            codes.append(Code.OK if error is None else error.code())

    threads = [threading.Thread(target=flood, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    go.wait()
    other = api.stub.SubmitDeletion(
        pb.SubmitDeletionRequest(subject_id="mail:in-between", idempotency_key="mid"),
        metadata=api.md("mail"),
    )
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(codes, key=str) == sorted([Code.OK] * 4 + [Code.RESOURCE_EXHAUSTED] * 16, key=str)
    stored = snapshot(api.store)[0]
    assert len(stored) == before + 5
    assert other.request_id in {r.request_id for r in stored}


def test_a_limited_token_is_let_in_again_once_its_bucket_refills(
    store: DeletionStore, tokens: dict[str, str], tokens_file: Path, unused_address: str
) -> None:
    """The limit slows a token down, it does not lock it out: after 1/rate seconds one more
    call goes through (the third call must come within a second of the first)."""
    server = start(store, tokens_file, unused_address, RateLimit(rate=1.0, burst=2))
    try:
        with grpc.insecure_channel(unused_address) as channel:
            api = Api(Stub(channel), channel, store, tokens)
            listing = every_rpc(api, api.md("notes"), "unused")["list"]
            listing()
            listing()
            _, error = outcome(listing)
            refused_with(error, Code.RESOURCE_EXHAUSTED, "a third call at once")
            time.sleep(1.1)
            listing()
    finally:
        server.stop(None)
