"""Account facts from NSS (local files or a directory service)."""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
from typing import Protocol

from otpgate.errors import InvalidArgument

# POSIX portable names plus what directory services use (user@realm, DOMAIN\user).
_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@\\-]{0,255}\$?")
DIRECTORY_ID_OFFSET = 100_000_000  # as TrueNAS: id of a directory account = uid + this
_LOCAL_PASSWD = "/etc/passwd"


@dataclasses.dataclass(frozen=True)
class Account:
    username: str
    uid: int
    gid: int
    full_name: str
    home: str
    shell: str

    # Looked up only when shown: verification needs the uid alone, and these cost
    # more than the whole TOTP check.
    @property
    def groups(self) -> tuple[int, ...]:
        try:
            return tuple(sorted(set(os.getgrouplist(self.username, self.gid))))
        except OSError:
            return (self.gid,)

    @property
    def local(self) -> bool:
        return _is_local(self.username)

    @property
    def api_id(self) -> int:
        return self.uid if self.local else self.uid + DIRECTORY_ID_OFFSET


class AccountLookup(Protocol):
    def __call__(self, username: str) -> Account | None: ...


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


def _is_local(username: str) -> bool:
    prefix = username + ":"
    try:
        with open(_LOCAL_PASSWD, encoding="utf-8", errors="replace") as passwd:
            return any(line.startswith(prefix) for line in passwd)
    except OSError:
        return False
