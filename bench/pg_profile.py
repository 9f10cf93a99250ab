"""Where a Verify's time goes on PostgreSQL, against SQLite (not in the default run:
`python -m bench.run --only pg_profile`).

One daemon on SQLite and one on PostgreSQL over TCP loopback, both under
bench.profiled (wall-clock timers on the verification path), pinned with the
database's processes to the server core; one caller on the other core sends wrong
codes to each in turn, as the scale section does. Rows: each timer's time per
Verify (its total over the number of Verifies) with its calls per Verify; the
daemons' and the database's CPU per call; from pg_stat_statements, what each
statement costs inside the server; then, with 64 callers (where the server core
is the limit), each daemon under cProfile with a CPU clock in every thread: the
share of the daemon's CPU that each part of the verification path takes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from bench.lib import BenchDaemon, Row, bench_daemon, bench_users, cpu_split, enroll, percentile
from bench.pg import BenchPg, bench_pg
from otpgate.v1 import otpgate_pb2 as pb

SECTION = "pg profile"
VERIFY = "Gate.verify (whole Verify but gRPC)"


def _round(daemon: BenchDaemon, names: list[str], calls: int) -> list[float]:
    pam = daemon.pam()
    latencies = []
    for i in range(calls):
        request = pb.PamRequest(username=names[i % len(names)], service="sshd", authtok="000000")
        started = time.perf_counter()
        pam.Verify(request, timeout=30)
        latencies.append(time.perf_counter() - started)
    return latencies


def _timer_rows(backend: str, samples: dict[str, list[float]]) -> list[Row]:
    verifies = len(samples.get(VERIFY, [])) or 1
    rows = []
    for name, values in sorted(samples.items(), key=lambda kv: -sum(kv[1])):
        if len(values) < verifies / 2:
            continue  # start-up and enrollment: not the verification path
        rows.append(
            Row(SECTION, f"{backend}: {name}", sum(values) / verifies * 1000,
                f"{len(values) / verifies:.2f} per Verify, p50 "
                f"{statistics.median(values) * 1e6:.0f} us each", "ms per Verify")
        )  # fmt: skip
    return rows


# (file suffix, function, label) of what _cpu_rows reports, in this order.
_CPU_FUNCTIONS = (
    ("grpc/_server.py", "_unary_response_in_pool", "gRPC call in its worker, whole"),
    ("core/gate.py", "verify", "Gate.verify, whole"),
    ("store/postgres.py", "load_settings", "store.load_settings"),
    ("store/sqlite.py", "load_settings", "store.load_settings"),
    ("core/settings.py", "with_changes", "  of which Settings.from_dict (parse)"),
    ("store/postgres.py", "count_attempt", "store.count_attempt"),
    ("store/sqlite.py", "count_attempt", "store.count_attempt"),
    ("store/postgres.py", "record_event", "store.record_event (the audit row)"),
    ("store/sqlite.py", "record_event", "store.record_event (the audit row)"),
    ("psycopg_pool/pool.py", "getconn", "pool.getconn"),
    ("store/postgres.py", "_check", "  of which the liveness check (empty query)"),
    ("psycopg/connection.py", "execute", "psycopg Connection.execute, every statement"),
    ("core/totp.py", "matching_step", "TOTP check (HMACs)"),
    ("logging/__init__.py", "info", "logging.info calls"),
)


def _cpu_profiles(
    pg: BenchPg, daemons: dict[str, BenchDaemon], names: list[str], work: Path,
    server_cpus: set[int] | None, client_cpus: set[int] | None, quick: bool,
) -> dict[str, Path]:  # fmt: skip
    """Each daemon again, under cProfile (CPU clock, every thread), at 64 callers."""
    from bench.throughput import measure

    paths = {}
    for backend, daemon in daemons.items():
        paths[backend] = work / f"{backend}.prof"
        os.environ["OTPGATE_BENCH_CPROFILE"] = str(paths[backend])
        try:
            daemon.start()
        finally:
            del os.environ["OTPGATE_BENCH_CPROFILE"]
        pg.pin(server_cpus)
        enroll(daemon, names)
        measure(daemon.socket("pam"), "verify", names, 64, 1000 if quick else 3000, client_cpus)
        daemon.stop()
    return paths


def _cpu_rows(backend: str, path: Path) -> list[Row]:
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    found: dict[str, tuple[float, float]] = {}  # label: (calls, cumulative CPU seconds)
    for (file, _line, function), (_cc, calls, _tt, cumulative, _callers) in stats.items():
        for suffix, name, label in _CPU_FUNCTIONS:
            if file.endswith(suffix) and function == name:
                before = found.get(label, (0, 0.0))
                found[label] = (before[0] + calls, before[1] + cumulative)
    total = sum(v[2] for v in stats.values())
    verifies = found.get("Gate.verify, whole", (1, 0.0))[0] or 1
    rows = [
        Row(SECTION, f"{backend}, 64 callers: daemon CPU, all threads", 100.0,
            f"{total / verifies * 1000:.2f} ms per Verify under the profiler", "% daemon CPU",
            "cProfile, CPU clock (time.thread_time), every thread")
    ]  # fmt: skip
    for label in dict.fromkeys(label for _suffix, _name, label in _CPU_FUNCTIONS):
        if label in found:
            calls, cumulative = found[label]
            rows.append(
                Row(SECTION, f"{backend}, 64 callers: {label}", cumulative / total * 100,
                    f"{calls / verifies:.2f} per Verify", "% daemon CPU",
                    f"{cumulative / verifies * 1000:.2f} ms per Verify under the profiler")
            )  # fmt: skip
    return rows


WHATIF = {  # label: bench.profiled's OTPGATE_BENCH_WHATIF flags
    "PostgreSQL as it is": "",
    "PostgreSQL, no pool check": "nocheck",
    "PostgreSQL, no check, settings once, parse cached": "nocheck,parsecache,onesettings",
    "PostgreSQL, no check, settings kept": "nocheck,cachesettings",
    "PostgreSQL, no check, settings kept, audit row queued": "nocheck,cachesettings,asyncaudit",
}
BASE = next(iter(WHATIF))


def _whatif(
    pg: BenchPg, dbname: str, daemons: dict[str, BenchDaemon], names: list[str], work: Path,
    stack: contextlib.ExitStack[bool | None], server_cpus: set[int] | None,
    client_cpus: set[int] | None, quick: bool,
) -> list[Row]:  # fmt: skip
    """The proposed store changes, patched into a daemon's process (bench.profiled's
    OTPGATE_BENCH_WHATIF), against SQLite and the store as it is, 1 caller."""
    rounds, per_round = (2, 300) if quick else (8, 500)
    key = daemons["PostgreSQL"].root / "key"
    variants = {"SQLite": daemons["SQLite"]}
    for i, (label, flags) in enumerate(WHATIF.items()):
        timers = work / f"whatif{i}.json"
        variants[label] = stack.enter_context(
            bench_daemon(server_cpus, *pg.daemon_args(dbname), key_from=key, profile=timers)
        )
        os.environ["OTPGATE_BENCH_WHATIF"] = flags
        try:
            variants[label].start()
        finally:
            del os.environ["OTPGATE_BENCH_WHATIF"]
    variants["SQLite"].start()
    pg.pin(server_cpus)
    mine = os.sched_getaffinity(0)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    p50s: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for daemon in (variants["SQLite"], variants[BASE]):
            enroll(daemon, names)  # the other variants share this database
        for daemon in variants.values():
            _round(daemon, names, 50)
        order = list(variants)
        for r in range(rounds):
            if r and r % 2 == 0:  # 64 accounts, threshold 100: reset before any lock
                for daemon in (variants["SQLite"], variants[BASE]):
                    enroll(daemon, names)
            for label in order[r % len(order) :] + order[: r % len(order)]:
                daemon = variants[label]
                before = daemon.cpu_seconds() + pg.cpu_seconds()
                p50s[label].append(percentile(_round(daemon, names, per_round), 0.5))
                cpu[label].append((daemon.cpu_seconds() + pg.cpu_seconds() - before) / per_round)
    finally:
        os.sched_setaffinity(0, mine)
        pg.unpin()
        for daemon in variants.values():
            daemon.stop()
    rows = []
    for label in variants:
        trips = ""
        profile = variants[label].profile
        if label != "SQLite" and profile is not None:
            samples: dict[str, list[float]] = json.loads(profile.read_text())
            verifies = max(1, len(samples.get(VERIFY, [])))
            # The statements of the verification path (not the enrollments between rounds).
            counts = [len(v) for k, v in samples.items() if k.startswith("SQL: ")]
            sql = sum(c for c in counts if c > verifies / 2)
            trips = f"; {sql / verifies:.1f} round trips per Verify"
        vs_lite = [a / b for a, b in zip(p50s[label], p50s["SQLite"], strict=True)]
        base = p50s[BASE]
        vs_pg = [a / b for a, b in zip(p50s[label], base, strict=True)]
        spread = f"{min(vs_lite):.2f}-{max(vs_lite):.2f}"
        note = f"{statistics.median(vs_lite):.2f}x SQLite's (rounds {spread})"
        if label != "SQLite":
            note += f", {statistics.median(vs_pg):.2f}x the store as it is"
        per_call = statistics.median(cpu[label]) * 1000
        rows.append(
            Row(SECTION, f"what-if, 1 caller: {label}", statistics.median(p50s[label]) * 1000,
                f"p50; CPU per call (daemon + database) {per_call:.2f} ms{trips}", "ms", note)
        )  # fmt: skip
    return rows


def run(quick: bool) -> list[Row]:
    rows: list[Row] = []
    server_cpus, client_cpus = cpu_split()
    rounds, per_round = (2, 300) if quick else (8, 500)
    mine = os.sched_getaffinity(0)
    with bench_users(64) as users, bench_pg() as pg, contextlib.ExitStack() as stack:
        # Removed last: after every daemon that writes its timers there has stopped.
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otpgate-bench-prof-")))
        names = [n for n, _ in users]
        pg.query("postgres", "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        pg.server.stop()
        pg.server.start()
        dbname = pg.create_database()
        pg.query(dbname, "CREATE EXTENSION pg_stat_statements")
        daemons = {
            "SQLite": stack.enter_context(bench_daemon(server_cpus, profile=work / "sqlite.json")),
            "PostgreSQL": stack.enter_context(
                bench_daemon(server_cpus, *pg.daemon_args(dbname), profile=work / "pg.json")
            ),
        }
        for daemon in daemons.values():
            daemon.start()
            daemon.admin().UpdateConfig(
                pb.UpdateConfigRequest(enabled=True, services_ssh=True, lockout_threshold=100),
                timeout=10,
            )
            enroll(daemon, names)
        pg.pin(server_cpus)
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)
        try:
            for daemon in daemons.values():
                _round(daemon, names, 50)  # warm: connections, prepared statements
            pg.query(dbname, "SELECT pg_stat_statements_reset()")
            for daemon in daemons.values():
                assert daemon.profile is not None
                daemon.stop()  # and start again: the timers count only what follows
                daemon.start()
                _round(daemon, names, 50)
            p50s: dict[str, list[float]] = {b: [] for b in daemons}
            cpu: dict[str, list[tuple[float, float]]] = {b: [] for b in daemons}
            calls = 0
            for r in range(rounds):  # 64 accounts: none reaches the lockout (100)
                order = list(daemons) if r % 2 == 0 else list(daemons)[::-1]
                for backend in order:
                    daemon = daemons[backend]
                    before = daemon.cpu_seconds(), pg.cpu_seconds()
                    latencies = _round(daemon, names, per_round)
                    after = daemon.cpu_seconds(), pg.cpu_seconds()
                    p50s[backend].append(percentile(latencies, 0.5))
                    cpu[backend].append(
                        ((after[0] - before[0]) / per_round, (after[1] - before[1]) / per_round)
                    )
                calls += per_round
        finally:
            os.sched_setaffinity(0, mine)
            pg.unpin()
        statements = pg.query(
            dbname,
            "SELECT query, calls, mean_exec_time FROM pg_stat_statements"
            " WHERE calls >= %s ORDER BY total_exec_time DESC LIMIT 6",
            (calls // 2,),
        )
        for daemon in daemons.values():
            daemon.stop()
        timers = {}
        for backend, daemon in daemons.items():
            assert daemon.profile is not None
            timers[backend] = json.loads(daemon.profile.read_text())
        cpu_profiles = _cpu_profiles(pg, daemons, names, work, server_cpus, client_cpus, quick)
        whatif = _whatif(pg, dbname, daemons, names, work, stack, server_cpus, client_cpus, quick)
        ratio = [p / s for p, s in zip(p50s["PostgreSQL"], p50s["SQLite"], strict=True)]
        for backend in daemons:
            own = statistics.median(c[0] for c in cpu[backend]) * 1000
            db = statistics.median(c[1] for c in cpu[backend]) * 1000
            note = f"1 caller; CPU per call: daemon {own:.2f} + PostgreSQL {db:.2f} ms"
            if backend == "PostgreSQL":
                note += f"; {statistics.median(ratio):.2f}x SQLite's"
            rows.append(
                Row(SECTION, f"Verify p50, {backend}", statistics.median(p50s[backend]) * 1000,
                    f"rounds {min(p50s[backend]) * 1000:.2f}-{max(p50s[backend]) * 1000:.2f}",
                    "ms", note)
            )  # fmt: skip
        for backend in daemons:
            rows += _timer_rows(backend, timers[backend])
        for backend, path in cpu_profiles.items():
            rows += _cpu_rows(backend, path)
        rows += whatif
        warm = 50  # the warm-up round after the restart reached pg_stat_statements too
        for query, count, mean_ms in statements:
            rows.append(
                Row(SECTION, "server: " + " ".join(str(query).split())[:60], mean_ms,
                    f"{count / (calls + warm):.2f} per Verify", "ms exec",
                    "pg_stat_statements mean_exec_time")
            )  # fmt: skip
    return rows
