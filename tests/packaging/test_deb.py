"""The Debian package (packaging/deb/build.sh): contents, modes, control data, relocation.

Installing it, upgrading and removing it on a booted Debian is test_nspawn.py's job.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed"
)

PREFIX = "/usr/lib/otpgate"
SYSTEM_PYTHON = "/usr/bin/python3"
STAGE_MARK = "otpgate-deb-"  # build.sh's staging directory: mktemp -d .../otpgate-deb-XXXXXX
FLOWS = ("password", "publickey", "single-prompt")


def _run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("debroot")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(root / "DEBIAN")], check=True)
    return root


@pytest.fixture(scope="module")
def listing(deb: Path) -> dict[str, tuple[str, str, str]]:
    """path -> (mode string, owner/group, link target or "")."""
    entries = {}
    for line in _run("dpkg-deb", "-c", str(deb)).splitlines():
        fields = line.split(maxsplit=5)
        name, _, target = fields[5].partition(" -> ")
        entries[name.removeprefix(".").rstrip("/") or "/"] = (fields[0], fields[1], target)
    return entries


def _field(deb: Path, name: str) -> str:
    return _run("dpkg-deb", "-f", str(deb), name).strip()


def test_file_name_version_and_architecture(deb: Path) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    debian_version = re.sub(r"\.?(a|b|rc|dev)(\d*)", r"~\1\2", version)
    arch = _run("dpkg", "--print-architecture").strip()
    assert deb.name == f"otpgate_{debian_version}_{arch}.deb"
    assert _field(deb, "Package") == "otpgate"
    assert _field(deb, "Version") == debian_version
    assert _field(deb, "Architecture") == arch  # grpcio and cffi are binary wheels
    assert int(_field(deb, "Installed-Size")) > 1000


def test_depends(deb: Path) -> None:
    depends = [d.strip() for d in _field(deb, "Depends").split(",")]
    # The venv links to /usr/bin/python3 and holds cpython-311 extension modules.
    for needed in ("python3 (>= 3.11)", "python3 (<< 3.12)", "libpam-runtime", "libpam-modules",
                   "libpam0g"):  # fmt: skip
        assert needed in depends
    names = {re.split(r"[ (]", d)[0] for d in depends}
    assert {"libc6", "libstdc++6"} <= names  # grpcio's shared library
    assert "systemd" not in names  # the maintainer scripts work without it


def test_owners_modes_and_links(listing: dict[str, tuple[str, str, str]]) -> None:
    assert {owner for _, owner, _ in listing.values()} == {"root/root"}
    expected = {
        f"{PREFIX}/otpgate-pam-hook": "-rwxr-xr-x",
        f"{PREFIX}/otpgate_pam_hook.py": "-rw-r--r--",
        f"{PREFIX}/__pycache__/otpgate_pam_hook.cpython-311.pyc": "-rw-r--r--",
        f"{PREFIX}/bin/otpgate": "-rwxr-xr-x",
        f"{PREFIX}/bin/otpgated": "-rwxr-xr-x",
        f"{PREFIX}/pyvenv.cfg": "-rw-r--r--",
        "/lib/systemd/system/otpgated.service": "-rw-r--r--",
        "/usr/lib/sysusers.d/otpgate.conf": "-rw-r--r--",
        "/usr/lib/tmpfiles.d/otpgate.conf": "-rw-r--r--",
        "/etc/pam.d/otpgate": "-rw-r--r--",
        "/usr/share/doc/otpgate/copyright": "-rw-r--r--",
        "/usr/share/doc/otpgate/changelog.gz": "-rw-r--r--",
        "/usr/share/man/man1/otpgate.1.gz": "-rw-r--r--",
        "/usr/share/man/man8/otpgated.8.gz": "-rw-r--r--",
        "/usr/share/man/man5/otpgated.toml.5.gz": "-rw-r--r--",
    }
    for flow in FLOWS:
        expected[f"/usr/share/otpgate/pam.d/otpgate-ssh-{flow}"] = "-rw-r--r--"
        expected[f"/usr/share/otpgate/sshd_config.d/otpgate-{flow}.conf"] = "-rw-r--r--"
    for path, mode in expected.items():
        assert path in listing, path
        assert listing[path][0] == mode, path
    assert listing["/usr/bin/otpgate"][2] == "../lib/otpgate/bin/otpgate"
    assert listing["/usr/sbin/otpgated"][2] == "../lib/otpgate/bin/otpgated"
    assert listing[f"{PREFIX}/bin/python3"][2] == SYSTEM_PYTHON
    for path, (mode, _, _) in listing.items():
        assert mode[8] != "w" or mode[0] == "l", f"writable by others: {path}"
        assert "s" not in mode[1:] and "S" not in mode[1:], f"set-id: {path}"


def test_nothing_activated(listing: dict[str, tuple[str, str, str]]) -> None:
    # SSH wiring is `otpgate setup ssh`'s job; a pam-auth-update profile would put the
    # hook into common-auth, for every PAM service.
    assert [p for p in listing if p.startswith("/etc/") and listing[p][0][0] != "d"] == [
        "/etc/pam.d/otpgate"
    ]
    assert not [p for p in listing if "pam-configs" in p or p.startswith("/etc/ssh")]


def test_control_files(tree: Path, deb: Path) -> None:
    control = tree / "DEBIAN"
    assert (control / "conffiles").read_text().split() == ["/etc/pam.d/otpgate"]
    for script in ("postinst", "prerm", "postrm"):
        path = control / script
        assert path.stat().st_mode & 0o777 == 0o755, script
        assert path.read_text().startswith("#!/bin/sh\n")
        subprocess.run(["sh", "-n", str(path)], check=True)
        if shutil.which("shellcheck"):
            subprocess.run(["shellcheck", "-s", "sh", str(path)], check=True)
    sums = {}
    for line in (control / "md5sums").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name] = digest
    files = {
        str(p.relative_to(tree))
        for p in tree.rglob("*")
        if p.is_file() and not p.is_symlink() and p.parts[len(tree.parts)] != "DEBIAN"
    }
    assert set(sums) == files
    hook = f"{PREFIX.lstrip('/')}/otpgate_pam_hook.py"
    assert sums[hook] == hashlib.md5((tree / hook).read_bytes()).hexdigest()  # noqa: S324


def test_no_staging_path_left(tree: Path) -> None:
    # Binary files too: bytecode, shared libraries, the control files.
    hits = subprocess.run(["grep", "-rlF", STAGE_MARK, str(tree)], capture_output=True, text=True)
    assert hits.stdout == ""
    links = [p for p in tree.rglob("*") if p.is_symlink() and STAGE_MARK in str(p.readlink())]
    assert links == []


def test_scripts_use_the_installed_venv(tree: Path) -> None:
    bindir = tree / PREFIX.lstrip("/") / "bin"
    scripts = [p for p in bindir.iterdir() if p.is_file() and not p.is_symlink()]
    assert {"otpgate", "otpgated"} <= {p.name for p in scripts}
    for script in scripts:
        assert script.read_bytes().split(b"\n", 1)[0] == b"#!/usr/lib/otpgate/bin/python", script
    assert not list(bindir.glob("pip*")) and not list(bindir.glob("activate*"))
    cfg = dict(
        line.split(" = ", 1)
        for line in (tree / PREFIX.lstrip("/") / "pyvenv.cfg").read_text().splitlines()
    )
    assert cfg["home"] == "/usr/bin"
    assert cfg["include-system-site-packages"] == "false"
    assert cfg["command"].endswith(f" -m venv {PREFIX}")


def test_records_are_true(tree: Path) -> None:
    """Every RECORD hash (scripts rewritten by the relocation too) matches its file."""
    site = next((tree / PREFIX.lstrip("/") / "lib").glob("python3*/site-packages"))
    otpgate_info = next(site.glob("otpgate-*.dist-info"))
    assert not (otpgate_info / "direct_url.json").exists()  # it named the staging directory
    assert not list(site.glob("*.egg-link")) and not list(site.glob("__editable__*"))
    checked = 0
    for record in site.glob("*.dist-info/RECORD"):
        with open(record, newline="") as f:
            for name, digest, _size in csv.reader(f):
                if not digest:
                    continue
                algorithm, _, expected = digest.partition("=")
                data = (site / name).resolve().read_bytes()
                actual = base64.urlsafe_b64encode(hashlib.new(algorithm, data).digest())
                assert actual.rstrip(b"=").decode() == expected, name
                checked += 1
    assert checked > 100


def test_bytecode_is_fresh_and_names_installed_paths(tree: Path) -> None:
    """Every module has bytecode the system Python accepts as is, compiled for its
    installed path: nothing is compiled (or written) at run time."""
    checker = r"""
import importlib.util, json, marshal, os, sys
root, prefix = sys.argv[1], sys.argv[2]
problems, count = [], 0
for dirpath, dirnames, filenames in os.walk(root + prefix):
    for name in filenames:
        if not name.endswith(".py"):
            continue
        source = os.path.join(dirpath, name)
        pyc = importlib.util.cache_from_source(source)
        installed = source[len(root):]
        if not os.path.exists(pyc):
            problems.append("no bytecode: " + installed)
            continue
        data = open(pyc, "rb").read()
        flags = int.from_bytes(data[4:8], "little")
        src = open(source, "rb").read()
        if data[:4] != importlib.util.MAGIC_NUMBER:
            problems.append("magic: " + installed)
        elif flags & 1:
            if data[8:16] != importlib.util.source_hash(src):
                problems.append("hash: " + installed)
        elif int.from_bytes(data[8:12], "little") != int(os.stat(source).st_mtime) or \
                int.from_bytes(data[12:16], "little") != len(src):
            problems.append("stale: " + installed)
        code = marshal.loads(data[16:])
        if code.co_filename != installed:
            problems.append("path: " + installed + " -> " + code.co_filename)
        count += 1
print(json.dumps({"count": count, "problems": problems}))
"""
    out = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-S", "-c", checker, str(tree), PREFIX],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["problems"] == []
    assert report["count"] > 200
    hook = tree / PREFIX.lstrip("/") / "__pycache__" / "otpgate_pam_hook.cpython-311.pyc"
    # checked-hash: valid whatever mtime the files get on the target.
    assert int.from_bytes(hook.read_bytes()[4:8], "little") == 0b11


def test_hook_runs_from_the_package(tree: Path) -> None:
    """The packaged hook under the system Python, as pam_exec runs it: no daemon, so
    fail=secure denies and fail=safe allows; its bytecode is used, not rewritten."""
    hook = tree / PREFIX.lstrip("/") / "otpgate-pam-hook"
    cache = hook.parent / "__pycache__"
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    env = {"PAM_USER": "nobody", "PAM_SERVICE": "sshd", "PAM_TYPE": "auth"}
    for fail, expected in (("secure", 1), ("safe", 0)):
        result = subprocess.run(
            [SYSTEM_PYTHON, "-I", "-S", str(hook), "check", "socket=/nonexistent/pam.sock",
             "timeout=1", f"fail={fail}"],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == expected, result.stderr
        assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before


def test_venv_imports_under_the_system_python(tree: Path) -> None:
    """The wheels' extension modules load in the system Python the venv is made for."""
    site = next((tree / PREFIX.lstrip("/") / "lib").glob("python3*/site-packages"))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import grpc, cryptography.hazmat.primitives.ciphers.aead, pam, segno, pyotp; "
        "import otpgate.server.main, otpgate.cli.main; "
        "sys.argv = ['otpgate', '--help']; otpgate.cli.main.main()"
    )
    result = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-S", "-B", "-c", code, str(site)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "renew-secret" in result.stdout


def test_shipped_files_match_the_sources(tree: Path) -> None:
    def installed(path: str) -> bytes:
        return (tree / path.lstrip("/")).read_bytes()

    snippets = REPO / "daemon" / "otpgate" / "ssh" / "snippets"
    for flow in FLOWS:
        name = f"otpgate-ssh-{flow}"
        assert installed(f"/usr/share/otpgate/pam.d/{name}") == (snippets / name).read_bytes()
        name = f"otpgate-{flow}.conf"
        assert (
            installed(f"/usr/share/otpgate/sshd_config.d/{name}") == (snippets / name).read_bytes()
        )
    pairs = {
        "/lib/systemd/system/otpgated.service": "packaging/systemd/otpgated.service",
        "/usr/lib/sysusers.d/otpgate.conf": "packaging/systemd/otpgate.sysusers",
        "/usr/lib/tmpfiles.d/otpgate.conf": "packaging/systemd/otpgate.tmpfiles",
        "/etc/pam.d/otpgate": "packaging/pam.d/otpgate",
        f"{PREFIX}/otpgate_pam_hook.py": "pam_hook/otpgate_pam_hook.py",
        "/usr/share/doc/otpgate/copyright": "packaging/deb/copyright",
    }
    for target, source in pairs.items():
        assert installed(target) == (REPO / source).read_bytes(), target
    assert (
        gzip.decompress(installed("/usr/share/doc/otpgate/changelog.gz"))
        == (REPO / "CHANGELOG.md").read_bytes()
    )
    pages = sorted((REPO / "packaging" / "man").glob("*.[1-8]"))
    assert len(pages) >= 3
    for page in pages:
        shipped = f"/usr/share/man/man{page.suffix[1:]}/{page.name}.gz"
        assert gzip.decompress(installed(shipped)) == page.read_bytes(), shipped
