"""Value types that cross core's ports: plain data, no I/O (pure).

Adapters (the stores, the NSS lookup, the PAM checker) build and return these;
core decides with them. Nothing here reads a file or a database: what an object
shows was resolved once, by whoever made it.
"""

from __future__ import annotations

import dataclasses
import enum

from otpgate.core.crypto import Sealed

DIRECTORY_ID_OFFSET = 100_000_000  # as TrueNAS: id of a directory account = uid + this

ANY_SECRET: object = object()  # Store.put_secret(expected=...): no condition


@dataclasses.dataclass(frozen=True)
class Account:
    """An account's passwd entry: all that verification needs (it binds by uid)."""

    username: str
    uid: int
    gid: int
    full_name: str
    home: str
    shell: str


@dataclasses.dataclass(frozen=True)
class AccountDetails(Account):
    """An account as it is shown: its passwd entry and the facts NSS gives on top.

    A separate type because those facts cost more than a whole TOTP check: they
    are resolved (once) only where an account is displayed, never to verify.
    """

    groups: tuple[int, ...]
    local: bool  # in /etc/passwd, as opposed to a directory service (sssd, LDAP)

    @property
    def api_id(self) -> int:
        return self.uid if self.local else self.uid + DIRECTORY_ID_OFFSET


@dataclasses.dataclass(frozen=True)
class SecretRecord:
    username: str
    uid: int
    sealed: Sealed
    otp_digits: int
    interval: int
    created_at: int
    # Highest time step accepted so far (-1: none); codes at or below it are spent.
    last_step: int = -1
    # Attempts counted since the last reset (an accepted code, a lock, a new secret).
    failures: int = 0
    # Consecutive lockouts since the last accepted code: each one doubles the next.
    lockouts: int = 0
    locked_until: int = 0  # whole seconds since the epoch; no lock in force at or after it


class PasswordResult(enum.Enum):
    OK = "ok"
    BAD = "bad"  # wrong password, unknown or locked account: never told apart
    EXPIRED = "expired"
