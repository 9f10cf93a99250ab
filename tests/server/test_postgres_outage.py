"""otpgated when its PostgreSQL goes away: killed with SIGKILL under a load of
verifications, or frozen with SIGSTOP. Every call in between is answered, within
its bound, with "unavailable" (never a verdict, never a hang); the health service
says NOT_SERVING; the systemd watchdog keeps being fed; the hook's fail mode
decides; nothing committed before is lost; and once the database is back the same
daemon process serves again, without a restart.

These tests own their PostgreSQL server (they kill it), not the session's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pyotp
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser, hook_exit
from tests.store.pg_harness import PgServer, private_server

TIMEOUT = 1.0  # --database-timeout of the daemons here
# What a call may take while the database is away: its bound, plus the pool's own
# wait for a connection, plus a loaded 2-core machine's slack.
CALL_BOUND = 2 * TIMEOUT + 1.5


@pytest.fixture(scope="module")
def own_server() -> Iterator[PgServer]:
    with private_server() as server:
        try:
            yield server
        finally:
            for pid in _server_pids(server):  # thaw whatever a failed test left stopped
                with contextlib.suppress(ProcessLookupError):  # a backend that just ended
                    os.kill(pid, signal.SIGCONT)


def _server_pids(server: PgServer) -> list[int]:
    """The postmaster and every process it started (backends, checkpointer...)."""
    try:
        postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return []
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = (Path("/proc") / entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(entry))
    return pids


def _kill(server: PgServer) -> None:
    pids = _server_pids(server)
    assert pids, "no PostgreSQL server to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:  # gone for good before anything else: the restart needs the port
        while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return "zombie"


def _health(daemon: Daemon) -> int:
    channel = grpc.insecure_channel("unix:" + daemon.admin_socket)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        return status


def _wait_health(daemon: Daemon, status: int, within: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        if _health(daemon) == status:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"health not {status} within {within} s (is {_health(daemon)})")


@pytest.fixture
def fleet_daemon(
    own_server: PgServer, make_daemon: Callable[..., Daemon], user: LocalUser
) -> tuple[Daemon, pyotp.TOTP, str]:
    url = own_server.daemon_url(own_server.create_database())
    daemon = make_daemon("--database-url", url, "--database-timeout", str(TIMEOUT))
    daemon.admin().UpdateConfig(
        pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=10, lockout_threshold=100),
        timeout=5,
    )
    entry = daemon.admin().RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    return daemon, pyotp.parse_uri(entry.twofactor_config.provisioning_uri), url


def _row(server: PgServer, url: str, username: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT last_step, failures FROM secrets WHERE username = %s", (username,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


class Load:
    """Threads asking pam.sock whether a login needs a code (each call reads the
    settings and the secret) for as long as it runs; every answer is kept with
    how long it took. Check counts nothing, so no lockout muddles the verdicts."""

    def __init__(self, daemon: Daemon, username: str, threads: int = 8) -> None:
        self.answers: list[tuple[float, float, str]] = []  # (sent, seconds, verdict)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(daemon, username)) for _ in range(threads)
        ]

    def _run(self, daemon: Daemon, username: str) -> None:
        stub = daemon.pam()
        while not self._stop.is_set():
            sent = time.monotonic()
            request = pb.PamRequest(username=username, service="sshd")
            try:
                answer = pb.Verdict.Name(stub.Check(request, timeout=30).verdict)
            except grpc.RpcError as exc:
                answer = f"rpc:{exc.code().name}"
            with self._lock:
                self.answers.append((sent, time.monotonic() - sent, answer))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def between(self, start: float, end: float) -> list[tuple[float, float, str]]:
        with self._lock:
            return [a for a in self.answers if start <= a[0] < end]


def test_database_killed_under_load_then_back(
    own_server: PgServer,
    fleet_daemon: tuple[Daemon, pyotp.TOTP, str],
    user: LocalUser,
) -> None:
    daemon, totp, url = fleet_daemon
    pid = daemon.proc.pid if daemon.proc else None
    step = int(time.time()) // 30 - 5
    request = pb.PamRequest(username=user.name, service="sshd", authtok=totp.at(step * 30))
    assert daemon.pam().Verify(request, timeout=5).verdict == pb.VERDICT_ALLOW

    wrong = pb.PamRequest(username=user.name, service="sshd", authtok="000000")
    for _ in range(7):
        assert daemon.pam().Verify(wrong, timeout=5).verdict == pb.VERDICT_DENY

    with Load(daemon, user.name) as load:
        time.sleep(1.0)
        before = time.monotonic()
        _kill(own_server)
        killed = time.monotonic()
        down_for = _wait_health(daemon, health_pb2.HealthCheckResponse.NOT_SERVING, 5.0)
        time.sleep(2.0)
        # The hook's fail mode acts on "unavailable", as on an unreachable daemon.
        assert hook_exit(daemon, user.name, "000000", "secure") == 1
        assert hook_exit(daemon, user.name, "000000", "safe") == 0
        restarting = time.monotonic()
        own_server.start()
        back_for = _wait_health(daemon, health_pb2.HealthCheckResponse.SERVING, 15.0)
        time.sleep(1.0)
        after = time.monotonic()

    assert daemon.proc is not None and daemon.proc.pid == pid and daemon.proc.poll() is None
    decided_before = [a for a in load.between(0, before) if a[2] == "VERDICT_OTP_REQUIRED"]
    assert len(decided_before) > 10, load.answers[:5]
    # Answered while it was down (a call still waiting for a connection when the
    # server came back may rightly be decided).
    outage = [a for a in load.between(killed + 0.5, restarting) if a[0] + a[1] < restarting]
    assert len(outage) > 10
    # Every call while the database was gone: "unavailable", in time. Never a verdict
    # that decides, never a daemon error, never a wait for the caller's deadline.
    assert {a[2] for a in outage} == {"VERDICT_UNAVAILABLE"}, outage[:5]
    slowest = max(a[1] for a in outage)
    assert slowest < CALL_BOUND, slowest
    # Once back: decided again, by the same process.
    assert {a[2] for a in load.between(after - 0.5, after)} == {"VERDICT_OTP_REQUIRED"}
    assert down_for < 5.0 and back_for < 15.0

    # Nothing lost: the step spent before the crash stays spent (a replay is refused),
    # the seven wrong codes stay counted; the two hook calls answered "unavailable"
    # may or may not have been (the database can fail after it counted).
    last_step, failures = _row(own_server, url, user.name)
    assert last_step == step
    assert 7 <= failures <= 9, failures
    assert daemon.pam().Verify(request, timeout=5).verdict == pb.VERDICT_DENY  # replay
    fresh = pb.PamRequest(username=user.name, service="sshd", authtok=totp.at((step + 1) * 30))
    assert daemon.pam().Verify(fresh, timeout=5).verdict == pb.VERDICT_ALLOW
    log = daemon.log()
    assert log.count("database_unreachable") == 1 and log.count("database_back") == 1
    assert "rpc_crashed" not in log and "Traceback" not in log


def test_frozen_database_fails_calls_in_time_and_recovers(
    own_server: PgServer,
    fleet_daemon: tuple[Daemon, pyotp.TOTP, str],
    user: LocalUser,
) -> None:
    # SIGSTOP: the server keeps its sockets open and answers nothing, so only a
    # client-side deadline (store.deadlines) can end a call.
    daemon, totp, _ = fleet_daemon
    step = int(time.time()) // 30 - 5
    admin = daemon.admin()
    pids = _server_pids(own_server)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        times = []
        for _ in range(3):
            start = time.monotonic()
            request = pb.PamRequest(username=user.name, service="sshd", authtok=totp.at(step * 30))
            verdict = daemon.pam().Verify(request, timeout=30).verdict
            times.append(time.monotonic() - start)
            assert verdict == pb.VERDICT_UNAVAILABLE
        assert max(times) < CALL_BOUND, times
        # The admin API says so too: UNAVAILABLE, with the reason.
        with pytest.raises(grpc.RpcError) as caught:
            admin.GetConfig(pb.GetConfigRequest(), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not answer within" in (caught.value.details() or "")
        _wait_health(daemon, health_pb2.HealthCheckResponse.NOT_SERVING, 5.0)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    _wait_health(daemon, health_pb2.HealthCheckResponse.SERVING, 15.0)
    request = pb.PamRequest(username=user.name, service="sshd", authtok=totp.at(step * 30))
    assert daemon.pam().Verify(request, timeout=5).verdict == pb.VERDICT_ALLOW


def test_watchdog_is_fed_while_the_database_is_away(
    own_server: PgServer,
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A restart cannot bring the database back: the daemon waits, and says so.
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping every 0.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    url = own_server.daemon_url(own_server.create_database())
    daemon = make_daemon("--database-url", url, "--database-timeout", str(TIMEOUT))
    try:
        _kill(own_server)
        _wait_health(daemon, health_pb2.HealthCheckResponse.NOT_SERVING, 5.0)
        listener.settimeout(0.2)
        pings, end = 0, time.monotonic() + 3.0
        while time.monotonic() < end:
            try:
                if listener.recv(64) == b"WATCHDOG=1":
                    pings += 1
            except TimeoutError:
                pass
        assert pings >= 4, pings
    finally:
        listener.close()
        own_server.start()
    _wait_health(daemon, health_pb2.HealthCheckResponse.SERVING, 15.0)
