"""LoginEx / LoginExContinue logic with an injected clock and password checker."""

from __future__ import annotations

from pathlib import Path

import pyotp
import pytest

from otpgate.core.crypto import Keyring
from otpgate.core.login import ATTEMPT_SECONDS, OTP_RETRIES, Level, Logins, Response
from otpgate.core.passwords import PasswordResult
from otpgate.core.service import TwoFactorService
from otpgate.store.sqlite import SQLiteStore
from tests.core.test_service import Accounts, Clock

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "old": "old-pw"}


def check_password(username: str, password: str) -> PasswordResult:
    if username == "old" and password == PASSWORDS["old"]:
        return PasswordResult.EXPIRED
    ok = PASSWORDS.get(username) == password
    return PasswordResult.OK if ok else PasswordResult.BAD


@pytest.fixture
def env(tmp_path: Path) -> tuple[Logins, TwoFactorService, Clock, list[float]]:
    clock, accounts = Clock(), Accounts()
    for i, name in enumerate(PASSWORDS):
        accounts.add(name, 1000 + i)
    service = TwoFactorService(
        SQLiteStore(str(tmp_path / "db")), Keyring(b"k" * 32), default_issuer="T",
        accounts=accounts, clock=clock,
    )  # fmt: skip
    sleeps: list[float] = []
    logins = Logins(service, check_password, clock=clock, sleep=sleeps.append)
    return logins, service, clock, sleeps


def _enroll(service: TwoFactorService, name: str) -> pyotp.TOTP:
    uri = service.renew_secret(name).provisioning_uri
    assert uri
    totp = pyotp.parse_uri(uri)
    assert isinstance(totp, pyotp.TOTP)
    return totp


def test_no_two_factor_success_at_level_1(env: tuple) -> None:
    logins, service, _, _ = env
    _enroll(service, "alice")  # enrolled, but 2FA is off
    outcome = logins.login("alice", "alice-pw")
    assert outcome.response is Response.SUCCESS and outcome.level is Level.LEVEL_1
    session = logins.session(outcome.session_token)
    assert session and session.username == "alice"


def test_not_enrolled_success_at_once(env: tuple) -> None:
    logins, service, _, _ = env
    service.update_config({"enabled": True})
    assert logins.login("bob", "bob-pw").response is Response.SUCCESS


def test_otp_required_then_success_level_2(env: tuple) -> None:
    logins, service, clock, _ = env
    service.update_config({"enabled": True})
    totp = _enroll(service, "alice")
    first = logins.login("alice", "alice-pw")
    assert (first.response, first.username) == (Response.OTP_REQUIRED, "alice")
    assert first.session_token == "" and logins.session(first.attempt_token) is None
    done = logins.login_continue(first.attempt_token, totp.at(clock.now))
    assert done.response is Response.SUCCESS and done.level is Level.LEVEL_2
    assert done.user is not None and done.user.account.username == "alice"
    # The attempt is used up.
    assert logins.login_continue(first.attempt_token, totp.at(clock.now)).response is (
        Response.AUTH_ERR
    )


def test_wrong_codes_retry_then_auth_err(env: tuple) -> None:
    logins, service, clock, _ = env
    service.update_config({"enabled": True, "lockout_threshold": 100})
    totp = _enroll(service, "alice")
    token = logins.login("alice", "alice-pw").attempt_token
    for _ in range(OTP_RETRIES - 1):
        again = logins.login_continue(token, "000000")
        assert again.response is Response.OTP_REQUIRED and again.attempt_token == token
    assert logins.login_continue(token, "000000").response is Response.AUTH_ERR
    assert logins.login_continue(token, totp.at(clock.now)).response is Response.AUTH_ERR


def test_wrong_codes_count_toward_lockout(env: tuple) -> None:
    logins, service, clock, _ = env
    service.update_config({"enabled": True, "lockout_threshold": 2})
    totp = _enroll(service, "alice")
    token = logins.login("alice", "alice-pw").attempt_token
    logins.login_continue(token, "000000")
    logins.login_continue(token, "000001")  # the second wrong code locks the account
    token = logins.login("alice", "alice-pw").attempt_token
    assert logins.login_continue(token, totp.at(clock.now)).response is Response.AUTH_ERR
    assert service.get_user("alice").locked_seconds > 0


def test_pending_attempt_expires(env: tuple) -> None:
    logins, service, clock, _ = env
    service.update_config({"enabled": True, "window": 10})
    totp = _enroll(service, "alice")
    token = logins.login("alice", "alice-pw").attempt_token
    clock.now += ATTEMPT_SECONDS + 1
    assert logins.login_continue(token, totp.at(clock.now)).response is Response.AUTH_ERR


def test_otp_without_pending_attempt_refused(env: tuple) -> None:
    logins, service, clock, _ = env
    service.update_config({"enabled": True})
    totp = _enroll(service, "alice")
    assert logins.login_continue("", totp.at(clock.now)).response is Response.AUTH_ERR
    assert logins.login_continue("made-up", totp.at(clock.now)).response is Response.AUTH_ERR


def test_failures_look_alike_and_are_padded(env: tuple) -> None:
    logins, _, _, sleeps = env
    answers = [
        logins.login("alice", "wrong"),
        logins.login("nobody", "x"),
        logins.login("../bad name", "x"),
    ]
    assert all(a == answers[0] for a in answers) and answers[0].response is Response.AUTH_ERR
    assert len(sleeps) == 3 and all(s > 0 for s in sleeps)


def test_expired_password(env: tuple) -> None:
    logins, _, _, _ = env
    assert logins.login("old", "old-pw").response is Response.EXPIRED
    assert logins.login("old", "wrong").response is Response.AUTH_ERR


def test_sessions_expire_and_logout(env: tuple) -> None:
    logins, _, clock, _ = env
    token = logins.login("bob", "bob-pw").session_token
    assert logins.session(token) is not None
    logins.logout(token)
    assert logins.session(token) is None
    token = logins.login("bob", "bob-pw").session_token
    clock.now += 10_000
    assert logins.session(token) is None
