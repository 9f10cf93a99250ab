"""Account facts from NSS (local files or a directory service): the adapters of
core.ports.AccountLookup and AccountDetailsLookup, and the check of a name."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from otpgate.core.ports import AccountLookup
from otpgate.core.records import Account, AccountDetails
from otpgate.errors import InvalidArgument

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# POSIX portable names plus what directory services use (user@realm, DOMAIN\user).
_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@\\-]{0,255}\$?")
_LOCAL_PASSWD = "/etc/passwd"
_LOCAL_GROUP = "/etc/group"
_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(Account))


def check_username(username: str, field: str = "username") -> str:
    if not _USERNAME.fullmatch(username):
        raise InvalidArgument(
            field,
            "must be 1 to 256 characters: letters, digits and _ . @ \\ - "
            "(not starting with . @ \\ or -)",
        )
    return username


def lookup_account(username: str) -> Account | None:
    """The account named `username`, or None when NSS knows no such account."""
    try:
        entry = pwd.getpwnam(username)
    except KeyError:
        return None
    return Account(
        username=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        full_name=entry.pw_gecos.split(",", 1)[0],
        home=entry.pw_dir,
        shell=entry.pw_shell,
    )


def account_details(account: Account) -> AccountDetails:
    """The account's groups and whether /etc/passwd has it: one read of the file
    and one group list per account, only where an account is shown."""
    try:
        groups = tuple(sorted(set(os.getgrouplist(account.username, account.gid))))
    except OSError:
        groups = (account.gid,)
    return AccountDetails(
        **{field: getattr(account, field) for field in _ENTRY_FIELDS},
        groups=groups,
        local=_is_local(account.username),
    )


def group_names(account: Account) -> frozenset[str]:
    """The names of the account's groups (NSS: its group list, then each group's
    name); a gid without a name is left out."""
    try:
        gids = set(os.getgrouplist(account.username, account.gid))
    except OSError:
        gids = {account.gid}
    names = set()
    for gid in gids:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return frozenset(names)


def _stamp(path: str) -> Hashable:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def group_files_stamp() -> Hashable:
    """What changes whenever /etc/group or /etc/passwd (the primary group) is
    rewritten; None when either cannot be read."""
    group, passwd = _stamp(_LOCAL_GROUP), _stamp(_LOCAL_PASSWD)
    return None if group is None or passwd is None else (group, passwd)


class StampedCache(Generic[K, V]):
    """Answers kept for at most `ttl` seconds, all dropped when the stamp of the
    files they come from changes (or cannot be read)."""

    def __init__(
        self,
        *,
        ttl: float,
        max_entries: int,
        clock: Callable[[], float],
        stamp: Callable[[], Hashable],
    ) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._stamp = stamp
        self._lock = threading.Lock()
        self._seen_stamp: Hashable = None
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K, compute: Callable[[], V]) -> V:
        now = self._clock()
        stamp = self._stamp()
        with self._lock:
            if stamp is None or stamp != self._seen_stamp:
                self._entries.clear()
                self._seen_stamp = stamp
            elif (hit := self._entries.get(key)) is not None and now < hit[0]:
                return hit[1]
        value = compute()
        with self._lock:
            # Only an answer read after the stamp still current is kept: one read
            # while the file was being replaced must not outlive the change.
            if stamp is not None and stamp == self._seen_stamp:
                if len(self._entries) >= self._max_entries:
                    self._entries.clear()
                self._entries[key] = (now + self._ttl, value)
        return value


class CachedGroupNames:
    """group_names answers reused for at most `ttl` seconds, dropped when /etc/group
    or /etc/passwd changes (usermod -aG, groupadd, gpasswd rewrite them), keyed by
    the account's name, uid and primary gid. As CachedAccountLookup: a directory
    group is seen within `ttl`, as sssd and nscd keep theirs for minutes."""

    def __init__(
        self,
        lookup: Callable[[Account], frozenset[str]] = group_names,
        *,
        ttl: float = 5.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        stamp: Callable[[], Hashable] = group_files_stamp,
    ) -> None:
        self._lookup = lookup
        self._cache: StampedCache[tuple[str, int, int], frozenset[str]] = StampedCache(
            ttl=ttl, max_entries=max_entries, clock=clock, stamp=stamp
        )

    def __call__(self, account: Account) -> frozenset[str]:
        key = (account.username, account.uid, account.gid)
        return self._cache.get(key, lambda: self._lookup(account))


def passwd_file_stamp() -> Hashable:
    """What changes whenever /etc/passwd is rewritten (useradd, userdel, usermod, vipw
    all replace or rewrite it); None when it cannot be read."""
    return _stamp(_LOCAL_PASSWD)


class CachedAccountLookup:
    """NSS answers reused for at most `ttl` seconds, dropped when /etc/passwd changes.

    getpwnam reads /etc/passwd from the start at every call (six system calls): in
    the daemon that was about a sixth of a verification. A local account added,
    removed or changed is seen at the next call, because the file's stamp changed;
    a directory account (sssd, LDAP) within `ttl` seconds, where nscd and sssd
    themselves keep answers for minutes. Unknown names are remembered the same way.
    """

    def __init__(
        self,
        lookup: AccountLookup = lookup_account,
        *,
        ttl: float = 5.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        stamp: Callable[[], Hashable] = passwd_file_stamp,
    ) -> None:
        self._lookup = lookup
        self._cache: StampedCache[str, Account | None] = StampedCache(
            ttl=ttl, max_entries=max_entries, clock=clock, stamp=stamp
        )

    def __call__(self, username: str) -> Account | None:
        return self._cache.get(username, lambda: self._lookup(username))


def local_account_names(path: str = _LOCAL_PASSWD) -> list[str]:
    """The names in /etc/passwd, in its order, without asking NSS (which may list a
    whole directory, slowly); [] when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as passwd:
            return [line.split(":", 1)[0] for line in passwd if ":" in line]
    except OSError:
        return []


def _is_local(username: str) -> bool:
    prefix = username + ":"
    try:
        with open(_LOCAL_PASSWD, encoding="utf-8", errors="replace") as passwd:
            return any(line.startswith(prefix) for line in passwd)
    except OSError:
        return False
