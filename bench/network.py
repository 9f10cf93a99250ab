"""The network paths against the local ones, measured in the same run.

Login latency through an edge: pamtester runs the real hook (pam_exec, as in
bench.hook_latency) against a single-host otpgated's pam.sock, and against an
edge otpgated's pam.sock whose upstream is a central otpgated on 127.0.0.1 over
mutual TLS (certificates from otpgate.pki in a temporary directory). Every login
uses its own bench user with a fresh secret and its first code, so each sample is
a real first-time success (a code, once accepted, is spent). Prompt when needed is
the shipped stack (bench.hook_latency.when_needed_stack): its gate lines read the
runtime_dir/gate of the daemon that serves that pam.sock (the edge's files come
from the central's HostGate.AskList), and the run waits until each lists its bench
accounts, so one hook call (`verify`) runs; the same stack reading gate files that
list nobody measures the old two calls (`check`, then `verify`). The stacks take
turns sample by sample; the ratio is edge over local of the medians.

Verification throughput over TLS: the workload of bench.throughput (Verify of a
wrong code, spread over 64 accounts whose counters are reset before each round)
from 1, 8 and 64 concurrent callers, once through the central's pam.sock
(PamGate.Verify) and once through its TLS listener with a `host` certificate
(HostGate.Verify: the same question, the same Gate). The central is pinned to one
core and the clients to the other(s); the two kinds run in alternating rounds and
each ratio is the median of the rounds' own ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import grpc
import pyotp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.hook_latency import empty_gate_dir, when_needed_stack
from bench.lib import (
    HOOK,
    BenchDaemon,
    Row,
    bench_daemon,
    bench_users,
    cpu_split,
    enroll,
    percentile,
    stats_ms,
)
from bench.ssh_login import _wait_listed
from otpgate import pki
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc

SECTION = "network"
PY = f"/usr/bin/python3 -I -S {HOOK}"
EDGE, HOST = "bench-edge", "bench-host"  # client certificates, both of role host
ALWAYS = "prompt always (verify: 1 call)"
GATED = "prompt when needed (gate + verify: 1 call)"
UNGATED = "prompt when needed, without gate files (check + verify: 2 calls)"
Part = tuple[float, float, list[float]]  # (started, ended, latencies) of one process


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Fleet:
    """A CA and certificates (otpgate.pki) and the TOML files of a central and an edge,
    in `directory` (as tests.fleet_harness writes them)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = directory / "ca" / pki.CA_CERT
        pki.init(directory / "ca", server_name="localhost", ip_addresses=["127.0.0.1"])
        for name in (EDGE, HOST):
            pki.issue_client(directory / "ca", name, role="host")
        self.port = _free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cert(self, name: str) -> tuple[Path, Path]:
        return self.directory / "ca" / f"{name}.crt", self.directory / "ca" / f"{name}.key"

    def central_config(self) -> Path:
        ca = self.directory / "ca"
        path = self.directory / "central.toml"
        path.write_text(
            f'listen = "{self.address}"\n'
            f'tls_cert = "{ca / pki.SERVER_CERT}"\ntls_key = "{ca / pki.SERVER_KEY}"\n'
            f'tls_client_ca = "{self.ca}"\n'
            f'\n[roles]\n"{EDGE}" = "host"\n"{HOST}" = "host"\n'
        )
        return path

    def edge_config(self) -> Path:
        cert, key = self.cert(EDGE)
        path = self.directory / "edge.toml"
        path.write_text(
            f'upstreams = ["{self.address}"]\n'
            f'tls_cert = "{cert}"\ntls_key = "{key}"\nupstream_ca = "{self.ca}"\n'
        )
        return path


@contextlib.contextmanager
def _fleet() -> Iterator[Fleet]:
    directory = Path(tempfile.mkdtemp(prefix="otpgate-bench-net-"))
    try:
        yield Fleet(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _configure(daemon: BenchDaemon, request: pb.UpdateConfigRequest) -> None:
    """2FA on for sshd and every other PAM service, plus `request`'s settings."""
    request.enabled = request.services_ssh = True
    daemon.admin().UpdateConfig(request, timeout=10)


# -- login latency through an edge ---------------------------------------------------


def _pam_service(body: str) -> str:
    name = f"otpgate-bench-{secrets.token_hex(4)}"
    Path("/etc/pam.d", name).write_text(body + "account required pam_permit.so\n")
    return name


def _pamtester(service: str, user: str, typed: str) -> tuple[bool, float]:
    """(accepted, seconds) of one login."""
    started = time.perf_counter()
    result = subprocess.run(
        ["pamtester", service, user, "authenticate"],
        input=typed + "\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return result.returncode == 0, time.perf_counter() - started


def _stacks(socket_path: str, gate_dir: Path, empty_gate: Path) -> dict[str, str]:
    """The shipped stacks as in bench.hook_latency, their hook asking `socket_path`,
    prompt when needed reading `gate_dir` and (the old two calls) `empty_gate`: PAM
    service names by label."""
    opts = f"socket={socket_path}"
    verify = f"pam_exec.so quiet expose_authtok stdout {PY} verify {opts}"
    always = _pam_service(
        "auth optional pam_echo.so Verification code:\n"
        f"auth requisite {verify}\nauth required pam_permit.so\n"
    )
    gated = _pam_service(when_needed_stack(socket_path, gate_dir))
    ungated = _pam_service(when_needed_stack(socket_path, empty_gate))
    return {ALWAYS: always, GATED: gated, UNGATED: ungated}


def _hook_latency(quick: bool) -> list[Row]:
    count = 15 if quick else 40
    where = {"local": "single-host daemon's pam.sock",
             "edge": "edge -> central on 127.0.0.1 over mTLS"}  # fmt: skip
    services: list[str] = []
    rows: list[Row] = []
    try:
        with contextlib.ExitStack() as stack:
            fleet = stack.enter_context(_fleet())
            local = stack.enter_context(bench_daemon())
            central = stack.enter_context(
                bench_daemon(None, "--config", str(fleet.central_config()))
            )
            edge = stack.enter_context(bench_daemon(None, "--config", str(fleet.edge_config())))
            for daemon in (local, central, edge):
                daemon.start()
            for daemon in (local, central):
                _configure(daemon, pb.UpdateConfigRequest(window=1))
            stacks: dict[tuple[str, str], str] = {}
            empty_gate = empty_gate_dir(fleet.directory)
            gate_dirs = {"local": Path(local.socket("pam")).parent / "gate",
                         "edge": Path(edge.socket("pam")).parent / "gate"}  # fmt: skip
            for kind, daemon in (("local", local), ("edge", edge)):
                sock = daemon.socket("pam")
                for label, service in _stacks(sock, gate_dirs[kind], empty_gate).items():
                    stacks[(kind, label)] = service
                    services.append(service)
            # One user per login plus one per stack for a warm-up and a wrong code.
            users = stack.enter_context(bench_users(len(stacks) * (count + 1)))
            names = [n for n, _ in users]
            mine = {key: names[i * (count + 1) : (i + 1) * (count + 1)]
                    for i, key in enumerate(stacks)}  # fmt: skip
            totps: dict[str, pyotp.TOTP] = {}
            for (kind, _), accounts in mine.items():
                secrets_ = enroll(local if kind == "local" else central, accounts)
                totps |= {name: pyotp.TOTP(s) for name, s in secrets_.items()}
            for key, service in stacks.items():
                # The first login through the edge opens its TLS connection; and each
                # stack must refuse a wrong code, or it would not be verifying at all.
                spare = mine[key][-1]
                right = totps[spare].now()
                wrong = next(c for c in ("000000", "111111") if c != right)
                if _pamtester(service, spare, wrong)[0]:
                    raise RuntimeError(f"{key}: a wrong code was accepted")
                if not _pamtester(service, spare, totps[spare].now())[0]:
                    raise RuntimeError(f"{key}: a right code was refused")
            # The gate files of the daemon behind each pam.sock list its accounts: the
            # local one's soon after each RenewSecret, the edge's from AskList at its
            # next rewrite (soon after the logins above, new names to it; every 30 s).
            for kind in ("local", "edge"):
                _wait_listed(gate_dirs[kind], mine[(kind, GATED)], timeout=45)
            samples: dict[tuple[str, str], list[float]] = {key: [] for key in stacks}
            order = list(stacks)
            for i in range(count):
                for key in order[i % len(order) :] + order[: i % len(order)]:
                    user = mine[key][i]
                    ok, seconds = _pamtester(stacks[key], user, totps[user].now())
                    if not ok:
                        raise RuntimeError(f"{key}: refused {user}'s code")
                    samples[key].append(seconds)
            for label in dict.fromkeys(label for _, label in stacks):
                base, _ = stats_ms(samples[("local", label)])
                for kind in ("local", "edge"):
                    values = samples[(kind, label)]
                    median, spread = stats_ms(values)
                    spread += f", p90 {percentile(values, 0.9) * 1000:.2f}"
                    note = "" if kind == "local" else (
                        f"+{median - base:.2f} ms, {median / base:.2f}x local")  # fmt: skip
                    if label == UNGATED:
                        gated, _ = stats_ms(samples[(kind, GATED)])
                        note += "; " if note else ""
                        note += f"{median / gated:.2f}x with the gate files"
                        note += f" (+{median - gated:.2f} ms)"
                    rows.append(
                        Row(SECTION, f"hook, {label}: {where[kind]}", median, spread, "ms", note)
                    )
    finally:
        for service in services:
            Path("/etc/pam.d", service).unlink(missing_ok=True)
    return rows


# -- verification throughput over TLS ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the workers send Verify: a Unix socket (PamGate) or the TLS listener
    (HostGate, with a client certificate)."""

    unix: str = ""
    address: str = ""
    ca: bytes = b""
    cert: bytes = b""
    key: bytes = b""

    def connect(self) -> tuple[grpc.Channel, Callable[..., object]]:
        """A channel and its Verify method."""
        if self.unix:
            channel = grpc.insecure_channel("unix:" + self.unix)
            return channel, pb_grpc.PamGateStub(channel).Verify
        credentials = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        channel = grpc.secure_channel(self.address, credentials)
        return channel, pb_grpc.HostGateStub(channel).Verify


def _worker(
    target: Target,
    users: list[str],
    threads: int,
    calls: int,
    cpus: set[int] | None,
    ready: Barrier,
    results: Queue[Part],
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    channel, verify = target.connect()
    # Connected (TLS handshake done) before the clock: Health answers any certificate.
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    latencies: list[float] = []
    lock = threading.Lock()
    go = threading.Barrier(threads + 1)

    def run(index: int) -> None:
        mine = []
        go.wait()
        for j in range(calls):
            user = users[(index * 7919 + j) % len(users)]
            t = time.perf_counter()
            verify(pb.PamRequest(username=user, service="sshd", authtok="000000"), timeout=30)
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


def _measure(
    target: Target, users: list[str], callers: int, total: int, cpus: set[int] | None
) -> tuple[float, list[float]]:
    """(calls per second, latencies) of `total` calls from `callers` concurrent callers,
    in processes of up to 16 threads each (as bench.throughput.measure)."""
    processes = min(callers, 4)
    threads = callers // processes
    calls = max(1, total // callers)
    ctx = multiprocessing.get_context("spawn")  # a fork of a gRPC process can deadlock
    ready = ctx.Barrier(processes)
    results: Queue[Part] = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(target, users, threads, calls, cpus, ready, results))
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


@dataclasses.dataclass
class Series:
    """One kind of Verify in every round: rates, latencies, each round's p50 and the
    daemon's CPU seconds per call."""

    rates: list[float] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    p50s: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)

    def measure(self, daemon: BenchDaemon, target: Target, users: list[str], callers: int,
                total: int, cpus: set[int] | None) -> None:  # fmt: skip
        before = daemon.cpu_seconds()
        rate, latencies = _measure(target, users, callers, total, cpus)
        self.cpu.append((daemon.cpu_seconds() - before) / len(latencies))
        self.rates.append(rate)
        self.latencies += latencies
        self.p50s.append(percentile(latencies, 0.5))

    def spread(self) -> str:
        return (f"p50 {percentile(self.latencies, 0.5) * 1000:.2f} ms, "
                f"p99 {percentile(self.latencies, 0.99) * 1000:.2f} ms; "
                f"rounds {min(self.rates):,.0f}-{max(self.rates):,.0f}")  # fmt: skip

    def cpu_note(self) -> str:
        return f"daemon CPU per call {statistics.median(self.cpu) * 1000:.2f} ms"


def _throughput(quick: bool) -> list[Row]:
    rows: list[Row] = []
    server_cpus, client_cpus = cpu_split()
    rounds, per_round = (2, 1500) if quick else (9, 3000)
    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(_fleet())
        users = stack.enter_context(bench_users(64))
        names = [n for n, _ in users]
        config = str(fleet.central_config())
        # The listener runs at most workers * 4 calls at once and refuses the rest:
        # 32 workers leave room for the 64 callers below.
        central = stack.enter_context(
            bench_daemon(server_cpus, "--config", config, "--workers", "32")
        )
        central.start()
        _configure(central, pb.UpdateConfigRequest(lockout_threshold=100))
        cert, key = fleet.cert(HOST)
        targets = {
            "Unix": Target(unix=central.socket("pam")),
            "TLS": Target(address=fleet.address, ca=fleet.ca.read_bytes(),
                          cert=cert.read_bytes(), key=key.read_bytes()),
        }  # fmt: skip
        labels = {"Unix": "PamGate.Verify on pam.sock (Unix socket)",
                  "TLS": "HostGate.Verify over mTLS (127.0.0.1, host cert)"}  # fmt: skip
        for callers in (1, 8, 64):
            series = {kind: Series() for kind in targets}
            order = list(targets)
            for r in range(rounds):
                for kind in order if r % 2 == 0 else order[::-1]:
                    enroll(central, names)  # fresh counters: no account reaches the lockout
                    series[kind].measure(
                        central, targets[kind], names, callers, per_round, client_cpus
                    )
            unix, tls = series["Unix"], series["TLS"]
            rate = [t / u for t, u in zip(tls.rates, unix.rates, strict=True)]
            p50 = [t / u for t, u in zip(tls.p50s, unix.p50s, strict=True)]
            rows += [
                Row(SECTION, f"{labels['Unix']}, {callers} callers",
                    statistics.median(unix.rates), unix.spread(), "RPC/s",
                    f"wrong codes, as throughput's Verify; {unix.cpu_note()}"),
                Row(SECTION, f"{labels['TLS']}, {callers} callers",
                    statistics.median(tls.rates), tls.spread(), "RPC/s",
                    f"{statistics.median(rate):.0%} of the Unix socket's calls/s "
                    f"(rounds {min(rate):.0%}-{max(rate):.0%}); p50 "
                    f"{statistics.median(p50):.2f}x (rounds {min(p50):.2f}-{max(p50):.2f}); "
                    f"{tls.cpu_note()}"),
            ]  # fmt: skip
    return rows


def run(quick: bool) -> list[Row]:
    return _hook_latency(quick) + _throughput(quick)
