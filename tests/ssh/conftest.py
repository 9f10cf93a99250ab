"""A real sshd on 127.0.0.1, wired with the shipped PAM and sshd snippets.

Each sshd is a symlink to the system binary under a unique name: sshd uses its
program name as PAM service, so it reads our /etc/pam.d/<unique name> and never
the host's sshd files. Logins are driven by paramiko (keyboard-interactive rounds
answered programmatically) and by the OpenSSH client.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest

from tests.conftest import REPO, Daemon, LocalUser

SSHD = "/usr/sbin/sshd"
HOOK = REPO / "pam_hook" / "otpgate-pam-hook"
PACKAGING = REPO / "packaging"
_HOOK_CALL = re.compile(r"(/usr/bin/python3 -I -S )/usr/local/lib/otpgate/otpgate-pam-hook (\S+)")


def render_pam_snippet(
    flow: str, pam_socket: str, hook_options: str = "", prompt: str = "when-needed"
) -> str:
    """The shipped snippet, pointed at this checkout's hook and a test daemon."""
    suffix = "-always" if prompt == "always" else ""
    text = (PACKAGING / "pam.d" / f"otpgate-ssh-{flow}{suffix}").read_text()
    extra = f" {hook_options}" if hook_options else ""
    text = text.replace("/run/otpgate/gate", str(Path(pam_socket).parent / "gate"))
    return _HOOK_CALL.sub(rf"\g<1>{HOOK} \g<2> socket={pam_socket}{extra}", text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Sshd:
    root: Path
    flow: str
    pam_text: str
    port: int = field(default_factory=_free_port)
    name: str = field(default_factory=lambda: f"sshd-otpgate-test-{secrets.token_hex(4)}")
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pam_file(self) -> Path:
        return Path("/etc/pam.d") / self.name

    @property
    def log_path(self) -> Path:
        return self.root / "sshd.log"

    # sshd reads authorized keys as the user: they must live where users can look.
    keys_dir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="otpgate-test-keys-"))
    )

    def authorized_keys(self, user: str) -> Path:
        return self.keys_dir / user

    def start(self) -> Sshd:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self.keys_dir.chmod(0o755)
        hostkey = self.root / "hostkey"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True
        )
        dropin = (PACKAGING / "sshd_config.d" / f"otpgate-{self.flow}.conf").read_text()
        # The drop-in first: sshd keeps the first value it reads, as with Debian's Include.
        (self.root / "sshd_config").write_text(
            dropin
            + f"""
Port {self.port}
ListenAddress 127.0.0.1
HostKey {hostkey}
PidFile {self.root}/sshd.pid
AuthorizedKeysFile {self.keys_dir}/%u
StrictModes no
PubkeyAuthentication yes
MaxAuthTries 10
MaxStartups 100
LoginGraceTime 60
LogLevel VERBOSE
"""
        )
        self.pam_file.write_text(
            self.pam_text
            + "account required pam_unix.so\nsession required pam_permit.so\n"
            + "password required pam_deny.so\n"
        )
        binary = self.root / self.name
        binary.symlink_to(SSHD)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [str(binary), "-D", "-e", "-f", str(self.root / "sshd_config")],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited:\n{self.log_path.read_text()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            time.sleep(0.05)
        raise TimeoutError("sshd did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.pam_file.unlink(missing_ok=True)
        shutil.rmtree(self.keys_dir, ignore_errors=True)


@pytest.fixture
def make_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Sshd]]:
    made: list[Sshd] = []

    def make(
        flow: str,
        daemon: Daemon,
        hook_options: str = "",
        prompt: str = "when-needed",
        edit: Callable[[str], str] = lambda text: text,
    ) -> Sshd:
        """`edit`: a change to the rendered stack (tests.ssh.test_gate's counting hook)."""
        pam_text = edit(render_pam_snippet(flow, daemon.socket("pam"), hook_options, prompt))
        sshd = Sshd(tmp_path_factory.mktemp("sshd"), flow, pam_text)
        made.append(sshd)
        return sshd.start()

    yield make
    for sshd in made:
        sshd.stop()


@dataclass
class Login:
    ok: bool
    prompts: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return "\n".join(self.messages + self.prompts)


def ssh_login(
    port: int,
    username: str,
    *,
    password: str | None = None,
    key: paramiko.PKey | None = None,
    answers: list[str] | None = None,
    timeout: float = 30.0,
    source: str = "",
) -> Login:
    """Log in: first factor (password or key) if given, then keyboard-interactive rounds.

    `answers` are typed, in order, at the keyboard-interactive prompts. `source`: the
    local address to connect from (another loopback address: 127.0.0.2), which sshd
    reports as PAM_RHOST.
    """
    result = Login(ok=False)
    queue = list(answers or [])
    start = time.monotonic()

    def handler(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
        if instructions:
            result.messages.append(instructions)
        replies = []
        for text, _echo in prompts:
            result.prompts.append(text)
            replies.append(queue.pop(0) if queue else "")
        return replies

    sock = socket.create_connection(
        ("127.0.0.1", port), timeout, source_address=(source, 0) if source else None
    )
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        transport.auth_timeout = timeout
        remaining: list[str] | None = ["keyboard-interactive"]
        with contextlib.suppress(paramiko.AuthenticationException, paramiko.SSHException):
            if key is not None:
                remaining = transport.auth_publickey(username, key)
            elif password is not None:
                remaining = transport.auth_password(username, password, fallback=False)
            if (
                not transport.is_authenticated()
                and remaining
                and ("keyboard-interactive" in remaining)
            ):
                transport.auth_interactive(username, handler)
        result.ok = transport.is_authenticated()
    finally:
        transport.close()
        sock.close()
    result.seconds = time.monotonic() - start
    return result


def authorize_key(sshd: Sshd, user: LocalUser) -> paramiko.Ed25519Key:
    """A new key pair for `user`, its public half in the sshd's authorized_keys."""
    keyfile = sshd.root / f"id_{user.name}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keyfile)], check=True)
    sshd.authorized_keys(user.name).write_text(Path(f"{keyfile}.pub").read_text())
    sshd.authorized_keys(user.name).chmod(0o644)
    return paramiko.Ed25519Key.from_private_key_file(str(keyfile))
