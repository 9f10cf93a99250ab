"""Scale: verification latency, bytes per user, start time and memory with 1,000 /
100,000 / 1,000,000 enrolled users, on SQLite and on PostgreSQL (TCP loopback);
and pam_oath with a users file of each size.

The store is filled directly (sealed like the daemon seals; SQLite by executemany,
PostgreSQL by COPY), plus a few real NSS accounts enrolled through the API: those
are the ones that log in. Every daemon shares one key, so the sealed rows are made
once. All six daemons then run at once and are measured in interleaved rounds, so
the ratios (1,000,000 users against 1,000, PostgreSQL against SQLite) compare
samples taken seconds apart on this noisy VM.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.lib import BenchDaemon, Row, bench_daemon, bench_users, enroll, percentile, stats_ms
from bench.pg import BenchPg, bench_pg
from otpgate.core.crypto import Keyring, account_binding, load_key_file
from otpgate.v1 import otpgate_pb2 as pb

Row_ = tuple[str, int, str, bytes, bytes, int, int, int]
BACKENDS = ("SQLite", "PostgreSQL")
ENROLLED = 32  # real accounts, the ones that log in


def _sealed_rows(key_file: Path, count: int) -> list[Row_]:
    keyring = Keyring(load_key_file(str(key_file)))
    rows: list[Row_] = []
    for i in range(count):
        name, uid = f"scale{i:07d}", 3_000_000 + i
        secret = base64.b32encode(os.urandom(20))
        sealed = keyring.seal(secret, account_binding(name, uid))
        rows.append((name, uid, sealed.key_id, sealed.nonce, sealed.ciphertext, 6, 30, 0))
    return rows


def _fill(database: Path, rows: list[Row_]) -> None:
    db = sqlite3.connect(database)
    db.execute("PRAGMA journal_mode=WAL")
    with db:
        db.executemany(
            "INSERT INTO secrets (username, uid, key_id, nonce, ciphertext, otp_digits, interval,"
            " created_at) VALUES (?,?,?,?,?,?,?,?)",
            rows,
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


def _verify_round(daemon: BenchDaemon, names: list[str], calls: int) -> list[float]:
    pam = daemon.pam()
    latencies = []
    for i in range(calls):
        request = pb.PamRequest(username=names[i % len(names)], service="sshd", authtok="000000")
        started = time.perf_counter()
        pam.Verify(request, timeout=30)
        latencies.append(time.perf_counter() - started)
    return latencies


def _prepare(
    daemon: BenchDaemon, names: list[str], pg: BenchPg, dbname: str | None, rows: list[Row_]
) -> float:
    """Enroll the real accounts, fill the rest, restart; seconds the fill took."""
    daemon.start()
    daemon.admin().UpdateConfig(
        pb.UpdateConfigRequest(enabled=True, services_ssh=True, lockout_threshold=100),
        timeout=10,
    )
    enroll(daemon, names)
    daemon.stop()
    started = time.monotonic()
    if dbname is None:
        _fill(daemon.root / "state" / "otpgate.sqlite3", rows)
    else:
        pg.fill(dbname, rows)
    return time.monotonic() - started


def run(quick: bool) -> list[Row]:
    rows: list[Row] = []
    sizes = (1_000, 100_000) if quick else (1_000, 100_000, 1_000_000)
    rounds, per_round = (4, 100) if quick else (10, 100)
    with bench_users(ENROLLED) as users, bench_pg() as pg, contextlib.ExitStack() as stack:
        names = [n for n, _ in users]
        first = stack.enter_context(bench_daemon())
        first.start()  # makes the key every other daemon copies
        first.stop()
        started = time.monotonic()
        sealed = _sealed_rows(first.root / "key", max(sizes) - ENROLLED)
        seal_seconds = time.monotonic() - started
        daemons: dict[tuple[str, int], BenchDaemon] = {}
        databases: dict[int, str] = {}
        fills: dict[tuple[str, int], float] = {}
        for backend in BACKENDS:
            for size in sizes:
                if backend == "SQLite":
                    dbname = None
                    daemon = first if size == sizes[0] else stack.enter_context(
                        bench_daemon(None, key_from=first.root / "key")
                    )  # fmt: skip
                else:
                    dbname = databases[size] = pg.create_database()
                    daemon = stack.enter_context(
                        bench_daemon(None, *pg.daemon_args(dbname), key_from=first.root / "key")
                    )
                daemons[backend, size] = daemon
                fills[backend, size] = _prepare(
                    daemon, names, pg, dbname, sealed[: size - ENROLLED]
                )
        del sealed
        starts = {where: daemon.start() for where, daemon in daemons.items()}
        latencies: dict[tuple[str, int], list[float]] = {where: [] for where in daemons}
        p50s: dict[tuple[str, int], list[float]] = {where: [] for where in daemons}
        order = list(daemons)
        for r in range(rounds):
            for where in order[r % len(order) :] + order[: r % len(order)]:
                samples = _verify_round(daemons[where], names, per_round)
                latencies[where] += samples
                p50s[where].append(statistics.median(samples))
        rss = {where: daemon.rss_mb() for where, daemon in daemons.items()}
        for daemon in daemons.values():
            daemon.stop()
        for backend in BACKENDS:
            for size in sizes:
                where = (backend, size)
                label = f"{backend}, {size:,} users"
                median, spread = stats_ms(latencies[where])
                spread += f", p99 {percentile(latencies[where], 0.99) * 1000:.2f}"
                ratios = [a / b for a, b in zip(p50s[where], p50s[backend, sizes[0]], strict=True)]
                note = "1 caller"
                if size != sizes[0]:
                    note += (f"; p50 {statistics.median(ratios):.2f}x {sizes[0]:,} users' "
                             f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
                if backend != "SQLite":
                    vs = [a / b for a, b in zip(p50s[where], p50s["SQLite", size], strict=True)]
                    note += f"; p50 {statistics.median(vs):.2f}x SQLite's"
                if backend == "SQLite":
                    state = daemons[where].root / "state"
                    size_bytes = sum(p.stat().st_size for p in state.iterdir())
                    size_note = "database files"
                    fill_note = "executemany, one transaction"
                else:
                    size_bytes = pg.secrets_bytes(databases[size])
                    size_note = "pg_total_relation_size(secrets): heap, TOAST, indexes"
                    fill_note = "COPY (binary) + VACUUM ANALYZE"
                rows += [
                    Row("scale", f"Verify latency, {label}", median, spread, "ms", note),
                    Row("scale", f"store size, {label}", size_bytes / size, "", "bytes/user",
                        size_note),
                    Row("scale", f"daemon start, {label}", starts[where] * 1000, "", "ms",
                        "process start to serving"),
                    Row("scale", f"resident memory, {label}", rss[where], "", "MB"),
                    Row("scale", f"fill, {label}", fills[where], "", "s",
                        f"{size - ENROLLED:,} rows; {fill_note}; sealing them took "
                        f"{seal_seconds * (size - ENROLLED) / (max(sizes) - ENROLLED):.1f} s"),
                ]  # fmt: skip
    for size in sizes:
        oath_median, oath_spread = _oath_latency(size, 3 if size >= 1_000_000 else 10)
        note = "pamtester; users at the end of the file"
        rows.append(
            Row("scale", f"pam_oath login, {size:,} users file", oath_median, oath_spread, "ms",
                note)
        )  # fmt: skip
    return rows
