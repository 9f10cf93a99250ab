"""Account lookup: NSS facts, and the cache that must never outlive a change."""

from __future__ import annotations

import grp
import pwd
import subprocess
from collections.abc import Callable, Hashable

import pytest

from otpgate.core.accounts import (
    CachedAccountLookup,
    CachedGroupNames,
    account_details,
    check_username,
    group_files_stamp,
    group_names,
    lookup_account,
    passwd_file_stamp,
)
from otpgate.core.records import DIRECTORY_ID_OFFSET, Account
from otpgate.errors import InvalidArgument
from tests.conftest import LocalUser


class FakeNss:
    """A directory whose answers, clock and passwd stamp the test moves by hand."""

    def __init__(self) -> None:
        self.uids: dict[str, int] = {"alice": 1000}
        self.calls = 0
        self.now = 100.0
        self.stamp: Hashable = ("passwd", 1)

    def lookup(self, username: str) -> Account | None:
        self.calls += 1
        uid = self.uids.get(username)
        return None if uid is None else Account(username, uid, uid, "", "/home", "/bin/sh")

    def cache(self, **kwargs: object) -> CachedAccountLookup:
        return CachedAccountLookup(
            self.lookup,
            clock=lambda: self.now,
            stamp=lambda: self.stamp,
            **kwargs,  # type: ignore[arg-type]
        )


def test_answers_are_reused_within_the_ttl() -> None:
    nss = FakeNss()
    cache = nss.cache(ttl=5.0)
    first = cache("alice")
    nss.now += 4.9
    assert cache("alice") == first and nss.calls == 1
    nss.now += 0.2
    assert cache("alice") == first and nss.calls == 2


def test_a_changed_passwd_file_is_seen_at_the_next_call() -> None:
    nss = FakeNss()
    cache = nss.cache(ttl=3600.0)
    assert cache("alice") is not None and cache("alice").uid == 1000  # type: ignore[union-attr]
    nss.uids["alice"] = 2000  # userdel + useradd: another uid under the same name
    nss.stamp = ("passwd", 2)
    account = cache("alice")
    assert account is not None and account.uid == 2000


def test_unknown_names_are_remembered_until_the_file_changes() -> None:
    nss = FakeNss()
    cache = nss.cache(ttl=3600.0)
    assert cache("bob") is None and cache("bob") is None
    assert nss.calls == 1
    nss.uids["bob"] = 1001
    nss.stamp = ("passwd", 2)
    assert cache("bob") is not None


def test_nothing_is_kept_when_the_passwd_file_cannot_be_read() -> None:
    nss = FakeNss()
    nss.stamp = None
    cache = nss.cache(ttl=3600.0)
    cache("alice")
    cache("alice")
    assert nss.calls == 2


def test_an_answer_read_across_a_change_is_not_kept() -> None:
    nss = FakeNss()
    cache = CachedAccountLookup(nss.lookup, ttl=3600.0, clock=lambda: nss.now,
                                stamp=lambda: nss.stamp)  # fmt: skip
    cache("alice")  # the cache has seen stamp 1

    def lookup_while_the_file_changes(username: str) -> Account | None:
        answer = nss.lookup(username)
        nss.stamp = ("passwd", 2)  # replaced after this read...
        cache._lookup = nss.lookup
        cache("carol")  # ...and another caller already saw the new file
        return answer

    cache._lookup = lookup_while_the_file_changes
    nss.stamp = ("passwd", 1.5)
    cache("alice")
    calls = nss.calls
    cache("alice")
    assert nss.calls == calls + 1  # the answer read under stamp 1.5 was dropped


def test_the_cache_is_bounded() -> None:
    nss = FakeNss()
    cache = nss.cache(ttl=3600.0, max_entries=3)
    for name in ("a1", "a2", "a3", "a4"):
        cache(name)
    assert len(cache._cache._entries) <= 3


def test_stamp_follows_the_real_passwd_file(make_user: Callable[..., LocalUser]) -> None:
    before = passwd_file_stamp()
    assert before is not None and before == passwd_file_stamp()
    user = make_user()  # useradd rewrites /etc/passwd
    assert passwd_file_stamp() != before
    cache = CachedAccountLookup()
    account = cache(user.name)
    assert account is not None and account.uid == user.uid


def test_real_lookup_matches_nss() -> None:
    root = lookup_account("root")
    assert root is not None and root.uid == 0 and root.home == pwd.getpwnam("root").pw_dir
    assert lookup_account("no-such-user-otpgate") is None


@pytest.mark.parametrize("name", ["", "-x", ".x", "a b", "a/b", "x" * 300, "é"])
def test_bad_usernames_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="username"):
        check_username(name)


def test_details_are_resolved_once_into_a_plain_value(make_user: Callable[..., LocalUser]) -> None:
    user = make_user()
    account = lookup_account(user.name)
    assert account is not None
    details = account_details(account)
    assert details.local and details.gid in details.groups and details.api_id == account.uid
    # A value: what it shows stays, whatever NSS says later.
    subprocess.run(["userdel", "--remove", user.name], check=True, capture_output=True)
    assert details.local and details.api_id == account.uid
    gone = account_details(account)
    assert not gone.local and gone.api_id == account.uid + DIRECTORY_ID_OFFSET


# -- group names (the access policy's group rules) -----------------------------------------


def test_group_names_are_cached_until_the_ttl_or_a_change() -> None:
    now, stamp, calls = [100.0], [("group", 1)], []
    alice = Account("alice", 1000, 1000, "", "/home", "/bin/sh")

    def lookup(account: Account) -> frozenset[str]:
        calls.append(account.username)
        return frozenset({"alice", f"ops{len(calls)}"})

    cache = CachedGroupNames(lookup, ttl=5.0, clock=lambda: now[0], stamp=lambda: stamp[0])
    assert cache(alice) == {"alice", "ops1"} == cache(alice)
    now[0] += 5.1
    assert cache(alice) == {"alice", "ops2"}
    stamp[0] = ("group", 2)  # usermod -aG, gpasswd: /etc/group rewritten
    assert cache(alice) == {"alice", "ops3"}
    # Another account under the same name (a new uid or primary group) is asked afresh.
    assert cache(Account("alice", 1001, 1001, "", "/home", "/bin/sh")) == {"alice", "ops4"}
    stamp[0] = None  # unreadable: nothing is kept
    cache(alice)
    cache(alice)
    assert len(calls) == 6


def test_real_group_names(make_user: Callable[..., LocalUser]) -> None:
    user = make_user()
    account = lookup_account(user.name)
    assert account is not None
    before = group_files_stamp()
    cache = CachedGroupNames()
    primary = grp.getgrgid(account.gid).gr_name
    assert group_names(account) == {primary} == cache(account)
    group = f"ogtg{user.name[3:]}"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["usermod", "-aG", group, user.name], check=True)
        assert group_files_stamp() != before
        assert cache(account) == {primary, group} == group_names(account)
    finally:
        subprocess.run(["groupdel", group], check=True)
