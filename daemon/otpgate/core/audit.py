"""The audit trail: who did what, through which path (pure, but for one context
variable).

Every change the store makes is audited in the same transaction as the change
itself; the servicer that takes a call says once, here, which path it came by
(`admin`, `user`, `pam:SERVICE`) and, where it is known, who the caller is (a
local uid and pid, a remote host), so that the store can write them into every
row of that call without each service method passing them along. A context
variable, because each call runs on its own thread (or task) from start to end.

Never a code, a secret or a password in an event: details are counts, uids,
results and field names.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Origin:
    path: str = ""  # admin, user, pam:sshd; empty: otpgated itself (a command, a start)
    caller: str = ""  # uid=1000 pid=4242, rhost=192.0.2.7; empty when unknown


@dataclasses.dataclass(frozen=True)
class Event:
    id: int
    at: int  # seconds since the epoch
    event: str
    username: str
    detail: str
    host: str
    path: str
    caller: str


_ORIGIN: contextvars.ContextVar[Origin] = contextvars.ContextVar("otpgate_audit_origin")
_NOBODY = Origin()


def origin() -> Origin:
    """Where the call being served came from (or nowhere: otpgated itself)."""
    return _ORIGIN.get(_NOBODY)


@contextlib.contextmanager
def from_origin(path: str, caller: str = "") -> Iterator[None]:
    """Audit rows written inside this block name `path` and `caller`."""
    token = _ORIGIN.set(Origin(path, caller))
    try:
        yield
    finally:
        _ORIGIN.reset(token)
