"""Global two-factor settings: their defaults, bounds and validation (pure)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import ipaddress
import re
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
# Entries of each access-policy list (exempt_networks, exempt_groups, required_groups):
# enough for any real policy, and a bound on what every login matches against.
POLICY_LIST_MAX = 256
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


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
    # The access policy (core.policy): source networks (CIDR, normalised) and groups
    # (names) from which, or for which, no code is asked; groups always asked.
    exempt_networks: tuple[str, ...] = ()
    exempt_groups: tuple[str, ...] = ()
    required_groups: tuple[str, ...] = ()
    # "YYYY-MM-DD" or empty: under enrollment_policy=required, accounts without a
    # secret still log in with the first factor alone until the end of that day (UTC).
    enrollment_deadline: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The stored form (JSON-ready). Keys added after the first release are left
        out while they hold their defaults: an older otpgated sharing the database
        then still reads the settings, and refuses them (rather than ignore a rule
        it does not know) only once one of those keys is set."""
        data = self._values()
        for name in _LATER_KEYS:
            if data[name] == _DEFAULTS[name]:
                del data[name]
        return data

    def _values(self) -> dict[str, Any]:
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
        values = self._values() | dict(changes)
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
            exempt_networks=check_networks("exempt_networks", values["exempt_networks"]),
            exempt_groups=check_groups("exempt_groups", values["exempt_groups"]),
            required_groups=check_groups("required_groups", values["required_groups"]),
            enrollment_deadline=check_date("enrollment_deadline", values["enrollment_deadline"]),
        )._checked()

    def _checked(self) -> Settings:
        both = sorted(set(self.exempt_groups) & set(self.required_groups))
        if both:
            verb = "is" if len(both) == 1 else "are"
            raise InvalidArgument(
                "exempt_groups",
                f"{', '.join(both)} {verb} also in required_groups: a group is either exempt "
                "or required, never both",
            )
        return self


# Settings.to_dict leaves these out while at their defaults (see there).
_LATER_KEYS = ("exempt_networks", "exempt_groups", "required_groups", "enrollment_deadline")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)}


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


def _entries(field: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidArgument(field, "must be a list of strings")
    if len(value) > POLICY_LIST_MAX:
        raise InvalidArgument(field, f"at most {POLICY_LIST_MAX} entries (got {len(value)})")
    if not all(isinstance(item, str) for item in value):
        raise InvalidArgument(field, "must be a list of strings")
    return list(value)


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))  # first occurrence kept, order kept


def check_networks(field: str, value: Any) -> tuple[str, ...]:
    """Source networks in CIDR notation (IPv4 or IPv6; a bare address is one host),
    normalised ("2001:DB8::/32" -> "2001:db8::/32"). A network with host bits set
    (10.0.0.5/8) is refused rather than widened: it may as well mean the one host."""
    networks = []
    for text in _entries(field, value):
        not_a_network = InvalidArgument(
            field, f"{text!r} is not a network (CIDR, e.g. 10.0.0.0/8 or 2001:db8::/32)"
        )
        if not text.isascii() or "%" in text or text != text.strip():
            raise not_a_network  # a scope (fe80::/64%eth0) names no source address
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                loose = ipaddress.ip_network(text, strict=False)
                host = text.split("/", 1)[0]
                raise InvalidArgument(
                    field,
                    f"{text!r} has host bits set: write {loose} for the network, "
                    f"or {host} for the one host",
                ) from None
            raise not_a_network from None
        networks.append(str(network))
    return _unique(networks)


def check_groups(field: str, value: Any) -> tuple[str, ...]:
    """Group names, checked as account names are (core.accounts.check_username)."""
    from otpgate.core.accounts import check_username  # accounts -> ports -> this module

    names = []
    for name in _entries(field, value):
        try:
            check_username(name, field)
        except InvalidArgument as exc:
            rule = str(exc).split(": ", 1)[1]
            raise InvalidArgument(field, f"{name!r} is not a group name: {rule}") from None
        names.append(name)
    return _unique(names)


def check_date(field: str, value: Any) -> str:
    """A day as YYYY-MM-DD (empty: none)."""
    if not isinstance(value, str):
        raise InvalidArgument(field, "must be a date YYYY-MM-DD, or empty")
    if value == "":
        return value
    try:
        if not _DATE.fullmatch(value):
            raise ValueError
        day = datetime.date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(
            field, f"must be a date YYYY-MM-DD, or empty to clear it (got {value!r})"
        ) from None
    if day.year < 1970:
        raise InvalidArgument(field, f"must be 1970-01-01 or later (got {value!r})")
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
