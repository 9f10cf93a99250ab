"""Each hook mode in a real PAM stack, driven by pamtester, against a real otpgated."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pam
import pyotp
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser
from tests.pam_hook.conftest import HOOK_LAUNCHER

PY = f"/usr/bin/python3 -I -S {HOOK_LAUNCHER}"


@pytest.fixture
def pam_service() -> Iterator[Callable[[str], str]]:
    made: list[Path] = []

    def write(stack: str) -> str:
        name = f"otpgate-hooktest-{secrets.token_hex(4)}"
        path = Path("/etc/pam.d") / name
        path.write_text(stack + "account required pam_permit.so\n")
        made.append(path)
        return name

    yield write
    for path in made:
        path.unlink(missing_ok=True)


def pamtester(service: str, user: str, typed: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pamtester", "-v", service, user, "authenticate"],
        input=typed + "\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def _code_stack(sock: str) -> str:
    return (
        f"auth [success=done default=ignore] pam_exec.so quiet stdout {PY} check socket={sock}\n"
        f"auth requisite pam_exec.so quiet expose_authtok stdout {PY} verify socket={sock}\n"
        "auth required pam_permit.so\n"
    )


def test_check_then_verify(
    daemon: Daemon, user: LocalUser, pam_service: Callable[[str], str]
) -> None:
    service = pam_service(_code_stack(daemon.socket("pam")))
    admin = daemon.admin()
    # 2FA off: check lets the stack through without reading anything.
    result = pamtester(service, user.name, "")
    assert result.returncode == 0 and "Password" not in result.stdout + result.stderr
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1), timeout=5)
    # The PAM service is not sshd: 2FA applies through `enabled` alone.
    entry = admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    totp = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    wrong = f"{(int(totp.now()) + 1) % 10**6:06d}"
    denied = pamtester(service, user.name, wrong)
    assert denied.returncode != 0 and "Invalid code." in denied.stdout + denied.stderr
    assert pamtester(service, user.name, totp.now()).returncode == 0
    assert pamtester(service, user.name, totp.now()).returncode != 0  # replay


def test_single_prompt(
    login_daemon: Daemon, user: LocalUser, pam_service: Callable[[str], str]
) -> None:
    sock = login_daemon.socket("pam")
    service = pam_service(
        f"auth requisite pam_exec.so quiet expose_authtok stdout {PY} single-prompt socket={sock}\n"
        "auth required pam_permit.so\n"
    )
    admin = login_daemon.admin()
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1), timeout=5)
    assert pamtester(service, user.name, user.password).returncode == 0  # not enrolled
    entry = admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    totp = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    assert pamtester(service, user.name, user.password).returncode != 0
    assert pamtester(service, user.name, "nope" + totp.now()).returncode != 0
    assert pamtester(service, user.name, user.password + totp.now()).returncode == 0


def test_first_factor_done_outside_ssh_denies(
    daemon: Daemon, user: LocalUser, pam_service: Callable[[str], str]
) -> None:
    service = pam_service(
        f"auth requisite pam_exec.so quiet {PY} first-factor-done\nauth required pam_permit.so\n"
    )
    assert pamtester(service, user.name, "").returncode != 0


def _pam_login(service: str, user: str, typed: str, **env: str) -> tuple[bool, str]:
    """One authentication through python-pam, which can set PAM environment variables as
    sshd does (pamtester cannot); returns (success, every message shown)."""
    authenticator = pam.PamAuthenticator()
    ok = authenticator.authenticate(user, typed, service=service, env=env, resetcreds=False)
    return ok, "\n".join(authenticator.messages)


def test_always_prompt_stack_one_hook_call(
    daemon: Daemon, user: LocalUser, pam_service: Callable[[str], str]
) -> None:
    sock = daemon.socket("pam")
    service = pam_service(
        "auth optional pam_echo.so Verification code:\n"
        f"auth requisite pam_exec.so quiet expose_authtok stdout {PY} verify socket={sock} "
        "first-factor=required\nauth required pam_permit.so\n"
    )
    key = {"SSH_AUTH_INFO_0": "publickey ssh-ed25519 AAAA"}
    admin = daemon.admin()
    admin.UpdateConfig(
        pb.UpdateConfigRequest(
            enabled=True, window=1, enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED
        ),
        timeout=5,
    )
    ok, text = _pam_login(service, user.name, "123456", **key)
    assert not ok and "otpgate renew-secret" in text
    entry = admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    totp = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    # A right code without the first factor: refused before the daemon is asked, so
    # the code is not spent and works right after.
    assert _pam_login(service, user.name, totp.now()) == (False, "Verification code:\nPassword: ")
    ok, text = _pam_login(service, user.name, totp.now(), **key)
    assert ok, text
    assert text.startswith("Verification code:")
    # 2FA off: the prompt still comes, and anything typed passes.
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=False), timeout=5)
    assert _pam_login(service, user.name, "anything", **key)[0]


def test_dead_daemon_secure_and_safe(
    daemon: Daemon, user: LocalUser, pam_service: Callable[[str], str]
) -> None:
    sock = daemon.socket("pam")
    secure = pam_service(_code_stack(sock))
    safe = pam_service(_code_stack(sock).replace(f"socket={sock}", f"socket={sock} fail=safe"))
    daemon.stop()
    assert pamtester(secure, user.name, "123456").returncode != 0
    assert pamtester(safe, user.name, "123456").returncode == 0
