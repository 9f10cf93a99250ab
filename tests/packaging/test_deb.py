"""The Debian package's contents, modes and maintainer scripts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("debroot")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def _listing(deb: Path) -> dict[str, str]:
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True)
    entries = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        entries[fields[5].lstrip(".")] = f"{fields[0]} {fields[1]}"
    return entries


def test_files_owners_and_modes(deb: Path) -> None:
    files = _listing(deb)
    expected = {
        "/usr/lib/otpgate/otpgate-pam-hook": "-rwxr-xr-x root/root",
        "/usr/lib/otpgate/otpgate_pam_hook.py": "-rw-r--r-- root/root",
        "/usr/lib/otpgate/__pycache__/otpgate_pam_hook.cpython-311.pyc": "-rw-r--r-- root/root",
        "/lib/systemd/system/otpgated.service": "-rw-r--r-- root/root",
        "/usr/lib/sysusers.d/otpgate.conf": "-rw-r--r-- root/root",
        "/usr/lib/tmpfiles.d/otpgate.conf": "-rw-r--r-- root/root",
        "/etc/pam.d/otpgate": "-rw-r--r-- root/root",
        "/usr/share/otpgate/pam.d/otpgate-ssh-password": "-rw-r--r-- root/root",
        "/usr/share/otpgate/sshd_config.d/otpgate-publickey.conf": "-rw-r--r-- root/root",
        "/usr/share/man/man8/otpgate-pam-hook.8.gz": "-rw-r--r-- root/root",
        "/usr/share/man/man1/otpgate.1.gz": "-rw-r--r-- root/root",
        "/usr/share/man/man5/otpgated.toml.5.gz": "-rw-r--r-- root/root",
    }
    for path, mode in expected.items():
        assert files.get(path) == mode, path
    assert files["/usr/bin/otpgate"].startswith("lrwxrwxrwx")
    assert all(owner == "root/root" for _, owner in (v.split() for v in files.values()))
    # Installed, never activated: nothing lands in sshd's own files.
    assert not any(p.startswith(("/etc/ssh", "/etc/pam.d/sshd")) for p in files)
    assert not any("pam-configs" in p for p in files)


def test_control_and_conffiles(deb: Path) -> None:
    field = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Depends"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "Package: otpgate" in field and "python3 (>= 3.11)" in field
    with_control = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"],
                                  capture_output=True, text=True, check=True)  # fmt: skip
    assert with_control.stdout.split() == ["/etc/pam.d/otpgate"]


def test_no_staging_paths_left(tree: Path) -> None:
    hits = subprocess.run(
        ["grep", "-rlI", "otpgate-deb-", str(tree)], capture_output=True, text=True
    )
    assert hits.stdout == ""
    shebang = (tree / "usr/lib/otpgate/bin/otpgate").read_text().splitlines()[0]
    assert shebang == "#!/usr/lib/otpgate/bin/python3"


def test_bytecode_is_fresh_for_the_hook(tree: Path) -> None:
    import importlib.util

    pyc = tree / "usr/lib/otpgate/__pycache__/otpgate_pam_hook.cpython-311.pyc"
    source = tree / "usr/lib/otpgate/otpgate_pam_hook.py"
    header = pyc.read_bytes()[:16]
    assert header[:4] == importlib.util.MAGIC_NUMBER  # CPython 3.11, as the system Python
    assert int.from_bytes(header[8:12], "little") == int(source.stat().st_mtime)
