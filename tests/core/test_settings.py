"""Every bound of every setting, accepted and refused."""

from __future__ import annotations

from typing import Any

import pytest

from otpgate.core.settings import EnrollmentPolicy, Settings
from otpgate.errors import InvalidArgument

BOUNDS = {
    "window": (0, 10),
    "otp_digits": (6, 8),
    "interval": (5, 120),
    "lockout_threshold": (1, 100),
    "lockout_seconds": (1, 86400),
}


def test_defaults_follow_the_seeds() -> None:
    s = Settings()
    assert (s.enabled, s.window, s.services_ssh, s.otp_digits, s.interval) == (
        False,
        0,
        False,
        6,
        30,
    )
    assert s.enrollment_policy is EnrollmentPolicy.OPTIONAL


@pytest.mark.parametrize("name", BOUNDS)
def test_integer_bounds(name: str) -> None:
    low, high = BOUNDS[name]
    assert getattr(Settings().with_changes({name: low}), name) == low
    assert getattr(Settings().with_changes({name: high}), name) == high
    for bad in (low - 1, high + 1):
        with pytest.raises(InvalidArgument, match=rf"^{name}: must be from {low} to {high}"):
            Settings().with_changes({name: bad})


@pytest.mark.parametrize(
    ("name", "value"),
    [("window", True), ("window", "1"), ("window", 1.0), ("enabled", 1), ("services_ssh", "yes")],
)
def test_wrong_types_refused(name: str, value: Any) -> None:
    with pytest.raises(InvalidArgument, match=f"^{name}:"):
        Settings().with_changes({name: value})


@pytest.mark.parametrize("issuer", ["a:b", "x" * 65, "tab\there", "nl\n"])
def test_bad_issuers_refused(issuer: str) -> None:
    with pytest.raises(InvalidArgument, match="^issuer:"):
        Settings().with_changes({"issuer": issuer})


def test_issuer_accepts_64_printable_and_empty() -> None:
    assert Settings().with_changes({"issuer": "x" * 64}).issuer == "x" * 64
    assert Settings().with_changes({"issuer": ""}).issuer == ""


def test_unknown_setting_refused() -> None:
    with pytest.raises(InvalidArgument, match="^secret: unknown setting"):
        Settings().with_changes({"secret": "x"})


def test_policy_by_name_and_refusal() -> None:
    assert Settings().with_changes({"enrollment_policy": "required"}).enrollment_policy is (
        EnrollmentPolicy.REQUIRED
    )
    with pytest.raises(InvalidArgument, match="^enrollment_policy:"):
        Settings().with_changes({"enrollment_policy": "sometimes"})


def test_round_trip_through_dict() -> None:
    s = Settings(enabled=True, window=3, enrollment_policy=EnrollmentPolicy.REQUIRED, issuer="X")
    assert Settings.from_dict(s.to_dict()) == s
