"""A booted Debian 12 (systemd-nspawn on a debootstrap root): install the package,
run the unit, enroll, `otpgate setup ssh`, log in over SSH with password then code,
then remove and purge without losing SSH access. Slow, but it runs in CI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("systemd-nspawn") is None or shutil.which("debootstrap") is None,
        reason="systemd-nspawn or debootstrap missing (scripts/test.sh installs them)",
    ),
]

PACKAGES = ["systemd", "systemd-sysv", "dbus", "openssh-server", "openssh-client", "python3",
            "oathtool", "sshpass", "procps", "iproute2", "passwd", "libpam-runtime"]  # fmt: skip
CACHE = Path("/var/tmp/otpgate-nspawn-cache")
MIRROR = "http://deb.debian.org/debian"
SCRIPT = Path(__file__).with_name("nspawn_e2e.sh")
EXPECTED = ["ssh_active", "baseline_password_login", "dpkg_install", "unit_active",
            "unit_type_notify", "key_created", "enroll_admin", "enable", "setup_ssh",
            "doctor_clean", "otp_login", "wrong_code_refused", "password_alone_refused",
            "self_service", "dpkg_remove", "unwired", "login_after_remove", "state_kept",
            "reinstall", "key_kept", "enrollment_kept", "purge", "purged",
            "login_after_purge"]  # fmt: skip


def _cached_root() -> Path:
    key = hashlib.sha256(" ".join(["bookworm", MIRROR, *PACKAGES]).encode()).hexdigest()[:12]
    root = CACHE / key
    if not (root / "etc" / "debian_version").exists():
        building = CACHE / f"{key}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        building.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
             "bookworm", str(building), MIRROR],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)
    return root


def _is_tmpfs(path: str) -> bool:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == path:
            return fields[2] == "tmpfs"
    return False


@pytest.fixture
def nspawn_propagate_dir() -> Iterator[None]:
    # nspawn refuses to clean its propagation directory unless it is on a tmpfs.
    path = "/run/systemd/nspawn"
    os.makedirs(path, exist_ok=True)
    mounted = False
    if not _is_tmpfs(path):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path], check=True)
        mounted = True
    yield
    if mounted:
        subprocess.run(["umount", "--lazy", path], check=False)


def test_package_in_a_booted_debian(deb: Path, tmp_path: Path, nspawn_propagate_dir: None) -> None:
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(_cached_root()), str(root)], check=True)
    probe = subprocess.run(
        ["systemd-nspawn", "-D", str(root), "--register=no", "--keep-unit", "--quiet",
         "/bin/true"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if probe.returncode != 0:  # the machine cannot run containers at all: not ours to test
        pytest.skip(f"systemd-nspawn cannot start a container here: {probe.stderr.strip()}")
    shutil.copy(deb, root / "root" / "otpgate.deb")
    shutil.copy(SCRIPT, root / "root" / "e2e.sh")
    (root / "root" / "e2e.sh").chmod(0o755)
    unit = root / "etc/systemd/system/otpgate-e2e.service"
    unit.write_text(
        "[Unit]\nAfter=multi-user.target ssh.service\n"
        "[Service]\nType=oneshot\nExecStart=/root/e2e.sh\nTimeoutStartSec=600\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "otpgate-e2e.service").symlink_to("/etc/systemd/system/otpgate-e2e.service")
    console = open(tmp_path / "console.log", "wb")  # noqa: SIM115 - the child writes to it
    proc = subprocess.Popen(
        ["systemd-nspawn", "-D", str(root), "--register=no", "--keep-unit", "--private-network",
         "-b", "--console=pipe", "--machine", f"otpgate-e2e-{os.getpid()}"],
        stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        proc.wait(timeout=480)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        console.close()
    time.sleep(0.2)
    results_file = root / "root" / "e2e-results"
    log = (
        (root / "root" / "e2e.log").read_text(errors="replace")
        if (root / "root/e2e.log").exists()
        else ""
    )
    assert results_file.exists(), (tmp_path / "console.log").read_text(errors="replace")[-4000:]
    results = results_file.read_text().split("\n")
    passed = {line[3:] for line in results if line.startswith("ok ")}
    failed = [line[5:] for line in results if line.startswith("FAIL ")]
    journal = root / "root" / "journal-otpgated.log"
    context = log[-6000:] + (
        journal.read_text(errors="replace")[-3000:] if journal.exists() else ""
    )
    assert not failed, f"failed: {failed}\n{context}"
    assert "done" in results, context
    assert set(EXPECTED) <= passed, f"missing: {set(EXPECTED) - passed}\n{context}"
