"""Scale: verification latency, bytes per user, start time and memory with 1,000 /
100,000 / 1,000,000 enrolled users; and pam_oath with a users file of each size.

The store is filled directly (sealed like the daemon seals), plus a few real NSS
accounts enrolled through the API: those are the ones that log in.
"""

from __future__ import annotations

import base64
import os
import secrets
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import grpc

from bench.lib import Row, bench_daemon, bench_users, enroll, stats_ms
from otpgate.core.crypto import Keyring, account_binding, load_key_file
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc


def _fill(database: Path, key_file: Path, count: int) -> None:
    keyring = Keyring(load_key_file(str(key_file)))
    db = sqlite3.connect(database)
    db.execute("PRAGMA journal_mode=WAL")

    def rows():  # type: ignore[no-untyped-def]
        for i in range(count):
            name, uid = f"scale{i:07d}", 3_000_000 + i
            secret = base64.b32encode(os.urandom(20))
            sealed = keyring.seal(secret, account_binding(name, uid))
            yield (name, uid, sealed.key_id, sealed.nonce, sealed.ciphertext, 6, 30, 0)

    with db:
        db.executemany(
            "INSERT INTO secrets (username, uid, key_id, nonce, ciphertext, otp_digits, interval,"
            " created_at) VALUES (?,?,?,?,?,?,?,?)",
            rows(),
        )
    db.close()


def _oath_latency(count: int, samples: int) -> tuple[float, str]:
    workdir = Path(tempfile.mkdtemp(prefix="otpgate-bench-oath-"))
    secret_hex = os.urandom(20).hex()
    users_file = workdir / "users.oath"
    with open(users_file, "w") as f:
        for i in range(count):
            f.write(f"HOTP/T30 oath{i:07d} - {secret_hex}\n")
    users_file.chmod(0o600)
    service = f"otpgate-bench-oath-{secrets.token_hex(4)}"
    Path("/etc/pam.d", service).write_text(
        f"auth requisite pam_oath.so usersfile={users_file} window=1\n"
        "auth required pam_permit.so\naccount required pam_permit.so\n"
    )
    import pyotp

    code = pyotp.TOTP(base64.b32encode(bytes.fromhex(secret_hex)).decode())
    times = []
    try:
        for i in range(samples):  # users at the end of the file: its worst case
            user = f"oath{count - 1 - i:07d}"
            started = time.perf_counter()
            result = subprocess.run(
                ["pamtester", service, user, "authenticate"],
                input=code.now() + "\n", capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            times.append(time.perf_counter() - started)
            if result.returncode != 0:
                raise RuntimeError(f"pam_oath refused: {result.stderr!r}")
    finally:
        Path("/etc/pam.d", service).unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", str(workdir)])
    return stats_ms(times)


def run(quick: bool) -> list[Row]:
    rows: list[Row] = []
    sizes = (1_000, 100_000) if quick else (1_000, 100_000, 1_000_000)
    with bench_users(32) as users:
        names = [n for n, _ in users]
        for size in sizes:
            with bench_daemon() as daemon:
                daemon.start()
                daemon.admin().UpdateConfig(
                    pb.UpdateConfigRequest(enabled=True, services_ssh=True, lockout_threshold=100),
                    timeout=10,
                )
                enroll(daemon, names)
                daemon.stop()
                _fill(daemon.root / "state" / "otpgate.sqlite3", daemon.root / "key", size - 32)
                start_seconds = daemon.start()
                pam = pb_grpc.PamGateStub(grpc.insecure_channel("unix:" + daemon.socket("pam")))
                latencies = []
                for i in range(1000):
                    request = pb.PamRequest(
                        username=names[i % 32], service="sshd", authtok="000000"
                    )
                    started = time.perf_counter()
                    pam.Verify(request, timeout=30)
                    latencies.append(time.perf_counter() - started)
                rss = daemon.rss_mb()
                daemon.stop()
                state = daemon.root / "state"
                size_bytes = sum(p.stat().st_size for p in state.iterdir())
                median, spread = stats_ms(latencies)
                label = f"{size:,} users"
                rows += [
                    Row("scale", f"Verify latency, {label}", median, spread, "ms", "1 caller"),
                    Row("scale", f"store size, {label}", size_bytes / size, "", "bytes/user"),
                    Row(
                        "scale",
                        f"daemon start, {label}",
                        start_seconds * 1000,
                        "",
                        "ms",
                        "process start to serving",
                    ),
                    Row("scale", f"resident memory, {label}", rss, "", "MB"),
                ]
            oath_median, oath_spread = _oath_latency(size, 3 if size >= 1_000_000 else 10)
            note = "pamtester; users at the end of the file"
            rows.append(
                Row("scale", f"pam_oath login, {label} file", oath_median, oath_spread, "ms", note)
            )
    return rows
