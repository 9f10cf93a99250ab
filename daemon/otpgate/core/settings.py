"""Global two-factor settings: their defaults, bounds and validation (pure)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from otpgate.errors import InvalidArgument


class EnrollmentPolicy(enum.Enum):
    """What an SSH login to an account without a secret gets while 2FA is on."""

    OPTIONAL = "optional"  # the first factor alone (as TrueNAS)
    REQUIRED = "required"  # denied, and told how to enroll


# Bounds: (low, high) inclusive. The seeds give the lower bounds; the upper ones keep a
# typo from turning 2FA into a formality (a window of 1000 steps accepts hours of codes).
WINDOW_BOUNDS = (0, 10)
DIGITS_BOUNDS = (6, 8)
# 120: pyotp refuses longer steps (NIST SP 800-63B: a new code at least every two minutes).
INTERVAL_BOUNDS = (5, 120)
LOCKOUT_THRESHOLD_BOUNDS = (1, 100)
# A day: also where the doubling of lockouts in a row stops (core.lockout).
LOCKOUT_SECONDS_BOUNDS = (1, 86400)
ISSUER_MAX_LEN = 64


@dataclasses.dataclass(frozen=True)
class Settings:
    enabled: bool = False
    window: int = 0
    services_ssh: bool = False
    otp_digits: int = 6
    interval: int = 30
    issuer: str = ""  # empty: the daemon's configured default
    enrollment_policy: EnrollmentPolicy = EnrollmentPolicy.OPTIONAL
    lockout_threshold: int = 5
    lockout_seconds: int = 300

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["enrollment_policy"] = self.enrollment_policy.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Settings:
        """Validate a complete or partial mapping on top of the defaults."""
        return cls().with_changes(data)

    def with_changes(self, changes: Mapping[str, Any]) -> Settings:
        """A copy with `changes` applied; raises InvalidArgument on the first bad field."""
        known = {f.name for f in dataclasses.fields(self)}
        for name in changes:
            if name not in known:
                raise InvalidArgument(name, f"unknown setting; known: {', '.join(sorted(known))}")
        values = self.to_dict() | dict(changes)
        return Settings(
            enabled=_bool("enabled", values["enabled"]),
            window=check_int("window", values["window"], WINDOW_BOUNDS),
            services_ssh=_bool("services_ssh", values["services_ssh"]),
            otp_digits=check_int("otp_digits", values["otp_digits"], DIGITS_BOUNDS),
            interval=check_int("interval", values["interval"], INTERVAL_BOUNDS),
            issuer=check_issuer("issuer", values["issuer"], allow_empty=True),
            enrollment_policy=_policy(values["enrollment_policy"]),
            lockout_threshold=check_int(
                "lockout_threshold", values["lockout_threshold"], LOCKOUT_THRESHOLD_BOUNDS
            ),
            lockout_seconds=check_int(
                "lockout_seconds", values["lockout_seconds"], LOCKOUT_SECONDS_BOUNDS
            ),
        )


def check_int(field: str, value: Any, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer from {low} to {high}")
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be from {low} to {high} (got {value})")
    return value


def check_issuer(field: str, value: Any, *, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(field, "must be a string")
    if value == "" and allow_empty:
        return value
    # The Key Uri Format separates issuer and account with ':' in the label.
    if not 1 <= len(value) <= ISSUER_MAX_LEN or ":" in value or not value.isprintable():
        reset = " (or empty, to reset it to the default)" if allow_empty else ""
        raise InvalidArgument(
            field, f"must be 1 to {ISSUER_MAX_LEN} printable characters without ':'{reset}"
        )
    return value


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(field, "must be true or false")
    return value


def _policy(value: Any) -> EnrollmentPolicy:
    if isinstance(value, EnrollmentPolicy):
        return value
    try:
        return EnrollmentPolicy(value)
    except ValueError:
        choices = ", ".join(p.value for p in EnrollmentPolicy)
        raise InvalidArgument("enrollment_policy", f"must be one of {choices}") from None
