"""LoginEx / LoginExContinue: password through PAM, then a code; sessions.

The caller's uid comes from the kernel (see server.relay): an ordinary user may
check only their own password, and checks of one account are throttled as su's
failure delay would (core.throttle), so user.sock is no password oracle.

Attempts and sessions live in memory only (they die with the daemon) and are
keyed by the SHA-256 of their random token, so a memory dump does not hand out
usable tokens. A failed login is padded to the time a real password check takes,
so that an unknown account, a locked one and a wrong password look alike.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import math
import pwd
import secrets
import threading
import time
from collections.abc import Callable

from otpgate.core.accounts import check_username
from otpgate.core.crypto import Sealed
from otpgate.core.ports import PasswordChecker, SelfService
from otpgate.core.records import PasswordResult, SecretRecord
from otpgate.core.service import Clock, UserView, VerifyResult
from otpgate.core.throttle import LineBudget, PasswordThrottle
from otpgate.errors import InvalidArgument, NotFound, PermissionDenied, TooManyAttempts

log = logging.getLogger("otpgated")

ATTEMPT_SECONDS = 300
OTP_RETRIES = 3  # as TrueNAS
SESSION_SECONDS = 900
MAX_PENDING = 10_000
# Per uid, so that no local user can fill the tables for everyone: a new one
# replaces that uid's oldest.
MAX_PER_UID = 16
_MIN_FAILURE_SECONDS = 0.05


class Response(enum.Enum):
    SUCCESS = "success"
    OTP_REQUIRED = "otp_required"
    AUTH_ERR = "auth_err"
    EXPIRED = "expired"


class Level(enum.Enum):
    LEVEL_1 = 1  # password
    LEVEL_2 = 2  # password and code


@dataclasses.dataclass(frozen=True)
class Session:
    username: str
    uid: int
    level: Level
    expires: float
    # The secret this session itself enrolled, if any: a LEVEL_1 session may go on
    # with a secret it created (it has just seen it), never with one it found.
    created_secret: Sealed | None = None

    def may_act_on(self, record: SecretRecord | None) -> bool:
        """Whether this session's proof covers the account's current secret."""
        if record is None or self.level is Level.LEVEL_2:
            return True
        return self.created_secret is not None and record.sealed == self.created_secret


@dataclasses.dataclass
class _Attempt:
    username: str
    uid: int
    expires: float
    retries_left: int = OTP_RETRIES


@dataclasses.dataclass(frozen=True)
class LoginOutcome:
    response: Response
    username: str = ""
    attempt_token: str = ""
    session_token: str = ""
    session_expires_in: int = 0
    user: UserView | None = None
    level: Level | None = None


def _plausible_name(username: str) -> bool:
    try:
        check_username(username)
        return True
    except InvalidArgument:
        return False


def _name_of_uid(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _make_room(table: dict[bytes, _Attempt] | dict[bytes, Session], uid: int) -> None:
    # Dicts keep insertion order: the first of this uid's entries is its oldest.
    mine = [key for key, entry in table.items() if entry.uid == uid]
    for key in mine[: max(0, len(mine) - MAX_PER_UID + 1)]:
        del table[key]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode(errors="replace")).digest()


class Logins:
    def __init__(
        self,
        service: SelfService,
        passwords: PasswordChecker,
        *,
        clock: Clock = time.time,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        name_of_uid: Callable[[int], str | None] = _name_of_uid,
    ) -> None:
        self._service = service
        self._name_of_uid = name_of_uid
        self._passwords = passwords
        self._clock = clock
        self._sleep = sleep
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._attempts: dict[bytes, _Attempt] = {}
        self._sessions: dict[bytes, Session] = {}
        self._typical_check = _MIN_FAILURE_SECONDS  # moving average of successful checks
        self._throttle = PasswordThrottle(monotonic)
        self._throttled_lines = LineBudget(1.0, monotonic, burst=5)
        self._refused_lines = LineBudget(1.0, monotonic, burst=5)
        self._no_attempt_lines = LineBudget(1.0, monotonic, burst=5)

    # -- LoginEx --------------------------------------------------------------------

    def login(
        self, username: str, password: str, *, caller_uid: int, caller: str = ""
    ) -> LoginOutcome:
        """Check `username`'s password for a caller the kernel identified.

        As unix_chkpwd, an ordinary user (caller_uid != 0) may check only their own
        password: another name is PermissionDenied before any check. Checks of one
        account are throttled (one at a time, then a growing delay after each wrong
        password: TooManyAttempts), so guessing is no faster than through su.
        """
        who = f"{caller} " if caller else ""
        if caller_uid != 0:
            self._own_account_only(username, caller_uid, who)
        try:
            check_username(username)
        except InvalidArgument:
            started = self._monotonic()
            log.info("login user=<invalid> %sresult=auth_err reason=bad_name", who)
            return self._failed(started)
        wait = self._throttle.begin(username)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            allowed, suppressed = self._throttled_lines.allow()
            if allowed:
                more = f" (and {suppressed} more not logged)" if suppressed else ""
                log.warning(
                    "login_throttled user=%s %sretry_after=%d%s", username, who, retry, more
                )
            raise TooManyAttempts(
                f"too many wrong passwords for {username}: try again in {retry} s", retry
            )
        started = self._monotonic()
        result = PasswordResult.BAD  # what a checker that raises counts as
        try:
            result = self._passwords(username, password)
        finally:
            self._throttle.end(username, failed=result is PasswordResult.BAD)
        if result is PasswordResult.BAD:
            log.warning(
                "login user=%s %sresult=auth_err reason=password failures=%d",
                username,
                who,
                self._throttle.failures(username),
            )
            self._service.record("login", username, "result=auth_err reason=password")
            return self._failed(started)
        if result is PasswordResult.EXPIRED:
            log.info("login user=%s %sresult=expired", username, who)
            return LoginOutcome(Response.EXPIRED)
        self._learn_check_time(self._monotonic() - started)
        try:
            view = self._service.get_user(username)
        except NotFound:
            log.info("login user=%s %sresult=auth_err reason=no_account", username, who)
            return self._failed(started)  # PAM knew the name, NSS does not: refuse
        account = view.account
        if view.locked_seconds:
            # As the README promises: a locked account looks like a wrong password.
            log.info("login user=%s %sresult=auth_err reason=locked", account.username, who)
            self._service.record("login", account.username, "result=auth_err reason=locked")
            return self._failed(started)
        if view.record is not None:
            # Whatever the global switch: a session of an enrolled account can see and
            # replace its secret, so it must prove the secret (LEVEL_2) first.
            token = secrets.token_urlsafe(32)
            with self._lock:
                self._prune()
                _make_room(self._attempts, account.uid)
                if len(self._attempts) >= MAX_PENDING:
                    return self._failed(started)
                self._attempts[_digest(token)] = _Attempt(
                    account.username, account.uid, self._clock() + ATTEMPT_SECONDS
                )
            log.info("login user=%s %sresult=otp_required", account.username, who)
            return LoginOutcome(
                Response.OTP_REQUIRED, username=account.username, attempt_token=token
            )
        return self._success(view, Level.LEVEL_1)

    def _own_account_only(self, username: str, caller_uid: int, who: str) -> None:
        # As unix_chkpwd: the caller's own name, from its uid. Looking up whatever
        # name a caller sends would let anyone churn the account cache pam.sock
        # relies on, or send a directory service a query per made-up name.
        if self._name_of_uid(caller_uid) == username:
            account = self._service.lookup(username)
            if account is not None and account.uid == caller_uid:
                return
        allowed, suppressed = self._refused_lines.allow()
        if allowed:
            more = f" (and {suppressed} more not logged)" if suppressed else ""
            log.warning(
                "login_refused user=%s %sreason=not_own_account%s",
                username if _plausible_name(username) else "<invalid>",
                who,
                more,
            )
        raise PermissionDenied(
            f"uid {caller_uid} may log in as itself only (as unix_chkpwd); "
            "root may log in as anyone"
        )

    def _failed(self, started: float) -> LoginOutcome:
        # The worker thread waits for tens of milliseconds at most: the PAM service
        # runs pam_unix with nodelay, and this floor replaces its seconds-long delay.
        remaining = max(_MIN_FAILURE_SECONDS, self._typical_check) - (self._monotonic() - started)
        if remaining > 0:
            self._sleep(remaining)
        return LoginOutcome(Response.AUTH_ERR)

    def _learn_check_time(self, seconds: float) -> None:
        with self._lock:
            self._typical_check = 0.8 * self._typical_check + 0.2 * min(seconds, 1.0)

    # -- LoginExContinue --------------------------------------------------------------

    def login_continue(self, attempt_token: str, code: str, *, caller_uid: int) -> LoginOutcome:
        key = _digest(attempt_token)
        with self._lock:
            attempt = self._attempts.get(key)
            if attempt is not None and caller_uid not in (0, attempt.uid):
                attempt = None  # another uid's attempt: as if it did not exist, untouched
            elif attempt is not None and attempt.expires <= self._clock():
                del self._attempts[key]
                attempt = None
            if attempt is None:
                allowed, suppressed = self._no_attempt_lines.allow()
                if allowed:
                    more = f" (and {suppressed} more not logged)" if suppressed else ""
                    log.info("login_continue result=auth_err reason=no_pending_attempt%s", more)
                return LoginOutcome(Response.AUTH_ERR)
            attempt.retries_left -= 1
            last_try = attempt.retries_left <= 0
            if last_try:
                del self._attempts[key]
        outcome = self._check_code(attempt, code)
        if outcome is VerifyResult.VALID:
            with self._lock:
                self._attempts.pop(key, None)
            return self._success(self._service.get_user(attempt.username), Level.LEVEL_2)
        if outcome in (VerifyResult.LOCKED, VerifyResult.NOT_ENROLLED) or last_try:
            with self._lock:
                self._attempts.pop(key, None)
            log.info("login_continue user=%s result=auth_err", attempt.username)
            return LoginOutcome(Response.AUTH_ERR)
        return LoginOutcome(
            Response.OTP_REQUIRED, username=attempt.username, attempt_token=attempt_token
        )

    def _check_code(self, attempt: _Attempt, code: str) -> VerifyResult:
        try:
            view = self._service.get_user(attempt.username)
            if view.account.uid != attempt.uid:
                return VerifyResult.NOT_ENROLLED
            # A malformed code is one more wrong code: it counts toward the lockout.
            return self._service.verify(
                attempt.username, code, via="login", malformed_counts=True
            ).result
        except (NotFound, InvalidArgument):
            return VerifyResult.NOT_ENROLLED

    # -- sessions -------------------------------------------------------------------

    def _success(self, view: UserView, level: Level) -> LoginOutcome:
        token = secrets.token_urlsafe(32)
        session = Session(
            view.account.username, view.account.uid, level, self._clock() + SESSION_SECONDS
        )
        with self._lock:
            self._prune()
            _make_room(self._sessions, session.uid)
            self._sessions[_digest(token)] = session
        log.info("login user=%s result=success level=%s", view.account.username, level.name)
        self._service.record("login", view.account.username, f"result=success level={level.name}")
        return LoginOutcome(
            Response.SUCCESS,
            username=view.account.username,
            session_token=token,
            session_expires_in=SESSION_SECONDS,
            user=view,
            level=level,
        )

    def session(self, token: str) -> Session | None:
        with self._lock:
            session = self._sessions.get(_digest(token))
            if session is None or session.expires <= self._clock():
                return None
            return session

    def note_created_secret(self, token: str, sealed: Sealed) -> None:
        with self._lock:
            key = _digest(token)
            session = self._sessions.get(key)
            if session is not None:
                self._sessions[key] = dataclasses.replace(session, created_secret=sealed)

    def logout(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(_digest(token), None)

    def _prune(self) -> None:
        now = self._clock()
        for table in (self._attempts, self._sessions):
            for key in [k for k, v in table.items() if v.expires <= now]:
                del table[key]
