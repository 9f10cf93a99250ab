"""The package in a booted Debian 12 (issue "Deployment").

A debootstrap root of bookworm (cached in /var/tmp/otpgate-nspawn-cache/<hash>, built on
demand in about a minute) boots under systemd-nspawn with its own network namespace, so
its sshd listens on the container's loopback only and the host's sshd is never touched.
Every run gets a fresh overlay (or copy) of the cached root. A oneshot unit runs
E2E_SCRIPT after boot: install, enroll, `otpgate setup ssh`, SSH logins with password then
code, reinstall, upgrade, remove (the wiring is undone, password logins still work),
reinstall (same key), a refused removal, purge. It writes "ok NAME" / "FAIL NAME" lines
and logs into the root, then powers the container off; the host asserts on them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
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
    pytest.mark.skipif(os.geteuid() != 0, reason="booting a container needs root"),
]

SUITE = "bookworm"
MIRROR = os.environ.get("OTPGATE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ["systemd", "systemd-sysv", "dbus", "openssh-server", "openssh-client", "python3",
            "oathtool", "sshpass", "procps", "iproute2", "passwd", "libpam-runtime"]  # fmt: skip
CACHE = Path("/var/tmp/otpgate-nspawn-cache")
BOOT_TIMEOUT = 360  # the whole container run (boot to poweroff): normally 20-40 s
BUMPED_VERSION_SUFFIX = "+e2e1"

EXPECTED = [
    "ssh_active", "baseline_password_login", "install", "unit_active", "unit_type_notify",
    "unit_enabled", "admin_group", "key_created", "key_mode", "key_from_credential",
    "enroll", "enable_2fa", "setup_ssh", "hook_path_substituted", "doctor_clean",
    "otp_login", "wrong_code_refused", "password_alone_refused", "self_service",
    "package_files_intact", "no_stray_files", "reinstall_same_version", "reinstall_restarted",
    "reinstall_kept_wiring", "upgrade", "upgrade_version", "upgrade_restarted",
    "upgrade_kept_secrets", "disabled_stays_disabled", "remove", "remove_unwired",
    "remove_stopped", "remove_deleted_files", "login_after_remove", "remove_kept_state",
    "reinstall_after_remove", "reinstall_kept_key", "reinstall_kept_enrollment",
    "one_key_id", "refuse_remove_while_wired", "refused_remove_kept_package",
    "refused_remove_kept_daemon", "purge", "purge_deleted_state", "purge_deleted_unit",
    "login_after_purge",
]  # fmt: skip

E2E_SCRIPT = r"""#!/bin/sh
# Runs inside the booted container (oneshot unit after multi-user.target).
exec >/root/e2e.log 2>&1
set -x
results=/root/e2e-results
: >"$results"
started=$(date +%s)
pass() { echo "ok $1" >>"$results"; }
fail() { echo "FAIL $1" >>"$results"; }
check() { name=$1; shift; if "$@"; then pass "$name"; else fail "$name"; fi; }
refute() { name=$1; shift; if "$@"; then fail "$name"; else pass "$name"; fi; }
finish() {
  echo "seconds $(($(date +%s) - started))" >>"$results"
  journalctl -b -u otpgated --no-pager -o short-precise >/root/journal-otpgated.log 2>&1
  journalctl -b -u ssh --no-pager >/root/journal-ssh.log 2>&1
  echo done >>"$results"
  sync
  systemctl poweroff --no-block
}
trap finish EXIT

for i in $(seq 150); do systemctl is-active -q ssh && break; sleep 0.2; done
check ssh_active systemctl is-active -q ssh
useradd -m -s /bin/bash alice
useradd -m -s /bin/bash bob
echo 'alice:Alice-pw-1' | chpasswd
cp /etc/pam.d/sshd /root/pam-sshd.orig

ssh_opts="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
  -o PubkeyAuthentication=no -o PreferredAuthentications=password,keyboard-interactive"
# The password alone (sshpass answers every "Password:" prompt with it).
password_only() {
  SSHPASS=Alice-pw-1 timeout 60 sshpass -e ssh $ssh_opts alice@127.0.0.1 echo otpgate-ok |
    grep -qx otpgate-ok
}
# ssh asks SSH_ASKPASS at each prompt: the password first, then the code ($1).
cat >/root/askpass <<'EOS'
#!/bin/sh
echo "$1" >>/root/askpass.prompts
n=$(($(cat /root/askpass.count 2>/dev/null || echo 0) + 1)); echo $n >/root/askpass.count
sed -n "${n}p" /root/askpass.answers
EOS
chmod 700 /root/askpass
password_and_code() {
  rm -f /root/askpass.count
  printf 'Alice-pw-1\n%s\n' "$1" >/root/askpass.answers
  SSH_ASKPASS=/root/askpass SSH_ASKPASS_REQUIRE=force DISPLAY=:0 timeout 60 setsid -w \
    ssh $ssh_opts -o NumberOfPasswordPrompts=1 alice@127.0.0.1 echo otpgate-ok </dev/null |
    grep -qx otpgate-ok
}
code() { oathtool --totp -b "$1" -N "@$(($(date +%s) + ${2:-0}))"; }
main_pid() { systemctl show -p MainPID --value otpgated; }
secret_of() {
  otpgate renew-secret --now "$1" --qr none | sed -n 's/.*[?&]secret=\([A-Z2-7]*\).*/\1/p'
}
restarted_since() { systemctl is-active -q otpgated && [ "$(main_pid)" != "$1" ]; }
absent() { for p in "$@"; do ! test -e "$p" || return 1; done; }
no_daemon() { ! systemctl is-active -q otpgated && ! pgrep -f '^/usr/lib/otpgate/'; }
key_ids() { journalctl -b -u otpgated | grep -o 'key_loaded .*key_id=[^ ]*' | sed 's/.*key_id=//'; }
status_of() { dpkg-query -W -f '${db:Status-Status}' otpgate 2>/dev/null; }
enrolled() { otpgate user show "$1" --json | grep -q '"twofactor_auth_configured": true'; }

check baseline_password_login password_only

# Install.
check install dpkg -i /root/otpgate.deb
check unit_active systemctl is-active -q otpgated
check unit_type_notify test "$(systemctl show -p Type --value otpgated)" = notify
check unit_enabled systemctl is-enabled -q otpgated
check admin_group getent group otpgate-admin
check key_created test -s /etc/otpgate/otpgate.key
check key_mode test "$(stat -c '%a %U %G %s' /etc/otpgate/otpgate.key)" = "600 root root 45"
check key_from_credential sh -c 'journalctl -b -u otpgated | grep -q "key_loaded source=credential"'
key_before=$(sha256sum /etc/otpgate/otpgate.key)

# Enroll and wire sshd.
secret=$(secret_of alice)
bob_secret=$(secret_of bob)
check enroll sh -c "[ -n '$secret' ] && otpgate renew-secret --now root --qr none >/dev/null"
check enable_2fa otpgate update enabled=true services.ssh=true window=1
check setup_ssh otpgate setup ssh --flow password
check hook_path_substituted grep -q '/usr/bin/python3 -I -S /usr/lib/otpgate/otpgate-pam-hook ' \
  /etc/pam.d/otpgate-ssh-password
check doctor_clean otpgate doctor

# Log in: password then code; a wrong code and the password alone are refused.
check otp_login password_and_code "$(code "$secret")"
cat /root/askpass.prompts
refute wrong_code_refused password_and_code "$(code "$secret" 600)"
refute password_alone_refused password_only
# Self-service through the hardened unit: LoginEx checks the password with PAM inside it.
self_service() {
  printf 'Alice-pw-1\n%s\n' "$(code "$secret" 30)" |
    runuser -u alice -- otpgate --password-stdin user show |
    grep -q 'twofactor_auth_configured  true'
}
check self_service self_service

# Nothing wrote into the package's files (stale bytecode would be rewritten by root).
check package_files_intact test -z "$(dpkg -V otpgate)"
find /usr/lib/otpgate ! -type d | sort >/root/files.found
dpkg -L otpgate | grep '^/usr/lib/otpgate/' | sort >/root/files.packaged
check no_stray_files test -z "$(comm -23 /root/files.found /root/files.packaged)"

# Reinstall the same version, then upgrade: restarted, wiring and secrets kept.
pid=$(main_pid)
check reinstall_same_version dpkg -i /root/otpgate.deb
check reinstall_restarted restarted_since "$pid"
check reinstall_kept_wiring grep -q '^@include otpgate-ssh-password' /etc/pam.d/sshd
pid=$(main_pid)
check upgrade dpkg -i /root/otpgate-bumped.deb
check upgrade_version sh -c "dpkg-query -W -f '\${Version}' otpgate | grep -q '+e2e1$'"
check upgrade_restarted restarted_since "$pid"
check upgrade_kept_secrets sh -c "otpgate verify bob $(code "$bob_secret") | grep -qx true"
systemctl disable otpgated
dpkg -i /root/otpgate-bumped.deb
check disabled_stays_disabled systemctl is-active -q otpgated
refute disabled_stays_disabled systemctl is-enabled -q otpgated
systemctl enable otpgated

# Remove: the wiring is undone first; state and key stay.
check remove dpkg -r otpgate
check remove_unwired cmp /etc/pam.d/sshd /root/pam-sshd.orig
check remove_unwired absent /etc/ssh/sshd_config.d/otpgate.conf /etc/pam.d/otpgate-ssh-password
check remove_stopped no_daemon
check remove_deleted_files absent /usr/lib/otpgate /usr/bin/otpgate /usr/sbin/otpgated
check login_after_remove password_only
check remove_kept_state test -f /var/lib/otpgate/otpgate.sqlite3 -a -f /etc/otpgate/otpgate.key

# Reinstall: the same key (one key id in every start's log), the same enrollments.
check reinstall_after_remove dpkg -i /root/otpgate.deb
check reinstall_kept_key test "$(sha256sum /etc/otpgate/otpgate.key)" = "$key_before"
check reinstall_kept_enrollment enrolled alice
key_ids | sort | uniq -c
check one_key_id test "$(key_ids | sort -u | wc -l)" = 1

# Wired by hand (no backup to restore): removal is refused, nothing changes.
sed 's|/usr/local/lib/otpgate/otpgate-pam-hook|/usr/lib/otpgate/otpgate-pam-hook|' \
  /usr/share/otpgate/pam.d/otpgate-ssh-password >/etc/pam.d/otpgate-ssh-password
sed -i 's/^@include common-auth$/@include otpgate-ssh-password/' /etc/pam.d/sshd
dpkg -r otpgate >/root/refused-remove.log 2>&1
status=$?
cat /root/refused-remove.log
check refuse_remove_while_wired test "$status" != 0
check refuse_remove_while_wired grep -q 'refusing to remove' /root/refused-remove.log
check refused_remove_kept_package test "$(status_of)" = installed
check refused_remove_kept_package test -x /usr/lib/otpgate/otpgate-pam-hook
check refused_remove_kept_daemon systemctl is-active -q otpgated
cp /root/pam-sshd.orig /etc/pam.d/sshd
rm -f /etc/pam.d/otpgate-ssh-password

# Purge: state, key, unit and PAM service gone; SSH still works.
check purge dpkg -P otpgate
check purge_deleted_state absent /var/lib/otpgate /etc/otpgate /etc/pam.d/otpgate
check purge_deleted_state test "$(status_of || echo not-installed)" = not-installed
check purge_deleted_unit absent /lib/systemd/system/otpgated.service \
  /etc/systemd/system/otpgated.service /etc/systemd/system/multi-user.target.wants/otpgated.service
check purge_deleted_unit no_daemon
check login_after_purge password_only
"""

E2E_UNIT = """[Unit]
Description=otpgate end-to-end test
After=multi-user.target ssh.service
[Service]
Type=oneshot
ExecStart=/root/e2e.sh
TimeoutStartSec=330
StandardOutput=journal
[Install]
WantedBy=multi-user.target
"""


def _cached_root() -> Path:
    """The debootstrap root for PACKAGES, built once (under a lock) and never modified."""
    key = hashlib.sha256(" ".join([SUITE, MIRROR, *PACKAGES]).encode()).hexdigest()[:12]
    root = CACHE / key
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "etc" / "debian_version").exists():
            building = CACHE / f"{key}.building"
            shutil.rmtree(building, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                 SUITE, str(building), MIRROR],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-3000:]}"
            # Downloaded .debs are not needed once installed.
            shutil.rmtree(building / "var" / "cache" / "apt" / "archives", ignore_errors=True)
            building.rename(root)
    return root


def _is_mountpoint(path: Path, fstype: str | None = None) -> bool:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path) and (fstype is None or fields[2] == fstype):
            return True
    return False


def _umount(path: Path) -> None:
    for _ in range(20):
        if not _is_mountpoint(path):
            return
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    subprocess.run(["umount", "--lazy", str(path)], check=False)


@pytest.fixture
def nspawn_propagate_dir() -> Iterator[None]:
    """nspawn refuses to clean up its propagation directory ("Attempted to remove disk file
    system under /run/systemd/nspawn/propagate") unless it is on a tmpfs, as /run is on
    hosts booted with systemd. Where it is not, a tmpfs is mounted there for the run.
    Runs take turns (a lock), so that one never unmounts it under another."""
    path = Path("/run/systemd/nspawn")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path.mkdir(parents=True, exist_ok=True)
        fstype = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
        mounted = False
        if fstype != "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(path)],
                           check=True)  # fmt: skip
            mounted = True
        try:
            yield
        finally:
            if mounted:
                _umount(path)


@pytest.fixture
def container_root(tmp_path: Path) -> Iterator[Path]:
    """A fresh, writable copy of the cached root: an overlay, or a copy where that fails."""
    lower = _cached_root()
    merged, upper, work = tmp_path / "root", tmp_path / "upper", tmp_path / "work"
    for d in (merged, upper, work):
        d.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    overlay = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], capture_output=True
    )
    if overlay.returncode != 0:
        merged.rmdir()
        subprocess.run(["cp", "-a", str(lower), str(merged)], check=True)
    try:
        yield merged
    finally:
        if overlay.returncode == 0:
            _umount(merged)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Ask nspawn for an orderly shutdown; then kill it and everything under it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # nspawn passes SIGRTMIN+3 to the container's systemd
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
        return
    for pid in [*reversed(_descendants(proc.pid)), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _bumped(deb: Path, tmp_path: Path) -> Path:
    """The same package with a higher version: an upgrade for dpkg."""
    tree = tmp_path / "bumped"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    control.write_text(re.sub(r"^Version: (.*)$", rf"Version: \1{BUMPED_VERSION_SUFFIX}",
                              text, count=1, flags=re.M))  # fmt: skip
    out = tmp_path / "otpgate-bumped.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(tree), str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    shutil.rmtree(tree)
    return out


def _nspawn(root: Path, *args: str) -> list[str]:
    return ["systemd-nspawn", "-D", str(root), "--register=no", "--keep-unit", "--quiet",
            "--link-journal=no", "--private-network", *args]  # fmt: skip


def test_package_in_a_booted_debian(
    deb: Path, tmp_path: Path, container_root: Path, nspawn_propagate_dir: None
) -> None:
    root = container_root
    probe = subprocess.run(_nspawn(root, "/bin/true"), capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:  # the machine cannot run containers at all: not ours to test
        pytest.skip(f"systemd-nspawn cannot start a container here: {probe.stderr.strip()}")

    shutil.copy(deb, root / "root" / "otpgate.deb")
    shutil.copy(_bumped(deb, tmp_path), root / "root" / "otpgate-bumped.deb")
    script = root / "root" / "e2e.sh"
    script.write_text(E2E_SCRIPT)
    script.chmod(0o755)
    (root / "etc/systemd/system/otpgate-e2e.service").write_text(E2E_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "otpgate-e2e.service").symlink_to("/etc/systemd/system/otpgate-e2e.service")

    started = time.monotonic()
    with open(tmp_path / "console.log", "wb") as console:
        proc = subprocess.Popen(
            _nspawn(root, "--boot", "--console=pipe", f"--machine=otpgate-e2e-{os.getpid()}"),
            stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            proc.wait(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop(proc)
    elapsed = time.monotonic() - started

    # Keep the evidence beside the test's tmp dir (the overlay goes away).
    for name in ("e2e-results", "e2e.log", "journal-otpgated.log", "journal-ssh.log"):
        if (root / "root" / name).exists():
            shutil.copy(root / "root" / name, tmp_path / name)

    def tail(name: str, size: int) -> str:
        path = tmp_path / name
        text = path.read_text(errors="replace")[-size:] if path.exists() else "(missing)"
        return f"\n--- {name} (end) ---\n{text}"

    results_file = tmp_path / "e2e-results"
    assert results_file.exists(), (
        f"no results after {elapsed:.0f} s (nspawn exit {proc.returncode})"
        + tail("console.log", 4000)
    )
    lines = results_file.read_text().splitlines()
    context = tail("e2e.log", 8000) + tail("journal-otpgated.log", 3000)
    failed = [line[5:] for line in lines if line.startswith("FAIL ")]
    assert not failed, f"failed: {failed}{context}"
    assert "done" in lines, f"the script did not finish{context}"
    passed = {line[3:] for line in lines if line.startswith("ok ")}
    assert set(EXPECTED) <= passed, f"missing: {sorted(set(EXPECTED) - passed)}{context}"
    assert proc.returncode == 0, f"nspawn exit {proc.returncode}" + tail("console.log", 3000)
