"""Budgets in time, with an injected clock."""

from __future__ import annotations

from otpgate.core.throttle import (
    FIRST_DELAY_SECONDS,
    FORGET_SECONDS,
    LineBudget,
    PasswordThrottle,
    Spacing,
    TokenBucket,
)
from tests.core.test_service import Clock


def test_password_throttle_one_at_a_time_then_delay() -> None:
    clock = Clock()
    throttle = PasswordThrottle(clock)
    assert throttle.begin("alice") == 0.0
    assert throttle.begin("alice") > 0  # a check is running: no second one in parallel
    assert throttle.begin("bob") == 0.0  # other accounts are not affected
    throttle.end("alice", failed=True)
    assert throttle.begin("alice") == FIRST_DELAY_SECONDS
    clock.now += FIRST_DELAY_SECONDS - 0.5
    assert 0 < throttle.begin("alice") <= 0.5
    clock.now += 0.5
    assert throttle.begin("alice") == 0.0
    throttle.end("alice", failed=False)
    assert throttle.failures("alice") == 0


def test_password_throttle_sustained_rate_and_forgetting() -> None:
    clock = Clock()
    throttle = PasswordThrottle(clock)
    checks = 0
    start = clock.now
    while clock.now - start < 600:  # a guesser that retries every 0.1 s for 10 minutes
        if throttle.begin("alice") == 0.0:
            checks += 1
            throttle.end("alice", failed=True)
        clock.now += 0.1
    # su: about one guess every 3 s (200 in 10 minutes); here far fewer.
    assert checks <= 10, checks
    clock.now += FORGET_SECONDS
    assert throttle.begin("alice") == 0.0  # a long pause forgets the run
    throttle.end("alice", failed=True)
    assert throttle.failures("alice") == 1


def test_token_bucket() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=20, clock=clock)
    assert bucket.take(25) == 20
    assert bucket.take(1) == 0
    assert bucket.seconds_until(5) == 0.5
    clock.now += 1
    assert bucket.available() == 10
    clock.now += 100
    assert bucket.available() == 20  # never more than the burst


def test_line_budget_counts_what_it_suppressed() -> None:
    clock = Clock()
    budget = LineBudget(1.0, clock, burst=2)
    assert [budget.allow() for _ in range(5)] == [
        (True, 0), (True, 0), (False, 0), (False, 0), (False, 0)
    ]  # fmt: skip
    clock.now += 1
    assert budget.allow() == (True, 3)


def test_spacing_one_event_per_key_per_interval() -> None:
    clock = Clock()
    spacing = Spacing(5.0, clock)
    assert spacing.take("alice") == 0.0
    assert spacing.take("alice") == 5.0
    assert spacing.take("bob") == 0.0
    clock.now += 4
    assert spacing.take("alice") == 1.0
    clock.now += 1
    assert spacing.take("alice") == 0.0
