"""End to end: a real sshd, the shipped PAM/sshd snippets, the hook, otpgated."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyotp

from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser
from tests.ssh.conftest import Sshd, authorize_key, ssh_login

MakeSshd = Callable[..., Sshd]


def enable(daemon: Daemon, **changes: object) -> None:
    # window=1: a code read just before a 30 s boundary is still good just after it.
    request = pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1)
    for name, value in changes.items():
        setattr(request, name, value)
    daemon.admin().UpdateConfig(request, timeout=5)


def enroll(daemon: Daemon, user: LocalUser) -> pyotp.TOTP:
    entry = daemon.admin().RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    totp = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    assert isinstance(totp, pyotp.TOTP)
    return totp


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}"


# -- flow (a): password, then a code ------------------------------------------------


def test_password_then_code(daemon: Daemon, make_sshd: MakeSshd, user: LocalUser) -> None:
    enable(daemon)
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon)
    login = ssh_login(sshd.port, user.name, password=user.password, answers=[totp.now()])
    assert login.ok, sshd.log_path.read_text()
    assert len(login.prompts) == 1
    assert "code" in login.text.lower()


def test_wrong_code_denied(daemon: Daemon, make_sshd: MakeSshd, user: LocalUser) -> None:
    enable(daemon)
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon)
    login = ssh_login(sshd.port, user.name, password=user.password, answers=[wrong(totp.now())])
    assert not login.ok
    assert "Invalid code" in login.text


def test_wrong_password_never_reaches_the_code(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enable(daemon)
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon)
    login = ssh_login(sshd.port, user.name, password=user.password + "x", answers=[totp.now()])
    assert not login.ok and login.prompts == []


def test_replayed_code_denied(daemon: Daemon, make_sshd: MakeSshd, user: LocalUser) -> None:
    enable(daemon)
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon)
    code = totp.now()
    assert ssh_login(sshd.port, user.name, password=user.password, answers=[code]).ok
    again = ssh_login(sshd.port, user.name, password=user.password, answers=[code])
    assert not again.ok
    assert "already used" in again.text


def test_two_parallel_logins_one_code_one_gets_in(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enable(daemon)
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon)
    code = totp.now()
    results: list[bool] = []
    barrier = threading.Barrier(2)

    def login() -> None:
        barrier.wait()
        results.append(ssh_login(sshd.port, user.name, password=user.password, answers=[code]).ok)

    threads = [threading.Thread(target=login) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]


def test_two_factor_off_no_code_prompt(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enroll(daemon, user)  # enrolled, but 2FA is off (the default)
    sshd = make_sshd("password", daemon)
    login = ssh_login(sshd.port, user.name, password=user.password)
    assert login.ok and login.prompts == []
    enable(daemon, services_ssh=False)  # on, but not for SSH
    assert ssh_login(sshd.port, user.name, password=user.password).ok


def test_not_enrolled_optional_and_required(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enable(daemon, enrollment_policy=pb.ENROLLMENT_POLICY_OPTIONAL)
    sshd = make_sshd("password", daemon)
    login = ssh_login(sshd.port, user.name, password=user.password)
    assert login.ok and login.prompts == []
    enable(daemon, enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED)
    login = ssh_login(sshd.port, user.name, password=user.password, answers=["123456"])
    assert not login.ok
    assert "otpgate renew-secret" in login.text


def test_unknown_user_denied_like_a_wrong_code(daemon: Daemon, make_sshd: MakeSshd) -> None:
    enable(daemon)
    sshd = make_sshd("password", daemon)
    login = ssh_login(sshd.port, "no-such-otpgate-user", password="x", answers=["123456"])
    assert not login.ok


def test_lockout_across_connections(daemon: Daemon, make_sshd: MakeSshd, user: LocalUser) -> None:
    enable(daemon, lockout_threshold=3, lockout_seconds=600)
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon)
    for _ in range(3):
        bad = ssh_login(sshd.port, user.name, password=user.password, answers=[wrong(totp.now())])
        assert not bad.ok
    locked = ssh_login(sshd.port, user.name, password=user.password, answers=[totp.now()])
    assert not locked.ok
    assert "locked" in locked.text
    shown = daemon.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert shown.locked_seconds > 0


# -- daemon failures and fail modes -----------------------------------------------------


def test_daemon_stopped_secure_denies(daemon: Daemon, make_sshd: MakeSshd, user: LocalUser) -> None:
    enable(daemon)
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon)
    daemon.stop()
    login = ssh_login(sshd.port, user.name, password=user.password, answers=[totp.now()])
    assert not login.ok


def test_daemon_stopped_safe_allows(daemon: Daemon, make_sshd: MakeSshd, user: LocalUser) -> None:
    enable(daemon)
    enroll(daemon, user)
    sshd = make_sshd("password", daemon, "fail=safe")
    daemon.stop()
    login = ssh_login(sshd.port, user.name, password=user.password, answers=["000000"])
    assert login.ok
    # safe mode still needs the first factor
    assert not ssh_login(sshd.port, user.name, password=user.password + "x").ok


def test_frozen_daemon_gives_a_verdict_within_the_timeout(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enable(daemon)
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon, "timeout=1.5")
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        login = ssh_login(sshd.port, user.name, password=user.password, answers=[totp.now()])
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    assert not login.ok
    # Two hook calls at most (check, then verify) of 1.5 s each, plus sshd's own work.
    assert login.seconds < 10


# -- flow (b): public key, then a code ---------------------------------------------------


def test_publickey_then_code(daemon: Daemon, make_sshd: MakeSshd, user: LocalUser) -> None:
    enable(daemon)
    totp = enroll(daemon, user)
    sshd = make_sshd("publickey", daemon)
    key = authorize_key(sshd, user)
    assert ssh_login(sshd.port, user.name, key=key, answers=[totp.now()]).ok
    assert not ssh_login(sshd.port, user.name, key=key, answers=[wrong(totp.now())]).ok


def test_publickey_flow_refuses_code_alone(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enable(daemon)
    totp = enroll(daemon, user)
    sshd = make_sshd("publickey", daemon)
    authorize_key(sshd, user)
    # keyboard-interactive without the key first: sshd's AuthenticationMethods and the
    # stack's first-factor-done line both refuse it.
    assert not ssh_login(sshd.port, user.name, answers=[totp.now()]).ok


def test_publickey_not_enrolled_optional_no_prompt(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enable(daemon)
    sshd = make_sshd("publickey", daemon)
    key = authorize_key(sshd, user)
    login = ssh_login(sshd.port, user.name, key=key)
    assert login.ok and login.prompts == []


# -- prompting every account: one hook call fewer ------------------------------------


def test_publickey_always_prompt(daemon: Daemon, make_sshd: MakeSshd, user: LocalUser) -> None:
    enable(daemon, enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED)
    sshd = make_sshd("publickey", daemon, prompt="always")
    key = authorize_key(sshd, user)
    login = ssh_login(sshd.port, user.name, key=key, answers=["123456"])
    assert not login.ok and "otpgate renew-secret" in login.text
    totp = enroll(daemon, user)
    assert not ssh_login(sshd.port, user.name, answers=[totp.now()]).ok  # no key
    login = ssh_login(sshd.port, user.name, key=key, answers=[totp.now()])
    assert login.ok, sshd.log_path.read_text()
    assert len(login.prompts) == 1 and "Verification code" in login.text
    assert not ssh_login(sshd.port, user.name, key=key, answers=[wrong(totp.now())]).ok
    # 2FA off: the prompt stays, and whatever is typed passes after the key.
    daemon.admin().UpdateConfig(pb.UpdateConfigRequest(enabled=False), timeout=5)
    assert ssh_login(sshd.port, user.name, key=key, answers=[""]).ok


def test_password_always_prompt(daemon: Daemon, make_sshd: MakeSshd, user: LocalUser) -> None:
    enable(daemon, enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED)
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon, prompt="always")
    login = ssh_login(sshd.port, user.name, password=user.password, answers=[totp.now()])
    assert login.ok, sshd.log_path.read_text()
    assert len(login.prompts) == 1 and "Verification code" in login.text
    bad = ssh_login(sshd.port, user.name, password=user.password, answers=[wrong(totp.now())])
    assert not bad.ok
    assert not ssh_login(sshd.port, user.name, password="x" + user.password, answers=["1"]).ok


# -- flow (c): one prompt -------------------------------------------------------------


def test_single_prompt(login_daemon: Daemon, make_sshd: MakeSshd, user: LocalUser) -> None:
    daemon = login_daemon
    enable(daemon)
    totp = enroll(daemon, user)
    sshd = make_sshd("single-prompt", daemon)
    code = totp.now()
    assert not ssh_login(sshd.port, user.name, answers=[user.password + wrong(code)]).ok
    assert not ssh_login(sshd.port, user.name, answers=["bad" + code]).ok
    assert not ssh_login(sshd.port, user.name, answers=[user.password]).ok
    login = ssh_login(sshd.port, user.name, answers=[user.password + code])
    assert login.ok and len(login.prompts) == 1
    assert not ssh_login(sshd.port, user.name, answers=[user.password + code]).ok  # replay


def test_single_prompt_not_enrolled_password_alone(
    login_daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    daemon = login_daemon
    enable(daemon)
    sshd = make_sshd("single-prompt", daemon)
    assert ssh_login(sshd.port, user.name, answers=[user.password]).ok
    assert not ssh_login(sshd.port, user.name, answers=[user.password + "x"]).ok


# -- the OpenSSH client --------------------------------------------------------------


def test_openssh_client_password_then_code(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser, tmp_path: Path
) -> None:
    enable(daemon)
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon)
    # ssh asks SSH_ASKPASS for every prompt: the password first, then the code.
    answers = tmp_path / "answers"
    answers.write_text(f"{user.password}\n{totp.now()}\n")
    askpass = tmp_path / "askpass"
    askpass.write_text(
        "#!/bin/sh\n"
        f"c={tmp_path}/count; n=$(cat $c 2>/dev/null || echo 0); n=$((n + 1)); echo $n > $c\n"
        f'echo "$1" >> {tmp_path}/prompts\n'
        f"sed -n ${{n}}p {answers}\n"
    )
    askpass.chmod(0o700)
    env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
    started = time.monotonic()
    result = subprocess.run(
        ["ssh", "-p", str(sshd.port), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "PubkeyAuthentication=no",
         "-o", "PreferredAuthentications=password,keyboard-interactive",
         f"{user.name}@127.0.0.1", "echo", "otpgate-ok"],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.stdout.strip() == "otpgate-ok", (result.stderr, sshd.log_path.read_text())
    assert time.monotonic() - started < 30
    assert (tmp_path / "count").read_text().strip() == "2"  # asked twice: password, then code
    assert "Verification code" in (tmp_path / "prompts").read_text()
