"""Whole SSH logins, end to end: the OpenSSH client against a private sshd on 127.0.0.1.

Each sample is one `ssh user@127.0.0.1 true` that succeeds: process start of the
client to its exit, so key exchange, the host key, the first factor (public key or
password), the second factor (if any), account and session setup, running `true`
and the teardown. Seven sshds, each a symlink to /usr/sbin/sshd under a unique name
(sshd uses its program name as PAM service, so it reads our /etc/pam.d/<name> and
never the host's sshd files), each with its own sshd_config, host key and port.

Key first (`ssh -i KEY`):

- key only: AuthenticationMethods publickey (PAM is not asked to authenticate;
  account and session still go through it, as in all the others);
- otpgate, prompt when needed / prompt always: AuthenticationMethods
  publickey,keyboard-interactive (the shipped drop-in) with the shipped
  otpgate-ssh-publickey / otpgate-ssh-publickey-always stacks, pointed at this
  checkout's hook, a bench otpgated's pam.sock and its runtime_dir/gate files.
  One hook call per login in both: prompt when needed reads the daemon's gate files
  in-process (pam_listfile, pam_access), which list every bench account, so `check`
  is skipped and only `verify` runs (the run checks the `ask` file lists them all
  before it times anything);
- pam_google_authenticator: the same drop-in, `auth required
  pam_google_authenticator.so` (the user's ~/.google_authenticator: TOTP,
  DISALLOW_REUSE, WINDOW_SIZE 3) and pam_permit for setcred.

Password first (`ssh -o PubkeyAuthentication=no`, the password through the
password method):

- password only: AuthenticationMethods password, `auth required pam_unix.so`
  (common-auth's job);
- otpgate, prompt when needed: the shipped otpgate-password.conf
  (password,keyboard-interactive) and otpgate-ssh-password stack: pam_unix in the
  password round, the gate and `verify` in the keyboard-interactive round (one hook
  call; each round also starts one /bin/sh, which tells the rounds apart);
- pam_google_authenticator: the same sshd settings and the same stack with
  pam_google_authenticator.so and pam_permit where otpgate's gate and hook are.

ssh answers every prompt through SSH_ASKPASS (SSH_ASKPASS_REQUIRE=force): a small
Python script that types the user's password at ssh's password prompt and otherwise
the user's TOTP code at that moment, from a file named in its environment, and logs
each prompt; every login is checked to have been asked exactly what its stack asks
(nothing, the password, a code, or the password then a code). A code, once
accepted, is spent, so every login uses its own bench user, enrolled once. The
stacks take turns sample by sample, in an order that rotates each round.

Rows: per stack the median, IQR and p90 of the wall time of a login (ms), its ratio
to its first factor alone (key only, password only) and, for otpgate, to
pam_google_authenticator in the same flow; then "extra over ...": for each round,
the 2FA stack's login minus that round's login with the first factor alone (what
the second factor costs a whole login), and the ratios of otpgate's extra to
pam_google_authenticator's.
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
SHIPPED_GATE = "/run/otpgate/gate"
KEY_ONLY = "key only"
WHEN_NEEDED = "key + otpgate, prompt when needed (1 hook call)"
ALWAYS = "key + otpgate, prompt always (1 hook call)"
GA = "key + pam_google_authenticator"
PASSWORD_ONLY = "password only"
PASSWORD_WHEN_NEEDED = "password + otpgate, prompt when needed (1 hook call)"
PASSWORD_GA = "password + pam_google_authenticator"
STACKS = (KEY_ONLY, WHEN_NEEDED, ALWAYS, GA, PASSWORD_ONLY, PASSWORD_WHEN_NEEDED, PASSWORD_GA)
OTPGATE = (WHEN_NEEDED, ALWAYS, PASSWORD_WHEN_NEEDED)
GOOGLE = (GA, PASSWORD_GA)
# Each 2FA stack's login with its first factor alone, and otpgate's rival in its flow.
FIRST_FACTOR = {WHEN_NEEDED: KEY_ONLY, ALWAYS: KEY_ONLY, GA: KEY_ONLY,
                PASSWORD_WHEN_NEEDED: PASSWORD_ONLY, PASSWORD_GA: PASSWORD_ONLY}  # fmt: skip
RIVAL = {WHEN_NEEDED: GA, ALWAYS: GA, PASSWORD_WHEN_NEEDED: PASSWORD_GA}
SHORT = {KEY_ONLY: "key only", PASSWORD_ONLY: "password only",
         GA: "google-authenticator", PASSWORD_GA: "google-authenticator"}  # fmt: skip
PASSWORD_FLOWS = (PASSWORD_ONLY, PASSWORD_WHEN_NEEDED, PASSWORD_GA)
METHODS = (
    {KEY_ONLY: "publickey", PASSWORD_ONLY: "password"}
    | {s: "publickey,keyboard-interactive" for s in (WHEN_NEEDED, ALWAYS, GA)}
    | {s: "password,keyboard-interactive" for s in (PASSWORD_WHEN_NEEDED, PASSWORD_GA)}
)
# What the askpass program must have been asked, in order, in one login.
ASKED = (
    {KEY_ONLY: [], PASSWORD_ONLY: ["password"]}
    | {s: ["code"] for s in (WHEN_NEEDED, ALWAYS, GA)}
    | {s: ["password", "code"] for s in (PASSWORD_WHEN_NEEDED, PASSWORD_GA)}
)
DROPINS = {
    "publickey": "UsePAM yes\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
    "KbdInteractiveAuthentication no\nAuthenticationMethods publickey\n",
    "password": "UsePAM yes\nPasswordAuthentication yes\nKbdInteractiveAuthentication no\n"
    "AuthenticationMethods password\n",
    "publickey,keyboard-interactive": "otpgate-publickey.conf",  # the shipped ones
    "password,keyboard-interactive": "otpgate-password.conf",
}
GA_LINES = "auth required pam_google_authenticator.so\nauth required pam_permit.so\n"
# otpgate-ssh-password's first two lines: the rounds told apart, pam_unix in the first.
PASSWORD_ROUNDS = (
    'auth [success=1 default=ignore] pam_exec.so quiet /bin/sh -c [test -n "$SSH_AUTH_INFO_0"]\n'
    "auth [success=done default=die] pam_unix.so\n"
)

# The askpass program: at ssh's own password prompt ("user@host's password: ") prints
# $OGB_PASSWORD, at any other the current TOTP code of the secret in $OGB_SECRET_FILE
# (stdlib only: it starts as fast as it can); logs what it answered to $OGB_PROMPTS.
ASKPASS = """#!/usr/bin/python3 -IS
import os, sys
prompt = sys.argv[1] if len(sys.argv) > 1 else ""
kind = "password" if prompt.endswith("'s password: ") else "code"
with open(os.environ["OGB_PROMPTS"], "a") as log:
    log.write(kind + "\\t" + prompt.replace("\\n", " ") + "\\n")
if kind == "password":
    print(os.environ["OGB_PASSWORD"])
    sys.exit()
import base64, hashlib, hmac, struct, time
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
        dropin = DROPINS[self.methods]
        if dropin.endswith(".conf"):
            dropin = (PACKAGING / "sshd_config.d" / dropin).read_text()
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
def _shell_users(count: int, homes: Path) -> Iterator[list[tuple[str, str]]]:
    """Local users (name, password) with a shell (sshd runs `true` through it) and a
    home of their own."""
    tag = secrets.token_hex(2)
    users = [(f"ogb{tag}s{i:04d}", f"pw-{secrets.token_hex(8)}") for i in range(count)]
    lines = "".join(f"{n}:{pw}:::otpgate bench:{homes / n}:/bin/sh\n" for n, pw in users)
    try:
        subprocess.run(["newusers"], input=lines, text=True, check=True)
        yield users
    finally:
        for name, _ in users:
            subprocess.run(["userdel", name], capture_output=True)


def _login(
    sshd: Sshd, key: Path | None, user: str, password: str, secret_file: Path, prompts: Path
) -> float:
    """One login; `key` None: by password (the password method), else by that key."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "SSH_AUTH_SOCK")}
    env.update(
        SSH_ASKPASS=str(prompts.parent / "askpass"),
        SSH_ASKPASS_REQUIRE="force",
        OGB_SECRET_FILE=str(secret_file),
        OGB_PASSWORD=password,
        OGB_PROMPTS=str(prompts),
    )
    if key is None:
        first = ["-o", "PubkeyAuthentication=no",
                 "-o", "PreferredAuthentications=password,keyboard-interactive"]  # fmt: skip
    else:
        first = ["-i", str(key), "-o", "IdentitiesOnly=yes",
                 "-o", "PreferredAuthentications=publickey,keyboard-interactive"]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(
        ["ssh", "-F", "/dev/null", "-T", "-p", str(sshd.port), *first,
         "-o", "BatchMode=no", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
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


def _otpgate_stack(name: str, hook_socket: str, gate_dir: Path) -> str:
    """A shipped stack pointed at this checkout's hook and the bench daemon."""
    text = (PACKAGING / "pam.d" / name).read_text().replace(SHIPPED_GATE, str(gate_dir))
    lines = []
    for line in text.splitlines():
        if SHIPPED_HOOK in line:
            line = line.replace(f"{SHIPPED_HOOK} ", f"{HOOK} ") + f" socket={hook_socket}"
        lines.append(line + "\n")
    return "".join(lines)


def _wait_listed(gate_dir: Path, names: list[str], timeout: float = 15) -> None:
    """Until the daemon's gate files send all of `names` straight to the prompt."""
    ask = gate_dir / "ask"
    deadline = time.monotonic() + timeout
    missing = set(names)
    while True:
        with contextlib.suppress(FileNotFoundError):
            missing = set(names) - set(ask.read_text().split())
        if not missing:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ask}: {len(missing)} of {len(names)} accounts not listed")
        time.sleep(0.05)
    # No exempt network: pam_access succeeds for every address, so `check` is skipped.
    rules = (gate_dir / "networks.conf").read_text().splitlines()
    rules = [r for r in rules if r.strip() and not r.startswith("#")]
    if rules != ["+ : ALL : ALL"]:
        raise RuntimeError(f"{gate_dir}/networks.conf: unexpected rules {rules}")


def run(quick: bool) -> list[Row]:
    count = 10 if quick else 30
    work = Path(tempfile.mkdtemp(prefix="otpgate-bench-ssh-"))
    work.chmod(0o755)  # sshd reads the authorized keys as the user; homes live here
    homes = work / "home"
    homes.mkdir(mode=0o755)
    sshds: list[Sshd] = []
    rows: list[Row] = []
    try:
        with _shell_users((count + 1) * len(STACKS), homes) as everyone, bench_daemon() as daemon:
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
            passwords = dict(everyone)
            names = [name for name, _ in everyone]
            # Users: stack k, round i (round 0 warms up, unmeasured).
            users = {
                s: names[k * (count + 1) : (k + 1) * (count + 1)] for k, s in enumerate(STACKS)
            }
            enrolled = [name for stack in OTPGATE for name in users[stack]]
            for name in enrolled:
                entry = admin.RenewSecret(pb.RenewSecretRequest(username=name), timeout=10)
                uri = entry.twofactor_config.provisioning_uri
                (secrets_dir / name).write_text(pyotp.parse_uri(uri).secret)
            for name in (n for stack in GOOGLE for n in users[stack]):
                secret = base64.b32encode(os.urandom(20)).decode()
                (secrets_dir / name).write_text(secret)
                ga_file = homes / name / ".google_authenticator"
                ga_file.write_text(f'{secret}\n" WINDOW_SIZE 3\n" DISALLOW_REUSE\n" TOTP_AUTH\n')
                shutil.chown(ga_file, name, name)
                ga_file.chmod(0o400)
            for name in users[KEY_ONLY] + users[PASSWORD_ONLY]:
                (secrets_dir / name).write_text(base64.b32encode(os.urandom(20)).decode())
            sock = daemon.socket("pam")
            gate_dir = Path(sock).parent / "gate"  # the daemon's runtime_dir/gate
            _wait_listed(gate_dir, enrolled)
            auths = {
                KEY_ONLY: "auth required pam_deny.so\n",
                WHEN_NEEDED: _otpgate_stack("otpgate-ssh-publickey", sock, gate_dir),
                ALWAYS: _otpgate_stack("otpgate-ssh-publickey-always", sock, gate_dir),
                GA: GA_LINES,
                PASSWORD_ONLY: "auth required pam_unix.so\n",
                PASSWORD_WHEN_NEEDED: _otpgate_stack("otpgate-ssh-password", sock, gate_dir),
                PASSWORD_GA: PASSWORD_ROUNDS + GA_LINES,
            }
            for auth in auths.values():
                assert SHIPPED_HOOK not in auth and SHIPPED_GATE not in auth, auth
            for stack in (WHEN_NEEDED, PASSWORD_WHEN_NEEDED):
                assert f"file={gate_dir}/ask" in auths[stack], auths[stack]
                assert f"accessfile={gate_dir}/networks.conf" in auths[stack], auths[stack]
            by_stack = {}
            for stack in STACKS:
                sshd = Sshd(work, auths[stack], METHODS[stack], authorized)
                sshds.append(sshd)
                sshd.start()
                by_stack[stack] = sshd
            samples: dict[str, list[float]] = {s: [] for s in STACKS}
            for i in range(count + 1):
                for k in range(len(STACKS)):
                    stack = STACKS[(i + k) % len(STACKS)]
                    user = users[stack][i]
                    prompts = work / f"prompts-{user}"
                    prompts.touch()
                    by_key = None if stack in PASSWORD_FLOWS else key
                    elapsed = _login(
                        by_stack[stack], by_key, user, passwords[user], secrets_dir / user, prompts
                    )
                    asked = [line.split("\t") for line in prompts.read_text().splitlines()]
                    if [kind for kind, _ in asked] != ASKED[stack] or any(
                        kind == "code" and "Verification code" not in text for kind, text in asked
                    ):
                        raise RuntimeError(f"{stack}: {user} was asked {asked}")
                    if i > 0:
                        samples[stack].append(elapsed)
            rows = _rows(samples)
    finally:
        for sshd in sshds:
            sshd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _rows(samples: dict[str, list[float]]) -> list[Row]:
    """Per stack, then the second factor's extra over the same round's first factor alone."""
    rows = []
    medians = {s: statistics.median(v) * 1000 for s, v in samples.items()}
    for stack, values in samples.items():
        median, spread = stats_ms(values)
        spread += f", p90 {percentile(values, 0.9) * 1000:.2f}"
        notes = [f"{median / medians[s]:.2f}x {SHORT[s]}" for s in
                 (FIRST_FACTOR.get(stack), RIVAL.get(stack)) if s is not None]  # fmt: skip
        rows.append(Row(SECTION, f"login: {stack}", median, spread, "ms", ", ".join(notes)))
    extras = {}
    for stack, first in FIRST_FACTOR.items():
        paired = [a - b for a, b in zip(samples[stack], samples[first], strict=True)]
        median, spread = stats_ms(paired)
        extras[stack] = median
        note = f"difference of medians {medians[stack] - medians[first]:+.2f} ms"
        rows.append(Row(SECTION, f"extra over {first}: {stack}", median, spread, "ms", note))
    for stack, rival in RIVAL.items():
        rows.append(
            Row(
                SECTION,
                f"extra ratio: {stack} / {SHORT[rival]}",
                extras[stack] / extras[rival],
                "",
                "x",
                "of the medians of the extras above",
            )
        )
    return rows
