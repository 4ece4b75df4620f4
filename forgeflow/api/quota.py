"""Fair use: a token bucket of submissions per token, so one client cannot starve the others.

Each token may make ``submit_burst`` submissions at once, refilled at ``submit_rate_per_minute``; past
that a submission is answered 429 with ``Retry-After`` (whole seconds until one is allowed again).
The buckets live in this API process (several API processes each keep their own). An open service
(loopback, no tokens) has a single caller and no limit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class SubmissionQuota:
    def __init__(self, rate_per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens left, when counted)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def take(self, key: str) -> float:
        """Count one submission of ``key``: 0.0 when allowed, else the seconds until one will be."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        with self._lock:
            left, since = self._buckets.get(key, (self.burst, now))
            left = min(self.burst, left + (now - since) * self.rate_per_s)
            if left >= 1.0:
                self._buckets[key] = (left - 1.0, now)
                return 0.0
            self._buckets[key] = (left, now)
            return (1.0 - left) / self.rate_per_s

    @staticmethod
    def retry_after(seconds: float) -> str:
        return str(max(1, math.ceil(seconds)))
