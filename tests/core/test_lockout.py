"""The lockout policy on its own: records in, decisions out, no store and no clock."""

from __future__ import annotations

import dataclasses

import pytest

from otpgate.core.crypto import Sealed
from otpgate.core.lockout import MAX_LOCK_SECONDS, Judgement, judge, lock_seconds, remaining
from otpgate.core.records import SecretRecord
from otpgate.core.settings import LOCKOUT_SECONDS_BOUNDS

NOW = 1_000_000
RECORD = SecretRecord("alice", 1000, Sealed("k", b"n" * 12, b"c" * 48), 6, 30, 0)


def counted(failures: int, *, lockouts: int = 0, locked_until: int = 0) -> SecretRecord:
    """A record as Store.count_attempt returns it for the attempt with this count."""
    return dataclasses.replace(
        RECORD, failures=failures, lockouts=lockouts, locked_until=locked_until
    )


def test_counts_below_the_threshold_check_their_code() -> None:
    for count in (1, 2, 4):
        assert judge(counted(count), now=NOW, threshold=5, base_seconds=60) == Judgement(True)


def test_the_count_that_reaches_the_threshold_locks_and_still_checks() -> None:
    # Its code is checked like the others: a right one clears the lock again.
    judgement = judge(counted(5), now=NOW, threshold=5, base_seconds=60)
    assert judgement == Judgement(check_code=True, lock_until=NOW + 61)


def test_a_count_above_the_threshold_is_refused_unseen_and_locks() -> None:
    # Concurrent guesses past the threshold, or the one after an attempt that died
    # before it could write the lock: no code is checked, the lock is (re)written.
    judgement = judge(counted(9), now=NOW, threshold=5, base_seconds=60)
    assert judgement == Judgement(check_code=False, lock_until=NOW + 61, locked_seconds=61)


def test_a_lock_in_force_refuses_with_the_time_left() -> None:
    record = counted(0, lockouts=1, locked_until=NOW + 30)
    judgement = judge(record, now=NOW, threshold=5, base_seconds=60)
    assert judgement == Judgement(check_code=False, locked_seconds=30)


def test_a_lock_ends_at_its_second() -> None:
    record = counted(1, lockouts=1, locked_until=NOW)  # counted: the lock is over
    assert judge(record, now=NOW, threshold=5, base_seconds=60).check_code
    assert remaining(record, NOW) == 0 and remaining(record, NOW - 7) == 7


def test_each_lockout_in_a_row_doubles_the_next() -> None:
    assert [lock_seconds(60, n) for n in range(4)] == [60, 120, 240, 480]
    record = counted(3, lockouts=2)
    assert judge(record, now=NOW, threshold=3, base_seconds=60).lock_until == NOW + 1 + 240


@pytest.mark.parametrize("base", [1, 60, 300, LOCKOUT_SECONDS_BOUNDS[1]])
def test_locks_stop_growing_at_a_day(base: int) -> None:
    assert MAX_LOCK_SECONDS == 86400 == LOCKOUT_SECONDS_BOUNDS[1]
    assert lock_seconds(base, 0) == base
    assert lock_seconds(base, 40) == MAX_LOCK_SECONDS
    assert lock_seconds(base, 10**9) == MAX_LOCK_SECONDS  # no overflow, no huge shift
    assert all(lock_seconds(base, n) <= MAX_LOCK_SECONDS for n in range(64))


def test_a_threshold_of_one_locks_at_the_first_wrong_attempt() -> None:
    judgement = judge(counted(1), now=NOW, threshold=1, base_seconds=5)
    assert judgement == Judgement(check_code=True, lock_until=NOW + 6)
