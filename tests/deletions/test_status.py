"""The status order of a deletion request, its retry pauses, and the proto's enum."""

from __future__ import annotations

import itertools

import pytest

from coordinator.deletions.status import (
    FORWARD,
    IllegalTransition,
    RetryPolicy,
    Status,
    check_move,
    is_final,
)
from shared.proto.lethe.v1 import deletion_pb2


def allowed(current: Status, target: Status, attempts: int = 1, max_attempts: int = 3) -> bool:
    try:
        check_move(current, target, attempts, max_attempts)
    except IllegalTransition:
        return False
    return True


def test_exactly_the_documented_moves_are_allowed() -> None:
    legal = {pair for pair in itertools.product(Status, Status) if allowed(*pair)}
    forward = set(itertools.pairwise(FORWARD))
    failing = {(status, Status.FAILED) for status in FORWARD[:-1]}
    assert legal == forward | failing | {(Status.FAILED, Status.RECEIVED)}


def test_a_retry_needs_an_attempt_left_and_verified_is_final() -> None:
    assert allowed(Status.FAILED, Status.RECEIVED, attempts=2, max_attempts=3)
    assert not allowed(Status.FAILED, Status.RECEIVED, attempts=3, max_attempts=3)
    with pytest.raises(IllegalTransition, match="failed for good after 3 of 3"):
        check_move(Status.FAILED, Status.RECEIVED, 3, 3)
    with pytest.raises(IllegalTransition, match="VERIFIED, which is final"):
        check_move(Status.VERIFIED, Status.FAILED, 1, 3)
    with pytest.raises(IllegalTransition, match="may go to DISPATCHED or FAILED, not VERIFIED"):
        check_move(Status.RECEIVED, Status.VERIFIED, 1, 3)
    assert is_final(Status.VERIFIED, 1, 3) and is_final(Status.FAILED, 3, 3)
    assert not is_final(Status.FAILED, 2, 3) and not is_final(Status.APPLIED_GLOBALLY, 3, 3)


def test_retry_pauses_double_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=6, base_s=2.0, cap_s=10.0)
    assert [policy.delay(n) for n in range(1, 6)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_s=5.0, cap_s=1.0)


def test_the_python_statuses_are_the_protos() -> None:
    names = [deletion_pb2.Status.Name(n) for n in deletion_pb2.Status.values()]
    assert names == ["STATUS_UNSPECIFIED", *(s.value for s in Status)]
