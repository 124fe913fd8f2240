"""`lethe bench api`: the deletion API under a paced load, killed with SIGKILL halfway.

Setting. A fresh data directory in a temp folder (certificates as `lethe
certs init` makes them, one app token per client, a receipt signing key);
the real API as its own process (`lethe api serve`, TLS with the data
directory's certificates, SQLite in WAL mode with synchronous=FULL); two
executor processes that play the coordinator's side on the same database;
and, in this process, `clients` threads (each with its own TLS channel and
its own app token) that submit `requests` deletion requests in all.

Load. Open loop: request i is due at start + i / rps, whatever happened to
the others. The clients share one queue of due requests: a free client takes
the next one, sleeps until it is due and sends it; a client stuck retrying
does not hold the others back, and requests due while every client is stuck
(the crash) go out as soon as one is free again. Every request has its own
idempotency key and a subject id inside its app's pattern. A call that fails
with UNAVAILABLE (the server is down), DEADLINE_EXCEEDED or
RESOURCE_EXHAUSTED is sent again with the same key (doubling pauses from
50 ms to 1 s) until the server acknowledges it, so a request stored just
before the crash whose reply was lost comes back as the same request, not as
a second one. Each client holds its own token because the API limits every
token (by default 100 calls/s, bursts of 200): one shared token would
measure the limiter, not the API. The clients' channels reconnect after
100 ms to 1 s (gRPC's default backoff grows to 120 s, which would measure
the client library's patience rather than the server's recovery).

Crash. Once half the requests are acknowledged, the API process is killed
with SIGKILL (no chance to flush anything) and started again on the same
address at once; the clients carry on through it. The executors keep
running: the database is the only thing the API and the coordinator share.

Executors. Each takes due requests (`DeletionStore.due`) in random order and
claims a RECEIVED one by moving it to DISPATCHED with `expect={RECEIVED}`
(a compare-and-set: of two executors racing for a request, one wins and the
other gets UnexpectedStatus), writes the claim to its own append-only log,
then moves the request on to APPLIED_ON_DEVICES, APPLIED_GLOBALLY and, with
a signed receipt attached (the store refuses VERIFIED without one),
VERIFIED. Two executors race on purpose: a request claimed twice would show
up in their logs. Nothing is unlearned: there is no fleet here, so this
measures the API, the store and crash recovery, not forgetting; the
executors are a stand-in for `coordinator.deletions.propagation`.

Following. Every 50th acknowledged request is followed by one of four
watcher threads with WatchDeletion until VERIFIED (a stream broken by the
crash is opened again), then read with GetDeletion, whose receipt is
checked against the signing key's public half.

Figures (the JSON).
- submitted: requests sent at least once; acknowledged: those the API
  answered OK (on the first attempt or a retry).
- lost: acknowledged requests missing from the store (looked up by app and
  idempotency key; the id the API acknowledged must be the stored one) or
  not final (VERIFIED, or FAILED for good) when the run ends (missing and
  unfinished separately; drained is false when the executors ran out of
  time, so that unfinished requests are not taken for lost ones).
- duplicated: idempotency keys with more than one request in the store, plus
  requests the executors claimed more than once (duplicate_keys and
  duplicate_claims separately).
- rps: acknowledged requests per second, from the first due time to the last
  acknowledgement (the crash included).
- p50_ms / p99_ms: submit latency, measured from the actual send (not the
  due time) to the reply, over requests whose first attempt succeeded;
  latency_samples says how many. late_p99_ms / late_max_ms: how long after
  its due time a request was sent (so a client that fell behind is not
  hidden by measuring from the send).
- retries: attempts after the first, over all requests; retried_requests:
  requests that needed more than one; acks_lost: retried requests whose
  reply names a request stored before the retry was sent (stored, reply
  lost in the crash, found again by its key).
- crash_at_s: seconds from the start to the SIGKILL; restart_s: seconds from
  the SIGKILL until the new process answered its health check over TLS
  (mostly the new process importing its libraries); api_pids,
  api_exit_codes: the server processes in order (the first killed, -9).
- store_rows, verified, failed: the store's rows at the end and how they
  ended; drain_s: seconds from the last acknowledgement until no request
  was open; verify_lag_p50_s / verify_lag_p99_s: from a request's creation
  to its VERIFIED, as the store records them (how far the executors lag
  behind the load: five commits per request, about 25 requests/s on a
  2-core machine, against the API's one per submission); claims,
  claim_conflicts: claims written, and claims refused by the
  compare-and-set because the other executor had moved the request since
  the batch was read.
- followed, followed_verified (watched to VERIFIED with a valid receipt),
  watch_reconnects; errors: gRPC error codes the clients saw, by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.deletions.access import Scope, add_token
from coordinator.deletions.client import signed_receipt
from coordinator.deletions.layout import ApiFiles
from coordinator.deletions.records import DeletionRecord
from coordinator.deletions.status import Status
from coordinator.deletions.store import DeletionStore, UnexpectedStatus
from lethe.fleet.processes import BIN, ProcessGroup
from shared.auth import bearer_metadata
from shared.flower_cli import free_port
from shared.paths import DataDir
from shared.pki import CertFiles, init_folder
from shared.proto.lethe.v1 import deletion_pb2, deletion_pb2_grpc
from shared.receipts import (
    ensure_signing_key,
    load_public_key,
    load_signing_key,
    public_key_path,
    sign_receipt,
    verify_receipt,
)

EXECUTORS = 2
WATCHERS = 4
FOLLOW_EVERY = 50
CALL_TIMEOUT_S = 10.0
GIVE_UP_S = 120.0  # a request not acknowledged after this long of retries counts as refused
SERVING_TIMEOUT_S = 60.0
# How long the executors may take after the last submission before open requests count as lost
# (they carry about 25 requests/s on this 2-core machine: five commits each).
DRAIN_MIN_S = 120.0
DRAIN_S_PER_REQUEST = 0.1
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
# The executors' next step from each status they move a request through.
NEXT = {
    Status.DISPATCHED: Status.APPLIED_ON_DEVICES,
    Status.APPLIED_ON_DEVICES: Status.APPLIED_GLOBALLY,
    Status.APPLIED_GLOBALLY: Status.VERIFIED,
}
EXECUTOR_CODE = (
    "import sys; from pathlib import Path; from lethe.bench.api import run_executor; "
    "run_executor(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])"
)


# -- the executors (separate processes) ------------------------------------------------------


def run_executor(root: Path, claims: Path, name: str) -> None:
    """Carry every due request of the data directory `root` to VERIFIED until SIGTERM; each
    claim (RECEIVED -> DISPATCHED won by this process) is appended to `claims` as a JSON line,
    and the number of claims lost to another executor is the file's last line."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    files = ApiFiles(root)
    key = load_signing_key(files.signing_key)
    mine: set[str] = set()  # claimed here and not VERIFIED yet: finished by nobody else
    conflicts = 0
    with DeletionStore(files.url()) as store, claims.open("a", encoding="utf-8") as log:
        while not stop.is_set():
            batch = list(store.due())
            random.shuffle(batch)  # two executors do not walk the same rows in step
            for request in batch:
                if stop.is_set():
                    break
                rid = request.request_id
                if request.status is Status.RECEIVED:
                    try:
                        store.transition(
                            rid,
                            Status.DISPATCHED,
                            detail={"executor": name},
                            expect={Status.RECEIVED},
                        )
                    except UnexpectedStatus:  # the other executor claimed it first
                        conflicts += 1
                        continue
                    except Exception as error:  # noqa: BLE001 (still RECEIVED: claimed later)
                        print(f"claiming {rid}: {error!r}", file=sys.stderr, flush=True)
                        continue
                    log.write(json.dumps({"claimed": rid, "at": time.time()}) + "\n")
                    log.flush()
                    mine.add(rid)
                if rid in mine:
                    try:
                        _finish(store, rid, key)
                        mine.discard(rid)
                    except Exception as error:  # noqa: BLE001 (tried again on the next round)
                        print(f"request {rid}: {error!r}", file=sys.stderr, flush=True)
            if not batch:
                stop.wait(0.02)
        log.write(json.dumps({"conflicts": conflicts}) + "\n")


def _finish(store: DeletionStore, request_id: str, key: Ed25519PrivateKey) -> None:
    """Move a claimed request from where it is to VERIFIED, one compare-and-set at a time."""
    record = store.get(request_id)
    while record.status in NEXT:
        target = NEXT[record.status]
        if target is Status.VERIFIED:
            now = time.time()
            signed = sign_receipt(
                {
                    "request_id": request_id,
                    "subject_hash": record.subject_hash,
                    "model_versions_before": {},
                    "model_versions_after": {},
                    "measurements": {"devices": 0.0},  # no fleet: nothing was unlearned
                    "timestamps": {"received": record.created_at, "verified": now, "issued": now},
                },
                key,
            )
            store.attach_receipt(request_id, signed.body, signed.signature, signed.key_id)
        record = store.transition(request_id, target, expect={record.status})


# -- the clients (threads of this process) ---------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What happened to one request, as its client saw it."""

    ticket: int
    app: str
    key: str
    request_id: str | None = None
    attempts: int = 0
    first_ms: float | None = None  # latency of a first attempt that succeeded
    late_ms: float = 0.0  # sent this long after its due time
    acked_at: float | None = None  # perf_counter
    replayed: bool = False  # the reply named a request stored before this attempt was sent


class _Load:
    """State the client, watcher and main threads share during one run."""

    def __init__(self, callers: Sequence[_Caller], requests: int, rps: float) -> None:
        self.callers = callers
        self.requests = requests
        self.rps = rps
        self.start = time.perf_counter() + 0.5  # every client is waiting by then
        self.outcomes: list[Outcome | None] = [None] * requests
        self.errors: Counter[str] = Counter()
        self.half_acknowledged = threading.Event()
        self.follow: queue.Queue[tuple[int, str] | None] = queue.Queue()
        self.counts: Counter[str] = Counter()  # the watchers' figures
        self._next = 0
        self._acknowledged = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """The next request to send, or None when all have been taken."""
        with self._lock:
            if self._next >= self.requests:
                return None
            self._next += 1
            return self._next - 1

    def acknowledged(self) -> None:
        with self._lock:
            self._acknowledged += 1
            if self._acknowledged >= self.requests // 2:
                self.half_acknowledged.set()

    def error(self, code: grpc.StatusCode) -> None:
        with self._lock:
            self.errors[code.name] += 1

    def count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1


@dataclasses.dataclass(frozen=True)
class _Caller:
    """One client's app name, stub and bearer metadata (its own channel and token)."""

    app: str
    stub: deletion_pb2_grpc.DeletionServiceStub
    metadata: tuple[tuple[str, str]]


def _client(load: _Load, index: int) -> None:
    """Send due requests as client `index` until none is left."""
    while (ticket := load.take()) is not None:
        due = load.start + ticket / load.rps
        time.sleep(max(0.0, due - time.perf_counter()))
        outcome = _submit(load, index, ticket, due)
        load.outcomes[ticket] = outcome
        if outcome.request_id is not None and ticket % FOLLOW_EVERY == 0:
            load.follow.put((index, outcome.request_id))


def _submit(load: _Load, index: int, ticket: int, due: float) -> Outcome:
    """Submit request `ticket` until acknowledged, the same idempotency key every time."""
    caller = load.callers[index]
    key = f"bench-{ticket:07d}"
    outcome = Outcome(ticket=ticket, app=caller.app, key=key)
    message = deletion_pb2.SubmitDeletionRequest(
        subject_id=f"{caller.app}:person-{ticket}", idempotency_key=key
    )
    first_sent = time.perf_counter()
    outcome.late_ms = (first_sent - due) * 1000
    pause = 0.05
    while True:
        outcome.attempts += 1
        sent, sent_wall = time.perf_counter(), time.time()
        try:
            reply = caller.stub.SubmitDeletion(
                message, metadata=caller.metadata, timeout=CALL_TIMEOUT_S
            )
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            load.error(code)
            if code not in RETRYABLE or time.perf_counter() - first_sent > GIVE_UP_S:
                return outcome
            time.sleep(pause * random.uniform(0.5, 1.0))
            pause = min(1.0, pause * 2)
            continue
        outcome.acked_at = time.perf_counter()
        outcome.request_id = reply.request_id
        if outcome.attempts == 1:
            outcome.first_ms = (outcome.acked_at - sent) * 1000
        else:
            outcome.replayed = reply.request.created_at < sent_wall
        load.acknowledged()
        return outcome


def _watcher(load: _Load, public_key_file: Path, deadline: float) -> None:
    """Follow requests from the queue to VERIFIED (WatchDeletion, opened again when the crash
    breaks it), then check the receipt GetDeletion returns; until the queue's end marker."""
    public_key = load_public_key(public_key_file)
    while (item := load.follow.get()) is not None:
        index, request_id = item
        caller = load.callers[index]
        pause = 0.05
        while time.perf_counter() < deadline:
            try:
                watch = caller.stub.WatchDeletion(
                    deletion_pb2.WatchDeletionRequest(request_id=request_id),
                    metadata=caller.metadata,
                    timeout=deadline - time.perf_counter(),
                )
                if any(change.status == deletion_pb2.VERIFIED for change in watch):
                    shown = caller.stub.GetDeletion(
                        deletion_pb2.GetDeletionRequest(request_id=request_id),
                        metadata=caller.metadata,
                        timeout=CALL_TIMEOUT_S,
                    )
                    receipt = signed_receipt(shown)
                    if shown.status == deletion_pb2.VERIFIED and receipt is not None:
                        verify_receipt(receipt, public_key)
                        load.count("followed_verified")
                break  # the stream ended: VERIFIED, or FAILED for good
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                load.error(code)
                if code not in RETRYABLE:
                    break
            load.count("watch_reconnects")
            time.sleep(pause)
            pause = min(1.0, pause * 2)


# -- the server process ----------------------------------------------------------------------


def _channel(address: str, ca: bytes) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def _start_api(
    group: ProcessGroup, name: str, root: Path, address: str, ca: bytes
) -> subprocess.Popen[bytes]:
    """`lethe api serve` on `address`, returned once its health check answers SERVING over
    TLS; RuntimeError with its log if it exits or does not answer in time."""
    command = (str(BIN / "lethe"), "api", "serve", "--data-dir", str(root), "--address", address)
    process = group.start(name, *command)
    deadline = time.perf_counter() + SERVING_TIMEOUT_S
    with _channel(address, ca) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while process.poll() is None and time.perf_counter() < deadline:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return process
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"the deletion API did not come up:\n{group.log(name)}")


def _prepare(root: Path, clients: int) -> list[tuple[str, str]]:
    """Certificates, one app token per client and the receipt signing key under `root`;
    returns (app, token) per client."""
    init_folder(CertFiles(DataDir(root).certs), [], [], datetime.now(UTC))
    files = ApiFiles(root)
    ensure_signing_key(files.signing_key)
    apps = [f"bench{index}" for index in range(clients)]
    return [(app, add_token(files.tokens, app, Scope.APP, [f"{app}:*"])) for app in apps]


# -- the figures -----------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank q-th percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _all_rows(store: DeletionStore) -> list[DeletionRecord]:
    rows: list[DeletionRecord] = []
    after: int | None = None
    while True:
        page = store.list(None, None, 500, after)
        rows.extend(page.records)
        if page.next_after is None:
            return rows
        after = page.next_after


def _read_claims(paths: Sequence[Path]) -> tuple[Counter[str], int]:
    """How often each request was claimed, over every executor's log, and the conflicts."""
    claimed: Counter[str] = Counter()
    conflicts = 0
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if "claimed" in entry:
                claimed[entry["claimed"]] += 1
            else:
                conflicts += entry["conflicts"]
    return claimed, conflicts


def store_figures(
    outcomes: Sequence[Outcome], rows: Sequence[DeletionRecord], claimed: Counter[str]
) -> dict[str, Any]:
    """What the store and the executors' logs say about the acknowledged requests."""
    stored: dict[tuple[str, str], list[DeletionRecord]] = {}
    for row in rows:
        stored.setdefault((row.app, row.idempotency_key), []).append(row)
    missing = unfinished = 0
    for outcome in outcomes:
        if outcome.request_id is None:
            continue
        found = [
            r
            for r in stored.get((outcome.app, outcome.key), [])
            if r.request_id == outcome.request_id
        ]
        missing += not found
        unfinished += bool(found) and not found[0].final
    duplicate_keys = sum(len(found) - 1 for found in stored.values())
    duplicate_claims = sum(count - 1 for count in claimed.values())
    lags = [r.updated_at - r.created_at for r in rows if r.status is Status.VERIFIED]
    return {
        "lost": missing + unfinished,
        "missing": missing,
        "unfinished": unfinished,
        "duplicated": duplicate_keys + duplicate_claims,
        "duplicate_keys": duplicate_keys,
        "duplicate_claims": duplicate_claims,
        "store_rows": len(rows),
        "verified": sum(r.status is Status.VERIFIED for r in rows),
        "failed": sum(r.status is Status.FAILED for r in rows),
        "claims": sum(claimed.values()),
        "verify_lag_p50_s": _rounded(_percentile(lags, 50)),
        "verify_lag_p99_s": _rounded(_percentile(lags, 99)),
    }


def _client_figures(load: _Load, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """What the clients saw: throughput, latency, lateness, retries and errors."""
    acked = [o.acked_at for o in outcomes if o.acked_at is not None]
    wall = max(acked, default=load.start) - load.start
    samples = [o.first_ms for o in outcomes if o.first_ms is not None]
    late = [o.late_ms for o in outcomes]
    return {
        "submitted": len(outcomes),
        "acknowledged": len(acked),
        "rps": round(len(acked) / wall, 1) if wall > 0 else None,
        "p50_ms": _rounded(_percentile(samples, 50)),
        "p99_ms": _rounded(_percentile(samples, 99)),
        "latency_from": "send",
        "latency_samples": len(samples),
        "late_p99_ms": _rounded(_percentile(late, 99)),
        "late_max_ms": _rounded(max(late, default=None)),
        "retries": sum(o.attempts - 1 for o in outcomes),
        "retried_requests": sum(o.attempts > 1 for o in outcomes),
        "acks_lost": sum(o.replayed for o in outcomes),
        "errors": dict(load.errors),
        "followed": sum(o.acked_at is not None and o.ticket % FOLLOW_EVERY == 0 for o in outcomes),
        "followed_verified": load.counts["followed_verified"],
        "watch_reconnects": load.counts["watch_reconnects"],
        "submit_wall_s": round(wall, 2),
    }


# -- the run ---------------------------------------------------------------------------------


def _crash(
    load: _Load,
    api: list[subprocess.Popen[bytes]],
    start_api: Callable[[str], subprocess.Popen[bytes]],
    clients: Sequence[threading.Thread],
) -> dict[str, float | None]:
    """Once half the requests are acknowledged, SIGKILL the API (the last of `api`) and start
    it again at once (appended to `api`); crash_at_s and restart_s (None: no crash, because
    every client ended before half were acknowledged)."""
    while not load.half_acknowledged.wait(0.1):
        if not any(thread.is_alive() for thread in clients):
            return {"crash_at_s": None, "restart_s": None}
    killed = time.perf_counter()
    os.kill(api[-1].pid, signal.SIGKILL)
    api[-1].wait()
    api.append(start_api(f"api-{len(api) + 1}"))
    return {
        "crash_at_s": round(killed - load.start, 2),
        "restart_s": round(time.perf_counter() - killed, 2),
    }


def _drain(
    store: DeletionStore,
    group: ProcessGroup,
    executors: Sequence[subprocess.Popen[bytes]],
    deadline: float,
) -> bool:
    """Wait until no request is open (True) or the deadline passes (False); RuntimeError with
    their logs if an executor stops (the executors never fail a request, so "not open" means
    VERIFIED)."""
    while store.due(math.inf, limit=1):
        if time.perf_counter() > deadline:
            return False
        if any(process.poll() is not None for process in executors):
            logs = "\n".join(group.log(f"executor-{n}") for n in range(len(executors)))
            raise RuntimeError(f"an executor stopped:\n{logs}")
        time.sleep(0.2)
    return True


def run_api_bench(
    json_path: Path,
    requests: int = 10_000,
    rps: float = 200.0,
    clients: int = 8,
    crash: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run the load (and the crash) described above and write the figures to `json_path`."""
    # Imported here: it loads torch, which the executor processes (importing this module)
    # have no use for.
    from lethe.bench.report import machine_facts, write_report

    if requests < 2 or not rps > 0 or clients < 1:
        raise ValueError(
            f"need requests >= 2, rps > 0 and clients >= 1, got {requests}, {rps:g}, {clients}"
        )
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lethe-bench-api-") as folder:
        root = Path(folder)
        callers = _prepare(root, clients)
        files = ApiFiles(root)
        ca = CertFiles(DataDir(root).certs).ca_cert.read_bytes()
        address = f"127.0.0.1:{free_port()}"
        claim_logs = [root / f"claims-{n}.jsonl" for n in range(EXECUTORS)]
        with DeletionStore(files.url()) as store, ProcessGroup(root / "logs") as group:

            def start_api(name: str) -> subprocess.Popen[bytes]:
                return _start_api(group, name, root, address, ca)

            api = [start_api("api-1")]
            executors = [
                group.start(
                    f"executor-{n}", sys.executable, "-c", EXECUTOR_CODE, folder, str(p), f"e{n}"
                )
                for n, p in enumerate(claim_logs)
            ]
            channels = [_channel(address, ca) for _ in callers]
            for channel in channels:  # TLS handshakes now, not in the first requests' latency
                grpc.channel_ready_future(channel).result(timeout=SERVING_TIMEOUT_S)
            load = _Load(
                [
                    _Caller(app, deletion_pb2_grpc.DeletionServiceStub(c), bearer_metadata(token))
                    for (app, token), c in zip(callers, channels, strict=True)
                ],
                requests,
                rps,
            )
            log(f"{requests} requests at {rps:g}/s from {clients} clients to {address}")
            deadline = (
                load.start + requests / rps + max(DRAIN_MIN_S, requests * DRAIN_S_PER_REQUEST)
            )
            public_key = public_key_path(files.signing_key)
            # Daemon threads: an error in this thread must not leave the run hanging on them.
            senders = [
                threading.Thread(target=_client, args=(load, k), daemon=True)
                for k in range(clients)
            ]
            watchers = [
                threading.Thread(target=_watcher, args=(load, public_key, deadline), daemon=True)
                for _ in range(WATCHERS)
            ]
            for thread in senders + watchers:
                thread.start()
            crashed: dict[str, float | None] = {"crash_at_s": None, "restart_s": None}
            if crash:
                crashed = _crash(load, api, start_api, senders)
                log(f"crash: {crashed}")
            for thread in senders:
                thread.join()
            submitted_at = time.perf_counter()
            log("every request submitted; waiting for the executors")
            drained = _drain(store, group, executors, deadline)
            drain_s = time.perf_counter() - submitted_at
            for _ in watchers:
                load.follow.put(None)
            for thread in watchers:
                thread.join()
            for channel in channels:
                channel.close()
            group.stop_all()  # the executors write their conflict counts on SIGTERM
            rows = _all_rows(store)
        claimed, conflicts = _read_claims(claim_logs)
    outcomes = [o for o in load.outcomes if o is not None]
    report: dict[str, Any] = {
        **_client_figures(load, outcomes),
        **store_figures(outcomes, rows, claimed),
        "crash": crash,
        **crashed,
        "api_pids": [p.pid for p in api],
        "api_exit_codes": [p.returncode for p in api],
        "drained": drained,
        "drain_s": round(drain_s, 2),
        "claim_conflicts": conflicts,
        "clients": clients,
        "executors": EXECUTORS,
        "watchers": WATCHERS,
        "requests": requests,
        "target_rps": rps,
    }
    report.update(machine_facts("cpu", load_before))
    log(json.dumps({k: report[k] for k in ("submitted", "acknowledged", "lost", "duplicated")}))
    return write_report(json_path, report)
