"""Budgets in time, with the clock injected: password checks per account, bytes and
log lines per caller.

Neither sleeps: a caller over its budget is refused at once, so a guesser never
holds a server thread (PAM's own failure delay would hold one for two seconds).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

Clock = Callable[[], float]

# su (pam_unix's ~2 s failure delay plus the check and su's own start) allows about
# one guess every 3 s, so the first failure waits that long and each further one in a
# row twice as long as the one before: 3 checks in the first 10 s, as su, and ever
# fewer after (6 in 3 minutes), however many connections ask at once.
FIRST_DELAY_SECONDS = 3.0
DOUBLING_AFTER = 1
MAX_DELAY_SECONDS = 300.0
# A run of failures is forgotten after this long without another one.
FORGET_SECONDS = 900.0
MAX_TRACKED = 100_000


@dataclasses.dataclass
class _Account:
    failures: int = 0
    not_before: float = 0.0
    last_failure: float = 0.0
    in_flight: bool = False


def failure_delay(failures: int) -> float:
    """Seconds to wait after the `failures`-th wrong password in a row (1-based)."""
    if failures <= 0:
        return 0.0
    doublings = max(0, failures - DOUBLING_AFTER)
    return min(MAX_DELAY_SECONDS, FIRST_DELAY_SECONDS * float(2 ** min(doublings, 32)))


class PasswordThrottle:
    """At most one password check per account at a time, and after a wrong password
    none until its delay has passed: sustained, across connections and in parallel,
    no faster than su lets one guess."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}

    def begin(self, account: str) -> float:
        """0.0 when a check of `account` may start now (then call end()); otherwise the
        seconds to wait, and no check may run."""
        now = self._clock()
        with self._lock:
            state = self._accounts.get(account)
            if state is None:
                if len(self._accounts) >= MAX_TRACKED:
                    self._prune(now)
                    if len(self._accounts) >= MAX_TRACKED:
                        return FIRST_DELAY_SECONDS  # refuse rather than forget a guesser
                state = self._accounts[account] = _Account()
            elif state.failures and now - state.last_failure >= FORGET_SECONDS:
                state.failures, state.not_before = 0, 0.0
            if state.in_flight:
                return FIRST_DELAY_SECONDS
            if now < state.not_before:
                return state.not_before - now
            state.in_flight = True
            return 0.0

    def end(self, account: str, *, failed: bool) -> None:
        now = self._clock()
        with self._lock:
            state = self._accounts.get(account)
            if state is None:
                return
            state.in_flight = False
            if failed:
                state.failures += 1
                state.last_failure = now
                state.not_before = now + failure_delay(state.failures)
            else:
                del self._accounts[account]

    def failures(self, account: str) -> int:
        with self._lock:
            state = self._accounts.get(account)
            return state.failures if state else 0

    def _prune(self, now: float) -> None:
        stale = [
            name
            for name, s in self._accounts.items()
            if not s.in_flight and now >= s.not_before and now - s.last_failure >= FORGET_SECONDS
        ]
        for name in stale:
            del self._accounts[name]


class TokenBucket:
    """`rate` units a second, at most `burst` saved up. Not thread-safe: one owner."""

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self.rate, self.burst = rate, burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def available(self) -> float:
        self._refill()
        return self._tokens

    def take(self, wanted: float) -> float:
        """Take up to `wanted` units; returns how many were granted."""
        self._refill()
        granted = max(0.0, min(wanted, self._tokens))
        self._tokens -= granted
        return granted

    def seconds_until(self, units: float) -> float:
        self._refill()
        missing = units - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate


class LineBudget:
    """Log lines of one kind: `per_second` at most, then one line saying how many
    were left out. Thread-safe."""

    def __init__(self, per_second: float, clock: Clock, burst: float | None = None) -> None:
        self._bucket = TokenBucket(per_second, burst or per_second, clock)
        self._lock = threading.Lock()
        self._suppressed = 0

    def allow(self) -> tuple[bool, int]:
        """(may log now, how many lines were suppressed since the last allowed one)."""
        with self._lock:
            if self._bucket.available() >= 1.0:
                self._bucket.take(1.0)
                suppressed, self._suppressed = self._suppressed, 0
                return True, suppressed
            self._suppressed += 1
            return False, 0


class Spacing:
    """At most one event per key every `seconds` (e.g. a self-service renewal: each
    is a durable write and a log line, and one a few seconds is plenty)."""

    def __init__(self, seconds: float, clock: Clock, max_keys: int = MAX_TRACKED) -> None:
        self._seconds = seconds
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def take(self, key: str) -> float:
        """0.0 and the event counts now; or the seconds until the next may."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._seconds:
                return self._seconds - (now - last)
            if len(self._last) >= self._max_keys:
                self._last = {k: t for k, t in self._last.items() if now - t < self._seconds}
            self._last[key] = now
            return 0.0
