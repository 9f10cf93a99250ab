"""Verification throughput on pam.sock against the same server's empty-RPC limit.

Clients run in worker processes pinned to the other core(s); the server is pinned
to one core, so both measurements share one client and one transport, and the
ratio says what the 2FA work costs on top of gRPC itself.

A shared VM's speed drifts by tens of percent within a minute, so the two kinds
run in alternating rounds; the ratio is the median of each round's ratio (an empty
run and a Verify run seconds apart), and the clock starts only once every client
process has started and connected.

The same rounds also run Verify through otpgated on PostgreSQL, over TCP loopback
(127.0.0.1, the fleet case) and over its Unix socket; the server core then holds
the daemon and the database's processes, so the PG/SQLite ratios compare the
whole server side on one core, as the empty-RPC ratio does. Then two daemons on
one database against one (nothing pinned: two processes may use both cores), and
the cross-daemon races: one right code sent at once through both daemons (it must
be accepted exactly once), and a burst of wrong codes through both (no more codes
may be checked than the lockout threshold, and the account is locked once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import statistics
import threading
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.lib import BenchDaemon, Row, bench_daemon, bench_users, cpu_split, enroll, percentile
from bench.pg import BenchPg, bench_pg
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc

Part = tuple[float, float, list[float]]  # (started, ended, latencies) of one process
PG_TRANSPORTS = {"127.0.0.1": "tcp", "Unix socket": "unix"}  # row label: BenchPg transport


def _worker(
    socket_path: str,
    kind: str,
    users: list[str],
    threads: int,
    calls: int,
    cpus: set[int] | None,
    ready: Barrier,
    results: Queue[Part],
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    channel = grpc.insecure_channel("unix:" + socket_path)
    pam = pb_grpc.PamGateStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    health.Check(health_pb2.HealthCheckRequest(), timeout=30)  # connected before the clock
    latencies: list[float] = []
    lock = threading.Lock()
    go = threading.Barrier(threads + 1)

    def run(index: int) -> None:
        mine = []
        go.wait()
        for j in range(calls):
            t = time.perf_counter()
            if kind == "empty":
                health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            else:
                user = users[(index * 7919 + j) % len(users)]
                pam.Verify(
                    pb.PamRequest(username=user, service="sshd", authtok="000000"), timeout=30
                )
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    ready.wait(timeout=120)
    started = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    go.wait()
    for t in pool:
        t.join()
    results.put((started, time.perf_counter(), latencies))
    channel.close()


def measure(
    socket_path: str | list[str],
    kind: str,
    users: list[str],
    callers: int,
    total: int,
    cpus: set[int] | None,
) -> tuple[float, list[float]]:
    """(calls per second, latencies) of `total` calls from `callers` concurrent callers;
    with several sockets, the client processes take turns among them."""
    sockets = [socket_path] if isinstance(socket_path, str) else socket_path
    processes = min(callers, 4)
    threads = callers // processes
    calls = max(1, total // callers)
    # spawn, not fork: a forked copy of a process that already runs gRPC can deadlock.
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(processes)
    results: Queue[Part] = ctx.Queue()
    workers = [
        ctx.Process(
            target=_worker,
            args=(sockets[i % len(sockets)], kind, users, threads, calls, cpus, ready, results),
        )
        for i in range(processes)
    ]
    for w in workers:
        w.start()
    parts = [results.get(timeout=300) for _ in workers]
    for w in workers:
        w.join()
    elapsed = max(p[1] for p in parts) - min(p[0] for p in parts)
    latencies = [x for p in parts for x in p[2]]
    return len(latencies) / elapsed, latencies


def _spread(rates: list[float], latencies: list[float]) -> str:
    return (f"p50 {percentile(latencies, 0.5) * 1000:.2f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.2f} ms; "
            f"rounds {min(rates):,.0f}-{max(rates):,.0f}")  # fmt: skip


def _rows(callers: int, empty: list[float], verify: list[float],
          empty_ms: list[float], verify_ms: list[float]) -> list[Row]:  # fmt: skip
    ratios = [v / e for v, e in zip(verify, empty, strict=True)]  # each round's pair
    ratio = statistics.median(ratios)
    return [
        Row("throughput", f"empty RPC, {callers} callers", statistics.median(empty),
            _spread(empty, empty_ms), "RPC/s"),
        Row("throughput", f"Verify, {callers} callers", statistics.median(verify),
            _spread(verify, verify_ms), "RPC/s",
            f"{ratio:.0%} of empty RPC (rounds {min(ratios):.0%}-{max(ratios):.0%}); SQLite"),
    ]  # fmt: skip


@dataclasses.dataclass
class Series:
    """One kind of Verify measured in every round: its rates, latencies, round p50s."""

    rates: list[float] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    p50s: list[float] = dataclasses.field(default_factory=list)
    daemon_cpu: list[float] = dataclasses.field(default_factory=list)  # seconds per call
    db_cpu: list[float] = dataclasses.field(default_factory=list)

    def add(self, rate: float, latencies: list[float]) -> None:
        self.rates.append(rate)
        self.latencies += latencies
        self.p50s.append(percentile(latencies, 0.5))

    def measure(
        self, daemons: list[BenchDaemon], pg: BenchPg | None, callers: int,
        names: list[str], total: int, cpus: set[int] | None,
    ) -> None:  # fmt: skip
        """One round of Verify through `daemons` (the client processes take turns among
        them), with the CPU time the daemons and the database spent."""

        def cpu() -> tuple[float, float]:
            return sum(d.cpu_seconds() for d in daemons), pg.cpu_seconds() if pg else 0.0

        before = cpu()
        sockets = [d.socket("pam") for d in daemons]
        rate, latencies = measure(sockets, "verify", names, callers, total, cpus)
        after = cpu()
        self.add(rate, latencies)
        self.daemon_cpu.append((after[0] - before[0]) / len(latencies))
        self.db_cpu.append((after[1] - before[1]) / len(latencies))

    def cpu_note(self) -> str:
        daemon = statistics.median(self.daemon_cpu) * 1000
        if not any(self.db_cpu):
            return f"CPU per call: daemon {daemon:.2f} ms"
        db = statistics.median(self.db_cpu) * 1000
        return f"CPU per call: daemon {daemon:.2f} + PostgreSQL {db:.2f} ms"


def _pg_row(callers: int, label: str, pg: Series, lite: Series) -> Row:
    p50 = [a / b for a, b in zip(pg.p50s, lite.p50s, strict=True)]
    rate = [a / b for a, b in zip(pg.rates, lite.rates, strict=True)]
    note = (
        f"p50 {statistics.median(p50):.2f}x SQLite's (rounds {min(p50):.2f}-{max(p50):.2f}); "
        f"{statistics.median(rate):.0%} of its calls/s; {pg.cpu_note()}"
    )
    name = f"Verify on PostgreSQL ({label}), {callers} callers"
    spread = _spread(pg.rates, pg.latencies)
    return Row("throughput", name, statistics.median(pg.rates), spread, "RPC/s", note)


def _configure(daemon: BenchDaemon, lockout_threshold: int) -> None:
    request = pb.UpdateConfigRequest(
        enabled=True, services_ssh=True, lockout_threshold=lockout_threshold
    )
    daemon.admin().UpdateConfig(request, timeout=10)
    # Another daemon on the database holds a copy up to half a second old: let every
    # one of them see the change before anything is measured against it.
    time.sleep(1.0)


def run(quick: bool) -> list[Row]:
    rows: list[Row] = []
    server_cpus, client_cpus = cpu_split()
    rounds, per_round = (2, 1500) if quick else (9, 3000)
    with bench_users(64) as users, bench_pg() as pg:
        names = [name for name, _ in users]
        with contextlib.ExitStack() as stack:
            lite = stack.enter_context(bench_daemon(server_cpus))
            kinds = {"SQLite": lite}
            for label, transport in PG_TRANSPORTS.items():
                args = pg.daemon_args(pg.create_database(), transport)
                kinds[label] = stack.enter_context(bench_daemon(server_cpus, *args))
            for daemon in kinds.values():
                daemon.start()
                _configure(daemon, lockout_threshold=100)
            pg.pin(server_cpus)  # the server side on one core, database included
            for callers in (1, 8, 64):
                # The Unix socket only for one caller: with more, the server core is
                # the limit, and the transport changed nothing there (within noise).
                order = [k for k in kinds if callers == 1 or k != "Unix socket"]
                empty: list[float] = []
                empty_ms: list[float] = []
                series = {kind: Series() for kind in order}
                for r in range(rounds):
                    rate, latencies = measure(
                        lite.socket("pam"), "empty", names, callers, per_round, client_cpus
                    )
                    empty.append(rate)
                    empty_ms += latencies
                    for kind in order[r % len(order) :] + order[: r % len(order)]:
                        daemon = kinds[kind]
                        enroll(daemon, names)  # fresh counters: no account reaches the lockout
                        series[kind].measure(
                            [daemon], None if daemon is lite else pg, callers, names,
                            per_round, client_cpus,
                        )  # fmt: skip
                lite_series = series["SQLite"]
                rows += _rows(callers, empty, lite_series.rates, empty_ms, lite_series.latencies)
                rows[-1].note += f"; {lite_series.cpu_note()}"
                rows += [_pg_row(callers, k, series[k], lite_series) for k in order[1:]]
            pg.unpin()
        rows += _two_daemons(pg, names, rounds, per_round)
    return rows


def _pair(
    pg: BenchPg, stack: contextlib.ExitStack[bool | None]
) -> tuple[BenchDaemon, BenchDaemon, str]:
    """Two unpinned daemons on one new database (TCP), the second with the first's key;
    and the database's name."""
    dbname = pg.create_database()
    args = pg.daemon_args(dbname, "tcp")
    first = stack.enter_context(bench_daemon(None, *args))
    first.start()
    second = stack.enter_context(bench_daemon(None, *args, key_from=first.root / "key"))
    second.start()
    return first, second, dbname


def _two_daemons(pg: BenchPg, names: list[str], rounds: int, per_round: int) -> list[Row]:
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        a, b, dbname = _pair(pg, stack)
        _configure(a, lockout_threshold=100)
        callers = 64
        one, two = Series(), Series()
        kinds = [(one, [a]), (two, [a, b])]
        for r in range(rounds):
            for series, daemons in kinds if r % 2 == 0 else kinds[::-1]:
                enroll(a, names)
                series.measure(daemons, pg, callers, names, per_round, None)
        ratios = [x / y for x, y in zip(two.rates, one.rates, strict=True)]
        rows += [
            Row("throughput", f"one daemon on PostgreSQL (127.0.0.1), {callers} callers",
                statistics.median(one.rates), _spread(one.rates, one.latencies), "RPC/s",
                f"Verify; nothing pinned; {one.cpu_note()}"),
            Row("throughput", f"two daemons on one database, {callers} callers",
                statistics.median(two.rates), _spread(two.rates, two.latencies), "RPC/s",
                f"both together; {statistics.median(ratios):.2f}x one daemon's "
                f"(rounds {min(ratios):.2f}-{max(ratios):.2f}); nothing pinned; "
                f"{two.cpu_note().replace('daemon', 'daemons')}"),
        ]  # fmt: skip
        rows += _races(pg, dbname, a, b, names)
    return rows


def _race_stubs(a: BenchDaemon, b: BenchDaemon, count: int) -> list[pb_grpc.PamGateStub]:
    """`count` connections, alternately to each daemon, all connected already."""
    stubs = []
    for i in range(count):
        channel = grpc.insecure_channel("unix:" + (a, b)[i % 2].socket("pam"))
        grpc.channel_ready_future(channel).result(timeout=30)
        stubs.append(pb_grpc.PamGateStub(channel))
    return stubs


def _at_once(stubs: list[pb_grpc.PamGateStub], username: str, code: str) -> tuple[list[int], float]:
    """Every stub's verdict (-1: an RPC error) for one code sent by all at once."""
    request = pb.PamRequest(username=username, service="sshd", authtok=code)
    started = time.perf_counter()
    calls = [stub.Verify.future(request, timeout=30) for stub in stubs]
    verdicts: list[int] = []
    for call in calls:
        try:
            verdicts.append(int(call.result().verdict))
        except grpc.RpcError:
            verdicts.append(-1)
    return verdicts, time.perf_counter() - started


def _races(pg: BenchPg, dbname: str, a: BenchDaemon, b: BenchDaemon, names: list[str]) -> list[Row]:
    import pyotp

    concurrent, rounds, threshold = 64, 100, 10
    stubs = _race_stubs(a, b, concurrent)
    # One right code through both daemons at once: accepted exactly once.
    doubles = missing = errors = 0
    seconds = []
    for r in range(rounds):
        user = names[r % len(names)]
        totp = pyotp.TOTP(enroll(a, [user])[user])  # a fresh secret: no step spent yet
        verdicts, took = _at_once(stubs, user, totp.now())
        seconds.append(took)
        accepted = verdicts.count(pb.VERDICT_ALLOW)
        doubles += max(0, accepted - 1)
        missing += accepted == 0
        errors += verdicts.count(-1)
    once = rounds - missing - (doubles > 0)
    took_ms = statistics.median(seconds) * 1000
    rows = [
        Row("throughput", f"cross-daemon race: one right code, {concurrent} at once", doubles,
            f"accepted once in {once} of {rounds} rounds", "double accepts",
            f"split over 2 daemons; {errors} errors; {took_ms:.0f} ms to a round's last verdict")
    ]  # fmt: skip
    # Wrong codes through both at once: at most `threshold` codes checked, one lock.
    _configure(a, lockout_threshold=threshold)
    over = errors = 0
    checked_counts, refused_counts, locks_once, seconds = [], [], 0, []
    try:
        for r in range(rounds):
            user = names[r % len(names)]
            totp = pyotp.TOTP(enroll(a, [user])[user])  # fresh counters, lockouts 0
            now = int(time.time())
            good = {totp.at(now + d * 30) for d in (-2, -1, 0, 1, 2)}
            wrong = next(c for c in (f"{n:06d}" for n in range(1_000_000)) if c not in good)
            last = pg.query(dbname, "SELECT coalesce(max(id), 0) FROM audit_events")[0][0]
            verdicts, took = _at_once(stubs, user, wrong)
            seconds.append(took)
            checked = verdicts.count(pb.VERDICT_DENY)  # "Invalid code.": its code was checked
            checked_counts.append(checked)
            refused_counts.append(verdicts.count(pb.VERDICT_LOCKED))
            over += max(0, checked - threshold)
            errors += verdicts.count(-1)
            events = pg.query(
                dbname,
                "SELECT count(*) FROM audit_events WHERE id > %s AND username = %s"
                " AND event = 'locked'",
                (last, user),
            )[0][0]
            lockouts = pg.query(dbname, "SELECT lockouts FROM secrets WHERE username = %s",
                                (user,))[0][0]  # fmt: skip
            locks_once += events == 1 and lockouts == 1
    finally:
        _configure(a, lockout_threshold=100)
    took_ms = statistics.median(seconds) * 1000
    rows.append(
        Row("throughput", f"cross-daemon race: {concurrent} wrong codes at once", over,
            f"codes checked {min(checked_counts)}-{max(checked_counts)} per round "
            f"(lockout_threshold {threshold}); locked once in {locks_once} of {rounds} rounds",
            "over-counts",
            f"split over 2 daemons; {min(refused_counts)}-{max(refused_counts)} refused as "
            f"locked; {errors} errors; {took_ms:.0f} ms to a round's last verdict")
    )  # fmt: skip
    return rows
