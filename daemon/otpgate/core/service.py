"""The two-factor service: settings, secrets and verification, independent of gRPC.

Servicers translate messages to these calls and errors to status codes; all
policy lives here (the lockout's in core.lockout), with the store, the clock and
the account lookups injected (core.ports) for tests and other backends.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import logging
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from otpgate.core import audit, lockout, policy, recovery, totp
from otpgate.core.accounts import account_details, check_username, group_names, lookup_account
from otpgate.core.crypto import Keyring, account_binding
from otpgate.core.ports import AccountDetailsLookup, AccountLookup, GroupNamesLookup, Store
from otpgate.core.records import ANY_SECRET, Account, AccountDetails, SecretRecord
from otpgate.core.settings import DIGITS_BOUNDS, INTERVAL_BOUNDS, Settings, check_int
from otpgate.errors import (
    FailedPrecondition,
    InvalidArgument,
    KeyMismatch,
    NotFound,
    SecretChanged,
    StoreError,
    StoreUnavailable,
)

log = logging.getLogger("otpgated")

Clock = Callable[[], float]
# How long a renewed secret waits for its first code (renew_secret(pending=True)):
# time to scan a QR code and read a code, not long enough to be forgotten about.
PENDING_SECONDS = 15 * 60
_KEY_CHECK_PLAINTEXT = b"otpgate key check v1"
_KEY_CHECK_BINDING = b"otpgate/v1 key check"


class VerifyResult(enum.Enum):
    VALID = "valid"
    INVALID = "invalid"
    REPLAYED = "replayed"
    NOT_ENROLLED = "not_enrolled"
    LOCKED = "locked"


@dataclasses.dataclass(frozen=True)
class Verification:
    result: VerifyResult
    locked_seconds: int = 0
    # A recovery code was accepted: how many the account has left (else None).
    recovery_codes_left: int | None = None

    @property
    def valid(self) -> bool:
        return self.result is VerifyResult.VALID


@dataclasses.dataclass(frozen=True)
class Enrollment:
    """What a decision needs to know of an account (Gate.check): no display facts."""

    account: Account
    record: SecretRecord | None  # None: not enrolled (or the secret was another uid's)
    locked_seconds: int = 0


@dataclasses.dataclass(frozen=True)
class Rotation:
    resealed: int  # rows re-sealed by this run
    key_id: str  # the key everything is sealed with now (when old_key_ids is empty)
    old_key_ids: list[str]  # keys still needed: rows a renewal raced, or a failed run
    old_key_loaded: bool = True  # False: otpgated holds one key, so nothing was rotated


@dataclasses.dataclass(frozen=True)
class ImportEntry:
    """One token to take over (import_secrets), as core.imports reads it."""

    username: str
    secret: bytes = dataclasses.field(repr=False)
    otp_digits: int
    interval: int
    last_step: int = -1
    recovery_codes: tuple[str, ...] = dataclasses.field(default=(), repr=False)


def _scratch_shaped(code: str) -> bool:
    """google-authenticator's scratch codes: 8 digits (they become recovery codes)."""
    return len(code) == 8 and code.isascii() and code.isdigit()


@dataclasses.dataclass(frozen=True)
class UserView:
    """An account as shown (GetUser, ListUsers, LoginEx's user info)."""

    account: AccountDetails
    record: SecretRecord | None  # None: not enrolled (or the secret was another uid's)
    locked_seconds: int = 0
    provisioning_uri: str | None = None
    recovery_codes_left: int = 0
    pending_expires_in: int = 0  # a renewed secret waits for its first code this long


class TwoFactorService:
    def __init__(
        self,
        store: Store,
        keyring: Keyring,
        *,
        default_issuer: str,
        hostname: str | None = None,
        accounts: AccountLookup = lookup_account,
        accounts_for_enrollment: AccountLookup | None = None,
        details: AccountDetailsLookup = account_details,
        groups: GroupNamesLookup = group_names,
        clock: Clock = time.time,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._default_issuer = default_issuer
        self._hostname = hostname or socket.gethostname()
        self._accounts = accounts
        # The uid a new secret is bound to comes from NSS itself, never from a cache
        # (`accounts` may be one) that could still hold a recreated account's old uid.
        self._accounts_for_enrollment = accounts_for_enrollment or accounts
        self._details = details
        self._groups = groups
        self._clock = clock
        # Told after each change of settings or of who is enrolled (server.gate_writer
        # rewrites the SSH stacks' gate files then); it must not raise.
        self._on_change = on_change or (lambda: None)
        # Counts those changes: a copy of what they change is current while it holds.
        self.generation = 0
        self.check_key()
        self._recovery_key = self._load_recovery_key()

    def _load_recovery_key(self) -> bytes:
        # One per database, made by whichever daemon needs it first, sealed like a
        # secret (core.recovery says why it is keyed at all).
        sealed = self._store.recovery_key()
        if sealed is None:
            fresh = self._keyring.seal(secrets.token_bytes(32), recovery.KEY_BINDING)
            sealed = self._store.init_recovery_key(fresh)
        return self._keyring.open(sealed, recovery.KEY_BINDING)

    def check_key(self) -> None:
        """Refuse (KeyMismatch) unless the keyring opens everything in the store.

        A new store is sealed with the primary key so that a later start with a
        different key fails here instead of locking every user out at login.
        """
        check = self._store.key_check()
        if check is None:
            if self._store.key_ids_in_use():
                raise KeyMismatch("the database holds secrets but no key check")
            sealed = self._keyring.seal(_KEY_CHECK_PLAINTEXT, _KEY_CHECK_BINDING)
            self._store.set_key_check(sealed)
            return
        try:
            self._keyring.open(check, _KEY_CHECK_BINDING)
        except KeyMismatch:
            raise KeyMismatch(
                f"the database was sealed with key id {check.key_id} but the loaded key has id "
                f"{self._keyring.primary_id}: refusing to start (wrong key file?)"
            ) from None
        missing = self._store.key_ids_in_use() - self._keyring.key_ids
        if missing:
            raise KeyMismatch(f"secrets sealed with unknown key ids: {', '.join(sorted(missing))}")

    def _changed(self) -> None:
        self.generation += 1
        self._on_change()

    # -- settings -------------------------------------------------------------------

    def get_config(self) -> Settings:
        return self._store.load_settings()

    def update_config(self, changes: Mapping[str, Any]) -> Settings:
        current = self._store.load_settings()
        updated = current.with_changes(changes)
        if updated != current:
            changed = sorted(k for k in changes if getattr(current, k) != getattr(updated, k))
            self._store.save_settings(
                updated, audit="changed " + ",".join(changed), now=int(self._clock())
            )
            log.info("settings_updated fields=%s", ",".join(changed))
            self._changed()
        return updated

    def effective_issuer(self, settings: Settings) -> str:
        return settings.issuer or self._default_issuer

    # -- accounts and secrets -------------------------------------------------------

    def _account(self, username: str, lookup: AccountLookup | None = None) -> Account:
        account = (lookup or self._accounts)(check_username(username))
        if account is None:
            raise NotFound(f"no such account: {username}")
        return account

    def lookup(self, username: str) -> Account | None:
        """The account NSS knows by this name, or None (also for a malformed name)."""
        try:
            return self._account(username)
        except (NotFound, InvalidArgument):
            return None

    def _record_for(self, account: Account) -> SecretRecord | None:
        record = self._store.get_secret(account.username)
        # A secret belongs to the account that enrolled: a recreated account of the same
        # name (another uid) is not enrolled.
        if record is None or record.uid != account.uid:
            return None
        return record

    def _uri(self, account: Account, record: SecretRecord, settings: Settings) -> str:
        secret = self._open(record).decode()
        return totp.provisioning_uri(
            secret,
            account=f"{account.username}@{self._hostname}",
            issuer=self.effective_issuer(settings),
            digits=record.otp_digits,
            interval=record.interval,
        )

    def _open(self, record: SecretRecord) -> bytes:
        return self._keyring.open(record.sealed, account_binding(record.username, record.uid))

    def renew_secret(
        self,
        username: str,
        *,
        otp_digits: int | None = None,
        interval: int | None = None,
        expected: object = ANY_SECRET,
        pending: bool = False,
    ) -> UserView:
        """A new secret for `username`, replacing any; with `expected` (see
        Store.put_secret) only if the account's secret is still what the caller
        checked, else FailedPrecondition and nothing changes.

        With `pending`, the new secret waits (PENDING_SECONDS) beside the current
        one, which keeps working, until confirm_secret sees a code from it; the
        view then carries the current record and the new secret's URI. A pending
        secret never lets anyone in: an account with nothing else is not enrolled.
        """
        settings = self._store.load_settings()
        digits = check_int("otp_digits", otp_digits or settings.otp_digits, DIGITS_BOUNDS)
        seconds = check_int("interval", interval or settings.interval, INTERVAL_BOUNDS)
        account = self._account(username, lookup=self._accounts_for_enrollment)
        secret = totp.new_secret()
        record = SecretRecord(
            username=account.username,
            uid=account.uid,
            sealed=self._keyring.seal(
                secret.encode(), account_binding(account.username, account.uid)
            ),
            otp_digits=digits,
            interval=seconds,
            created_at=int(self._clock()),
        )
        uri = self._uri(account, record, settings)
        if pending:
            # `expected` is checked again when it is confirmed, under the same lock.
            self._store.put_pending(record, expires_at=record.created_at + PENDING_SECONDS)
            log.info(
                "secret_pending user=%s digits=%d interval=%d", account.username, digits, seconds
            )
            view = self._view(account, self._record_for(account))
            return dataclasses.replace(view, provisioning_uri=uri)
        if not self._store.put_secret(record, expected=expected):
            raise SecretChanged(f"the 2FA secret of {account.username} changed meanwhile")
        self._changed()
        log.info("secret_renewed user=%s digits=%d interval=%d", account.username, digits, seconds)
        return UserView(self._details(account), record, provisioning_uri=uri)

    def confirm_secret(
        self, username: str, token: str, *, expected: object = ANY_SECRET
    ) -> UserView:
        """Make the account's pending secret its secret, given a current code from
        it (that code is then spent); the old secret stops working. FailedPrecondition
        when there is none (or it expired, or `expected` no longer holds)."""
        totp.check_token_format(token)
        account = self._account(username)
        now = self._clock()
        pending = self._store.get_pending(account.username)
        if pending is None or pending[0].uid != account.uid or pending[1] <= int(now):
            raise FailedPrecondition(
                f"{account.username} has no pending 2FA secret (or it expired after "
                f"{PENDING_SECONDS // 60} minutes): renew it again"
            )
        record = pending[0]
        step = totp.matching_step(
            self._open(record).decode(),
            token,
            now=now,
            interval=record.interval,
            digits=record.otp_digits,
            window=self._store.load_settings().window,
        )
        if step is None:
            raise InvalidArgument("token", "is not a current code of the pending secret")
        if not self._store.confirm_pending(
            account.username, account.uid, record.sealed, step, now=int(now), expected=expected
        ):
            raise SecretChanged(f"the 2FA secret of {account.username} changed meanwhile")
        self._changed()
        log.info("secret_confirmed user=%s", account.username)
        return self._view(account, self._record_for(account))

    def provisioning_uri(self, username: str) -> str:
        account = self._account(username)
        record = self._record_for(account)
        if record is None:
            raise NotFound(f"account {account.username} has no 2FA secret")
        return self._uri(account, record, self._store.load_settings())

    def unset_secret(self, username: str) -> UserView:
        """Remove a secret; also the secret of an account NSS no longer knows, so an
        admin can clean up before the name (or its uid) is given to someone else."""
        try:
            account = self._details(self._account(username))
        except NotFound:
            record = self._store.get_secret(username)
            if record is None:
                raise
            # The facts went with the account: only what the row remembers is left.
            account = AccountDetails(record.username, record.uid, 0, "", "", "", (), False)
        if self._store.delete_secret(account.username, now=int(self._clock())):
            log.info("secret_unset user=%s", account.username)
            self._changed()
        return UserView(account, None)

    def enrollment(self, username: str) -> Enrollment:
        """The account, its secret and its lock: get_user without what is only shown."""
        account = self._account(username)
        record = self._record_for(account)
        return Enrollment(account, record, self._locked_seconds(record))

    def group_names(self, account: Account) -> frozenset[str]:
        """The account's group names (NSS), for the access policy's group rules."""
        return self._groups(account)

    def now(self) -> float:
        return self._clock()

    def explain_access(
        self, username: str, *, rhost: str, pam_service: str
    ) -> tuple[policy.Access, frozenset[str]]:
        """What the access policy decides for a login of this (existing) account
        from `rhost` through `pam_service`, as the PAM gate decides it; and the
        account's group names (empty unless a group list is set)."""
        state = self.enrollment(username)
        settings = self.get_config()
        groups = self.group_names(state.account) if policy.uses_groups(settings) else frozenset()
        access = policy.decide(
            settings,
            covered=policy.covers(settings, pam_service),
            known=True,
            enrolled=state.record is not None,
            groups=lambda: groups,
            rhost=rhost,
            now=self._clock(),
        )
        return access, groups

    def get_user(self, username: str) -> UserView:
        account = self._account(username)
        return self._view(account, self._record_for(account))

    def _enrolled(self) -> list[tuple[Account, SecretRecord]]:
        pairs = []
        for record in self._store.list_secrets():
            account = self._accounts(record.username)
            if account is not None and account.uid == record.uid:
                pairs.append((account, record))
        return pairs

    def enrolled_accounts(self) -> list[Account]:
        """Every account with a secret of its own (list_users without the views)."""
        return [account for account, _ in self._enrolled()]

    def list_users(self) -> list[UserView]:
        return [self._view(account, record) for account, record in self._enrolled()]

    def _view(self, account: Account, record: SecretRecord | None) -> UserView:
        left = 0 if record is None else self._store.recovery_codes_left(account.username)
        return UserView(
            self._details(account),
            record,
            locked_seconds=self._locked_seconds(record),
            recovery_codes_left=left,
            pending_expires_in=self._pending_left(account),
        )

    def _pending_left(self, account: Account) -> int:
        pending = self._store.get_pending(account.username)
        if pending is None or pending[0].uid != account.uid:
            return 0
        return max(0, pending[1] - int(self._clock()))

    def unlock(self, username: str) -> UserView:
        """Clear the account's lockout and wrong-code count; the secret stays."""
        account = self._account(username)
        if not self._store.unlock(account.username, account.uid, now=int(self._clock())):
            raise NotFound(f"account {account.username} has no 2FA secret")
        log.info("unlocked user=%s", account.username)
        return self._view(account, self._record_for(account))

    def import_secrets(self, entries: list[ImportEntry], *, dry_run: bool = False) -> list[str]:
        """Take over tokens from another module (core.imports reads their files):
        all or nothing. Every account must exist and have no secret yet; its spent
        step stays spent and its scratch codes become recovery codes. The names
        imported (or, with dry_run, that would be)."""
        if not entries:
            raise InvalidArgument("accounts", "nothing to import")
        names = [entry.username for entry in entries]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InvalidArgument("accounts", f"listed more than once: {', '.join(repeated)}")
        now = int(self._clock())
        items = []
        for entry in entries:
            account = self._account(entry.username, lookup=self._accounts_for_enrollment)
            where = f"account {account.username}"
            digits = check_int(f"{where}: otp_digits", entry.otp_digits, DIGITS_BOUNDS)
            seconds = check_int(f"{where}: interval", entry.interval, INTERVAL_BOUNDS)
            if len(entry.secret) < 10:
                raise InvalidArgument(f"{where}: secret", "must be at least 10 bytes (80 bits)")
            if entry.last_step < -1:
                raise InvalidArgument(f"{where}: last_step", "must be -1 or more")
            hashes = []
            for code in entry.recovery_codes:
                plain = recovery.normalise(code) or (code if _scratch_shaped(code) else None)
                if plain is None:
                    raise InvalidArgument(
                        f"{where}: recovery code", "must be 8 digits or a recovery code"
                    )
                hashes.append(
                    recovery.mac(self._recovery_key, account.username, account.uid, plain)
                )
            secret = base64.b32encode(entry.secret).decode().rstrip("=")
            record = SecretRecord(
                username=account.username,
                uid=account.uid,
                sealed=self._keyring.seal(
                    secret.encode(), account_binding(account.username, account.uid)
                ),
                otp_digits=digits,
                interval=seconds,
                created_at=now,
                last_step=entry.last_step,
            )
            items.append((record, hashes))
        enrolled = [r.username for r, _ in items if self._record_for_name(r) is not None]
        if not dry_run and not enrolled:
            enrolled = self._store.import_secrets(items, now=now)
            if not enrolled:
                self._changed()
        if enrolled:
            raise FailedPrecondition(
                f"already enrolled, so nothing was imported: {', '.join(enrolled)} "
                "(leave them out, or unset their secrets first)"
            )
        if not dry_run:
            log.info("secrets_imported count=%d users=%s", len(items), ",".join(names))
        return names

    def _record_for_name(self, record: SecretRecord) -> SecretRecord | None:
        current = self._store.get_secret(record.username)
        return current if current is not None and current.uid == record.uid else None

    def make_recovery_codes(self, username: str) -> list[str]:
        """A new set of recovery codes for an enrolled account, replacing any; the
        codes themselves exist only in this answer."""
        account = self._account(username)
        codes = recovery.generate()
        hashes = [
            recovery.mac(self._recovery_key, account.username, account.uid, c.replace("-", ""))
            for c in codes
        ]
        if not self._store.put_recovery_codes(
            account.username, account.uid, hashes, now=int(self._clock())
        ):
            raise FailedPrecondition(
                f"account {account.username} has no 2FA secret: enroll first "
                "(recovery codes stand in for its codes)"
            )
        log.info("recovery_codes_made user=%s count=%d", account.username, len(codes))
        return codes

    def _locked_seconds(self, record: SecretRecord | None) -> int:
        return 0 if record is None else lockout.remaining(record, int(self._clock()))

    # -- verification ---------------------------------------------------------------

    def verify(
        self,
        username: str,
        token: str,
        *,
        via: str,
        malformed_counts: bool = False,
        settings: Settings | None = None,
    ) -> Verification:
        """Check a code for an existing account; spend it when right.

        A code that is not 6 to 8 digits is refused (InvalidArgument, nothing
        changes), unless `malformed_counts`: then, as at a login prompt, it is one
        more wrong attempt toward the lockout, like any other.

        Raises NotFound for an unknown account: callers that must not reveal which
        accounts exist (the PAM and login paths) map that to their own answer.
        """
        code = recovery.normalise(token)
        try:
            if code is None:
                totp.check_token_format(token)
            well_formed = True
        except InvalidArgument:
            if not malformed_counts:
                raise InvalidArgument(
                    "token", "must be 6 to 8 ASCII digits, or a recovery code"
                ) from None
            well_formed = False
        account = self._account(username)
        outcome = self._verify(
            account, token if well_formed else None, recovery_code=code, settings=settings
        )
        shape = "" if well_formed else " token=malformed"
        if code is not None or outcome.recovery_codes_left is not None:
            shape = " token=recovery_code"  # an 8-digit scratch code is told by its use
            if outcome.recovery_codes_left is not None:
                shape += f" recovery_codes_left={outcome.recovery_codes_left}"
        log.info(
            "verify user=%s via=%s result=%s%s", account.username, via, outcome.result.value, shape
        )
        self.record("verify", account.username, f"result={outcome.result.value}{shape}")
        return outcome

    # -- key rotation -----------------------------------------------------------------

    def rotate_key(self) -> Rotation:
        """Re-seal everything sealed with an older key under the primary one, while
        serving. Each row is re-sealed in its own statement, and only if it is still
        as read (a renewal meanwhile wins), so a crash or kill at any moment leaves
        every row readable with the keys loaded, and running it again finishes."""
        primary = self._keyring.primary_id
        done = 0
        for table, records in (
            ("secrets", self._store.list_secrets()),
            ("pending_secrets", self._store.list_pending()),
        ):
            for record in records:
                if record.sealed.key_id == primary:
                    continue
                binding = account_binding(record.username, record.uid)
                fresh = self._keyring.seal(self._keyring.open(record.sealed, binding), binding)
                done += self._store.reseal(table, record.username, record.sealed, fresh)
        for name, current, binding in (
            ("key_check", self._store.key_check(), _KEY_CHECK_BINDING),
            ("recovery_key", self._store.recovery_key(), recovery.KEY_BINDING),
        ):
            if current is not None and current.key_id != primary:
                fresh = self._keyring.seal(self._keyring.open(current, binding), binding)
                done += self._store.reseal_meta(name, current, fresh)
        left = set(self._store.key_ids_in_use())
        check = self._store.key_check()
        if check is not None:
            left.add(check.key_id)
        left.discard(primary)
        self.record("key_rotated", "", f"resealed={done} key_id={primary} left={len(left)}")
        log.info(
            "key_rotated resealed=%d key_id=%s old_key_ids_left=%s",
            done,
            primary,
            ",".join(sorted(left)) or "none",
        )
        return Rotation(done, primary, sorted(left), old_key_loaded=len(self._keyring.key_ids) > 1)

    # -- audit ------------------------------------------------------------------------

    def record(self, event: str, username: str, detail: str) -> None:
        """One audit event of something that changed nothing (a verification, a
        login). Its decision stands if the event cannot be written: were the
        failure reported, a wrong code could come back as "unavailable"."""
        try:
            self._store.record_event(event, username, detail, now=int(self._clock()))
        except StoreError as exc:
            log.warning("audit_not_written event=%s user=%s: %s", event, username, exc)

    def audit_events(
        self,
        *,
        username: str | None = None,
        since: int | None = None,
        until: int | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[audit.Event]:
        """Audit events, newest first, a page at a time (before_id: the last id seen)."""
        if username is not None:
            check_username(username)
        limit = check_int("page_size", limit, (1, 1000))
        if since is not None and until is not None and since >= until:
            raise InvalidArgument("since", "must be before until")
        return self._store.audit_events(
            username=username, since=since, until=until, before_id=before_id, limit=limit
        )

    def purge_audit(self, retention_days: int) -> int:
        """Drop events older than `retention_days` (0: keep everything); how many."""
        if retention_days <= 0:
            return 0
        return self._store.purge_audit(before=int(self._clock()) - retention_days * 86400)

    def _verify(
        self,
        account: Account,
        token: str | None,
        *,
        recovery_code: str | None = None,
        settings: Settings | None = None,
    ) -> Verification:
        # The caller's copy when it has just read them (the PAM gate): one read less.
        settings = settings or self._store.load_settings()
        now = self._clock()
        # Counting the attempt also fetches the secret: one statement on the login path.
        record = self._store.count_attempt(account.username, account.uid, now=int(now))
        if record is None:
            return Verification(VerifyResult.NOT_ENROLLED)
        judgement = lockout.judge(
            record,
            now=int(now),
            threshold=settings.lockout_threshold,
            base_seconds=settings.lockout_seconds,
        )
        if judgement.lock_until is not None:
            # False when another attempt locked this run first (or a code was accepted
            # meanwhile): either way nothing is left to do; see core.lockout.
            try:
                self._store.lock(
                    account.username,
                    account.uid,
                    count=record.failures,
                    lockouts=record.lockouts,
                    until=judgement.lock_until,
                    now=int(now),
                )
            except StoreUnavailable:
                # This attempt was counted, so its answer stands: were it "unavailable",
                # a wrong code would pass where the hook runs fail=safe. The lock is not
                # lost either: the next attempt finds the threshold passed and locks.
                log.warning("lock_deferred user=%s: database unavailable", account.username)
        if not judgement.check_code:
            return Verification(VerifyResult.LOCKED, locked_seconds=judgement.locked_seconds)
        if token is None:
            return Verification(VerifyResult.INVALID)  # counted above, like a wrong code
        if recovery_code is None and len(token) != record.otp_digits and _scratch_shaped(token):
            # Digits of another length than the account's codes can only be a scratch
            # code taken over from google-authenticator (import_secrets).
            recovery_code = token
        if recovery_code is not None:
            # Counted above like any code; a right one clears the count as a code does.
            try:
                left = self._store.use_recovery_code(
                    account.username,
                    account.uid,
                    [
                        recovery.mac(
                            self._recovery_key, account.username, account.uid, recovery_code
                        )
                    ],
                    now=int(now),
                )
            except StoreUnavailable:
                return self._unspent(account)
            if left is None:
                return Verification(VerifyResult.INVALID)
            return Verification(VerifyResult.VALID, recovery_codes_left=left)
        step = totp.matching_step(
            self._open(record).decode(),
            token,
            now=now,
            interval=record.interval,
            digits=record.otp_digits,
            window=settings.window,
        )
        if step is None:
            return Verification(VerifyResult.INVALID)
        try:
            spent = self._store.accept_step(account.username, account.uid, step)
        except StoreUnavailable:
            return self._unspent(account)
        if not spent:
            return Verification(VerifyResult.REPLAYED)
        return Verification(VerifyResult.VALID)

    @staticmethod
    def _unspent(account: Account) -> Verification:
        # The attempt is counted and the code was looked at: from here on only a
        # verdict may come back, never "unavailable" (on which a fail=safe hook lets
        # the first factor alone in, a replayed or wrong code with it). A code
        # that could not be spent is refused; its owner types the next one.
        log.warning("code_not_spent user=%s: database unavailable; refused", account.username)
        return Verification(VerifyResult.INVALID)
