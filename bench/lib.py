"""Shared pieces of the benchmarks: a daemon, bench users, timing and the table."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
HOOK = REPO / "pam_hook" / "otpgate-pam-hook"


@dataclasses.dataclass
class Row:
    section: str
    name: str
    median: float
    spread: str
    unit: str
    note: str = ""


def stats_ms(samples: list[float]) -> tuple[float, str]:
    """Median and interquartile range, in milliseconds."""
    ms = sorted(s * 1000 for s in samples)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return statistics.median(ms), f"IQR {q[0]:.2f}-{q[2]:.2f}"


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def print_table(rows: list[Row]) -> None:
    header = ("section", "measurement", "median", "spread", "unit", "note")
    cells = [header] + [
        (r.section, r.name, f"{r.median:,.2f}", r.spread, r.unit, r.note) for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for i, cell in enumerate(cells):
        print(" | ".join(v.ljust(w) for v, w in zip(cell, widths, strict=True)).rstrip())
        if i == 0:
            print("-+-".join("-" * w for w in widths))


class BenchDaemon:
    """otpgated in a temporary directory, optionally pinned to some CPUs.

    On SQLite by default; `extra` may give it a PostgreSQL database instead
    (bench.pg.BenchPg.daemon_args). `key_from`: start with a copy of that key file,
    as every daemon that shares a database must. `profile`: run it under
    bench.profiled, which writes its timers there when it stops.
    """

    def __init__(
        self,
        root: Path,
        cpus: set[int] | None = None,
        *extra: str,
        key_from: Path | None = None,
        profile: Path | None = None,
    ) -> None:
        self.root = root
        self.profile = profile
        self.cpus = cpus
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "otpgated.log"
        if key_from is not None:
            shutil.copy2(key_from, root / "key")

    def socket(self, name: str) -> str:
        return str(self.root / "run" / f"{name}.sock")

    def start(self) -> float:
        """Start and return the seconds until it serves."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        started = time.monotonic()
        with open(self.log, "ab") as log:
            program = ["otpgate.server.main"]
            if self.profile is not None:
                program = ["bench.profiled", str(self.profile)]
            cpus = self.cpus
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *program,
                 "--state-dir", str(self.root / "state"), "--runtime-dir", str(self.root / "run"),
                 "--key-file", str(self.root / "key"), "--admin-group", "root", *self.extra],
                stdout=log, stderr=log, cwd=REPO,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )  # fmt: skip
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text())
            with open(self.log, "rb") as f:
                f.seek(offset)
                if b"started version=" in f.read():
                    return time.monotonic() - started
            time.sleep(0.005)

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None

    def admin(self) -> pb_grpc.TwoFactorAdminStub:
        return pb_grpc.TwoFactorAdminStub(grpc.insecure_channel("unix:" + self.socket("admin")))

    def pam(self) -> pb_grpc.PamGateStub:
        return pb_grpc.PamGateStub(grpc.insecure_channel("unix:" + self.socket("pam")))


@contextlib.contextmanager
def bench_daemon(
    cpus: set[int] | None = None,
    *extra: str,
    key_from: Path | None = None,
    profile: Path | None = None,
) -> Iterator[BenchDaemon]:
    """A BenchDaemon (not started yet), its directory removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="otpgate-bench-"))
    daemon = BenchDaemon(root, cpus, *extra, key_from=key_from, profile=profile)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def bench_users(count: int, with_password: bool = False) -> Iterator[list[tuple[str, str]]]:
    """Real local users (NSS must know them), removed afterwards."""
    tag = secrets.token_hex(2)
    users = [(f"ogb{tag}{i:04d}", "pw-" + secrets.token_hex(8)) for i in range(count)]
    lines = "".join(
        f"{name}:{pw}:::otpgate bench:/nonexistent:/usr/sbin/nologin\n" for name, pw in users
    )
    subprocess.run(["newusers"], input=lines, text=True, check=True)
    try:
        yield users
    finally:
        for name, _ in users:
            subprocess.run(["userdel", name], capture_output=True)


def enroll(daemon: BenchDaemon, names: list[str]) -> dict[str, str]:
    """Secrets of freshly renewed accounts (also clears their failure counters)."""
    import pyotp

    admin = daemon.admin()
    found = {}
    for name in names:
        entry = admin.RenewSecret(pb.RenewSecretRequest(username=name), timeout=30)
        found[name] = pyotp.parse_uri(entry.twofactor_config.provisioning_uri).secret
    return found


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return samples


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_split() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, client CPUs): one core each when there are two or more."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])
