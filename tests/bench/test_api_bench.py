"""`lethe bench api` on a small load: a real API process killed with SIGKILL halfway, real
executor processes, and not one acknowledged request lost or duplicated, as the store's
rows and the executors' claim logs tell it. A second test shows that the count of lost and
duplicated requests does see a request missing from the store and one claimed twice."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from coordinator.deletions.status import Status
from coordinator.deletions.store import DeletionStore
from lethe.bench.api import FOLLOW_EVERY, Outcome, run_api_bench, store_figures

# Small enough to stay near 30 s on a busy 2-core machine: the restarted server takes 5 to 9 s
# to import its libraries, and the executors carry about 25 requests/s.
REQUESTS = 400
KEYS = {
    "submitted",
    "acknowledged",
    "lost",
    "missing",
    "unfinished",
    "duplicated",
    "duplicate_keys",
    "duplicate_claims",
    "rps",
    "p50_ms",
    "p99_ms",
    "latency_from",
    "latency_samples",
    "late_p99_ms",
    "late_max_ms",
    "retries",
    "retried_requests",
    "acks_lost",
    "errors",
    "crash",
    "crash_at_s",
    "restart_s",
    "api_pids",
    "api_exit_codes",
    "store_rows",
    "verified",
    "failed",
    "claims",
    "claim_conflicts",
    "drained",
    "drain_s",
    "verify_lag_p50_s",
    "verify_lag_p99_s",
    "followed",
    "followed_verified",
    "watch_reconnects",
    "clients",
    "executors",
    "watchers",
    "requests",
    "target_rps",
    "submit_wall_s",
    "device",
    "cpu_count",
    "load_average_before",
    "load_average_after",
}


@pytest.mark.slow
def test_nothing_acknowledged_is_lost_or_duplicated_across_a_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "api.json"
    started = time.monotonic()
    returned = run_api_bench(path, requests=REQUESTS, rps=150.0, clients=4, crash=True)
    wall = time.monotonic() - started

    report = json.loads(path.read_text())
    assert report == returned
    assert KEYS <= set(report)
    assert report["submitted"] == report["acknowledged"] == REQUESTS
    assert report["drained"]
    assert report["lost"] == 0 and report["duplicated"] == 0
    # Counted from the store, not from the clients: every acknowledged request is a row of
    # its own, VERIFIED, and was claimed by exactly one executor.
    assert report["store_rows"] == report["verified"] == report["claims"] == REQUESTS
    # The crash really happened: the first server died of SIGKILL, another one took over.
    first, second = report["api_pids"]
    assert first != second
    assert report["api_exit_codes"][0] == -signal.SIGKILL
    assert 0 < report["crash_at_s"] and 0 < report["restart_s"]
    assert report["errors"].get("UNAVAILABLE", 0) > 0  # the clients saw it
    assert report["followed"] == report["followed_verified"] == REQUESTS // FOLLOW_EVERY
    assert 0 < report["p50_ms"] <= report["p99_ms"]
    assert report["latency_samples"] + report["retried_requests"] == REQUESTS
    print(f"bench api, {REQUESTS} requests: {wall:.0f} s wall; {report}")


def test_the_count_sees_a_lost_and_a_twice_claimed_request(tmp_path: Path) -> None:
    with DeletionStore(f"sqlite:///{tmp_path / 'deletions.db'}") as store:
        done, _ = store.submit("bench0", "bench0:a", (), "bench-0000000")
        open_, _ = store.submit("bench0", "bench0:b", (), "bench-0000001")
        store.transition(done.request_id, Status.FAILED, reason="test")  # not final: retried
        rows = store.list(None, None, 10).records
    acked = [
        Outcome(0, "bench0", "bench-0000000", request_id=done.request_id, attempts=1),
        Outcome(1, "bench0", "bench-0000001", request_id=open_.request_id, attempts=1),
        Outcome(2, "bench0", "bench-0000002", request_id="never-stored", attempts=2),
    ]
    claimed = Counter({done.request_id: 2, open_.request_id: 1})

    figures = store_figures(acked, rows, claimed)

    assert figures["missing"] == 1  # acknowledged, but no such row
    assert figures["unfinished"] == 2  # RECEIVED, and FAILED with attempts left
    assert figures["lost"] == 3
    assert figures["duplicate_claims"] == 1 and figures["duplicated"] == 1
    assert figures["store_rows"] == 2
