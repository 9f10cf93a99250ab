"""What core needs from the outside world; adapters implement it, core imports none.

The store (otpgate.store: SQLite, later PostgreSQL), the account lookup and the
password checker (NSS and PAM, in core.accounts and core.passwords) are given to
the service and the login logic as these protocols, so tests pass fakes and a
new backend changes no decision. tests/store/test_contract.py is the store's
contract in executable form: a backend is done when it passes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from otpgate.core import audit
from otpgate.core.crypto import Sealed
from otpgate.core.records import Account, AccountDetails, PasswordResult, SecretRecord
from otpgate.core.settings import Settings

if TYPE_CHECKING:  # core.service imports this module
    from otpgate.core.service import UserView, Verification


class AccountLookup(Protocol):
    """The account NSS knows by this name, or None. Asked at every verification,
    so it must be cheap: the passwd entry only."""

    def __call__(self, username: str) -> Account | None: ...


class AccountDetailsLookup(Protocol):
    """The facts shown of an account beyond its passwd entry (groups, local or
    not), resolved in one go; asked only where an account is displayed."""

    def __call__(self, account: Account) -> AccountDetails: ...


class GroupNamesLookup(Protocol):
    """The names of every group the account is in, its primary group included.
    Asked at a login only while a group rule of the access policy is set."""

    def __call__(self, account: Account) -> frozenset[str]: ...


class PasswordChecker(Protocol):
    def __call__(self, username: str, password: str) -> PasswordResult: ...


class Store(Protocol):
    """Stores and counts, atomically; decides nothing (core.lockout does).

    Thread-safe: one store serves every server thread, and several stores (of
    several daemons) may share one database. Every write is atomic: a crash
    leaves the old state or the new one. Times are whole seconds since the
    epoch from the caller's clock (`now`), never the database's, so audit rows
    and locks follow the clock the service was given.

    A secret belongs to an account by name and uid: the methods that take both
    act only on a row of that uid (an older account's row under the same name
    is not this account's secret).
    """

    def load_settings(self) -> Settings: ...

    def save_settings(self, settings: Settings, *, audit: str, now: int) -> None:
        """Replace the settings; audited (`audit` says what changed) at `now`."""
        ...

    def key_check(self) -> Sealed | None: ...

    def set_key_check(self, sealed: Sealed) -> None: ...

    def key_ids_in_use(self) -> set[str]: ...

    def put_secret(self, record: SecretRecord, *, expected: object = ...) -> bool:
        """Store `record`, replacing the account's secret, in one transaction;
        audited at `record.created_at`.

        With `expected` (ANY_SECRET by default: replace whatever is there) it is a
        compare-and-set: None means "only if this uid has no secret", a Sealed
        "only if that is still the secret"; False when the account had changed.
        """
        ...

    def get_secret(self, username: str) -> SecretRecord | None: ...

    def list_secrets(self) -> list[SecretRecord]:
        """Every secret, by username."""
        ...

    def delete_secret(self, username: str, *, now: int) -> bool:
        """Remove the name's secret, whatever its uid; audited at `now`. False if
        there was none."""
        ...

    def count_attempt(self, username: str, uid: int, *, now: int) -> SecretRecord | None:
        """Count one attempt, in one atomic statement, and return the record as
        that statement left it; None when the account (with this uid) has no secret.

        While a lock is in force (`locked_until > now`) nothing is counted and the
        record comes back as it is; otherwise `failures` goes up by one and the
        returned `failures` is this attempt's own count: concurrent attempts, from
        any thread or daemon, each get a different one.
        """
        ...

    def lock(
        self, username: str, uid: int, *, count: int, lockouts: int, until: int, now: int
    ) -> bool:
        """Lock the account until `until`: `failures` to 0, `lockouts` up by one, in
        one atomic conditional statement; audited at `now`.

        Only if the counter still stands at `count` or more and `lockouts` is
        still what the caller read with it (counts only grow until a reset, and
        every reset, be it a lock, an accepted code or a new secret, sets the
        counter back to 0): False when that no longer holds, so of the callers
        that read the same record at most one locks.
        """
        ...

    def accept_step(self, username: str, uid: int, step: int) -> bool:
        """Spend time step `step` and every earlier one, and clear `failures`,
        `lockouts` and the lock, in one atomic statement, if `step` is newer than
        the last one spent; False if it (or a later one) was spent already."""
        ...

    def unlock(self, username: str, uid: int, *, now: int) -> bool:
        """Clear the account's lock and counters (not its secret); audited at `now`.
        False when the account (with this uid) has no secret."""
        ...

    # Confirmed enrollment: a renewed secret waits beside the active one.

    def put_pending(self, record: SecretRecord, *, expires_at: int) -> None:
        """Store `record` as the account's pending secret, replacing any pending one
        (the active secret is untouched); audited at `record.created_at`."""
        ...

    def get_pending(self, username: str) -> tuple[SecretRecord, int] | None:
        """The pending secret and when it expires, expired or not; None if none."""
        ...

    def confirm_pending(
        self,
        username: str,
        uid: int,
        sealed: Sealed,
        step: int,
        *,
        now: int,
        expected: object = ...,
    ) -> bool:
        """In one transaction: if the pending secret is still `sealed`, of this uid
        and not expired at `now`, and the active secret is still `expected` (as in
        put_secret; by default whatever it is), make the pending one the active
        secret (replacing the old one and its recovery codes) with `step` already
        spent, and drop it from pending. False otherwise; of concurrent
        confirmations at most one succeeds."""
        ...

    # Key rotation (TwoFactorService.rotate_key).

    def list_pending(self) -> list[SecretRecord]: ...

    def reseal(self, table: str, username: str, old: Sealed, new: Sealed) -> bool:
        """Replace the sealed secret of `username` in `table` (secrets or
        pending_secrets) with `new`, if it is still `old`; one atomic statement."""
        ...

    def reseal_meta(self, name: str, old: Sealed, new: Sealed) -> bool:
        """The same for a sealed value in meta (key_check, recovery_key)."""
        ...

    # Recovery codes: only keyed hashes are stored (core.recovery).

    def recovery_key(self) -> Sealed | None: ...

    def init_recovery_key(self, sealed: Sealed) -> Sealed:
        """Store `sealed` as the recovery-code key unless one is there already;
        the one stored (so racing daemons agree on one)."""
        ...

    def put_recovery_codes(self, username: str, uid: int, hashes: list[bytes], *, now: int) -> bool:
        """Replace the account's set of codes with `hashes`, in one transaction;
        False if the account (with this uid) has no active secret."""
        ...

    def use_recovery_code(
        self, username: str, uid: int, hashes: list[bytes], *, now: int
    ) -> int | None:
        """Spend the unused code whose hash is among `hashes` and clear the lock and
        counters, in one transaction; how many are left, or None if none matched.
        Of concurrent uses of one code at most one succeeds."""
        ...

    def recovery_codes_left(self, username: str) -> int: ...

    def record_event(self, event: str, username: str, detail: str, *, now: int) -> None:
        """One audit row (changes write theirs themselves, in their own transaction)."""
        ...

    def audit_events(
        self,
        *,
        username: str | None = None,
        since: int | None = None,
        until: int | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[audit.Event]:
        """Audit rows, newest first: of one account, at or after `since`, before
        `until`, with an id below `before_id` (the last one of the page before)."""
        ...

    def purge_audit(self, *, before: int) -> int:
        """Remove the audit rows older than `before`; how many."""
        ...

    def import_secrets(
        self, items: list[tuple[SecretRecord, list[bytes]]], *, now: int
    ) -> list[str]:
        """Store every record with its recovery-code hashes, in one transaction, if
        none of those accounts (with its uid) has a secret yet; audited at `now`.
        The names of those that do (then nothing is written), or []."""
        ...

    def healthy(self) -> bool:
        """The database answers within its bound (the watchdog's question)."""
        ...

    def close(self) -> None: ...


class SelfService(Protocol):
    """What self-service (core.login, user.sock's servicer) asks of the service:
    TwoFactorService on a host that holds the secrets, the central tier's HostGate
    on an edge host (server.edge)."""

    def lookup(self, username: str) -> Account | None: ...

    def get_user(self, username: str) -> UserView: ...

    def record(self, event: str, username: str, detail: str) -> None: ...

    def verify(
        self, username: str, token: str, *, via: str, malformed_counts: bool = False
    ) -> Verification: ...

    def renew_secret(
        self,
        username: str,
        *,
        otp_digits: int | None = None,
        interval: int | None = None,
        expected: object = ...,
        pending: bool = False,
    ) -> UserView: ...

    def confirm_secret(self, username: str, token: str, *, expected: object = ...) -> UserView: ...

    def provisioning_uri(self, username: str) -> str: ...

    def make_recovery_codes(self, username: str) -> list[str]: ...
