"""Whole SSH logins, end to end: the OpenSSH client against a private sshd on 127.0.0.1.

Each sample is one `ssh -i KEY user@127.0.0.1 true` that succeeds: process start of
the client to its exit, so key exchange, the host key, the public key, the second
factor (if any), account and session setup, running `true` and the teardown. Four
sshds, each a symlink to /usr/sbin/sshd under a unique name (sshd uses its program
name as PAM service, so it reads our /etc/pam.d/<name> and never the host's sshd
files), each with its own sshd_config, host key and port:

- key only: AuthenticationMethods publickey (PAM is not asked to authenticate;
  account and session still go through it, as in the others);
- otpgate, prompt when needed / prompt always: AuthenticationMethods
  publickey,keyboard-interactive (the shipped drop-in) with the shipped
  otpgate-ssh-publickey / otpgate-ssh-publickey-always stacks, pointed at this
  checkout's hook and a bench otpgated's pam.sock (hook calls per login: 2 / 1);
- pam_google_authenticator: the same drop-in, `auth required
  pam_google_authenticator.so` (the user's ~/.google_authenticator: TOTP,
  DISALLOW_REUSE, WINDOW_SIZE 3) and pam_permit for setcred.

ssh types the code through SSH_ASKPASS (SSH_ASKPASS_REQUIRE=force): a small Python
script that computes the user's TOTP code at that moment from a file named in its
environment, and logs the prompt (each 2FA login is checked to have been asked for a
code, the key-only one not). A code, once accepted, is spent, so every login uses its
own bench user, enrolled once. The stacks take turns sample by sample, in an order
that rotates each round.

Rows: per stack the median, IQR and p90 of the wall time of a login (ms) and its
ratio to key only; then "extra over key only": for each round, the 2FA stack's login
minus that round's key-only login (what the second factor costs a whole login), and
the ratios of otpgate's extra to pam_google_authenticator's.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyotp

from bench.lib import HOOK, REPO, Row, bench_daemon, percentile, stats_ms
from otpgate.v1 import otpgate_pb2 as pb

SECTION = "ssh login"
SSHD = "/usr/sbin/sshd"
PACKAGING = REPO / "packaging"
SHIPPED_HOOK = "/usr/local/lib/otpgate/otpgate-pam-hook"
KEY_ONLY = "key only"
WHEN_NEEDED = "otpgate, prompt when needed (2 hook calls)"
ALWAYS = "otpgate, prompt always (1 hook call)"
GA = "pam_google_authenticator"

# The askpass program: prints the current TOTP code of the secret in $OGB_SECRET_FILE
# (stdlib only: it starts as fast as it can) and logs the prompt to $OGB_PROMPTS.
ASKPASS = """#!/usr/bin/python3 -IS
import base64, hashlib, hmac, os, struct, sys, time
with open(os.environ["OGB_PROMPTS"], "a") as log:
    log.write((sys.argv[1] if len(sys.argv) > 1 else "").replace("\\n", " ") + "\\n")
with open(os.environ["OGB_SECRET_FILE"]) as f:
    key = base64.b32decode(f.read().strip().upper())
mac = hmac.new(key, struct.pack(">Q", int(time.time()) // 30), hashlib.sha1).digest()
o = mac[-1] & 15
print("%06d" % ((struct.unpack(">I", mac[o : o + 4])[0] & 0x7FFFFFFF) % 1000000))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Sshd:
    """A private sshd; `auth` is its PAM auth stack, `methods` its AuthenticationMethods."""

    root: Path
    auth: str
    methods: str
    authorized_keys: Path
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.name = f"sshd-bench{secrets.token_hex(4)}"
        self.port = _free_port()
        self.pam_file = Path("/etc/pam.d") / self.name

    def start(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
        hostkey = self.root / f"{self.name}.hostkey"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True
        )
        if self.methods == "publickey":
            dropin = "UsePAM yes\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            dropin += "KbdInteractiveAuthentication no\nAuthenticationMethods publickey\n"
        else:  # the shipped one: publickey,keyboard-interactive
            dropin = (PACKAGING / "sshd_config.d" / "otpgate-publickey.conf").read_text()
        config = self.root / f"{self.name}.conf"
        # The drop-in first: sshd keeps the first value it reads.
        config.write_text(
            dropin + f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\n"
            f"PidFile {self.root}/{self.name}.pid\nAuthorizedKeysFile {self.authorized_keys}\n"
            "StrictModes no\nMaxAuthTries 10\nMaxStartups 100\nLoginGraceTime 60\n"
            "UseDNS no\nPrintMotd no\nPrintLastLog no\nLogLevel ERROR\n"
        )
        self.pam_file.write_text(
            self.auth + "account required pam_unix.so\nsession required pam_permit.so\n"
            "password required pam_deny.so\n"
        )
        binary = self.root / self.name
        binary.symlink_to(SSHD)
        with open(self.root / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(binary), "-D", "-e", "-f", str(config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log()}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            time.sleep(0.02)
        raise TimeoutError("sshd did not listen")

    def log(self) -> str:
        path = self.root / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        self.pam_file.unlink(missing_ok=True)


@contextlib.contextmanager
def _shell_users(count: int, homes: Path) -> Iterator[list[str]]:
    """Local users with a shell (sshd runs `true` through it) and a home of their own."""
    tag = secrets.token_hex(2)
    names = [f"ogb{tag}s{i:04d}" for i in range(count)]
    lines = "".join(
        f"{n}:pw-{secrets.token_hex(8)}:::otpgate bench:{homes / n}:/bin/sh\n" for n in names
    )
    try:
        subprocess.run(["newusers"], input=lines, text=True, check=True)
        yield names
    finally:
        for name in names:
            subprocess.run(["userdel", name], capture_output=True)


def _login(sshd: Sshd, key: Path, user: str, secret_file: Path, prompts: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "SSH_AUTH_SOCK")}
    env.update(
        SSH_ASKPASS=str(prompts.parent / "askpass"),
        SSH_ASKPASS_REQUIRE="force",
        OGB_SECRET_FILE=str(secret_file),
        OGB_PROMPTS=str(prompts),
    )
    started = time.perf_counter()
    result = subprocess.run(
        ["ssh", "-F", "/dev/null", "-T", "-p", str(sshd.port), "-i", str(key),
         "-o", "IdentitiesOnly=yes", "-o", "BatchMode=no", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
         "-o", "PreferredAuthentications=publickey,keyboard-interactive",
         f"{user}@127.0.0.1", "true"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"{sshd.name}: login of {user} failed ({result.returncode}): "
            f"{result.stderr.strip()}\n{sshd.log()[-2000:]}"
        )
    return elapsed


def run(quick: bool) -> list[Row]:
    count = 10 if quick else 30
    stacks = (KEY_ONLY, WHEN_NEEDED, ALWAYS, GA)
    work = Path(tempfile.mkdtemp(prefix="otpgate-bench-ssh-"))
    work.chmod(0o755)  # sshd reads the authorized keys as the user; homes live here
    homes = work / "home"
    homes.mkdir(mode=0o755)
    sshds: list[Sshd] = []
    rows: list[Row] = []
    try:
        with _shell_users((count + 1) * len(stacks), homes) as names, bench_daemon() as daemon:
            daemon.start()
            admin = daemon.admin()
            admin.UpdateConfig(
                pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1), timeout=10
            )
            key = work / "client_key"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
            authorized = work / "authorized_keys"
            shutil.copy(key.with_suffix(".pub"), authorized)
            authorized.chmod(0o644)
            askpass = work / "askpass"
            askpass.write_text(ASKPASS)
            askpass.chmod(0o755)
            secrets_dir = work / "secrets"
            secrets_dir.mkdir(mode=0o700)
            # Users: stack k, round i (round 0 warms up, unmeasured).
            users = {
                s: names[k * (count + 1) : (k + 1) * (count + 1)] for k, s in enumerate(stacks)
            }
            for stack in (WHEN_NEEDED, ALWAYS):
                for name in users[stack]:
                    entry = admin.RenewSecret(pb.RenewSecretRequest(username=name), timeout=10)
                    uri = entry.twofactor_config.provisioning_uri
                    (secrets_dir / name).write_text(pyotp.parse_uri(uri).secret)
            for name in users[GA]:
                secret = base64.b32encode(os.urandom(20)).decode()
                (secrets_dir / name).write_text(secret)
                ga_file = homes / name / ".google_authenticator"
                ga_file.write_text(f'{secret}\n" WINDOW_SIZE 3\n" DISALLOW_REUSE\n" TOTP_AUTH\n')
                shutil.chown(ga_file, name, name)
                ga_file.chmod(0o400)
            for name in users[KEY_ONLY]:
                (secrets_dir / name).write_text(base64.b32encode(os.urandom(20)).decode())
            hook = f"{HOOK} "
            sock = daemon.socket("pam")
            auths = {KEY_ONLY: "auth required pam_deny.so\n", GA: (
                "auth required pam_google_authenticator.so\nauth required pam_permit.so\n"
            )}  # fmt: skip
            for stack, suffix in ((WHEN_NEEDED, ""), (ALWAYS, "-always")):
                text = (PACKAGING / "pam.d" / f"otpgate-ssh-publickey{suffix}").read_text()
                lines = []
                for line in text.splitlines():
                    if SHIPPED_HOOK in line:
                        line = line.replace(f"{SHIPPED_HOOK} ", hook) + f" socket={sock}"
                    lines.append(line + "\n")
                auths[stack] = "".join(lines)
            assert all(SHIPPED_HOOK not in a for a in auths.values())
            by_stack = {}
            for stack in stacks:
                methods = "publickey" if stack == KEY_ONLY else "publickey,keyboard-interactive"
                sshd = Sshd(work, auths[stack], methods, authorized)
                sshds.append(sshd)
                sshd.start()
                by_stack[stack] = sshd
            samples: dict[str, list[float]] = {s: [] for s in stacks}
            for i in range(count + 1):
                for k in range(len(stacks)):
                    stack = stacks[(i + k) % len(stacks)]
                    user = users[stack][i]
                    prompts = work / f"prompts-{user}"
                    prompts.touch()
                    elapsed = _login(by_stack[stack], key, user, secrets_dir / user, prompts)
                    asked = len(prompts.read_text().splitlines())
                    if asked != (0 if stack == KEY_ONLY else 1):
                        raise RuntimeError(f"{stack}: {user} was asked {asked} times")
                    if i > 0:
                        samples[stack].append(elapsed)
            rows = _rows(samples)
    finally:
        for sshd in sshds:
            sshd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _rows(samples: dict[str, list[float]]) -> list[Row]:
    """Per stack, then the second factor's extra over the same round's key-only login."""
    rows = []
    medians = {s: statistics.median(v) * 1000 for s, v in samples.items()}
    key_only, ga = medians[KEY_ONLY], medians[GA]
    for stack, values in samples.items():
        median, spread = stats_ms(values)
        spread += f", p90 {percentile(values, 0.9) * 1000:.2f}"
        note = ""
        if stack != KEY_ONLY:
            note = f"{median / key_only:.2f}x key only"
        if stack in (WHEN_NEEDED, ALWAYS):
            note += f", {median / ga:.2f}x google-authenticator"
        rows.append(Row(SECTION, f"login: {stack}", median, spread, "ms", note))
    extras = {}
    for stack in (WHEN_NEEDED, ALWAYS, GA):
        paired = [a - b for a, b in zip(samples[stack], samples[KEY_ONLY], strict=True)]
        median, spread = stats_ms(paired)
        extras[stack] = median
        note = f"difference of medians {medians[stack] - key_only:+.2f} ms"
        rows.append(Row(SECTION, f"extra over key only: {stack}", median, spread, "ms", note))
    for stack in (WHEN_NEEDED, ALWAYS):
        rows.append(
            Row(
                SECTION,
                f"extra ratio: {stack} / pam_google_authenticator",
                extras[stack] / extras[GA],
                "",
                "x",
                "of the medians of the extras above",
            )
        )
    return rows
