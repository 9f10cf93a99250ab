"""Lost phone: recovery codes through a real sshd, the admin API and the CLI; unlock."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable

import grpc
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser, _wait_for
from tests.ssh.conftest import Sshd, ssh_login
from tests.ssh.test_flows import enable, enroll, wrong

MakeSshd = Callable[..., Sshd]
CODE = re.compile(r"^[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}$")


def _codes(daemon: Daemon, user: LocalUser) -> list[str]:
    request = pb.MakeRecoveryCodesRequest(username=user.name)
    codes = list(daemon.admin().MakeRecoveryCodes(request, timeout=5).codes)
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(CODE.match(c) for c in codes), codes
    return codes


def _left(daemon: Daemon, user: LocalUser) -> int:
    entry = daemon.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    return entry.recovery_codes_left


def test_a_recovery_code_logs_in_over_ssh_once(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enable(daemon)
    enroll(daemon, user)
    codes = _codes(daemon, user)
    sshd = make_sshd("password", daemon)
    # Typed as people type: upper case, without the dashes.
    typed = codes[0].replace("-", "").upper()
    login = ssh_login(sshd.port, user.name, password=user.password, answers=[typed])
    assert login.ok, sshd.log_path.read_text()
    again = ssh_login(sshd.port, user.name, password=user.password, answers=[codes[0]])
    assert not again.ok and "Invalid code" in again.text
    assert _left(daemon, user) == 9
    # What the hook prints on success (sshd shows it after the login, in the session).
    request = pb.PamRequest(username=user.name, service="sshd", authtok=codes[1])
    decision = daemon.pam().Verify(request, timeout=5)
    assert decision.verdict == pb.VERDICT_ALLOW
    assert "Recovery code accepted: 8 left" in decision.message
    _wait_for(lambda: "recovery_codes_left=9" in daemon.log(), 5, "no recovery line in the log")
    for code in codes:
        assert code not in daemon.log() and code.replace("-", "") not in daemon.log()


def test_recovery_codes_count_toward_the_lockout_and_replace_each_other(
    daemon: Daemon, user: LocalUser
) -> None:
    enable(daemon, lockout_threshold=3, lockout_seconds=300)
    totp = enroll(daemon, user)
    first = _codes(daemon, user)
    second = _codes(daemon, user)  # the first set is gone
    admin = daemon.admin()

    def verify(token: str) -> pb.VerifyTokenResponse:
        return admin.VerifyToken(pb.VerifyTokenRequest(username=user.name, token=token), timeout=5)

    assert verify(first[0]).result == pb.VERIFY_RESULT_INVALID
    assert verify("aaaa-aaaa-aaaa").result == pb.VERIFY_RESULT_INVALID
    assert verify(wrong(totp.now())).result == pb.VERIFY_RESULT_INVALID  # the third: locked
    locked = verify(second[0])
    assert locked.result == pb.VERIFY_RESULT_LOCKED  # refused unseen, like a code
    assert not locked.HasField("recovery_codes_left")
    # An admin clears the lock; the secret and the codes stay.
    entry = admin.Unlock(pb.UnlockRequest(username=user.name), timeout=5)
    assert entry.locked_seconds == 0 and entry.failed_attempts == 0
    assert entry.twofactor_auth_configured and entry.recovery_codes_left == 10
    accepted = verify(second[0])
    assert accepted.valid and accepted.recovery_codes_left == 9
    _wait_for(lambda: "unlocked user=" in daemon.log(), 5, "no unlocked line in the log")


def test_bad_requests_are_refused(daemon: Daemon, user: LocalUser) -> None:
    admin = daemon.admin()
    for call, request in (
        (admin.MakeRecoveryCodes, pb.MakeRecoveryCodesRequest(username=user.name)),
        (admin.Unlock, pb.UnlockRequest(username=user.name)),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=5)  # type: ignore[operator]
        assert caught.value.code() in (
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND,
        )
        assert "no 2FA secret" in (caught.value.details() or "")
    with pytest.raises(grpc.RpcError) as caught:
        admin.Unlock(pb.UnlockRequest(username="no-such-user-xyz"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otpgate.cli.main", "--socket", daemon.admin_socket, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_cli_recovery_codes_unlock_and_user_show(daemon: Daemon, user: LocalUser) -> None:
    enable(daemon)
    made = _cli(daemon, "recovery-codes", user.name)
    assert made.returncode == 2 and "no 2FA secret" in made.stderr  # an error, not "false"
    enroll(daemon, user)
    made = _cli(daemon, "recovery-codes", user.name)
    assert made.returncode == 0, made.stderr
    codes = made.stdout.split()
    assert len(codes) == 10 and all(CODE.match(c) for c in codes)
    assert "not shown again" in made.stderr
    as_json = json.loads(_cli(daemon, "--json", "recovery-codes", user.name).stdout)
    assert len(as_json["codes"]) == 10 and as_json["username"] == user.name
    used = _cli(daemon, "verify", user.name, as_json["codes"][1])
    assert used.returncode == 0 and used.stdout.strip() == "true"
    assert "recovery code accepted: 9 left" in used.stderr
    shown = _cli(daemon, "user", "show", user.name)
    assert re.search(r"recovery_codes_left\s*:?\s*9", shown.stdout), shown.stdout
    unlocked = _cli(daemon, "unlock", user.name)
    assert unlocked.returncode == 0 and f"{user.name} unlocked" in unlocked.stdout
    assert _cli(daemon, "unlock", "").returncode == 2
