"""Shared fixtures: a real otpgated in a temporary directory, real local users."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from otpgate.v1 import otpgate_pb2_grpc as pb_grpc
from tests.store.pg_harness import PgServer, private_server

REPO = Path(__file__).resolve().parent.parent
# Central, edge and certificate fixtures (tests.fleet_harness) for every test module.
pytest_plugins = ["tests.fleet_harness"]
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(what)


@dataclass
class Daemon:
    """A real otpgated process with its own state, runtime dir and key."""

    root: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    _log_offset: int = 0

    def __post_init__(self) -> None:
        self.log_path = self.root / "otpgated.log"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    @property
    def key_file(self) -> Path:
        return self.root / "etc" / "otpgate.key"

    @property
    def database(self) -> Path:
        return self.state_dir / "otpgate.sqlite3"

    def socket(self, name: str) -> str:
        return str(self.runtime_dir / f"{name}.sock")

    @property
    def admin_socket(self) -> str:
        return self.socket("admin")

    def args(self) -> list[str]:
        return [
            sys.executable, "-m", "otpgate.server.main",
            "--state-dir", str(self.state_dir),
            "--runtime-dir", str(self.runtime_dir),
            "--key-file", str(self.key_file),
            "--admin-group", "root",
            "--issuer", "otpgate-test",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, *, wait: bool = True) -> Daemon:
        self._log_offset = len(self.log())
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log, cwd=self.root)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"otpgated exited {self.proc.returncode}:\n{self.log()}")
            return "started version=" in self.log()[self._log_offset :]

        _wait_for(ready, timeout, "otpgated did not start")

    def run_to_exit(self, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        """Start expecting a refusal: returns the finished process."""
        return subprocess.run(self.args(), capture_output=True, text=True, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=20)
        self.proc = None
        return code

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def admin(self) -> pb_grpc.TwoFactorAdminStub:
        return pb_grpc.TwoFactorAdminStub(grpc.insecure_channel("unix:" + self.admin_socket))

    def user(self) -> pb_grpc.UserSelfServiceStub:
        return pb_grpc.UserSelfServiceStub(grpc.insecure_channel("unix:" + self.socket("user")))

    def pam(self) -> pb_grpc.PamGateStub:
        return pb_grpc.PamGateStub(grpc.insecure_channel("unix:" + self.socket("pam")))


@pytest.fixture
def make_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(*extra_args: str, root: Path | None = None, start: bool = True) -> Daemon:
        d = Daemon(root or tmp_path_factory.mktemp("otpgated"), list(extra_args))
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        with contextlib.suppress(Exception):
            d.stop(signal.SIGKILL if d.proc and d.proc.poll() is None else signal.SIGTERM)


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    d: Daemon = make_daemon()
    return d


@dataclass
class LocalUser:
    name: str
    password: str
    uid: int


def _create_user(prefix: str = "ogt") -> LocalUser:
    name = f"{prefix}{secrets.token_hex(4)}"
    password = "pw-" + secrets.token_urlsafe(12)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    subprocess.run(["chpasswd"], input=f"{name}:{password}", text=True, check=True)
    uid = int(subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True).stdout)
    return LocalUser(name, password, uid)


def _delete_user(name: str) -> None:
    # A session the test opened (sshd's child for the user) may still be closing:
    # end what runs as this test-made user, by PID, and try again.
    for _ in range(20):
        if subprocess.run(["userdel", "--remove", name], capture_output=True).returncode in (0, 6):
            return  # 6: no such user
        pids = subprocess.run(["pgrep", "-u", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.1)


@pytest.fixture
def make_user() -> Iterator[Callable[..., LocalUser]]:
    """Create real local users (removed afterwards); needs root."""
    if os.geteuid() != 0:
        pytest.skip("creating local users needs root")
    made: list[str] = []

    def make(prefix: str = "ogt") -> LocalUser:
        user = _create_user(prefix)
        made.append(user.name)
        return user

    yield make
    for name in made:
        _delete_user(name)


@pytest.fixture
def user(make_user: Callable[..., LocalUser]) -> LocalUser:
    u: LocalUser = make_user()
    return u


def delete_user(name: str) -> None:
    _delete_user(name)


@pytest.fixture
def password_pam_service() -> Iterator[str]:
    """otpgated's own PAM service file (as shipped) under a unique name."""
    name = f"otpgate-test-pw-{secrets.token_hex(4)}"
    path = Path("/etc/pam.d") / name
    path.write_text((REPO / "packaging" / "pam.d" / "otpgate").read_text())
    yield name
    path.unlink()


@pytest.fixture
def login_daemon(make_daemon: Callable[..., Daemon], password_pam_service: str) -> Daemon:
    """A daemon that checks passwords through the shipped PAM service."""
    d: Daemon = make_daemon("--password-pam-service", password_pam_service)
    return d


@pytest.fixture
def public_login_daemon(
    make_daemon: Callable[..., Daemon], password_pam_service: str
) -> Iterator[Daemon]:
    """A login daemon whose directory other users can traverse (to reach user.sock)."""
    root = Path(tempfile.mkdtemp(prefix="otpgate-test-"))
    root.chmod(0o755)
    try:
        yield make_daemon("--password-pam-service", password_pam_service, root=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _usable_by_others() -> bool:
    paths = [Path(sys.executable).resolve(), REPO / "daemon" / "otpgate" / "__init__.py"]
    return all(os.access(p, os.R_OK) for p in paths) and all(
        os.stat(parent).st_mode & 0o001 for p in paths for parent in p.parents
    )


@pytest.fixture(scope="session")
def cli_python() -> Iterator[tuple[str, dict[str, str]]]:
    """A Python with otpgate that an ordinary user can run: this one when the checkout
    is readable by others, else a fresh virtualenv in a world-readable directory."""
    if _usable_by_others():
        yield sys.executable, {"PYTHONPATH": str(REPO / "daemon")}
        return
    home = Path(tempfile.mkdtemp(prefix="otpgate-test-cli-"))
    home.chmod(0o755)
    try:
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(home / "venv")], check=True)
        subprocess.run([str(home / "venv/bin/pip"), "install", "-q", str(REPO)], check=True,
                       timeout=600)  # fmt: skip
        yield str(home / "venv/bin/python"), {}
    finally:
        shutil.rmtree(home, ignore_errors=True)


# -- PostgreSQL: one private server per session (tests/store/pg_harness.py), here so
# that every module that asks for it shares the same one.
@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with private_server() as server:
        yield server


@pytest.fixture(scope="session")
def pg_tls_server() -> Iterator[PgServer]:
    """A second server that also listens on 127.0.0.1 and lets in only TLS there."""
    with private_server(tls=True) as server:
        yield server


def hook_exit(daemon: Daemon, username: str, code: str, fail: str) -> int:
    """The shipped hook's exit status (0: the login goes on) for `code`, asked of
    `daemon`'s pam.sock as pam_exec would run it."""
    env = {"PAM_TYPE": "auth", "PAM_USER": username, "PAM_SERVICE": "sshd", "PATH": "/usr/bin"}
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(REPO / "pam_hook" / "otpgate-pam-hook"), "verify",
         f"socket={daemon.socket('pam')}", "timeout=10", f"fail={fail}"],
        input=code.encode(), env=env, capture_output=True, timeout=30,
    )  # fmt: skip
    return result.returncode


@pytest.fixture
def pam_service() -> Iterator[Callable[[str], str]]:
    """Writes an auth stack as a PAM service of a unique name (plus an account line,
    which pamtester's authenticate never reaches); removed afterwards."""
    made: list[Path] = []

    def write(stack: str) -> str:
        name = f"otpgate-test-{secrets.token_hex(4)}"
        path = Path("/etc/pam.d") / name
        path.write_text(stack + "account required pam_permit.so\n")
        made.append(path)
        return name

    yield write
    for path in made:
        path.unlink(missing_ok=True)
