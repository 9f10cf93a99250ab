"""Lockout policy: whether a counted attempt may check its code, and locks (pure).

The store counts each attempt before its code is checked (Store.count_attempt,
one statement) and hands back the account's record with the attempt's own count;
`judge` decides from that record alone, and the service carries the decision out.

- Counts 1 to `threshold` check their code. A count above the threshold is
  refused as locked without looking at the code: counts are handed out once
  each, so however many guesses run at once, at most `threshold` codes are
  checked between two resets (an accepted code, a lock, a new secret).
- The attempt whose count reaches the threshold locks the account (Store.lock)
  for `lockout_seconds`, doubling with each lockout in a row, up to a day;
  then checks its code like the others (a right one clears the lock, as an
  accepted code clears everything). So does any later attempt that finds the
  threshold passed and no lock in force: the one that reached it may have died
  between its two statements, and the account must not stay refused forever.
- Store.lock is a compare-and-set on what the attempt read (count and lockouts):
  of several attempts that try to lock the same run of failures, the first
  wins and the others change nothing (it set the counter to 0 and raised
  `lockouts`), so a run is locked once and `lockouts` goes up by one. It fails
  only after a reset, which either was that very lock or made it moot: an
  accepted code or a new secret clears a lock anyway, so the outcome is the one
  of the lock coming first and being cleared. A stale attempt that finds a
  new run past `count` again, `lockouts` unchanged, locks it as its own
  attempt would have: the same lock, once.

Times are whole seconds: a lock ends one second late rather than up to one early.
"""

from __future__ import annotations

import dataclasses

from otpgate.core.records import SecretRecord
from otpgate.core.settings import LOCKOUT_SECONDS_BOUNDS

MAX_LOCK_SECONDS = LOCKOUT_SECONDS_BOUNDS[1]  # a day: the longest first lock is the cap
# 2**17 times the shortest lock (1 s) is past a day already: no need to go higher.
_MAX_DOUBLINGS = 17


@dataclasses.dataclass(frozen=True)
class Judgement:
    """What to do with one counted attempt."""

    check_code: bool  # False: refuse it as locked, code unseen
    lock_until: int | None = None  # lock the account until then (Store.lock) first
    locked_seconds: int = 0  # when refused: how long the lock has left (at least 1)


def lock_seconds(base: int, lockouts: int) -> int:
    """How long the lock after `lockouts` earlier ones in a row lasts."""
    return min(base << min(lockouts, _MAX_DOUBLINGS), max(base, MAX_LOCK_SECONDS))


def remaining(record: SecretRecord, now: int) -> int:
    """Seconds the account's lock has left at `now` (0: none in force)."""
    return max(0, record.locked_until - now)


def judge(record: SecretRecord, *, now: int, threshold: int, base_seconds: int) -> Judgement:
    """The decision for the attempt that Store.count_attempt just counted at `now`."""
    if record.locked_until > now:  # in force: the store counted nothing
        return Judgement(check_code=False, locked_seconds=record.locked_until - now)
    count = record.failures
    if count < threshold:
        return Judgement(check_code=True)
    until = now + 1 + lock_seconds(base_seconds, record.lockouts)
    if count == threshold:
        return Judgement(check_code=True, lock_until=until)
    return Judgement(check_code=False, lock_until=until, locked_seconds=until - now)
