"""Verification throughput on pam.sock against the same server's empty-RPC limit.

Clients run in worker processes pinned to the other core(s); the server is pinned
to one core, so both measurements share one client and one transport, and the
ratio says what the 2FA work costs on top of gRPC itself.

A shared VM's speed drifts by tens of percent within a minute, so the two kinds
run in alternating rounds; the ratio is the median of each round's ratio (an empty
run and a Verify run seconds apart), and the clock starts only once every client
process has started and connected.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import threading
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.lib import Row, bench_daemon, bench_users, cpu_split, enroll, percentile
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc

Part = tuple[float, float, list[float]]  # (started, ended, latencies) of one process


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
    socket_path: str, kind: str, users: list[str], callers: int, total: int, cpus: set[int] | None
) -> tuple[float, list[float]]:
    """(calls per second, latencies) of `total` calls from `callers` concurrent callers."""
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
            args=(socket_path, kind, users, threads, calls, cpus, ready, results),
        )
        for _ in range(processes)
    ]
    for w in workers:
        w.start()
    parts = [results.get(timeout=300) for _ in workers]
    for w in workers:
        w.join()
    elapsed = max(p[1] for p in parts) - min(p[0] for p in parts)
    latencies = [x for p in parts for x in p[2]]
    return len(latencies) / elapsed, latencies


def _rows(callers: int, empty: list[float], verify: list[float],
          empty_ms: list[float], verify_ms: list[float]) -> list[Row]:  # fmt: skip
    def spread(rates: list[float], latencies: list[float]) -> str:
        return (f"p50 {percentile(latencies, 0.5) * 1000:.2f} ms, "
                f"p99 {percentile(latencies, 0.99) * 1000:.2f} ms; "
                f"rounds {min(rates):,.0f}-{max(rates):,.0f}")  # fmt: skip

    ratios = [v / e for v, e in zip(verify, empty, strict=True)]  # each round's pair
    ratio = statistics.median(ratios)
    return [
        Row("throughput", f"empty RPC, {callers} callers", statistics.median(empty),
            spread(empty, empty_ms), "RPC/s"),
        Row("throughput", f"Verify, {callers} callers", statistics.median(verify),
            spread(verify, verify_ms), "RPC/s",
            f"{ratio:.0%} of empty RPC (rounds {min(ratios):.0%}-{max(ratios):.0%})"),
    ]  # fmt: skip


def run(quick: bool) -> list[Row]:
    rows: list[Row] = []
    server_cpus, client_cpus = cpu_split()
    rounds, per_round = (2, 1500) if quick else (9, 3000)
    with bench_users(64) as users, bench_daemon(server_cpus) as daemon:
        daemon.start()
        names = [name for name, _ in users]
        daemon.admin().UpdateConfig(
            pb.UpdateConfigRequest(enabled=True, services_ssh=True, lockout_threshold=100),
            timeout=10,
        )
        socket = daemon.socket("pam")
        for callers in (1, 8, 64):
            empty: list[float] = []
            verify: list[float] = []
            empty_ms: list[float] = []
            verify_ms: list[float] = []
            for _ in range(rounds):
                rate, latencies = measure(socket, "empty", names, callers, per_round, client_cpus)
                empty.append(rate)
                empty_ms += latencies
                enroll(daemon, names)  # fresh counters: no account reaches the lockout
                rate, latencies = measure(socket, "verify", names, callers, per_round, client_cpus)
                verify.append(rate)
                verify_ms += latencies
            rows += _rows(callers, empty, verify, empty_ms, verify_ms)
    return rows
