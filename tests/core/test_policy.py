"""The access policy (core.policy) with an injected clock, then as the PAM gate
applies it (core.gate) over the service with fake accounts and groups."""

from __future__ import annotations

import calendar
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest

from otpgate.core import policy
from otpgate.core.crypto import Keyring
from otpgate.core.gate import ENROLL_HINT, Gate, Verdict, grace_hint
from otpgate.core.policy import Reason
from otpgate.core.records import Account, PasswordResult
from otpgate.core.service import TwoFactorService
from otpgate.core.settings import EnrollmentPolicy, Settings
from otpgate.store.sqlite import SQLiteStore
from tests.core.test_service import Accounts, Clock, code_at

ON = Settings(enabled=True, services_ssh=True)
REQUIRED = ON.with_changes({"enrollment_policy": EnrollmentPolicy.REQUIRED})
# 2027-01-31 ends at 2027-02-01T00:00:00Z.
DEADLINE_END = calendar.timegm((2027, 2, 1, 0, 0, 0))


def settings(base: Settings = ON, **changes: Any) -> Settings:
    return base.with_changes(changes)


class Groups:
    """A group lookup that counts its calls."""

    def __init__(self, *names: str) -> None:
        self.names = frozenset(names)
        self.calls = 0

    def __call__(self) -> Collection[str]:
        self.calls += 1
        return self.names


def decide(
    s: Settings,
    *,
    rhost: str = "",
    groups: Callable[[], Collection[str]] | None = None,
    known: bool = True,
    enrolled: bool = True,
    covered: bool = True,
    now: float = DEADLINE_END - 86400 * 30,
) -> policy.Access:
    return policy.decide(
        s,
        covered=covered,
        known=known,
        enrolled=enrolled,
        groups=groups or Groups(),
        rhost=rhost,
        now=now,
    )


# -- exempt networks ------------------------------------------------------------------------

NETS = settings(exempt_networks=["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])


@pytest.mark.parametrize(
    ("rhost", "matched"),
    [
        ("10.0.0.5", "10.0.0.0/8"),
        ("10.255.255.255", "10.0.0.0/8"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("2001:db8::1", "2001:db8::/32"),
        ("2001:DB8:ffff::9", "2001:db8::/32"),
        ("::ffff:10.0.0.5", "10.0.0.0/8"),  # IPv4-mapped: the IPv4 network
        ("::FFFF:10.1.2.3", "10.0.0.0/8"),
    ],
)
def test_an_address_in_an_exempt_network_is_not_asked(rhost: str, matched: str) -> None:
    for enrolled in (True, False):
        access = decide(NETS, rhost=rhost, enrolled=enrolled)
        assert (access.reason, access.asked, access.matched) == (
            Reason.EXEMPT_NETWORK,
            False,
            matched,
        )
    assert decide(NETS, rhost="10.0.0.5").explanation == (
        "would be asked for a code from 10.0.0.5: no, exempt network 10.0.0.0/8"
    )


@pytest.mark.parametrize(
    "rhost",
    [
        "",  # no PAM_RHOST: never exempt
        "11.0.0.1",
        "192.0.2.8",
        "2001:db9::1",
        "::ffff:11.0.0.1",
        "::10.0.0.5",  # IPv4-compatible, not mapped: another address
        "bastion.example.org",  # a host name (UseDNS=yes): never exempt
        "localhost",
        "10.0.0.5.example.org",
        "010.0.0.5",  # leading zeros: not an address Python (or sshd) writes
        " 10.0.0.5",
        "10.0.0.5 ",
        "10.0.0.5/8",
        "10.0.0.0/8",
        "10.0.0",
        "[2001:db8::1]",
        "[2001:db8::1]:22",
        "10.0.0.5:22",
        "?",
        "\x0010.0.0.5",
        "10.0.0.5\n",
        "\u0661\u0660.0.0.5",  # Arabic-Indic digits
        "1" * 300,
    ],
)
def test_anything_else_is_asked(rhost: str) -> None:
    access = decide(NETS, rhost=rhost)
    assert (access.reason, access.asked) == (Reason.ENROLLED, True), rhost


def test_scoped_link_local_addresses_match_by_address() -> None:
    s = settings(exempt_networks=["fe80::/10"])
    assert decide(s, rhost="fe80::1%eth0").reason is Reason.EXEMPT_NETWORK
    assert decide(s, rhost="fe81::1").reason is Reason.EXEMPT_NETWORK
    assert decide(s, rhost="fec0::1").reason is Reason.ENROLLED


def test_a_mapped_network_matches_ipv4_addresses_too() -> None:
    s = settings(exempt_networks=["::ffff:10.0.0.0/104"])
    assert decide(s, rhost="10.0.0.5").reason is Reason.EXEMPT_NETWORK
    assert decide(s, rhost="::ffff:10.0.0.5").reason is Reason.EXEMPT_NETWORK
    assert decide(s, rhost="11.0.0.5").reason is Reason.ENROLLED


def test_the_whole_internet_can_be_exempted_if_asked_for() -> None:
    s = settings(exempt_networks=["0.0.0.0/0"])
    assert decide(s, rhost="203.0.113.9").reason is Reason.EXEMPT_NETWORK
    assert decide(s, rhost="2001:db8::1").reason is Reason.ENROLLED  # not IPv6
    assert decide(s, rhost="::ffff:203.0.113.9").reason is Reason.EXEMPT_NETWORK


def test_an_unknown_account_from_an_exempt_network_is_exempt_like_any() -> None:
    # Otherwise "asked" or "not asked" from there would tell which names exist.
    groups = Groups()
    access = decide(NETS, rhost="10.0.0.5", known=False, enrolled=False, groups=groups)
    assert (access.reason, access.asked) == (Reason.EXEMPT_NETWORK, False)
    access = decide(NETS, rhost="11.0.0.5", known=False, enrolled=False, groups=groups)
    assert (access.reason, access.asked, access.refused) == (Reason.UNKNOWN_ACCOUNT, True, False)
    assert groups.calls == 0


# -- groups ---------------------------------------------------------------------------------

GROUPS = settings(
    exempt_networks=["10.0.0.0/8"], exempt_groups=["ops", "svc"], required_groups=["admins"]
)


def test_groups_are_resolved_once_and_only_when_a_group_rule_is_set() -> None:
    groups = Groups("ops")
    assert decide(NETS, rhost="10.0.0.5", groups=groups).reason is Reason.EXEMPT_NETWORK
    assert decide(ON, groups=groups).reason is Reason.ENROLLED
    assert groups.calls == 0  # no group list set
    assert decide(GROUPS, rhost="10.0.0.5", groups=groups).reason is Reason.EXEMPT_GROUP
    assert groups.calls == 1
    assert decide(GROUPS, groups=groups, covered=False).reason is Reason.NOT_COVERED
    assert decide(GROUPS, groups=groups, known=False).reason is Reason.UNKNOWN_ACCOUNT
    assert groups.calls == 1  # neither for a service 2FA does not cover, nor a stranger
    rule = policy.match(GROUPS, known=True, groups=groups, rhost="")
    assert (rule.reason, rule.groups_checked, groups.calls) == (Reason.EXEMPT_GROUP, True, 2)


def test_an_exempt_group_member_is_never_asked() -> None:
    for enrolled in (True, False):
        for base in (GROUPS, settings(REQUIRED, exempt_groups=["svc"])):
            access = decide(base, groups=Groups("users", "svc"), enrolled=enrolled)
            assert (access.reason, access.asked, access.matched) == (
                Reason.EXEMPT_GROUP,
                False,
                "svc",
            )
    assert decide(GROUPS, groups=Groups("ops")).explanation == (
        "would be asked for a code from an address outside exempt_networks: no, exempt group ops"
    )


def test_a_required_group_member_is_always_asked_and_refused_without_a_secret() -> None:
    groups = Groups("admins")
    for base in (GROUPS, settings(GROUPS, enrollment_policy="required")):
        enrolled = decide(base, groups=groups)
        assert (enrolled.reason, enrolled.asked, enrolled.refused, enrolled.matched) == (
            Reason.REQUIRED_GROUP,
            True,
            False,
            "admins",
        )
        # Without a secret: refused, whatever enrollment_policy says (optional too).
        bare = decide(base, groups=groups, enrolled=False)
        assert (bare.reason, bare.asked, bare.refused) == (Reason.REQUIRED_GROUP, True, True)
        assert bare.explanation == (
            "would be asked for a code from an address outside exempt_networks: yes, required "
            "group admins, and refused: no secret set up"
        )
    # ...and no enrollment grace either.
    graced = settings(GROUPS, enrollment_policy="required", enrollment_deadline="2027-01-31")
    assert decide(graced, groups=groups, enrolled=False).refused


def test_precedence_required_group_over_exempt_group_over_exempt_network() -> None:
    both = Groups("ops", "admins")
    access = decide(GROUPS, rhost="10.0.0.5", groups=both)
    assert (access.reason, access.asked) == (Reason.REQUIRED_GROUP, True)
    assert access.overridden == ("exempt group ops", "exempt network 10.0.0.0/8")
    assert access.explanation == (
        "would be asked for a code from 10.0.0.5: yes, required group admins (overrides "
        "exempt group ops and exempt network 10.0.0.0/8)"
    )
    access = decide(GROUPS, rhost="10.0.0.5", groups=Groups("ops"))
    assert (access.reason, access.matched) == (Reason.EXEMPT_GROUP, "ops")
    access = decide(GROUPS, rhost="10.0.0.5", groups=Groups("users"))
    assert (access.reason, access.matched) == (Reason.EXEMPT_NETWORK, "10.0.0.0/8")
    access = decide(GROUPS, rhost="11.0.0.5", groups=Groups("users"))
    assert access.reason is Reason.ENROLLED
    # Nothing at all where 2FA does not apply: no list makes a code appear.
    assert decide(GROUPS, groups=both, covered=False).asked is False


def test_group_names_match_exactly() -> None:
    for names in (("Admins",), ("admins2",), ("admin",), ("ops ",)):
        assert decide(GROUPS, groups=Groups(*names)).reason is Reason.ENROLLED, names


# -- enrollment_policy and the deadline -------------------------------------------------


def test_without_a_secret_optional_required_and_unset_deadline() -> None:
    access = decide(ON, enrolled=False)
    assert (access.reason, access.asked) == (Reason.NOT_ENROLLED_OPTIONAL, False)
    access = decide(REQUIRED, enrolled=False)
    assert (access.reason, access.asked, access.refused) == (Reason.NOT_ENROLLED, True, True)
    assert access.explanation == (
        "would be asked for a code from anywhere: yes, not enrolled "
        "(enrollment_policy=required), and refused until enrolled"
    )


@pytest.mark.parametrize(
    ("now", "graced"),
    [
        (DEADLINE_END - 86400 * 400, True),  # long before
        (calendar.timegm((2027, 1, 31, 0, 0, 0)), True),  # the day itself begins
        (DEADLINE_END - 1, True),  # its last second (UTC)
        (DEADLINE_END - 0.001, True),
        (DEADLINE_END, False),  # the day after begins: refused
        (DEADLINE_END + 1, False),
        (DEADLINE_END + 86400 * 400, False),
    ],
)
def test_the_deadline_is_the_end_of_its_day_in_utc(now: float, graced: bool) -> None:
    s = settings(REQUIRED, enrollment_deadline="2027-01-31")
    access = decide(s, enrolled=False, now=now)
    if graced:
        assert (access.reason, access.asked, access.refused, access.grace_until) == (
            Reason.ENROLLMENT_GRACE,
            False,
            False,
            DEADLINE_END,
        )
        assert "enrollment grace until the end of 2027-01-31 (UTC)" in access.explanation
    else:
        assert (access.reason, access.refused) == (Reason.NOT_ENROLLED, True)
        assert "enrollment_deadline 2027-01-31 passed" in access.explanation
    # An enrolled account is asked, deadline or not.
    assert decide(s, now=now).reason is Reason.ENROLLED


def test_the_deadline_does_nothing_under_optional() -> None:
    s = settings(enrollment_deadline="2027-01-31")
    for now in (DEADLINE_END - 1, DEADLINE_END + 1):
        assert decide(s, enrolled=False, now=now).reason is Reason.NOT_ENROLLED_OPTIONAL


def test_deadline_end() -> None:
    assert policy.deadline_end("2027-01-31") == DEADLINE_END
    assert policy.deadline_end("1970-01-01") == 86400
    assert policy.deadline_end("2028-02-29") == calendar.timegm((2028, 3, 1, 0, 0, 0))


def test_not_covered_explains_which_switch() -> None:
    assert decide(Settings(), covered=False).explanation == (
        "would be asked for a code from anywhere: no, 2FA is off (enabled=false)"
    )
    assert decide(Settings(enabled=True), covered=False).explanation == (
        "would be asked for a code from anywhere: no, 2FA is off for this service "
        "(services.ssh=false)"
    )
    assert policy.covers(Settings(enabled=True), "sudo")
    assert not policy.covers(Settings(enabled=True), "sshd-otpgate-test")


def test_host_names_are_said_to_be_never_exempt() -> None:
    assert decide(NETS, rhost="bastion.example.org").explanation == (
        "would be asked for a code from bastion.example.org (not an IP address: never "
        "exempt): yes, enrolled"
    )


# -- through the gate -------------------------------------------------------------------


class FakeGroups:
    def __init__(self) -> None:
        self.table: dict[str, frozenset[str]] = {}
        self.asked: list[str] = []

    def __call__(self, account: Account) -> frozenset[str]:
        self.asked.append(account.username)
        return self.table.get(account.username, frozenset())


@pytest.fixture
def gated(tmp_path: Path) -> tuple[TwoFactorService, Clock, FakeGroups, Gate]:
    clock, accounts, groups = Clock(), Accounts(), FakeGroups()
    accounts.add("alice", 1000)
    accounts.add("bob", 1001)
    service = TwoFactorService(
        SQLiteStore(str(tmp_path / "db.sqlite3")),
        Keyring(b"k" * 32),
        default_issuer="Test",
        hostname="h",
        accounts=accounts,
        details=accounts.details,
        groups=groups,  # the daemon's is CachedGroupNames
        clock=clock,
    )
    service.update_config({"enabled": True, "services_ssh": True})
    return service, clock, groups, Gate(service, lambda user, password: PasswordResult.OK)


def test_gate_exempt_network_asks_no_code_in_any_mode(gated: tuple) -> None:
    service, _, groups, gate = gated
    service.renew_secret("alice")
    service.update_config({"exempt_networks": ["10.0.0.0/8"]})
    for user in ("alice", "bob", "nosuchuser"):  # enrolled, not, unknown: all alike
        assert gate.check(user, "sshd", "10.0.0.5").verdict is Verdict.NOT_REQUIRED
        assert gate.verify(user, "sshd", "000000", "10.0.0.5").verdict is Verdict.NOT_REQUIRED
    # Nothing counted: an exempt login's "code" is never looked at.
    assert service.get_user("alice").record.failures == 0  # type: ignore[union-attr]
    assert gate.verify_single_prompt("alice", "sshd", "pw", "10.0.0.5").verdict is Verdict.ALLOW
    # From elsewhere: as before.
    assert gate.check("alice", "sshd", "11.0.0.5").verdict is Verdict.OTP_REQUIRED
    assert gate.check("nosuchuser", "sshd", "11.0.0.5").verdict is Verdict.OTP_REQUIRED
    assert gate.check("alice", "sshd").verdict is Verdict.OTP_REQUIRED  # no rhost
    assert gate.verify("alice", "sshd", "000000", "host.example").verdict is Verdict.DENY
    assert groups.asked == []  # no group list set: NSS never asked for groups


def test_gate_groups(gated: tuple) -> None:
    service, clock, groups, gate = gated
    service.renew_secret("alice")
    groups.table = {"alice": frozenset({"ops"}), "bob": frozenset({"admins"})}
    service.update_config(
        {"exempt_groups": ["ops"], "required_groups": ["admins"], "exempt_networks": ["10.0.0.0/8"]}
    )
    # alice (enrolled, exempt group): no code, wherever from.
    assert gate.check("alice", "sshd", "11.0.0.5").verdict is Verdict.NOT_REQUIRED
    assert gate.verify("alice", "sshd", "000000", "11.0.0.5").verdict is Verdict.NOT_REQUIRED
    # bob (no secret, required group, optional policy): refused, from the exempt network too.
    for rhost in ("11.0.0.5", "10.0.0.5"):
        check = gate.check("bob", "sshd", rhost)
        assert (check.verdict, check.message) == (Verdict.NOT_ENROLLED, ENROLL_HINT)
        assert gate.verify("bob", "sshd", "123456", rhost).verdict is Verdict.NOT_ENROLLED
        prompt = gate.verify_single_prompt("bob", "sshd", "pw", rhost)
        assert prompt.verdict is Verdict.NOT_ENROLLED
    # Enrolled, bob is asked from the exempt network, and a right code lets him in.
    service.renew_secret("bob")
    assert gate.check("bob", "sshd", "10.0.0.5").verdict is Verdict.OTP_REQUIRED
    code = code_at(service, "bob", clock.now)
    assert gate.verify("bob", "sshd", code, "10.0.0.5").verdict is Verdict.ALLOW
    # A stranger has no groups: asked, as an enrolled account.
    assert gate.check("nosuchuser", "sshd", "11.0.0.5").verdict is Verdict.OTP_REQUIRED
    assert "nosuchuser" not in groups.asked


def test_gate_enrollment_grace_lets_in_with_the_hint_and_audits(gated: tuple) -> None:
    service, clock, _, gate = gated
    service.update_config(
        {"enrollment_policy": EnrollmentPolicy.REQUIRED, "enrollment_deadline": "2027-01-31"}
    )
    hint = grace_hint("2027-01-31")
    assert "otpgate renew-secret" in hint
    clock.now = DEADLINE_END - 1
    assert gate.check("bob", "sshd").verdict is Verdict.NOT_REQUIRED
    assert gate.check("bob", "sshd").message == hint
    verify = gate.verify("bob", "sshd", "123456")
    assert (verify.verdict, verify.message) == (Verdict.NOT_REQUIRED, hint)
    single = gate.verify_single_prompt("bob", "sshd", "pw")
    assert (single.verdict, single.message) == (Verdict.ALLOW, hint)
    events = [e for e in service.audit_events(username="bob") if e.event == "enrollment_grace"]
    assert [e.detail for e in events] == ["until=2027-01-31"] * 4
    # From the first second after the day: refused as under "required".
    clock.now = DEADLINE_END
    check = gate.check("bob", "sshd")
    assert (check.verdict, check.message) == (Verdict.NOT_ENROLLED, ENROLL_HINT)
    assert gate.verify("bob", "sshd", "123456").verdict is Verdict.NOT_ENROLLED
    assert gate.verify_single_prompt("bob", "sshd", "pw").verdict is Verdict.NOT_ENROLLED
    # A wrong password in single-prompt mode is refused before any grace.
    clock.now = DEADLINE_END - 1
    wrong = Gate(service, lambda user, password: PasswordResult.BAD)
    assert wrong.verify_single_prompt("bob", "sshd", "pw").verdict is Verdict.DENY
    # An enrolled account is asked, grace or not.
    service.renew_secret("alice")
    assert gate.check("alice", "sshd").verdict is Verdict.OTP_REQUIRED


def test_explain_access_resolves_groups_only_for_group_rules(gated: tuple) -> None:
    service, _, groups, _ = gated
    access, names = service.explain_access("alice", rhost="", pam_service="sshd")
    assert (access.reason, names, groups.asked) == (Reason.NOT_ENROLLED_OPTIONAL, frozenset(), [])
    groups.table = {"alice": frozenset({"ops", "users"})}
    service.update_config({"exempt_groups": ["ops"]})
    access, names = service.explain_access("alice", rhost="10.0.0.5", pam_service="sshd")
    assert (access.reason, names, groups.asked) == (
        Reason.EXEMPT_GROUP,
        frozenset({"ops", "users"}),
        ["alice"],
    )
