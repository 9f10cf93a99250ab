"""LoginEx / LoginExContinue: password through PAM, then a code; sessions.

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
import secrets
import threading
import time
from collections.abc import Callable

from otpgate.core.accounts import check_username
from otpgate.core.passwords import PasswordChecker, PasswordResult
from otpgate.core.service import Clock, TwoFactorService, UserView, VerifyResult
from otpgate.errors import InvalidArgument, NotFound

log = logging.getLogger("otpgated")

ATTEMPT_SECONDS = 300
OTP_RETRIES = 3  # as TrueNAS
SESSION_SECONDS = 900
MAX_PENDING = 10_000
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


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode(errors="replace")).digest()


class Logins:
    def __init__(
        self,
        service: TwoFactorService,
        passwords: PasswordChecker,
        *,
        clock: Clock = time.time,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service = service
        self._passwords = passwords
        self._clock = clock
        self._sleep = sleep
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._attempts: dict[bytes, _Attempt] = {}
        self._sessions: dict[bytes, Session] = {}
        self._typical_check = _MIN_FAILURE_SECONDS  # moving average of successful checks

    # -- LoginEx --------------------------------------------------------------------

    def login(self, username: str, password: str) -> LoginOutcome:
        started = self._monotonic()
        try:
            check_username(username)
        except InvalidArgument:
            return self._failed(started)
        result = self._passwords(username, password)
        if result is PasswordResult.BAD:
            return self._failed(started)
        if result is PasswordResult.EXPIRED:
            log.info("login user=%s result=expired", username)
            return LoginOutcome(Response.EXPIRED)
        self._learn_check_time(self._monotonic() - started)
        try:
            view = self._service.get_user(username)
        except NotFound:
            return self._failed(started)  # PAM knew the name, NSS does not: refuse
        account = view.account
        if self._service.get_config().enabled and view.record is not None:
            token = secrets.token_urlsafe(32)
            with self._lock:
                self._prune()
                if len(self._attempts) >= MAX_PENDING:
                    return self._failed(started)
                self._attempts[_digest(token)] = _Attempt(
                    account.username, account.uid, self._clock() + ATTEMPT_SECONDS
                )
            log.info("login user=%s result=otp_required", account.username)
            return LoginOutcome(
                Response.OTP_REQUIRED, username=account.username, attempt_token=token
            )
        return self._success(view, Level.LEVEL_1)

    def _failed(self, started: float) -> LoginOutcome:
        # The worker thread waits for tens of milliseconds at most: the PAM service
        # runs pam_unix with nodelay, and this floor replaces its seconds-long delay.
        remaining = max(_MIN_FAILURE_SECONDS, self._typical_check) - (self._monotonic() - started)
        if remaining > 0:
            self._sleep(remaining)
        log.info("login result=auth_err")
        return LoginOutcome(Response.AUTH_ERR)

    def _learn_check_time(self, seconds: float) -> None:
        with self._lock:
            self._typical_check = 0.8 * self._typical_check + 0.2 * min(seconds, 1.0)

    # -- LoginExContinue --------------------------------------------------------------

    def login_continue(self, attempt_token: str, code: str) -> LoginOutcome:
        key = _digest(attempt_token)
        with self._lock:
            attempt = self._attempts.get(key)
            if attempt is None or attempt.expires <= self._clock():
                self._attempts.pop(key, None)
                log.info("login_continue result=auth_err reason=no_pending_attempt")
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
            return self._service.verify(attempt.username, code, via="login").result
        except InvalidArgument:
            return VerifyResult.INVALID  # a malformed code is a wrong code
        except NotFound:
            return VerifyResult.NOT_ENROLLED

    # -- sessions -------------------------------------------------------------------

    def _success(self, view: UserView, level: Level) -> LoginOutcome:
        token = secrets.token_urlsafe(32)
        session = Session(
            view.account.username, view.account.uid, level, self._clock() + SESSION_SECONDS
        )
        with self._lock:
            self._prune()
            self._sessions[_digest(token)] = session
        log.info("login user=%s result=success level=%s", view.account.username, level.name)
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

    def logout(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(_digest(token), None)

    def _prune(self) -> None:
        now = self._clock()
        for table in (self._attempts, self._sessions):
            for key in [k for k, v in table.items() if v.expires <= now]:
                del table[key]
