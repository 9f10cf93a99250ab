"""Every bound of every setting, accepted and refused."""

from __future__ import annotations

import json
import re
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


# -- the access policy's settings ---------------------------------------------------------


def test_policy_defaults_change_nothing() -> None:
    s = Settings()
    assert (s.exempt_networks, s.exempt_groups, s.required_groups) == ((), (), ())
    assert s.enrollment_deadline == ""


POLICY_KEYS = ("exempt_networks", "exempt_groups", "required_groups", "enrollment_deadline")
FIRST_KEYS = ["enabled", "window", "services_ssh", "otp_digits", "interval", "issuer",
              "enrollment_policy", "lockout_threshold", "lockout_seconds"]  # fmt: skip


def test_settings_stored_before_the_policy_load_and_an_older_daemon_reads_ours() -> None:
    # JSON written by an otpgated without these fields: the defaults fill them in.
    old = {key: Settings().to_dict()[key] for key in FIRST_KEYS} | {"window": 2}
    assert Settings.from_dict(old) == Settings(window=2)
    # And what we store holds no key an older otpgated does not know, until one is set
    # (then it refuses the settings: better than to ignore a rule it cannot apply).
    assert list(Settings(window=2).to_dict()) == FIRST_KEYS
    stored = Settings(exempt_groups=("ops",)).to_dict()
    assert [key for key in stored if key not in FIRST_KEYS] == ["exempt_groups"]
    values = {"exempt_networks": ["10.0.0.0/8"], "enrollment_deadline": "2027-01-31"}
    for key in POLICY_KEYS:
        changed = Settings().with_changes({key: values.get(key, ["ops"])})
        assert key in changed.to_dict()
        assert Settings.from_dict(json.loads(json.dumps(changed.to_dict()))) == changed


def test_networks_are_normalised_deduplicated_and_round_trip() -> None:
    s = Settings().with_changes(
        {"exempt_networks": ["10.0.0.0/8", "2001:DB8::/32", "192.0.2.7", "10.0.0.0/8", "::/0"]}
    )
    assert s.exempt_networks == ("10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32", "::/0")
    assert Settings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert Settings().with_changes({"exempt_networks": []}).exempt_networks == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "10.0.0.5/8",
            "'10.0.0.5/8' has host bits set: write 10.0.0.0/8 for the network, or 10.0.0.5 "
            "for the one host",
        ),
        (
            "2001:db8::1/32",
            "'2001:db8::1/32' has host bits set: write 2001:db8::/32 for the network, or "
            "2001:db8::1 for the one host",
        ),
        ("10.0.0.0/33", "'10.0.0.0/33' is not a network"),
        ("bastion.example.org", "'bastion.example.org' is not a network"),
        ("", "'' is not a network"),
        (" 10.0.0.0/8", "' 10.0.0.0/8' is not a network"),
        ("010.0.0.0/8", "'010.0.0.0/8' is not a network"),
        ("fe80::/64%eth0", "'fe80::/64%eth0' is not a network"),
        ("fe80::%eth0/64", "'fe80::%eth0/64' is not a network"),
        ("10.0.0.0/8,11.0.0.0/8", "'10.0.0.0/8,11.0.0.0/8' is not a network"),
        ("\u0661\u0660.0.0.0/8", "'\u0661\u0660.0.0.0/8' is not a network"),
    ],
)
def test_bad_networks_refused_naming_the_field_and_value(value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match="^exempt_networks: " + re.escape(message)):
        Settings().with_changes({"exempt_networks": ["192.0.2.0/24", value]})


@pytest.mark.parametrize("field", ["exempt_networks", "exempt_groups", "required_groups"])
def test_policy_lists_are_lists_of_strings_and_bounded(field: str) -> None:
    for bad in ("10.0.0.0/8", None, [1], [["x"]], {"x": 1}):
        with pytest.raises(InvalidArgument, match=f"^{field}: must be a list of strings"):
            Settings().with_changes({field: bad})
    many = [f"10.{i // 256}.{i % 256}.0/24" if field == "exempt_networks" else f"g{i}"
            for i in range(257)]  # fmt: skip
    assert len(getattr(Settings().with_changes({field: many[:256]}), field)) == 256
    with pytest.raises(InvalidArgument, match=f"^{field}: at most 256 entries \\(got 257\\)"):
        Settings().with_changes({field: many})


@pytest.mark.parametrize("field", ["exempt_groups", "required_groups"])
def test_group_names_checked_like_account_names(field: str) -> None:
    ok = ["ops", "domain_admins", "DOMAIN\\admins", "admins@example.org", "g.1", "a-b", "x$"]
    assert getattr(Settings().with_changes({field: [*ok, "ops"]}), field) == tuple(ok)
    for bad in ("", "-ops", ".ops", "o ps", "ops\n", "o:ps", "o/ps", "x" * 257):
        with pytest.raises(InvalidArgument, match=f"^{field}: {re.escape(repr(bad))} is not a"):
            Settings().with_changes({field: [bad]})


def test_a_group_is_never_both_exempt_and_required() -> None:
    with pytest.raises(
        InvalidArgument,
        match="^exempt_groups: admins is also in required_groups: a group is either exempt "
        "or required, never both",
    ):
        Settings().with_changes({"exempt_groups": ["ops", "admins"], "required_groups": ["admins"]})
    with pytest.raises(InvalidArgument, match="^exempt_groups: a, b are also in required_groups"):
        Settings(exempt_groups=("b", "a")).with_changes({"required_groups": ["a", "b", "c"]})
    # Case matters in group names: these are two groups.
    Settings().with_changes({"exempt_groups": ["Admins"], "required_groups": ["admins"]})


def test_enrollment_deadline() -> None:
    assert Settings().with_changes({"enrollment_deadline": "2027-01-31"}).enrollment_deadline == (
        "2027-01-31"
    )
    assert (
        Settings(enrollment_deadline="2027-01-31").with_changes({"enrollment_deadline": ""})
        == Settings()
    )
    assert Settings().with_changes({"enrollment_deadline": "2020-02-29"})  # past days are days
    bad_days = ["2027-1-31", "2027-02-30", "2027-13-01", "31.01.2027", "2027-01-31T00:00"]
    bad_days += ["20270131", " 2027-01-31", "2027-01-31 ", "tomorrow", "\u0662027-01-31"]
    for bad in bad_days:
        with pytest.raises(
            InvalidArgument,
            match=f"^enrollment_deadline: must be a date YYYY-MM-DD, or empty to clear it "
            f"\\(got {re.escape(repr(bad))}\\)",
        ):
            Settings().with_changes({"enrollment_deadline": bad})
    with pytest.raises(InvalidArgument, match="^enrollment_deadline: must be 1970-01-01 or later"):
        Settings().with_changes({"enrollment_deadline": "1969-12-31"})
    with pytest.raises(InvalidArgument, match="^enrollment_deadline: must be a date"):
        Settings().with_changes({"enrollment_deadline": 20270131})
