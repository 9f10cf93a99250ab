"""user.sock end to end: LoginEx through real PAM with real local users, sessions,
self-service, and the CLI run as an ordinary user."""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable

import grpc
import pyotp
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import RUNUSER, Daemon, LocalUser

NO_INFO = pb.AuthCommonOptions(user_info=False)


def login(daemon: Daemon, name: str, password: str, **kw: object) -> pb.LoginExResponse:
    request = pb.LoginExRequest(mechanism=pb.PASSWORD_PLAIN, username=name, password=password, **kw)
    reply: pb.LoginExResponse = daemon.user().LoginEx(request, timeout=10)
    return reply


def cont(daemon: Daemon, attempt: str, code: str, **kw: object) -> pb.LoginExResponse:
    request = pb.LoginExContinueRequest(
        mechanism=pb.OTP_TOKEN, attempt_token=attempt, otp_token=code, **kw
    )
    reply: pb.LoginExResponse = daemon.user().LoginExContinue(request, timeout=10)
    return reply


def enroll(daemon: Daemon, user: LocalUser) -> pyotp.TOTP:
    entry = daemon.admin().RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    totp = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    assert isinstance(totp, pyotp.TOTP)
    return totp


def enable(daemon: Daemon) -> None:
    # window=1: a code read just before a 30 s boundary is still good just after it.
    daemon.admin().UpdateConfig(pb.UpdateConfigRequest(enabled=True, window=1), timeout=5)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_user_socket_is_world_connectable(login_daemon: Daemon) -> None:
    assert os.stat(login_daemon.socket("user")).st_mode & 0o777 == 0o666


def test_no_two_factor_success_with_user_info(login_daemon: Daemon, user: LocalUser) -> None:
    reply = login(login_daemon, user.name, user.password)
    assert reply.response_type == pb.SUCCESS and reply.session_token
    info = reply.user_info
    assert (info.pw_name, info.pw_uid, info.pw_dir) == (user.name, user.uid, f"/home/{user.name}")
    assert info.pw_shell == "/bin/bash" and info.local and info.authenticator == pb.LEVEL_1
    assert user.uid in info.grouplist or info.pw_gid in info.grouplist
    assert not login(login_daemon, user.name, user.password, login_options=NO_INFO).HasField(
        "user_info"
    )


def test_otp_flow_every_answer(login_daemon: Daemon, user: LocalUser) -> None:
    enable(login_daemon)
    totp = enroll(login_daemon, user)
    first = login(login_daemon, user.name, user.password)
    assert first.response_type == pb.OTP_REQUIRED and first.username == user.name
    assert first.session_token == "" and not first.HasField("user_info")
    again = cont(login_daemon, first.attempt_token, "000000" if totp.now() != "000000" else "1")
    assert again.response_type == pb.OTP_REQUIRED
    done = cont(login_daemon, first.attempt_token, totp.now())
    assert done.response_type == pb.SUCCESS and done.session_token
    assert done.user_info.authenticator == pb.LEVEL_2
    assert done.user_info.two_factor_config.secret_configured


def test_retries_then_auth_err(login_daemon: Daemon, user: LocalUser) -> None:
    enable(login_daemon)
    totp = enroll(login_daemon, user)
    attempt = login(login_daemon, user.name, user.password).attempt_token
    wrong = f"{(int(totp.now()) + 1) % 10**6:06d}"
    assert cont(login_daemon, attempt, wrong).response_type == pb.OTP_REQUIRED
    assert cont(login_daemon, attempt, wrong).response_type == pb.OTP_REQUIRED
    assert cont(login_daemon, attempt, wrong).response_type == pb.AUTH_ERR
    assert cont(login_daemon, attempt, totp.now()).response_type == pb.AUTH_ERR
    shown = login_daemon.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert shown.failed_attempts == 3  # counted toward the per-user lockout


def test_otp_token_without_pending_attempt(login_daemon: Daemon, user: LocalUser) -> None:
    enable(login_daemon)
    totp = enroll(login_daemon, user)
    assert cont(login_daemon, "", totp.now()).response_type == pb.AUTH_ERR
    assert cont(login_daemon, "forged-attempt", totp.now()).response_type == pb.AUTH_ERR


def test_wrong_mechanism_refused(login_daemon: Daemon, user: LocalUser) -> None:
    with pytest.raises(grpc.RpcError) as info:
        login_daemon.user().LoginEx(
            pb.LoginExRequest(mechanism=pb.OTP_TOKEN, username=user.name), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("mechanism:")


def _timed_login(daemon: Daemon, name: str, password: str) -> tuple[int, float]:
    started = time.monotonic()
    reply = login(daemon, name, password)
    return reply.response_type, time.monotonic() - started


def test_unknown_user_and_wrong_password_indistinguishable(
    login_daemon: Daemon, user: LocalUser, make_user: Callable[..., LocalUser]
) -> None:
    # One try per account: a second wrong password for the same account within the
    # throttle's delay would not be checked at all (see the next test).
    wrong_users = [make_user() for _ in range(4)]
    locked_users = [make_user() for _ in range(4)]
    for locked in locked_users:
        subprocess.run(["usermod", "-L", locked.name], check=True)
    for _ in range(3):  # warm up the daemon's estimate of a real password check
        _timed_login(login_daemon, user.name, user.password)
    wrong = [_timed_login(login_daemon, u.name, "wrong") for u in wrong_users]
    unknown = [_timed_login(login_daemon, f"otpgate-no-such-{i}", "wrong") for i in range(4)]
    locked_out = [_timed_login(login_daemon, u.name, u.password) for u in locked_users]
    answers = {r for r, _ in wrong + unknown + locked_out}
    assert answers == {pb.AUTH_ERR}
    medians = [statistics.median(t for _, t in runs) for runs in (wrong, unknown, locked_out)]
    # "About the same time": within a factor two of each other (real PAM, noisy machine).
    assert max(medians) < 2 * min(medians), medians


def test_wrong_password_throttles_that_account_only(
    login_daemon: Daemon, user: LocalUser, make_user: Callable[..., LocalUser]
) -> None:
    other = make_user()
    assert login(login_daemon, user.name, "wrong").response_type == pb.AUTH_ERR
    with pytest.raises(grpc.RpcError) as refused:
        login(login_daemon, user.name, user.password)  # not even checked, for now
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "try again in 3 s" in refused.value.details()
    assert login(login_daemon, other.name, other.password).response_type == pb.SUCCESS
    time.sleep(3.1)
    assert login(login_daemon, user.name, user.password).response_type == pb.SUCCESS
    log = login_daemon.log()
    assert f"login user={user.name} caller_uid=0 " in log and "reason=password" in log
    assert f"login_throttled user={user.name} caller_uid=0" in log


def test_expired_account(login_daemon: Daemon, user: LocalUser) -> None:
    subprocess.run(["chage", "-E", "0", user.name], check=True)
    assert login(login_daemon, user.name, user.password).response_type == pb.EXPIRED
    assert login(login_daemon, user.name, "wrong").response_type == pb.AUTH_ERR


def test_session_gates_every_other_call(
    login_daemon: Daemon, user: LocalUser, make_user: Callable[..., LocalUser]
) -> None:
    other = make_user()
    login_daemon.admin().UpdateConfig(pb.UpdateConfigRequest(window=1), timeout=5)
    stub = login_daemon.user()
    with pytest.raises(grpc.RpcError) as info:
        stub.GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        stub.RenewSecret(pb.RenewSecretRequest(), timeout=5, metadata=bearer("forged"))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    token = login(login_daemon, user.name, user.password).session_token
    meta = bearer(token)
    entry = stub.RenewSecret(pb.RenewSecretRequest(), timeout=5, metadata=meta)
    assert entry.username == user.name and entry.twofactor_config.provisioning_uri
    uri = stub.GetProvisioningUri(pb.GetProvisioningUriRequest(), timeout=5, metadata=meta)
    assert uri.provisioning_uri == entry.twofactor_config.provisioning_uri
    code = pyotp.parse_uri(uri.provisioning_uri).now()
    verified = stub.VerifyToken(pb.VerifyTokenRequest(token=code), timeout=5, metadata=meta)
    assert verified.valid
    for call, request in [
        (stub.RenewSecret, pb.RenewSecretRequest(username=other.name)),
        (stub.GetProvisioningUri, pb.GetProvisioningUriRequest(username=other.name)),
        (stub.VerifyToken, pb.VerifyTokenRequest(username=other.name, token="123456")),
        (stub.GetUser, pb.GetUserRequest(username=other.name)),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=5, metadata=meta)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (
        not login_daemon.admin()
        .GetUser(pb.GetUserRequest(username=other.name), timeout=5)
        .twofactor_auth_configured
    )
    stub.Logout(pb.LogoutRequest(), timeout=5, metadata=meta)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetUser(pb.GetUserRequest(), timeout=5, metadata=meta)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_methods_absent_from_user_socket(login_daemon: Daemon) -> None:
    call = grpc.insecure_channel("unix:" + login_daemon.socket("user")).unary_unary(
        "/otpgate.v1.TwoFactorAdmin/UpdateConfig"
    )
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_burst_of_wrong_passwords_does_not_stall_another_account(
    login_daemon: Daemon, user: LocalUser, make_user: Callable[..., LocalUser]
) -> None:
    victim = make_user()
    baseline = statistics.median(
        _timed_login(login_daemon, user.name, user.password)[1] for _ in range(3)
    )
    results: list[object] = []
    barrier = threading.Barrier(21)

    def wrong() -> None:
        barrier.wait()
        try:
            results.append(login(login_daemon, victim.name, "wrong-password").response_type)
        except grpc.RpcError as exc:
            results.append(exc.code())

    threads = [threading.Thread(target=wrong) for _ in range(20)]
    for t in threads:
        t.start()
    barrier.wait()
    code, seconds = _timed_login(login_daemon, user.name, user.password)
    for t in threads:
        t.join()
    assert code == pb.SUCCESS
    # One password check at a time per account: of 20 parallel guesses one was checked.
    assert results.count(pb.AUTH_ERR) == 1, results
    assert results.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 19, results
    # With PAM's ~2 s failure delay this would take seconds; the bound is generous.
    assert seconds < max(1.5, 20 * baseline), (seconds, baseline)


def _cli_as(
    python: tuple[str, dict[str, str]],
    user: LocalUser,
    daemon: Daemon,
    args: list[str],
    stdin: str,
) -> subprocess.CompletedProcess[str]:
    executable, env = python
    return subprocess.run(
        [RUNUSER, "-u", user.name, "--", executable, "-m", "otpgate.cli.main",
         "--socket", daemon.admin_socket, "--password-stdin", *args],
        input=stdin, capture_output=True, text=True, timeout=60, cwd="/",
        env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip


def test_cli_as_ordinary_user_enrolls_itself(
    public_login_daemon: Daemon,
    user: LocalUser,
    make_user: Callable[..., LocalUser],
    cli_python: tuple[str, dict[str, str]],
) -> None:
    other = make_user()
    enrolled = _cli_as(
        cli_python,
        user,
        public_login_daemon,
        ["renew-secret", "--qr", "none"],
        f"{user.password}\n",
    )
    assert enrolled.returncode == 0, enrolled.stderr
    uri = enrolled.stdout.strip()
    assert uri.startswith("otpauth://totp/") and f"{user.name}%40" in uri
    assert "pending: confirm within 15 minutes" in enrolled.stderr
    # window=1, so that a code read just before a 30 s boundary is still good after it.
    public_login_daemon.admin().UpdateConfig(pb.UpdateConfigRequest(window=1), timeout=5)
    totp = pyotp.parse_uri(uri)
    # Not enrolled until a code from the new secret confirms it (that code is spent).
    entry = public_login_daemon.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert not entry.twofactor_auth_configured and entry.pending_expires_in > 0
    confirming = totp.now()
    confirmed = _cli_as(
        cli_python, user, public_login_daemon, ["confirm", confirming], f"{user.password}\n"
    )
    assert confirmed.returncode == 0, confirmed.stderr
    assert "confirmed" in confirmed.stdout
    # Enrolled now: even with 2FA off, logging in takes the code as well (LEVEL_2).
    refused = _cli_as(
        cli_python,
        user,
        public_login_daemon,
        ["renew-secret", other.name],
        f"{user.password}\n{totp.now()}\n",
    )
    assert refused.returncode == 2
    assert refused.stderr.startswith("PermissionDenied:")
    admin_only = _cli_as(cli_python, user, public_login_daemon, ["config"], "")
    assert admin_only.returncode == 2 and "needs admin rights" in admin_only.stderr
    # Now 2FA is on and the user is enrolled: the CLI asks for the code too.
    enable(public_login_daemon)  # window=1: the next step's code is good now
    shown = _cli_as(
        cli_python,
        user,
        public_login_daemon,
        ["user", "show", "--json"],
        f"{user.password}\n{totp.at(time.time() + 30)}\n",
    )
    assert shown.returncode == 0, shown.stderr
    assert '"twofactor_auth_configured": true' in shown.stdout
    bad_codes = "".join(f"{(int(totp.now()) + i) % 10**6:06d}\n" for i in (1, 2, 3))
    wrong = _cli_as(
        cli_python, user, public_login_daemon, ["user", "show"], f"{user.password}\n{bad_codes}"
    )
    assert wrong.returncode == 2 and "login failed" in wrong.stderr


def test_recovery_codes_need_a_session_that_proved_a_code(
    login_daemon: Daemon, user: LocalUser
) -> None:
    enable(login_daemon)
    stub = login_daemon.user()
    # A password alone enrolls (LEVEL_1, a secret of its own making): no codes from it.
    first = bearer(login(login_daemon, user.name, user.password).session_token)
    entry = stub.RenewSecret(pb.RenewSecretRequest(), timeout=5, metadata=first)
    with pytest.raises(grpc.RpcError) as info:
        stub.MakeRecoveryCodes(pb.MakeRecoveryCodesRequest(), timeout=5, metadata=first)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "LEVEL_2" in (info.value.details() or "")
    # Password and code: LEVEL_2, and a set of ten, for this account only.
    totp = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    attempt = login(login_daemon, user.name, user.password)
    assert attempt.response_type == pb.OTP_REQUIRED
    done = cont(login_daemon, attempt.attempt_token, totp.now())
    assert done.response_type == pb.SUCCESS
    second = bearer(done.session_token)
    codes = stub.MakeRecoveryCodes(pb.MakeRecoveryCodesRequest(), timeout=5, metadata=second)
    assert len(codes.codes) == 10
    with pytest.raises(grpc.RpcError) as info:
        stub.MakeRecoveryCodes(
            pb.MakeRecoveryCodesRequest(username="root"), timeout=5, metadata=second
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A recovery code logs in as a code does.
    again = login(login_daemon, user.name, user.password)
    after = cont(login_daemon, again.attempt_token, codes.codes[0])
    assert after.response_type == pb.SUCCESS
    shown = stub.GetUser(pb.GetUserRequest(), timeout=5, metadata=second)
    assert shown.recovery_codes_left == 9
