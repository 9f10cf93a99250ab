"""What the SSH stacks' in-process gate reads before the code prompt.

A prompt-when-needed stack once ran the hook twice per login: `check` (is a code
needed?) before the prompt, `verify` after it. Two stock modules now answer the
first question in-process for most logins, from two files the daemon keeps:

    ask            pam_listfile (item=user sense=allow): one account per line, each
                   enrolled and asked for a code from an address no exemption covers
    networks.conf  pam_access: for a listed account, whether this address is exempt
                   (then `check` runs after all, and says "no code")

The files can only ever skip `check`, never the code: a login they let past goes to
the prompt and to `verify`, where the daemon decides as it always did. So every
flaw of theirs fails closed. An account missing from `ask` (the file missing, cut
short, stale, refused by pam_listfile for being world-writable, a symlink or a
directory), or a `networks.conf` pam_access cannot read, sends the login through
`check`, the old two hook calls; an account listed wrongly (its secret removed
since, or an exempt network the file does not know) is shown a prompt it need not
answer: `verify` with first-factor=required lets any answer through when the
daemon says no code is needed.

Names are written only where the module reading them cannot take them for anything
but that one account: `ask` holds any name without blanks or control characters, up
to 253 bytes (pam_listfile splits longer lines); networks.conf only plain ones
(pam_access treats ALL, LOCAL, EXCEPT, @netgroup and (group) specially, and ignores
case). A name left out costs its logins the extra `check`, nothing more.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections import Counter
from collections.abc import Collection

from otpgate.core import policy
from otpgate.core.paths import ASK_FILE, NETWORKS_FILE
from otpgate.core.policy import IPNetwork
from otpgate.core.records import Account
from otpgate.core.service import TwoFactorService
from otpgate.core.settings import Settings

__all__ = [
    "ASK_FILE",
    "NETWORKS_FILE",
    "GateLists",
    "gate_lists",
    "listable",
    "render_ask",
    "render_networks",
]

# The PAM service a gate line serves: the stacks are SSH's ("sshd", "sshd-...").
_SSH_SERVICE = "sshd"
# The names networks.conf may hold: pam_access reads nothing else into them.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}\$?")
_ACCESS_KEYWORDS = frozenset({"ALL", "LOCAL", "EXCEPT"})


@dataclasses.dataclass(frozen=True)
class GateLists:
    # Enrolled accounts asked for a code from any address no exempt network covers.
    asked: tuple[str, ...] = ()
    # Of those, the ones a required group asks from everywhere (exempt networks too).
    everywhere: tuple[str, ...] = ()
    # exempt_networks, as the settings hold them.
    networks: tuple[str, ...] = ()


def _plain(name: str) -> bool:
    """A name pam_access reads as that one account."""
    return bool(_PLAIN_NAME.fullmatch(name)) and name.upper() not in _ACCESS_KEYWORDS


def listable(name: str) -> bool:
    """A name pam_listfile reads as that one line: any but blanks and control
    characters (alice@example.com and DOMAIN\\alice included), 253 bytes at most
    (pam_listfile reads lines of at most 255 bytes with their newline: a longer name
    would be read as two)."""
    return (
        0 < len(name.encode()) <= 253 and name.isprintable() and not any(c.isspace() for c in name)
    )


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _access_forms(text: str) -> list[str]:
    """`text` as pam_access networks: also in the other notation (10.0.0.0/8 and
    its ::ffff: mapped form), as the policy matches both; /0 as two /1, since
    pam_access (1.5.2) matches nothing against a /0."""
    network = ipaddress.ip_network(text)
    networks: list[IPNetwork] = [network]
    if isinstance(network, ipaddress.IPv4Network):
        mapped = ipaddress.IPv6Address(f"::ffff:{network.network_address}")
        networks.append(ipaddress.IPv6Network(f"{mapped}/{96 + network.prefixlen}"))
    elif network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        inner = network.network_address.ipv4_mapped
        assert inner is not None
        networks.append(ipaddress.IPv4Network(f"{inner}/{network.prefixlen - 96}"))
    elif _MAPPED.subnet_of(network):  # ::/0, ::/64...: every IPv4 address too
        networks.append(ipaddress.IPv4Network("0.0.0.0/0"))
    forms = []
    for each in networks:
        halves = each.subnets(prefixlen_diff=1) if each.prefixlen == 0 else [each]
        forms += [str(half) for half in halves]
    return forms


# HostGate.AskList's bound per call: a page of names, not a whole directory.
MAX_ASK_NAMES = 4096


def gate_lists(
    service: TwoFactorService,
    usernames: Collection[str] | None = None,
    *,
    enrolled: Collection[Account] | None = None,
) -> GateLists:
    """The lists for the service's current settings, secrets and groups.

    With `usernames` (HostGate.AskList, for an edge's files): those names instead of
    the enrolled accounts, each listed exactly when Check, from an address no
    exemption covers, would ask it for a code; so unknown names are listed as
    enrolled ones are, since Check does not tell them apart either. `enrolled`: the
    service's enrolled_accounts() if the caller has them at hand (a recent copy)."""
    settings = service.get_config()
    networks = tuple(settings.exempt_networks)
    if not policy.covers(settings, _SSH_SERVICE):
        return GateLists(networks=networks)
    if enrolled is None:
        enrolled = service.enrolled_accounts()
    holders = {account.username: account for account in enrolled}
    asked: list[str] = []
    everywhere: list[str] = []
    now = service.now()
    for name in sorted(holders if usernames is None else set(usernames)):
        if not listable(name):
            continue
        account = holders.get(name) or service.lookup(name)
        rule = policy.Match() if account is None else _rule(service, settings, account)
        access = policy.conclude(
            settings, rule, covered=True, known=account is not None, enrolled=name in holders,
            now=now,
        )  # fmt: skip
        if access.asked and not access.refused:
            asked.append(name)
            # Only of use against an exempt network, and only told then: Check
            # tells a required member from another account only there.
            if rule.reason is policy.Reason.REQUIRED_GROUP and networks:
                everywhere.append(name)
    return GateLists(tuple(asked), tuple(everywhere), networks)


def _rule(service: TwoFactorService, settings: Settings, account: Account) -> policy.Match:
    # From no address: only the groups can exempt here; networks.conf does the rest.
    return policy.match(settings, known=True, groups=lambda: service.group_names(account), rhost="")


def render_ask(lists: GateLists) -> str:
    # Checked again here: an edge's lists come from the network.
    return "".join(f"{name}\n" for name in lists.asked if listable(name))


def render_networks(lists: GateLists) -> str:
    """pam_access rules: success (no exemption: go to the prompt) unless the address
    is in an exempt network and no required group names the account."""
    lines = ["# Written by otpgated; rewritten whenever settings or secrets change.\n"]
    # One entry per line, as pam_access reads lines into a fixed buffer. A network
    # that does not parse (from an upstream) is left out: its logins are then
    # prompted, and verify waives the code; never spared one.
    networks = []
    for text in lists.networks:
        try:
            networks += _access_forms(text)
        except ValueError:
            continue
    # pam_access compares names without case: `+ : Alice : ALL` would also spare
    # `alice` the exemption. A name with such a twin gets no line (its logins from
    # an exempt network ask `check`, which asks for the code).
    folded = Counter(name.lower() for name in lists.asked)
    if networks:
        lines += [
            f"+ : {name} : ALL\n"
            for name in lists.everywhere
            if _plain(name) and folded[name.lower()] <= 1
        ]
        lines += [f"- : ALL : {network}\n" for network in networks]
    lines.append("+ : ALL : ALL\n")
    return "".join(lines)
