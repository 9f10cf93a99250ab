"""The SSH stacks' gate files (core.gate_files): what gate_lists makes of a service
with injected accounts, groups and clock on a real SQLite file, what render_ask and
render_networks write, and how the real pam_access and pam_listfile (through
pamtester, with real local users) read what is written."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from otpgate.core.accounts import lookup_account
from otpgate.core.crypto import Keyring, account_binding
from otpgate.core.gate import ENROLL_HINT, Gate, Verdict
from otpgate.core.gate_files import GateLists, gate_lists, render_ask, render_networks
from otpgate.core.records import Account, PasswordResult, SecretRecord
from otpgate.core.service import TwoFactorService
from otpgate.core.settings import EnrollmentPolicy
from otpgate.store.sqlite import SQLiteStore
from tests.conftest import LocalUser
from tests.core.test_service import T0, Accounts, Clock

COMMENT = "# Written by otpgated; rewritten whenever settings or secrets change.\n"
ON = {"enabled": True, "services_ssh": True}
KEYRING = Keyring(b"k" * 32)


def net(text: str) -> str:
    """A network as Python writes it: before 3.13 a mapped one in hex (::ffff:a00:0/104),
    which pam_access reads as well (test_pam_access_reads_...)."""
    return str(ipaddress.ip_network(text))


MAPPED_10 = net("::ffff:10.0.0.0/104")


class Groups:
    """Group names by account name (the daemon's is CachedGroupNames)."""

    def __init__(self) -> None:
        self.table: dict[str, frozenset[str]] = {}

    def __call__(self, account: Account) -> frozenset[str]:
        return self.table.get(account.username, frozenset())


Env = tuple[TwoFactorService, Accounts, Groups, SQLiteStore]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    accounts, groups = Accounts(), Groups()
    for uid, name in enumerate(("alice", "bob", "carol", "dave"), start=1000):
        accounts.add(name, uid)
    store = SQLiteStore(str(tmp_path / "db.sqlite3"))
    service = TwoFactorService(
        store,
        KEYRING,
        default_issuer="Test",
        hostname="h",
        accounts=accounts,
        details=accounts.details,
        groups=groups,
        clock=Clock(),
    )
    service.update_config(ON)
    return service, accounts, groups, store


def _plant_secret(store: SQLiteStore, name: str, uid: int) -> None:
    """A secret row as the store holds it, for a name renew_secret would refuse (rows
    of a shared database, or written by another version)."""
    record = SecretRecord(
        username=name,
        uid=uid,
        sealed=KEYRING.seal(b"JBSWY3DPEHPK3PXP", account_binding(name, uid)),
        otp_digits=6,
        interval=30,
        created_at=int(T0),
    )
    assert store.put_secret(record)


# -- who is listed -------------------------------------------------------------------------


def test_enrolled_accounts_are_listed_and_the_others_not(env: Env) -> None:
    service, _, _, _ = env
    assert gate_lists(service) == GateLists()
    service.renew_secret("carol")
    service.renew_secret("alice")
    lists = gate_lists(service)
    # bob and dave have no secret; an unknown name is never listed (check decides).
    assert lists == GateLists(asked=("alice", "carol"))
    assert render_ask(lists) == "alice\ncarol\n"
    # Under "required" too: an account without a secret is refused by check, not listed.
    service.update_config({"enrollment_policy": EnrollmentPolicy.REQUIRED})
    assert gate_lists(service).asked == ("alice", "carol")
    # A pending secret (not yet confirmed) does not enroll.
    service.renew_secret("bob", pending=True)
    assert gate_lists(service).asked == ("alice", "carol")
    service.unset_secret("carol")
    assert render_ask(gate_lists(service)) == "alice\n"


@pytest.mark.parametrize("off", [{"enabled": False}, {"services_ssh": False}])
def test_nobody_is_listed_while_2fa_does_not_cover_ssh(env: Env, off: dict[str, bool]) -> None:
    service, _, groups, _ = env
    groups.table = {"bob": frozenset({"admins"})}
    service.update_config({"required_groups": ["admins"], "exempt_networks": ["10.0.0.0/8"]})
    service.renew_secret("alice")
    service.renew_secret("bob")
    assert gate_lists(service).asked == ("alice", "bob")
    service.update_config(off)
    lists = gate_lists(service)
    assert (lists.asked, lists.everywhere, render_ask(lists)) == ((), (), "")
    # networks.conf then names no account: nobody listed reaches it.
    assert "bob" not in render_networks(lists)


def test_exempt_group_members_are_not_listed(env: Env) -> None:
    service, _, groups, _ = env
    for name in ("alice", "bob", "carol"):
        service.renew_secret(name)
    groups.table = {"alice": frozenset({"ops", "users"}), "bob": frozenset({"users"})}
    service.update_config({"exempt_groups": ["ops"]})
    assert gate_lists(service) == GateLists(asked=("bob", "carol"))


def test_required_group_members_are_listed_and_asked_everywhere(env: Env) -> None:
    service, _, groups, _ = env
    for name in ("alice", "bob", "carol"):
        service.renew_secret(name)
    # alice is in an exempt group as well: the required group wins (core.policy).
    groups.table = {
        "alice": frozenset({"admins", "ops"}),
        "bob": frozenset({"admins"}),
        "carol": frozenset({"ops"}),
    }
    service.update_config({"required_groups": ["admins"], "exempt_groups": ["ops"]})
    lists = gate_lists(service)
    # `everywhere` only matters against an exempt network, and is only told then.
    assert (lists.asked, lists.everywhere) == (("alice", "bob"), ())
    service.update_config({"exempt_networks": ["10.0.0.0/8"]})
    lists = gate_lists(service)
    assert (lists.asked, lists.everywhere) == (("alice", "bob"), ("alice", "bob"))


def test_a_required_member_without_a_secret_is_not_listed_and_check_hints(env: Env) -> None:
    service, _, groups, _ = env
    service.renew_secret("alice")
    groups.table = {"alice": frozenset({"admins"}), "dave": frozenset({"admins"})}
    service.update_config({"required_groups": ["admins"], "exempt_networks": ["10.0.0.0/8"]})
    lists = gate_lists(service)
    assert (lists.asked, lists.everywhere) == (("alice",), ("alice",))
    assert "dave" not in render_ask(lists) + render_networks(lists)
    # dave goes through check, which refuses him with the hint, from anywhere.
    gate = Gate(service, lambda user, password: PasswordResult.OK)
    for rhost in ("11.0.0.1", "10.0.0.5", ""):
        check = gate.check("dave", "sshd", rhost)
        assert (check.verdict, check.message) == (Verdict.NOT_ENROLLED, ENROLL_HINT)


def test_a_secret_of_another_uid_does_not_list_a_recreated_account(env: Env) -> None:
    service, accounts, _, _ = env
    service.renew_secret("alice")
    service.renew_secret("bob")
    accounts.add("alice", 2000)  # deleted and made again with another uid
    assert gate_lists(service).asked == ("bob",)
    del accounts.table["bob"]  # gone from NSS, its row still there
    assert gate_lists(service).asked == ()


def test_names_are_written_only_where_they_can_not_be_misread(env: Env) -> None:
    service, accounts, groups, store = env
    # Names renew_secret accepts (core.accounts.check_username) ...
    keywords = ["ALL", "all", "All", "LOCAL", "local", "EXCEPT", "except"]
    checked = ["a@b", "user@EXAMPLE.ORG", "DOMAIN\\user"]
    plain = ["9lives", "ok.name", "ok-name", "ok_name", "_svc", "host$", "Mixed"]
    for uid, name in enumerate(keywords + checked + plain, start=3000):
        accounts.add(name, uid)
        service.renew_secret(name)
    # ... and rows it would refuse, for accounts NSS would return (anything goes there).
    odd = ["a:b", "(wheel)", "@netgroup", "a,b", "+x", "-x", "é"]  # one line to pam_listfile
    unlistable = ["a b", "a\tb", "a\nb", "", "x" * 254]
    for uid, name in enumerate(odd + unlistable, start=4000):
        accounts.table[name] = Account(name, uid, uid, "", "/", "/bin/sh")
        _plant_secret(store, name, uid)
    assert {a.username for a in service.enrolled_accounts()} >= set(odd + unlistable)
    # ask holds every name that is one line to pam_listfile (blanks, control
    # characters and over 253 bytes are not); pam_listfile compares whole lines.
    groups.table = {name: frozenset({"admins"}) for name in keywords + checked + odd}
    service.update_config({"required_groups": ["admins"], "exempt_networks": ["10.0.0.0/8"]})
    lists = gate_lists(service)
    listable = sorted(keywords + checked + plain + odd)
    assert lists.asked == tuple(listable)
    assert render_ask(lists) == "".join(f"{name}\n" for name in listable)
    # networks.conf only plain names: as required-group members none of the others
    # gets a line (their logins from an exempt network ask `check`).
    assert render_networks(lists) == (
        COMMENT + f"- : ALL : 10.0.0.0/8\n- : ALL : {MAPPED_10}\n+ : ALL : ALL\n"
    )


# -- networks.conf -------------------------------------------------------------------------


def test_exempt_networks_are_written_one_per_line_in_both_notations(env: Env) -> None:
    service, _, _, _ = env
    service.update_config(
        {
            "exempt_networks": [
                "10.0.0.0/8",
                "::ffff:192.0.2.0/120",  # mapped: also as 192.0.2.0/24
                "2001:db8::/32",  # plain IPv6: once
                "198.51.100.7",  # one host
            ]
        }
    )
    written = [
        "10.0.0.0/8",
        MAPPED_10,
        net("::ffff:192.0.2.0/120"),
        "192.0.2.0/24",
        "2001:db8::/32",
        "198.51.100.7/32",
        net("::ffff:198.51.100.7/128"),
    ]
    lines = "".join(f"- : ALL : {network}\n" for network in written)
    assert render_networks(gate_lists(service)) == COMMENT + lines + "+ : ALL : ALL\n"


def test_lists_from_elsewhere_are_rendered_only_as_far_as_they_are_safe() -> None:
    # An edge renders what a central's AskList sent: names and networks are checked
    # again, and what fails is left out (a login then asks `check`, never less).
    lists = GateLists(
        asked=("ok", "ALL", "a b", "a:b", "(wheel)", "@ng", "x\n+ : ALL : ALL", "all"),
        everywhere=("ok", "EXCEPT", "a b", "LOCAL"),
        networks=("not-a-network", "10.0.0.5/8", "10.0.0.0/8", "ALL", "10.0.0.0/8 ALL"),
    )
    # pam_listfile compares whole lines: only a line break or a blank could make a
    # name into something else.
    assert render_ask(lists) == "ok\nALL\na:b\n(wheel)\n@ng\nall\n"
    assert render_networks(lists) == COMMENT + (
        f"+ : ok : ALL\n- : ALL : 10.0.0.0/8\n- : ALL : {MAPPED_10}\n+ : ALL : ALL\n"
    )
    # No network left: no exemption, so no line for the required members either.
    only_bad = GateLists(asked=("ok",), everywhere=("ok",), networks=("ALL", "LOCAL"))
    assert render_networks(only_bad) == COMMENT + "+ : ALL : ALL\n"


def test_names_asked_about_are_listed_as_check_would_answer(env: Env) -> None:
    # HostGate.AskList: any names, not only the enrolled; an unknown one is asked,
    # as Check asks it (telling it apart would tell which accounts exist).
    service, _, groups, _ = env
    service.renew_secret("alice")
    service.renew_secret("carol")
    groups.table = {"carol": frozenset({"ops"}), "dave": frozenset({"admins"})}
    service.update_config({"exempt_groups": ["ops"], "required_groups": ["admins"]})
    names = ["nosuchuser", "alice", "bob", "carol", "dave", "ALL", "a b", "alice"]
    lists = gate_lists(service, names)
    # bob: no secret, optional; carol: exempt group; dave: required, no secret
    # (refused); ALL: no such account, so asked as nosuchuser is.
    assert (lists.asked, lists.everywhere) == (("ALL", "alice", "nosuchuser"), ())
    service.renew_secret("dave")
    service.update_config({"exempt_networks": ["10.0.0.0/8"]})
    lists = gate_lists(service, names)
    assert lists.asked == ("ALL", "alice", "dave", "nosuchuser") and lists.everywhere == ("dave",)
    assert gate_lists(service, []) == GateLists(networks=("10.0.0.0/8",))


def test_required_members_come_before_the_network_lines(env: Env) -> None:
    service, _, groups, _ = env
    for name in ("alice", "bob", "carol"):
        service.renew_secret(name)
    groups.table = {"bob": frozenset({"admins"}), "carol": frozenset({"admins"})}
    service.update_config({"required_groups": ["admins"], "exempt_networks": ["10.0.0.0/8"]})
    assert render_networks(gate_lists(service)).splitlines(keepends=True) == [
        COMMENT,
        "+ : bob : ALL\n",
        "+ : carol : ALL\n",
        "- : ALL : 10.0.0.0/8\n",
        f"- : ALL : {MAPPED_10}\n",
        "+ : ALL : ALL\n",
    ]


def test_without_exempt_networks_the_file_lets_everyone_through(env: Env) -> None:
    service, _, groups, _ = env
    service.renew_secret("bob")
    groups.table = {"bob": frozenset({"admins"})}
    service.update_config({"required_groups": ["admins"]})
    lists = gate_lists(service)
    assert lists.asked == ("bob",) and lists.everywhere == ()
    lists = GateLists(asked=("bob",), everywhere=("bob",))  # as a central might send
    # No exemption to override: the required members need no line of their own.
    assert render_networks(lists) == COMMENT + "+ : ALL : ALL\n"
    assert render_networks(GateLists()) == COMMENT + "+ : ALL : ALL\n"
    assert render_ask(GateLists()) == ""


# -- read by the real modules (pamtester) ---------------------------------------------------


def pam_ok(service: str, user: str, rhost: str = "") -> bool:
    items = ["-I", f"rhost={rhost}"] if rhost else []
    result = subprocess.run(
        ["pamtester", *items, service, user, "authenticate"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    return result.returncode == 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def _real_service(tmp_path: Path, groups: Groups) -> TwoFactorService:
    # pam_access looks the user up (getpwnam): real accounts, real uids.
    service = TwoFactorService(
        SQLiteStore(str(tmp_path / "real.sqlite3")),
        KEYRING,
        default_issuer="Test",
        hostname="h",
        accounts=lookup_account,
        groups=groups,
    )
    service.update_config(ON)
    return service


PERMIT = "auth required pam_permit.so\n"  # success when the line under test passes


def _access_stack(path: Path) -> str:
    # The stacks' pam_access line, on its own: success = "not exempt, go to the prompt".
    return f"auth requisite pam_access.so nodefgroup noaudit accessfile={path}\n{PERMIT}"


def test_pam_access_reads_networks_conf_as_the_policy_means_it(
    tmp_path: Path,
    make_user: Callable[..., LocalUser],
    pam_service: Callable[[str], str],
) -> None:
    member, other = make_user(), make_user()
    groups = Groups()
    groups.table = {member.name: frozenset({"admins"})}
    service = _real_service(tmp_path, groups)
    service.renew_secret(member.name)
    service.renew_secret(other.name)
    conf = tmp_path / "networks.conf"
    stack = pam_service(_access_stack(conf))

    # No exempt network: through from anywhere.
    _write(conf, render_networks(gate_lists(service)))
    assert conf.read_text() == COMMENT + "+ : ALL : ALL\n"
    for rhost in ("10.0.0.5", "::ffff:10.0.0.5", "2001:db8::1"):
        assert pam_ok(stack, other.name, rhost), rhost

    service.update_config(
        {
            "required_groups": ["admins"],
            "exempt_networks": ["10.0.0.0/8", "::ffff:192.0.2.0/120", "2001:db8::/32"],
        }
    )
    lists = gate_lists(service)
    assert lists.everywhere == (member.name,)
    _write(conf, render_networks(lists))
    exempt = ["10.0.0.5", "::ffff:10.0.0.5", "::FFFF:10.1.2.3", "192.0.2.9", "::ffff:192.0.2.9"]
    exempt += ["2001:db8::1", "2001:db8:ffff::9"]
    elsewhere = ["11.0.0.1", "::ffff:11.0.0.1", "192.0.3.1", "2001:db9::1", "::10.0.0.5"]
    for rhost in exempt:
        assert not pam_ok(stack, other.name, rhost), rhost  # exempt: check runs, says no code
        assert pam_ok(stack, member.name, rhost), rhost  # a required member: to the prompt
    for rhost in elsewhere:
        assert pam_ok(stack, other.name, rhost), rhost
        assert pam_ok(stack, member.name, rhost), rhost


def test_pam_listfile_reads_ask_as_written(
    tmp_path: Path,
    make_user: Callable[..., LocalUser],
    pam_service: Callable[[str], str],
) -> None:
    listed, unlisted = make_user(), make_user()
    service = _real_service(tmp_path, Groups())
    service.renew_secret(listed.name)
    ask = _write(tmp_path / "ask", render_ask(gate_lists(service)))
    stack = pam_service(
        f"auth requisite pam_listfile.so quiet item=user sense=allow onerr=fail file={ask}\n"
        + PERMIT
    )
    assert pam_ok(stack, listed.name)
    assert not pam_ok(stack, unlisted.name)
    assert not pam_ok(stack, listed.name.upper())  # pam_listfile compares exactly
    ask.unlink()  # missing: onerr=fail, so the check runs
    assert not pam_ok(stack, listed.name)


# -- known gaps: both fail closed (a needless prompt, never a skipped code) ------------------


def test_a_required_members_line_names_only_that_account(
    tmp_path: Path,
    make_user: Callable[..., LocalUser],
    pam_service: Callable[[str], str],
) -> None:
    user = make_user()
    accounts, groups = Accounts(), Groups()
    accounts.table[user.name] = Account(user.name, user.uid, user.uid, "", "/", "/bin/sh")
    twin = user.name.upper()  # another account (a directory service's), a required member
    accounts.add(twin, user.uid + 100_000)
    groups.table = {twin: frozenset({"admins"})}
    service = TwoFactorService(
        SQLiteStore(str(tmp_path / "db.sqlite3")),
        KEYRING,
        default_issuer="Test",
        accounts=accounts,
        details=accounts.details,
        groups=groups,
    )
    service.update_config({**ON, "required_groups": ["admins"], "exempt_networks": ["10.0.0.0/8"]})
    service.renew_secret(user.name)
    service.renew_secret(twin)
    lists = gate_lists(service)
    assert (lists.asked, lists.everywhere) == (tuple(sorted([user.name, twin])), (twin,))
    conf = _write(tmp_path / "networks.conf", render_networks(lists))
    stack = pam_service(_access_stack(conf))
    # user is not a required member: from an exempt network pam_access should say "exempt".
    assert not pam_ok(stack, user.name, "10.0.0.5")


def test_a_long_name_lists_no_other_account(
    env: Env, tmp_path: Path, pam_service: Callable[[str], str]
) -> None:
    service, accounts, _, _ = env
    long_name = "x" * 255 + "a"  # 256 characters: check_username accepts it
    accounts.add(long_name, 5000)
    service.renew_secret(long_name)
    # Left out (its logins ask `check`): pam_listfile would read it as two names.
    assert gate_lists(service).asked == ()
    ask = _write(tmp_path / "ask", render_ask(gate_lists(service)))
    stack = pam_service(
        f"auth requisite pam_listfile.so quiet item=user sense=allow onerr=fail file={ask}\n"
        + PERMIT
    )
    # pam_listfile looks no account up: "a" need not exist to be matched.
    assert not pam_ok(stack, "a")


def test_an_exemption_of_every_address_is_read_as_one(
    tmp_path: Path,
    make_user: Callable[..., LocalUser],
    pam_service: Callable[[str], str],
) -> None:
    user = make_user()
    service = _real_service(tmp_path, Groups())
    service.renew_secret(user.name)
    service.update_config({"exempt_networks": ["0.0.0.0/0", "::/0"]})
    assert gate_lists(service).asked == (user.name,)  # listed: the file must say "exempt"
    conf = _write(tmp_path / "networks.conf", render_networks(gate_lists(service)))
    stack = pam_service(_access_stack(conf))
    assert [pam_ok(stack, user.name, r) for r in ("203.0.113.9", "2001:db8::1")] == [False] * 2
