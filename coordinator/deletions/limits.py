"""Per-token rate limits of the deletion API: a token bucket per caller.

A caller may spend `burst` calls at once and `rate` calls per second after
that; a call beyond is refused with RESOURCE_EXHAUSTED before any handler runs,
so a runaway or hostile app slows only itself, never the store or the other
apps. Pure logic with an injected clock; the interceptor in `access` applies it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    """Calls per second a token may sustain, and how many it may make at once."""

    rate: float = 100.0
    burst: int = 200

    def __post_init__(self) -> None:
        if not self.rate > 0 or self.burst < 1:
            raise ValueError(f"a rate limit needs rate > 0 and burst >= 1, got {self}")


class RateLimiter:
    """One token bucket per key (a token's digest), refilled continuously."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, key: str) -> bool:
        """Spend one call of `key`'s bucket; False when it is empty."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self.limit.burst), now))
            tokens = min(float(self.limit.burst), tokens + (now - at) * self.limit.rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            return allowed
