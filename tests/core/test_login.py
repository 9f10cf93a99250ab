"""LoginEx / LoginExContinue logic with an injected clock and password checker."""

from __future__ import annotations

import threading
from pathlib import Path

import pyotp
import pytest

from otpgate.core.crypto import Keyring
from otpgate.core.login import (
    ATTEMPT_SECONDS,
    MAX_PER_UID,
    OTP_RETRIES,
    Level,
    LoginOutcome,
    Logins,
    Response,
)
from otpgate.core.records import PasswordResult
from otpgate.core.service import TwoFactorService
from otpgate.core.throttle import FIRST_DELAY_SECONDS, failure_delay
from otpgate.errors import PermissionDenied, TooManyAttempts
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
        accounts=accounts, details=accounts.details, clock=clock,
    )  # fmt: skip
    sleeps: list[float] = []
    names = {1000 + i: name for i, name in enumerate(PASSWORDS)}
    logins = Logins(
        service, check_password, clock=clock, sleep=sleeps.append, monotonic=clock,
        name_of_uid=names.get,
    )  # fmt: skip
    return logins, service, clock, sleeps


def _cont(logins: Logins, token: str, code: str) -> LoginOutcome:
    return logins.login_continue(token, code, caller_uid=0)


def _enroll(service: TwoFactorService, name: str) -> pyotp.TOTP:
    uri = service.renew_secret(name).provisioning_uri
    assert uri
    totp = pyotp.parse_uri(uri)
    assert isinstance(totp, pyotp.TOTP)
    return totp


def test_enrolled_needs_the_code_even_with_two_factor_off(env: tuple) -> None:
    logins, service, clock, _ = env
    totp = _enroll(service, "alice")  # enrolled, but 2FA is off
    outcome = logins.login("alice", "alice-pw", caller_uid=0)
    # Its session could read and replace the secret: the password alone is not enough.
    assert outcome.response is Response.OTP_REQUIRED
    done = _cont(logins, outcome.attempt_token, totp.at(clock.now))
    assert done.response is Response.SUCCESS and done.level is Level.LEVEL_2
    session = logins.session(done.session_token)
    assert session and session.username == "alice"


def test_not_enrolled_success_at_level_1(env: tuple) -> None:
    logins, _, _, _ = env
    outcome = logins.login("bob", "bob-pw", caller_uid=0)
    assert outcome.response is Response.SUCCESS and outcome.level is Level.LEVEL_1


def test_not_enrolled_success_at_once(env: tuple) -> None:
    logins, service, _, _ = env
    service.update_config({"enabled": True})
    assert logins.login("bob", "bob-pw", caller_uid=0).response is Response.SUCCESS


def test_otp_required_then_success_level_2(env: tuple) -> None:
    logins, service, clock, _ = env
    service.update_config({"enabled": True})
    totp = _enroll(service, "alice")
    first = logins.login("alice", "alice-pw", caller_uid=0)
    assert (first.response, first.username) == (Response.OTP_REQUIRED, "alice")
    assert first.session_token == "" and logins.session(first.attempt_token) is None
    done = _cont(logins, first.attempt_token, totp.at(clock.now))
    assert done.response is Response.SUCCESS and done.level is Level.LEVEL_2
    assert done.user is not None and done.user.account.username == "alice"
    # The attempt is used up.
    assert _cont(logins, first.attempt_token, totp.at(clock.now)).response is (Response.AUTH_ERR)


def test_wrong_codes_retry_then_auth_err(env: tuple) -> None:
    logins, service, clock, _ = env
    service.update_config({"enabled": True, "lockout_threshold": 100})
    totp = _enroll(service, "alice")
    token = logins.login("alice", "alice-pw", caller_uid=0).attempt_token
    for _ in range(OTP_RETRIES - 1):
        again = _cont(logins, token, "000000")
        assert again.response is Response.OTP_REQUIRED and again.attempt_token == token
    assert _cont(logins, token, "000000").response is Response.AUTH_ERR
    assert _cont(logins, token, totp.at(clock.now)).response is Response.AUTH_ERR


def test_wrong_codes_count_toward_lockout(env: tuple) -> None:
    logins, service, clock, _ = env
    service.update_config({"enabled": True, "lockout_threshold": 2})
    totp = _enroll(service, "alice")
    token = logins.login("alice", "alice-pw", caller_uid=0).attempt_token
    _cont(logins, token, "000000")
    _cont(logins, token, "000001")  # the second wrong code locks the account
    token = logins.login("alice", "alice-pw", caller_uid=0).attempt_token
    assert _cont(logins, token, totp.at(clock.now)).response is Response.AUTH_ERR
    assert service.get_user("alice").locked_seconds > 0


def test_pending_attempt_expires(env: tuple) -> None:
    logins, service, clock, _ = env
    service.update_config({"enabled": True, "window": 10})
    totp = _enroll(service, "alice")
    token = logins.login("alice", "alice-pw", caller_uid=0).attempt_token
    clock.now += ATTEMPT_SECONDS + 1
    assert _cont(logins, token, totp.at(clock.now)).response is Response.AUTH_ERR


def test_otp_without_pending_attempt_refused(env: tuple) -> None:
    logins, service, clock, _ = env
    service.update_config({"enabled": True})
    totp = _enroll(service, "alice")
    assert _cont(logins, "", totp.at(clock.now)).response is Response.AUTH_ERR
    assert _cont(logins, "made-up", totp.at(clock.now)).response is Response.AUTH_ERR


def test_failures_look_alike_and_are_padded(env: tuple) -> None:
    logins, _, _, sleeps = env
    answers = [
        logins.login("alice", "wrong", caller_uid=0),
        logins.login("nobody", "x", caller_uid=0),
        logins.login("../bad name", "x", caller_uid=0),
    ]
    assert all(a == answers[0] for a in answers) and answers[0].response is Response.AUTH_ERR
    assert len(sleeps) == 3 and all(s > 0 for s in sleeps)


def test_expired_password(env: tuple) -> None:
    logins, _, _, _ = env
    assert logins.login("old", "old-pw", caller_uid=0).response is Response.EXPIRED
    assert logins.login("old", "wrong", caller_uid=0).response is Response.AUTH_ERR


def test_sessions_expire_and_logout(env: tuple) -> None:
    logins, _, clock, _ = env
    token = logins.login("bob", "bob-pw", caller_uid=0).session_token
    assert logins.session(token) is not None
    logins.logout(token)
    assert logins.session(token) is None
    token = logins.login("bob", "bob-pw", caller_uid=0).session_token
    clock.now += 10_000
    assert logins.session(token) is None


# -- the caller, from the kernel, and the password throttle -------------------------------


def test_ordinary_caller_may_log_in_as_itself_only(env: tuple) -> None:
    logins, _, _, _ = env
    alice_uid = 1000  # see env: alice, bob, old get 1000, 1001, 1002
    for name, password in [("bob", "bob-pw"), ("bob", "wrong"), ("nobody", "x"), ("../x", "x")]:
        with pytest.raises(PermissionDenied, match="uid 1000 may log in as itself only"):
            logins.login(name, password, caller_uid=alice_uid)
    assert logins.login("alice", "alice-pw", caller_uid=alice_uid).response is Response.SUCCESS
    assert logins.login("bob", "bob-pw", caller_uid=0).response is Response.SUCCESS  # root


def test_wrong_password_delays_the_next_check(env: tuple) -> None:
    logins, _, clock, _ = env
    assert logins.login("alice", "wrong", caller_uid=0).response is Response.AUTH_ERR
    with pytest.raises(TooManyAttempts, match="try again in 3 s"):
        logins.login("alice", "alice-pw", caller_uid=0)  # not checked: even the right one
    assert logins.login("bob", "bob-pw", caller_uid=0).response is Response.SUCCESS
    clock.now += FIRST_DELAY_SECONDS
    assert logins.login("alice", "alice-pw", caller_uid=0).response is Response.SUCCESS
    # A success forgets the failures: the next wrong one waits the first delay again.
    assert logins.login("alice", "wrong", caller_uid=0).response is Response.AUTH_ERR
    clock.now += FIRST_DELAY_SECONDS
    assert logins.login("alice", "alice-pw", caller_uid=0).response is Response.SUCCESS


def test_one_password_check_per_account_at_a_time(env: tuple) -> None:
    _, service, clock, _ = env
    entered, release = threading.Event(), threading.Event()

    def slow(username: str, password: str) -> PasswordResult:
        entered.set()
        release.wait(5)
        return check_password(username, password)

    logins = Logins(service, slow, clock=clock, sleep=lambda s: None, monotonic=clock)
    first = threading.Thread(target=logins.login, args=("alice", "wrong"), kwargs={"caller_uid": 0})
    first.start()
    assert entered.wait(5)
    with pytest.raises(TooManyAttempts):
        logins.login("alice", "alice-pw", caller_uid=0)
    release.set()
    first.join()


def test_locked_account_right_password_is_auth_err(env: tuple) -> None:
    logins, service, _, _ = env
    service.update_config({"enabled": True, "lockout_threshold": 1})
    _enroll(service, "alice")
    token = logins.login("alice", "alice-pw", caller_uid=0).attempt_token
    _cont(logins, token, "000000")  # locks
    assert logins.login("alice", "alice-pw", caller_uid=0).response is Response.AUTH_ERR


def test_malformed_codes_count_toward_lockout(env: tuple) -> None:
    logins, service, _, _ = env
    service.update_config({"enabled": True, "lockout_threshold": 3})
    _enroll(service, "alice")
    token = logins.login("alice", "alice-pw", caller_uid=0).attempt_token
    for junk in ("abc", "", "1" * 40):
        _cont(logins, token, junk)
    assert service.get_user("alice").locked_seconds > 0


def test_another_uid_cannot_use_or_spend_an_attempt(env: tuple) -> None:
    logins, service, clock, _ = env
    service.update_config({"enabled": True})
    totp = _enroll(service, "alice")
    token = logins.login("alice", "alice-pw", caller_uid=1000).attempt_token
    stolen = logins.login_continue(token, totp.at(clock.now), caller_uid=1001)
    assert stolen.response is Response.AUTH_ERR
    done = logins.login_continue(token, totp.at(clock.now), caller_uid=1000)
    assert done.response is Response.SUCCESS


def test_level_1_session_covers_only_a_secret_it_created(env: tuple) -> None:
    logins, service, _, _ = env
    outcome = logins.login("alice", "alice-pw", caller_uid=0)
    session = logins.session(outcome.session_token)
    assert session and session.may_act_on(None)
    found = service.renew_secret("alice").record  # an admin enrolls alice meanwhile
    assert found is not None and not session.may_act_on(found)
    created = service.renew_secret("alice").record
    assert created is not None
    logins.note_created_secret(outcome.session_token, created.sealed)
    session = logins.session(outcome.session_token)
    assert session and session.may_act_on(created) and not session.may_act_on(found)


def test_failure_delay_doubles() -> None:
    assert [failure_delay(n) for n in range(0, 7)] == [0, 3, 6, 12, 24, 48, 96]
    assert failure_delay(100) == 300


def test_one_uid_cannot_fill_the_tables_for_everyone(env: tuple) -> None:
    logins, service, clock, _ = env
    tokens = []
    for _ in range(MAX_PER_UID + 5):
        tokens.append(logins.login("bob", "bob-pw", caller_uid=1001).session_token)
        clock.now += 1
    alive = [t for t in tokens if logins.session(t) is not None]
    assert alive == tokens[-MAX_PER_UID:]  # the oldest gave way, the newest work
    assert logins.login("alice", "alice-pw", caller_uid=1000).response is Response.SUCCESS
    _enroll(service, "bob")
    attempts = [logins.login("bob", "bob-pw", caller_uid=1001).attempt_token for _ in range(20)]
    assert _cont(logins, attempts[0], "000000").response is Response.AUTH_ERR  # evicted
