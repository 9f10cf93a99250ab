"""Each hook mode in a real PAM stack, driven by pamtester, against a real otpgated."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyotp
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser
from tests.pam_hook.conftest import HOOK_LAUNCHER, load_hook

PY = f"/usr/bin/python3 -I -S {HOOK_LAUNCHER}"


def pamtester(service: str, user: str, typed: str | bytes) -> subprocess.CompletedProcess[str]:
    raw = typed.encode() if isinstance(typed, str) else typed
    result = subprocess.run(
        ["pamtester", "-v", service, user, "authenticate"],
        input=raw + b"\n", capture_output=True, timeout=30,
    )  # fmt: skip
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
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
    code = totp.now()
    assert pamtester(service, user.name, code).returncode == 0
    assert pamtester(service, user.name, code).returncode != 0  # replay


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


def _pam_login(service: str, user: str, typed: str | bytes, **env: str) -> tuple[bool, str]:
    """One authentication through python-pam, which can set PAM environment variables as
    sshd does (pamtester cannot); returns (success, every message shown).

    In a process of its own: pam_exec forks whoever runs PAM, and this test process
    holds gRPC channels whose fork handlers then run in the child (an epoll_wait
    error line, now and then a lost login). sshd, the real caller, has none."""
    script = (
        "import json, sys, pam\n"
        "service, user, typed, env = json.loads(sys.stdin.read())\n"
        "typed = bytes.fromhex(typed)\n"
        "a = pam.PamAuthenticator()\n"
        "ok = a.authenticate(user, typed, service=service, env=env, resetcreds=False)\n"
        "print(json.dumps([bool(ok), a.messages]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([service, user, _bytes(typed).hex(), env]),
        capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    ok, messages = json.loads(result.stdout)
    return ok, "\n".join(messages)


def _bytes(typed: str | bytes) -> bytes:
    return typed.encode() if isinstance(typed, str) else typed


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


# -- tokens that are not text, and what fail=safe may allow ------------------------------------
# Through real PAM some of these arrive changed: the conversation and pam_exec use C
# strings (cut at a NUL) and pam_exec sends at most 511 bytes. The hook's own refusal
# of each is in test_fail_modes.py; here, whatever arrives, the login must be denied.

BAD_INPUTS = {
    "not UTF-8": b"\xff\xfe",
    "NUL inside": b"123\x00456",
    "control character": b"123\x01456",
    "overlong": b"1" * 2000,
}
# These reach the hook as typed, so the hook refuses them before asking the daemon:
# the daemon records no failed attempt for them (it counts malformed codes).
INTACT = ("not UTF-8", "control character")
INPUT_MODES = [
    ("check", "secure"), ("check", "safe"),
    ("verify", "secure"), ("verify", "safe"),
    ("verify first-factor=required", "secure"), ("verify first-factor=required", "safe"),
    ("single-prompt", "secure"),
]  # fmt: skip
FIRST_FACTOR = {"SSH_AUTH_INFO_0": "publickey ssh-ed25519 AAAA"}


def _hook_line(mode: str, sock: str, fail: str) -> str:
    return f"{PY} {mode} socket={sock} fail={fail}"


def _stack(mode: str, sock: str, fail: str) -> str:
    exec_ = "pam_exec.so quiet expose_authtok stdout"
    if mode == "check":  # the when-needed stack: check, then verify when a code is needed
        return (
            f"auth [success=done default=ignore] {exec_} {_hook_line('check', sock, fail)}\n"
            f"auth requisite {exec_} {_hook_line('verify', sock, fail)}\n"
            "auth required pam_permit.so\n"
        )
    prompt = "auth optional pam_echo.so Verification code:\n" if "first-factor" in mode else ""
    line = f"auth requisite {exec_} {_hook_line(mode, sock, fail)}\n"
    return prompt + line + "auth required pam_permit.so\n"


def _enrolled(daemon: Daemon, user: LocalUser) -> pyotp.TOTP:
    admin = daemon.admin()
    # Many wrong tokens in a row: none of them must lock the account before the last check.
    admin.UpdateConfig(
        pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1, lockout_threshold=50),
        timeout=5,
    )
    entry = admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    totp: pyotp.TOTP = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    return totp


def _failed_attempts(daemon: Daemon, user: LocalUser) -> int:
    entry = daemon.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    return int(entry.failed_attempts)


def _login(mode: str, service: str, user: LocalUser, typed: bytes) -> bool:
    """One login; first-factor=required needs sshd's SSH_AUTH_INFO_0, which pamtester
    cannot set, so that mode goes through python-pam. python-pam refuses a NUL, where a
    C conversation such as pamtester's answers what comes before it: send that."""
    if "first-factor" in mode:
        return _pam_login(service, user.name, typed.split(b"\0")[0], **FIRST_FACTOR)[0]
    return pamtester(service, user.name, typed).returncode == 0


@pytest.mark.parametrize(("mode", "fail"), INPUT_MODES)
def test_tokens_that_are_not_text_deny(
    login_daemon: Daemon,
    user: LocalUser,
    pam_service: Callable[[str], str],
    mode: str,
    fail: str,
) -> None:
    totp = _enrolled(login_daemon, user)
    service = pam_service(_stack(mode, login_daemon.socket("pam"), fail))
    password = user.password if mode == "single-prompt" else ""
    for name in INTACT:  # first, so no other input has counted a failure yet
        assert not _login(mode, service, user, password.encode() + BAD_INPUTS[name]), name
        assert _failed_attempts(login_daemon, user) == 0, name
    for name, typed in BAD_INPUTS.items():
        assert not _login(mode, service, user, typed), name
        if password:
            assert not _login(mode, service, user, password.encode() + typed), name
    # Empty is text: it goes to the daemon, which refuses it for an enrolled account.
    assert not _login(mode, service, user, b"")
    if mode == "single-prompt":
        assert not _login(mode, service, user, password.encode())
    # The same stack lets the right answer through, so the denials above mean something.
    assert _login(mode, service, user, (password + totp.now()).encode())


def test_attacker_non_utf8_code_with_fail_safe_is_denied(
    login_daemon: Daemon, user: LocalUser, pam_service: Callable[[str], str]
) -> None:
    """The audit's case: ff fe made the daemon answer INTERNAL, which fail=safe allowed."""
    _enrolled(login_daemon, user)
    sock = login_daemon.socket("pam")
    verify = pam_service(_stack("verify", sock, "safe"))
    assert pamtester(verify, user.name, b"\xff\xfe").returncode != 0
    assert pamtester(verify, user.name, b"\xff\xfe").returncode != 0
    # The same call, made raw, is an answer from the daemon (an error status): that,
    # too, denies under fail=safe.
    hook = load_hook()
    request = pb.PamRequest(username=user.name, service="sshd").SerializeToString()
    request += bytes([4 << 3 | 2, 2]) + b"\xff\xfe"  # authtok (field 4) = ff fe
    with pytest.raises(hook.BadAnswer, match="grpc-status"):
        hook.unary_call(sock, "Verify", request, time.monotonic() + 5)
    # single-prompt, where the audit's login went through: fail=safe is refused outright.
    single = pam_service(_stack("single-prompt", sock, "safe"))
    assert pamtester(single, user.name, b"\xff\xfe").returncode != 0
    assert pamtester(single, user.name, user.password.encode() + b"\xff\xfe").returncode != 0


def test_empty_token_passes_where_no_code_is_needed(
    login_daemon: Daemon, user: LocalUser, pam_service: Callable[[str], str]
) -> None:
    """Prompt-always stack: an account that needs no code passes whatever text it types,
    the empty string included, but never a token that is not text."""
    service = pam_service(
        _stack("verify first-factor=required", login_daemon.socket("pam"), "secure")
    )
    for typed in (b"", b"anything"):
        assert _login("verify first-factor=required", service, user, typed)
    for name, typed in BAD_INPUTS.items():
        if name not in ("NUL inside", "overlong"):  # arrive as valid text through PAM
            assert not _login("verify first-factor=required", service, user, typed), name


def test_daemon_stopped_fail_safe_allows_verify_refuses_single_prompt(
    login_daemon: Daemon, user: LocalUser, pam_service: Callable[[str], str]
) -> None:
    totp = _enrolled(login_daemon, user)
    sock = login_daemon.socket("pam")
    verify_safe = pam_service(_stack("verify", sock, "safe"))
    verify_secure = pam_service(_stack("verify", sock, "secure"))
    single_safe = pam_service(_stack("single-prompt", sock, "safe"))
    single_secure = pam_service(_stack("single-prompt", sock, "secure"))
    # Running daemon: single-prompt fail=safe denies even the right password and code.
    assert pamtester(single_safe, user.name, user.password + totp.now()).returncode != 0
    login_daemon.stop()
    assert not Path(sock).exists()
    assert pamtester(verify_safe, user.name, "123456").returncode == 0  # fail-safe still works
    assert pamtester(verify_safe, user.name, "").returncode == 0
    assert pamtester(verify_secure, user.name, "123456").returncode != 0
    # ...but not for a token that is not text, which is refused before any call.
    for name in INTACT:
        assert pamtester(verify_safe, user.name, BAD_INPUTS[name]).returncode != 0, name
    # single-prompt: no password check without the daemon, so never allowed.
    assert pamtester(single_safe, user.name, user.password + "123456").returncode != 0
    assert pamtester(single_safe, user.name, "").returncode != 0
    assert pamtester(single_secure, user.name, user.password + "123456").returncode != 0
