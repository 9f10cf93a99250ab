"""`otpgate setup ssh`: backups, validation, rollback, undo, lockout refusal."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from otpgate.errors import FailedPrecondition, InvalidArgument
from otpgate.ssh import doctor
from otpgate.ssh import setup as ssh_setup
from tests.conftest import REPO, Daemon

HOOK = str(REPO / "pam_hook" / "otpgate-pam-hook")
DEBIAN_SSHD_PAM = """\
# PAM configuration for the Secure Shell service
@include common-auth
account    required     pam_nologin.so
@include common-account
session    required     pam_permit.so
@include common-password
"""


@pytest.fixture
def paths(tmp_path: Path) -> ssh_setup.Paths:
    pam_dir = tmp_path / "pam.d"
    pam_dir.mkdir()
    name = "sshd-otpgate-setup-test"
    (pam_dir / name).write_text(DEBIAN_SSHD_PAM)
    (pam_dir / "common-auth").write_text("auth required pam_unix.so\nauth required pam_permit.so\n")
    (pam_dir / "common-account").write_text("account required pam_unix.so\n")
    (pam_dir / "common-password").write_text("password required pam_unix.so\n")
    ssh_dir = tmp_path / "ssh"
    (ssh_dir / "sshd_config.d").mkdir(parents=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_dir / "hostkey")], check=True
    )
    (ssh_dir / "sshd_config").write_text(
        f"Include {ssh_dir}/sshd_config.d/*.conf\nHostKey {ssh_dir}/hostkey\n"
        "KbdInteractiveAuthentication no\nUsePAM yes\n"
    )
    sshd = tmp_path / name
    sshd.symlink_to("/usr/sbin/sshd")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    return ssh_setup.Paths(
        pam_dir=str(pam_dir),
        sshd_config=str(ssh_dir / "sshd_config"),
        sshd_config_dir=str(ssh_dir / "sshd_config.d"),
        sshd=str(sshd),
        backup_dir=str(tmp_path / "backup"),
    )


def _snapshot(paths: ssh_setup.Paths) -> dict[str, bytes]:
    files = {}
    for directory in (paths.pam_dir, paths.sshd_config_dir):
        for name in sorted(os.listdir(directory)):
            files[name] = Path(directory, name).read_bytes()
    files["sshd_config"] = Path(paths.sshd_config).read_bytes()
    return files


def _setup(paths: ssh_setup.Paths, flow: str = "password", **kw: object) -> list[str]:
    reloads: list[str] = []
    kw.setdefault("lockout_risk", None)
    report = ssh_setup.setup(
        flow, paths, hook=HOOK, reload=lambda: reloads.append("r") or "reloaded", **kw
    )  # type: ignore[arg-type]
    return report + reloads


@pytest.mark.parametrize(
    ("flow", "prompt"),
    [(flow, "when-needed") for flow in ssh_setup.FLOWS]
    + [("password", "always"), ("publickey", "always")],
)
def test_setup_then_doctor_clean_then_undo_restores(
    paths: ssh_setup.Paths, flow: str, prompt: str
) -> None:
    before = _snapshot(paths)
    report = _setup(paths, flow, prompt=prompt)
    assert report[-1] == "r"  # reloaded once, after the checks passed
    name = f"otpgate-ssh-{flow}" + ("-always" if prompt == "always" else "")
    service = Path(paths.pam_file).read_text()
    assert f"@include {name}\n" in service
    assert "\n@include common-auth" not in service
    snippet = Path(paths.snippet_file(name)).read_text()
    assert ("otpgate-pam-hook check" in snippet) is (flow != "single-prompt" and prompt != "always")
    assert f"{HOOK} " in snippet and "/usr/local/lib/otpgate" not in snippet
    assert "AuthenticationMethods" in Path(paths.dropin).read_text()
    assert ssh_setup.doctor_checks(paths, flow) == []
    assert doctor.detect_flow(doctor.read_pam_auth(paths.pam_service, paths.pam_dir)) == flow
    ssh_setup.undo(paths, reload=lambda: "reloaded")
    assert _snapshot(paths) == before


def test_dry_run_changes_nothing(paths: ssh_setup.Paths) -> None:
    before = _snapshot(paths)
    report = _setup(paths, dry_run=True)
    assert report[0].startswith("dry run") and any(paths.dropin in line for line in report)
    assert _snapshot(paths) == before


def test_failed_checks_roll_back(paths: ssh_setup.Paths) -> None:
    before = _snapshot(paths)
    with pytest.raises(ssh_setup.SetupError, match="has problems: broken"):
        _setup(paths, checks=lambda _p, _f: ["broken"])
    assert _snapshot(paths) == before
    assert ssh_setup.load_backup(paths.backup_dir) == {}


def test_sshd_t_failure_rolls_back(paths: ssh_setup.Paths) -> None:
    before = _snapshot(paths)
    fake = Path(paths.backup_dir).parent / "fake" / paths.pam_service
    fake.parent.mkdir()
    fake.symlink_to("/bin/false")  # same name (PAM service), but `sshd -t` fails
    broken = ssh_setup.Paths(**{**paths.__dict__, "sshd": str(fake)})
    with pytest.raises(ssh_setup.SetupError, match="sshd -t refused"):
        ssh_setup.setup(
            "password", broken, hook=HOOK, lockout_risk=None, reload=lambda: "x",
            checks=lambda _p, _f: [],
        )  # fmt: skip
    assert _snapshot(paths) == before


def test_lockout_risk_refused_unless_forced(paths: ssh_setup.Paths) -> None:
    before = _snapshot(paths)
    with pytest.raises(FailedPrecondition, match="no administrator"):
        _setup(paths, lockout_risk="no administrator is enrolled")
    assert _snapshot(paths) == before
    _setup(paths, lockout_risk="no administrator is enrolled", force=True)
    assert _snapshot(paths) != before


def test_unrecognised_pam_file_and_missing_include_refused(paths: ssh_setup.Paths) -> None:
    Path(paths.sshd_config).write_text("UsePAM yes\n")
    with pytest.raises(ssh_setup.SetupError, match="does not Include"):
        _setup(paths)
    Path(paths.pam_file).write_text("auth required pam_unix.so\n")
    with pytest.raises(ssh_setup.SetupError, match="no '@include common-auth'"):
        _setup(paths)


def test_switching_flows_and_undo_returns_to_the_first_original(paths: ssh_setup.Paths) -> None:
    before = _snapshot(paths)
    _setup(paths, "password")
    _setup(paths, "publickey")
    assert "@include otpgate-ssh-publickey" in Path(paths.pam_file).read_text()
    ssh_setup.undo(paths, reload=lambda: "x")
    after = _snapshot(paths)
    after.pop("otpgate-ssh-password", None)  # the first flow's snippet file may stay behind
    assert after == before


def test_cli_setup_refuses_when_daemon_unreachable_and_works_with_it(
    paths: ssh_setup.Paths, daemon: Daemon
) -> None:
    args = [
        sys.executable, "-m", "otpgate.cli.main", "setup", "ssh", "--flow", "password",
        "--hook", HOOK, "--no-reload", "--sshd", paths.sshd, "--sshd-config", paths.sshd_config,
        "--sshd-config-dir", paths.sshd_config_dir, "--pam-dir", paths.pam_dir,
        "--backup-dir", paths.backup_dir,
    ]  # fmt: skip
    before = _snapshot(paths)
    dead = subprocess.run(
        [*args, "--socket", "/nonexistent/admin.sock"], capture_output=True, text=True
    )
    assert dead.returncode == 2 and "not reachable" in dead.stderr
    assert _snapshot(paths) == before
    ok = subprocess.run([*args, "--socket", daemon.admin_socket], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "sshd not reloaded" in ok.stdout
    undo = subprocess.run(
        [*args, "--undo", "--socket", daemon.admin_socket], capture_output=True, text=True
    )
    assert undo.returncode == 0, undo.stderr
    assert _snapshot(paths) == before
    shutil.rmtree(paths.backup_dir, ignore_errors=True)


def test_doctor_complains_about_deliberately_broken_wiring(paths: ssh_setup.Paths) -> None:
    _setup(paths, "password")
    assert ssh_setup.doctor_checks(paths, "password") == []
    # Someone "fixes" a login problem by letting a password alone through.
    Path(paths.dropin).write_text(
        Path(paths.dropin)
        .read_text()
        .replace("AuthenticationMethods password,keyboard-interactive", "AuthenticationMethods any")
    )
    problems = ssh_setup.doctor_checks(paths, "password")
    assert any("'any'" in p for p in problems), problems
    # ...and drops pam_permit from the stack.
    snippet = Path(paths.snippet_file("otpgate-ssh-password"))
    snippet.write_text(
        snippet.read_text().replace("auth  required                       pam_permit.so\n", "")
    )
    problems = ssh_setup.doctor_checks(paths, "password")
    assert any("does not end with pam_permit.so" in p for p in problems), problems


def test_prompt_always_refused_for_single_prompt(paths: ssh_setup.Paths) -> None:
    before = _snapshot(paths)
    with pytest.raises(InvalidArgument, match="--prompt"):
        _setup(paths, "single-prompt", prompt="always")
    assert _snapshot(paths) == before


def test_switching_prompt_variant_then_undo_restores_the_first_originals(
    paths: ssh_setup.Paths,
) -> None:
    before = _snapshot(paths)
    _setup(paths, "publickey")
    _setup(paths, "publickey", prompt="always")
    service = Path(paths.pam_file).read_text()
    assert "@include otpgate-ssh-publickey-always\n" in service
    assert "@include otpgate-ssh-publickey\n" not in service
    assert ssh_setup.doctor_checks(paths, "publickey") == []
    ssh_setup.undo(paths, reload=lambda: "reloaded")
    assert _snapshot(paths) == before


@pytest.mark.parametrize(
    ("flow", "hook", "options", "complaint"),
    [
        ("password", "/nonexistent/otpgate-pam-hook", "", "--hook: no otpgate hook at"),
        ("password", HOOK, "fail=bogus", "--hook-options: the hook (check)"),
        ("password", HOOK, "timeout=0", "timeout= must be from 0.1 to 30"),
        ("single-prompt", HOOK, "fail=safe", "fail=safe"),
    ],
)
def test_hook_and_options_checked_before_writing(
    paths: ssh_setup.Paths, flow: str, hook: str, options: str, complaint: str
) -> None:
    before = _snapshot(paths)
    with pytest.raises(InvalidArgument, match=re.escape(complaint)):
        ssh_setup.setup(flow, paths, hook=hook, hook_options=options, lockout_risk=None,
                        reload=lambda: "x")  # fmt: skip
    assert _snapshot(paths) == before
