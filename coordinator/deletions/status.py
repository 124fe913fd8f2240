"""The life of a deletion request: which status may follow which, and when to retry.

A request moves forward one step at a time, RECEIVED -> DISPATCHED ->
APPLIED_ON_DEVICES -> APPLIED_GLOBALLY -> VERIFIED, so a status always
implies everything before it happened. Any step may fail; a failed request is
retried from the start (FAILED -> RECEIVED) after an exponentially growing
pause, until it has used its attempts: then FAILED is final and an operator
has to look. The rules are pure functions here so the store (which applies
them inside a transaction) and its tests share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    """Mirrors `lethe.v1.Status` without STATUS_UNSPECIFIED (a test keeps them equal)."""

    RECEIVED = "RECEIVED"
    DISPATCHED = "DISPATCHED"
    APPLIED_ON_DEVICES = "APPLIED_ON_DEVICES"
    APPLIED_GLOBALLY = "APPLIED_GLOBALLY"
    VERIFIED = "VERIFIED"
    FAILED = "FAILED"


FORWARD = (
    Status.RECEIVED,
    Status.DISPATCHED,
    Status.APPLIED_ON_DEVICES,
    Status.APPLIED_GLOBALLY,
    Status.VERIFIED,
)


class IllegalTransition(ValueError):
    """A status change the order does not allow; nothing was changed."""


def is_final(status: Status, attempts: int, max_attempts: int) -> bool:
    """Nothing more will happen: VERIFIED, or FAILED with no attempt left."""
    return status is Status.VERIFIED or (status is Status.FAILED and attempts >= max_attempts)


def check_move(current: Status, target: Status, attempts: int, max_attempts: int) -> None:
    """Raise IllegalTransition unless a request in `current` may move to `target`."""
    if current is Status.VERIFIED:
        raise IllegalTransition(f"the request is VERIFIED, which is final; it cannot go {target}")
    if current is Status.FAILED:
        if target is not Status.RECEIVED:
            raise IllegalTransition(
                f"a FAILED request can only be retried (RECEIVED), not {target}"
            )
        if attempts >= max_attempts:
            raise IllegalTransition(
                f"the request failed for good after {attempts} of {max_attempts} attempts"
            )
        return
    if target is Status.FAILED:
        return
    following = FORWARD[FORWARD.index(current) + 1]
    if target is not following:
        raise IllegalTransition(
            f"a {current} request may go to {following} or FAILED, not {target}"
        )


@dataclass(frozen=True)
class RetryPolicy:
    """How often a request is tried and how long to wait between tries.

    The pauses double (base, 2 base, 4 base, ... up to cap): a fleet that is
    down for a while is not hammered, and a brief hiccup costs little.
    """

    max_attempts: int = 5
    base_s: float = 30.0
    cap_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or not 0 < self.base_s <= self.cap_s:
            raise ValueError(f"unusable retry policy {self}")

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait before the next attempt once `failed_attempts` have failed."""
        return min(self.cap_s, self.base_s * 2.0 ** max(0, failed_attempts - 1))
