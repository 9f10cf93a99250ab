"""`otpgate doctor`'s checks, on text and on PAM files in a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from otpgate.ssh import doctor

GOOD_SSHD = {
    "usepam": ["yes"],
    "kbdinteractiveauthentication": ["yes"],
    "authenticationmethods": ["password,keyboard-interactive"],
}


def _problems(**overrides: list[str]) -> list[str]:
    return doctor.check_sshd(GOOD_SSHD | overrides, "password")


def test_good_sshd_config_has_no_problem() -> None:
    assert _problems() == []


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"usepam": ["no"]}, "UsePAM is off"),
        ({"kbdinteractiveauthentication": ["no"]}, "KbdInteractiveAuthentication is off"),
        ({"authenticationmethods": ["any"]}, "'any'"),
        ({"authenticationmethods": ["publickey password,keyboard-interactive"]}, "'publickey'"),
        ({"authenticationmethods": ["keyboard-interactive"]}, "the password alone"),
    ],
)
def test_unsafe_sshd_settings_reported(overrides: dict[str, list[str]], needle: str) -> None:
    problems = _problems(**overrides)
    assert len(problems) == 1 and needle in problems[0], problems


def test_parse_sshd_t_lowercases_and_accumulates() -> None:
    parsed = doctor.parse_sshd_t("UsePAM yes\nport 22\nport 2222\n")
    assert parsed == {"usepam": ["yes"], "port": ["22", "2222"]}


HOOK = "/usr/local/lib/otpgate/otpgate-pam-hook"


def _write_stack(tmp_path: Path, body: str, name: str = "sshd-x") -> list[doctor.PamLine]:
    (tmp_path / name).write_text(body)
    return doctor.read_pam_auth(name, str(tmp_path))


def test_shipped_snippets_detected_and_clean(tmp_path: Path) -> None:
    packaging = Path(__file__).resolve().parents[2] / "packaging" / "pam.d"
    for flow in ("password", "publickey", "single-prompt"):
        snippet = (packaging / f"otpgate-ssh-{flow}").read_text()
        (tmp_path / f"otpgate-ssh-{flow}").write_text(snippet)
        stack = _write_stack(
            tmp_path, f"@include otpgate-ssh-{flow}\naccount required pam_unix.so\n", f"sshd-{flow}"
        )
        assert doctor.detect_flow(stack) == flow
        assert doctor.check_pam("sshd", stack, lambda _path: None) == []


def test_pam_without_hook_or_permit_reported(tmp_path: Path) -> None:
    stack = _write_stack(tmp_path, "auth required pam_unix.so\n")
    assert doctor.check_pam("sshd", stack, lambda _p: None) == [
        "pam: service sshd never runs otpgate-pam-hook: no code is ever asked"
    ]
    stack = _write_stack(
        tmp_path,
        f"auth [success=done default=ignore] pam_exec.so quiet /usr/bin/python3 -S {HOOK} check\n"
        f"auth requisite pam_exec.so quiet /usr/bin/python3 -I -S {HOOK} verify\n",
    )
    problems = doctor.check_pam("sshd", stack, lambda _p: None)
    assert any("does not end with pam_permit.so" in p for p in problems)
    assert any("lacks expose_authtok" in p for p in problems)
    assert any("without python3 -I" in p for p in problems)


def test_relative_or_writable_hook_reported(tmp_path: Path) -> None:
    stack = _write_stack(
        tmp_path,
        "auth requisite pam_exec.so quiet expose_authtok otpgate-pam-hook verify\n"
        "auth required pam_permit.so\n",
    )
    assert any("not absolute" in p for p in doctor.check_pam("sshd", stack, lambda _p: None))
    hook = tmp_path / "otpgate-pam-hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o666)
    assert "writable by group or others" in (doctor.root_owned_chain(str(hook)) or "")
    hook.chmod(0o755)
    assert doctor.root_owned_chain(str(hook)) is None  # /tmp is sticky: allowed
    os.chown(hook, 4242, 4242)
    assert "is not owned by root" in (doctor.root_owned_chain(str(hook)) or "")
