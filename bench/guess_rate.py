"""Password guessing by an ordinary local user: through su, and through user.sock.

The reference is su, one attempt at a time (its pam_unix failure delay). Through
otpgate an ordinary user may not check another account's password at all (the
kernel names the caller; LoginEx for someone else is refused unchecked), and their
own is throttled per account: the row counts the checks that actually ran while
16 connections guessed as fast as the daemon answered.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.lib import REPO, BenchDaemon, Row, bench_users

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
SU = shutil.which("su") or "/bin/su"

_GUESSER = """
import grpc, json, sys, threading, time
from otpgate.v1 import otpgate_pb2 as pb, otpgate_pb2_grpc as pb_grpc
sock, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
counts, lock = {}, threading.Lock()
def guess(i):
    stub = pb_grpc.UserSelfServiceStub(grpc.insecure_channel("unix:" + sock))
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        try:
            reply = stub.LoginEx(pb.LoginExRequest(mechanism=pb.PASSWORD_PLAIN,
                username=target, password=f"wrong-{i}-{n}"), timeout=10)
            answer = pb.ResponseType.Name(reply.response_type)
        except grpc.RpcError as exc:
            answer = exc.code().name
        n += 1
        with lock:
            counts[answer] = counts.get(answer, 0) + 1
threads = [threading.Thread(target=guess, args=(i,)) for i in range(16)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(counts))
"""


def _su_attempt(attacker: str, victim: str) -> float:
    """Seconds for one wrong password typed to `su victim`, run by `attacker`."""
    master, slave = pty.openpty()
    started = time.monotonic()
    proc = subprocess.Popen(
        [RUNUSER, "-u", attacker, "--", SU, victim, "-c", "true"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True, cwd="/",
    )  # fmt: skip
    os.close(slave)
    try:
        seen = b""
        while b"assword" not in seen:
            ready, _, _ = select.select([master], [], [], 10)
            if not ready:
                raise RuntimeError("su did not ask for a password")
            seen += os.read(master, 1024)
        os.write(master, b"not-the-password\n")
        proc.wait(timeout=30)
    finally:
        os.close(master)
    return time.monotonic() - started


@contextlib.contextmanager
def _public_daemon(service: str) -> Iterator[BenchDaemon]:
    # Other users must reach user.sock: a traversable root, unlike bench_daemon's.
    root = Path(tempfile.mkdtemp(prefix="otpgate-bench-guess-"))
    root.chmod(0o755)
    daemon = BenchDaemon(root, None, "--password-pam-service", service)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def _otpgate_guesses(daemon: BenchDaemon, attacker: str, target: str, seconds: float) -> dict:
    out = subprocess.run(
        [RUNUSER, "-u", attacker, "--", sys.executable, "-c", _GUESSER,
         daemon.socket("user"), target, str(seconds)],
        capture_output=True, text=True, check=True, cwd="/", timeout=seconds + 120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "daemon")},
    )  # fmt: skip
    counts: dict = json.loads(out.stdout.strip().splitlines()[-1])
    return counts


def run(quick: bool) -> list[Row]:
    su_tries = 2 if quick else 4
    seconds = 10.0 if quick else 30.0
    service = f"otpgate-bench-pw-{secrets.token_hex(4)}"
    pam_file = Path("/etc/pam.d", service)
    pam_file.write_text((REPO / "packaging" / "pam.d" / "otpgate").read_text())
    try:
        with bench_users(2) as users, _public_daemon(service) as daemon:
            (attacker, _), (victim, _) = users
            su_times = [_su_attempt(attacker, victim) for _ in range(su_tries)]
            su_rate = su_tries / sum(su_times)
            daemon.start()
            other = _otpgate_guesses(daemon, attacker, victim, min(seconds, 5.0))
            own = _otpgate_guesses(daemon, attacker, attacker, seconds)
    finally:
        pam_file.unlink()
    checked = own.get("AUTH_ERR", 0)
    own_rate = checked / seconds
    refused = sum(v for k, v in own.items() if k != "AUTH_ERR")
    return [
        Row("guessing", "su, one attempt at a time (reference)", su_rate, f"{su_tries} tries",
            "guesses/s", f"{sum(su_times) / su_tries:.2f} s per wrong password"),
        Row("guessing", "otpgate LoginEx, another account, 16 connections",
            other.get("AUTH_ERR", 0) / 5.0, f"answers {other}", "guesses/s",
            "refused before any check: PERMISSION_DENIED"),
        Row("guessing", f"otpgate LoginEx, own account, 16 connections, {seconds:.0f} s",
            own_rate, f"{checked} checked, {refused} refused unchecked", "guesses/s",
            f"{own_rate / su_rate:.2f}x su" if su_rate else ""),
    ]  # fmt: skip
