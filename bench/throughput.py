"""Verification throughput on pam.sock against the same server's empty-RPC limit.

Clients run in worker processes pinned to the other core(s); the server is pinned
to one core, so both measurements share one client and one transport, and the
ratio says what the 2FA work costs on top of gRPC itself.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.lib import Row, bench_daemon, bench_users, cpu_split, enroll, percentile
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc


def _worker(args: tuple[str, str, list[str], int, int, set[int] | None]) -> list[float]:
    socket_path, kind, users, threads, calls, cpus = args
    if cpus:
        os.sched_setaffinity(0, cpus)
    channel = grpc.insecure_channel("unix:" + socket_path)
    pam = pb_grpc.PamGateStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def run(index: int) -> None:
        mine = []
        start.wait()
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
    for t in pool:
        t.join()
    return latencies


def measure(
    socket_path: str, kind: str, users: list[str], callers: int, total: int, cpus: set[int] | None
) -> tuple[float, float, float]:
    processes = min(callers, 4)
    threads = callers // processes
    calls = max(1, total // callers)
    # spawn, not fork: a forked copy of a process that already runs gRPC can deadlock.
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        started = time.perf_counter()
        parts = pool.map(_worker, [(socket_path, kind, users, threads, calls, cpus)] * processes)
        elapsed = time.perf_counter() - started
    latencies = [x for part in parts for x in part]
    return (len(latencies) / elapsed, percentile(latencies, 0.5) * 1000,
            percentile(latencies, 0.99) * 1000)  # fmt: skip


def run(quick: bool) -> list[Row]:
    rows: list[Row] = []
    server_cpus, client_cpus = cpu_split()
    total = 2000 if quick else 6000
    with bench_users(64) as users, bench_daemon(server_cpus) as daemon:
        daemon.start()
        names = [name for name, _ in users]
        daemon.admin().UpdateConfig(
            pb.UpdateConfigRequest(enabled=True, services_ssh=True, lockout_threshold=100),
            timeout=10,
        )
        for callers in (1, 8, 64):
            empty = measure(daemon.socket("pam"), "empty", names, callers, total, client_cpus)
            enroll(daemon, names)  # fresh counters: no account reaches the lockout mid-run
            verify = measure(daemon.socket("pam"), "verify", names, callers, total, client_cpus)
            ratio = verify[0] / empty[0]
            rows += [
                Row("throughput", f"empty RPC, {callers} callers", empty[0],
                    f"p50 {empty[1]:.2f} ms, p99 {empty[2]:.2f} ms", "RPC/s"),
                Row("throughput", f"Verify, {callers} callers", verify[0],
                    f"p50 {verify[1]:.2f} ms, p99 {verify[2]:.2f} ms", "RPC/s",
                    f"{ratio:.0%} of empty RPC"),
            ]  # fmt: skip
    return rows
