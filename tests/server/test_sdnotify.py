"""sd_notify and the watchdog against a real datagram socket, and a daemon's READY=1."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from otpgate.server import sdnotify
from tests.conftest import Daemon


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_notify_sends_the_state(notify_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1")
    assert notify_socket.recv(100) == b"READY=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"otpgate-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert sdnotify.notify("STOPPING=1")
        assert sock.recv(100) == b"STOPPING=1"
    finally:
        sock.close()


@pytest.mark.parametrize("value", [None, "", "relative/path", "/nonexistent/notify"])
def test_no_or_bad_socket(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert sdnotify.watchdog_interval() is None


def _collect(sock: socket.socket, seconds: float) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + seconds
    sock.settimeout(0.05)
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            got.append(sock.recv(100))
    return got


def test_watchdog_pings_only_while_healthy(notify_socket: socket.socket) -> None:
    healthy = threading.Event()
    healthy.set()
    dog = sdnotify.Watchdog(0.05, healthy.is_set)
    dog.start()
    pings = _collect(notify_socket, 0.6)
    assert len(pings) >= 3 and set(pings) == {b"WATCHDOG=1"}
    healthy.clear()
    time.sleep(0.1)
    _collect(notify_socket, 0.05)
    assert _collect(notify_socket, 0.4) == []
    dog.stop()


def test_daemon_reports_ready_and_stopping(
    make_daemon: Callable[..., Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        daemon = make_daemon()
        assert sock.recv(100) == b"READY=1"
        daemon.stop()
        assert sock.recv(100) == b"STOPPING=1"
    finally:
        sock.close()
