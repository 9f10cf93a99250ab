"""The access policy: is a code asked of this login, and why (pure).

The hook's questions (core.gate) and `otpgate user show` (ExplainAccess) both
decide here, from the settings, what is known of the account, its group names,
the login's source address (PAM_RHOST) and the time. Nothing here reads NSS or
the clock: the group names come from a function called at most once, and only
when a group rule is set and the account is known (groups cost an NSS call).

Precedence, strongest first (a demanding administrator's reading: the list that
names people who must always give a code wins over every list that spares them):

1. 2FA does not cover the service (`enabled`, `services.ssh`): no code, as ever.
2. `required_groups`: a member is always asked, from anywhere (an exempt network
   too: a bastion that is taken over must not open the way to every admin
   account), and refused without a secret, whatever `enrollment_policy` and
   `enrollment_deadline` say.
3. `exempt_groups`: a member is never asked.
4. `exempt_networks`: no code is asked of a login from there. Matched against
   PAM_RHOST only when it is an IP address: a host name (sshd's UseDNS=yes), an
   empty or unparsable value is never exempt. An IPv4-mapped IPv6 address
   (::ffff:10.0.0.5) matches the IPv4 networks. An unknown account is exempt
   from there as a known one is (otherwise the difference would tell which names
   exist).
5. Otherwise as before: an enrolled account (or an unknown one, which must look
   enrolled) is asked; one without a secret gets the first factor alone under
   `optional`, and under `required` the first factor alone with the enrollment
   hint until the end of `enrollment_deadline` (UTC), refused after it.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import enum
import functools
import ipaddress
from collections.abc import Callable, Collection

from otpgate.core.settings import EnrollmentPolicy, Settings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Reason(enum.Enum):
    NOT_COVERED = "not_covered"  # 2FA is off for this service: no code
    ENROLLED = "enrolled"  # asked for a code
    UNKNOWN_ACCOUNT = "unknown_account"  # asked, as an enrolled account is
    REQUIRED_GROUP = "required_group"  # asked; refused without a secret
    EXEMPT_GROUP = "exempt_group"  # no code
    EXEMPT_NETWORK = "exempt_network"  # no code
    NOT_ENROLLED_OPTIONAL = "not_enrolled_optional"  # no secret, optional: no code
    ENROLLMENT_GRACE = "enrollment_grace"  # no secret, required, before the deadline
    NOT_ENROLLED = "not_enrolled"  # no secret, required: refused, told how to enroll


@dataclasses.dataclass(frozen=True)
class Match:
    """Which rule of the lists applies to this account and address, if any."""

    reason: Reason | None = None  # REQUIRED_GROUP, EXEMPT_GROUP, EXEMPT_NETWORK or None
    matched: str = ""  # the group or network that decided
    # Exemptions that would have applied but a required group overrode.
    overridden: tuple[str, ...] = ()
    groups_checked: bool = False  # the account's groups were resolved


@dataclasses.dataclass(frozen=True)
class Access:
    reason: Reason
    asked: bool  # a code is demanded: the first factor alone does not let in
    refused: bool = False  # no code can let in: the account has no secret
    matched: str = ""  # EXEMPT_*, REQUIRED_GROUP: the network or group
    grace_until: int = 0  # ENROLLMENT_GRACE: the end of the deadline, epoch seconds
    overridden: tuple[str, ...] = ()  # exemptions a required group overrode
    explanation: str = ""  # one line for people

    @property
    def exempt(self) -> bool:
        return self.reason in (Reason.EXEMPT_GROUP, Reason.EXEMPT_NETWORK)


def covers(settings: Settings, pam_service: str) -> bool:
    """Whether 2FA applies to logins through `pam_service` now."""
    if not settings.enabled:
        return False
    # sshd uses its program name as PAM service: "sshd", or a renamed copy "sshd-...".
    if is_ssh(pam_service):
        return settings.services_ssh
    return True


def is_ssh(pam_service: str) -> bool:
    return pam_service == "sshd" or pam_service.startswith("sshd-")


def uses_groups(settings: Settings) -> bool:
    return bool(settings.exempt_groups or settings.required_groups)


def has_rules(settings: Settings) -> bool:
    """Whether any list is set (else no account needs looking at before a code)."""
    return bool(settings.exempt_networks) or uses_groups(settings)


# -- addresses --------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _networks(texts: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    # Parsed once per list (the settings hold them as validated strings).
    return tuple(ipaddress.ip_network(text) for text in texts)


def parse_rhost(rhost: str) -> IPAddress | None:
    """PAM_RHOST as an IP address, or None: a host name, empty, anything else."""
    if not rhost or len(rhost) > 64 or not rhost.isascii() or rhost != rhost.strip():
        return None
    try:
        return ipaddress.ip_address(rhost)
    except ValueError:
        return None


def _candidates(address: IPAddress) -> tuple[IPAddress, ...]:
    # ::ffff:10.0.0.5 is 10.0.0.5 (a dual-stack sshd reports IPv4 clients so), and
    # 10.0.0.5 is ::ffff:10.0.0.5 for a network written in the mapped form.
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return (address,) if mapped is None else (address, mapped)
    return (address, ipaddress.IPv6Address(f"::ffff:{address}"))


def exempt_network(settings: Settings, rhost: str) -> str | None:
    """The first network of exempt_networks that holds `rhost`, or None."""
    if not settings.exempt_networks:
        return None
    address = parse_rhost(rhost)
    if address is None:
        return None
    candidates = _candidates(address)
    for network in _networks(settings.exempt_networks):
        if any(c.version == network.version and c in network for c in candidates):
            return str(network)
    return None


# -- the deadline -----------------------------------------------------------------------


def deadline_end(deadline: str) -> int:
    """The end of the day `deadline` (YYYY-MM-DD) in UTC, epoch seconds: the first
    second at which it has passed."""
    day = datetime.date.fromisoformat(deadline)
    return calendar.timegm(day.timetuple()) + 86400


# -- deciding ---------------------------------------------------------------------------


def match(
    settings: Settings,
    *,
    known: bool,
    groups: Callable[[], Collection[str]],
    rhost: str,
) -> Match:
    """The list that applies, by the precedence above; `groups` is called at most
    once, and only for a known account while a group list is set."""
    names: Collection[str] = ()
    checked = False
    if known and uses_groups(settings):
        names = groups()
        checked = True
    network = exempt_network(settings, rhost)
    required = next((g for g in settings.required_groups if g in names), None)
    exempt_group = next((g for g in settings.exempt_groups if g in names), None)
    if required is not None:
        overridden = []
        if exempt_group is not None:
            overridden.append(f"exempt group {exempt_group}")
        if network is not None:
            overridden.append(f"exempt network {network}")
        return Match(Reason.REQUIRED_GROUP, required, tuple(overridden), checked)
    if exempt_group is not None:
        return Match(Reason.EXEMPT_GROUP, exempt_group, (), checked)
    if network is not None:
        return Match(Reason.EXEMPT_NETWORK, network, (), checked)
    return Match(groups_checked=checked)


def conclude(
    settings: Settings, rule: Match, *, covered: bool, known: bool, enrolled: bool, now: float
) -> Access:
    """The decision, given the rule `match` found (ignored when not covered); without
    its explanation, which only `decide` writes (a login needs none)."""
    if not covered:
        return Access(Reason.NOT_COVERED, asked=False)
    if rule.reason is Reason.REQUIRED_GROUP:
        return Access(
            Reason.REQUIRED_GROUP,
            asked=True,
            refused=not enrolled,
            matched=rule.matched,
            overridden=rule.overridden,
        )
    if rule.reason is not None:  # exempt
        return Access(rule.reason, asked=False, matched=rule.matched)
    if not known:
        return Access(Reason.UNKNOWN_ACCOUNT, asked=True)
    if enrolled:
        return Access(Reason.ENROLLED, asked=True)
    return without_secret(settings, now=now)


def without_secret(settings: Settings, *, now: float) -> Access:
    """An account with no secret that no list names."""
    if settings.enrollment_policy is EnrollmentPolicy.OPTIONAL:
        return Access(Reason.NOT_ENROLLED_OPTIONAL, asked=False)
    if settings.enrollment_deadline:
        end = deadline_end(settings.enrollment_deadline)
        if now < end:
            return Access(Reason.ENROLLMENT_GRACE, asked=False, grace_until=end)
    return Access(Reason.NOT_ENROLLED, asked=True, refused=True)


def decide(
    settings: Settings,
    *,
    covered: bool,
    known: bool,
    enrolled: bool,
    groups: Callable[[], Collection[str]],
    rhost: str,
    now: float,
) -> Access:
    """match, then conclude, then explain: the whole decision for one login, as
    ExplainAccess shows it."""
    rule = match(settings, known=known, groups=groups, rhost=rhost) if covered else Match()
    access = conclude(settings, rule, covered=covered, known=known, enrolled=enrolled, now=now)
    return dataclasses.replace(access, explanation=explain(settings, access, rhost))


# -- for people -------------------------------------------------------------------------


def _where(settings: Settings, rhost: str) -> str:
    if not rhost:
        return "an address outside exempt_networks" if settings.exempt_networks else "anywhere"
    if parse_rhost(rhost) is None:
        return f"{rhost} (not an IP address: never exempt)"
    return rhost


def explain(settings: Settings, access: Access, rhost: str) -> str:
    """One line for people, e.g. "would be asked for a code from 10.0.0.5: no, exempt
    network 10.0.0.0/8"."""
    why = {
        Reason.NOT_COVERED: (
            "2FA is off (enabled=false)"
            if not settings.enabled
            else "2FA is off for this service (services.ssh=false)"
        ),
        Reason.ENROLLED: "enrolled",
        Reason.UNKNOWN_ACCOUNT: "unknown account (asked as an enrolled one is; no code is right)",
        Reason.REQUIRED_GROUP: f"required group {access.matched}",
        Reason.EXEMPT_GROUP: f"exempt group {access.matched}",
        Reason.EXEMPT_NETWORK: f"exempt network {access.matched}",
        Reason.NOT_ENROLLED_OPTIONAL: "not enrolled (enrollment_policy=optional)",
        Reason.ENROLLMENT_GRACE: (
            f"not enrolled, enrollment grace until the end of {settings.enrollment_deadline} "
            "(UTC): the first factor alone, with the enrollment hint"
        ),
        Reason.NOT_ENROLLED: "not enrolled (enrollment_policy=required"
        + (f", enrollment_deadline {settings.enrollment_deadline} passed" if
           settings.enrollment_deadline else "")
        + ")",
    }[access.reason]  # fmt: skip
    if access.overridden:
        why += f" (overrides {' and '.join(access.overridden)})"
    if access.reason is Reason.REQUIRED_GROUP and access.refused:
        why += ", and refused: no secret set up"
    elif access.reason is Reason.NOT_ENROLLED:
        why += ", and refused until enrolled"
    answer = "yes" if access.asked else "no"
    return f"would be asked for a code from {_where(settings, rhost)}: {answer}, {why}"
