"""user.sock's relay on its own: bytes through unchanged, callers named, budgets kept."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from otpgate.server.relay import PEER_PREFIX, Budgets, CallerRegistry, UserSocketRelay
from tests.conftest import RUNUSER


class Upstream:
    """Echoes every byte back, and records the peer name of each connection."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.peers: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, address = self.listener.accept()
            except OSError:
                return
            self.peers.append(address.decode() if isinstance(address, bytes) else address)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[Callable[..., tuple[UserSocketRelay, Upstream]]]:
    made: list[UserSocketRelay] = []
    public = Path(tempfile.mkdtemp(prefix="otpgate-test-relay-"))
    public.chmod(0o755)  # other users reach the public socket, never the upstream

    def make(**budgets: object) -> tuple[UserSocketRelay, Upstream]:
        upstream = Upstream(str(tmp_path / f"up{len(made)}.sock"))
        relay = UserSocketRelay(
            str(public / f"user{len(made)}.sock"),
            str(tmp_path / f"up{len(made)}.sock"),
            CallerRegistry(),
            Budgets(**budgets),  # type: ignore[arg-type]
        )
        relay.bind()
        os.chmod(relay.public_path, 0o666)  # noqa: S103 - as otpgated does
        relay.start()
        made.append(relay)
        return relay, upstream

    yield make
    for relay in made:
        relay.stop()
    shutil.rmtree(public, ignore_errors=True)


def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_bytes_pass_unchanged_and_caller_is_named(relay_factory: Callable[..., tuple]) -> None:
    relay, upstream = relay_factory()
    client = socket.socket(socket.AF_UNIX)
    client.connect(relay.public_path)
    payload = os.urandom(300_000)  # more than one read, more than the high-water mark
    threading.Thread(target=client.sendall, args=(payload,), daemon=True).start()
    received = bytearray()
    while len(received) < len(payload):
        received += client.recv(65536)
    assert bytes(received) == payload
    _wait(lambda: len(upstream.peers) == 1)
    # The upstream sees an abstract name, and the registry maps it to us (root).
    name = upstream.peers[0].lstrip("\0")
    caller = relay.registry.from_peer(PEER_PREFIX + name)
    assert caller is not None and (caller.uid, caller.pid) == (0, os.getpid())
    assert relay.registry.from_peer("unix:") is None
    assert relay.registry.from_peer(PEER_PREFIX + "otpgate-user/forged") is None
    client.close()
    _wait(lambda: relay.connection_count() == 0)  # gone from the registry with the link


def test_total_budget_refuses_extra_connections(relay_factory: Callable[..., tuple]) -> None:
    relay, _ = relay_factory(max_connections=3)
    held = []
    for _ in range(6):
        s = socket.socket(socket.AF_UNIX)
        s.connect(relay.public_path)
        held.append(s)
    _wait(lambda: relay.connection_count() == 3)
    time.sleep(0.2)
    assert relay.connection_count() == 3
    # The refused ones were closed by the relay: they read end-of-file.
    closed = 0
    for s in held:
        s.settimeout(0.5)
        try:
            s.send(b"x")
            if s.recv(1) == b"":
                closed += 1
        except (BrokenPipeError, ConnectionResetError):
            closed += 1
        except TimeoutError:
            pass
    assert closed == 3


def test_idle_links_are_closed(relay_factory: Callable[..., tuple]) -> None:
    relay, _ = relay_factory(idle_seconds=1.0)
    client = socket.socket(socket.AF_UNIX)
    client.connect(relay.public_path)
    _wait(lambda: relay.connection_count() == 1)
    _wait(lambda: relay.connection_count() == 0, timeout=5)
    client.settimeout(2)
    assert client.recv(1) == b""


def _as_nobody(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [RUNUSER, "-u", "nobody", "--", sys.executable, "-I", "-c", script, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip


def test_per_uid_budget_and_byte_rate(relay_factory: Callable[..., tuple]) -> None:
    relay, _ = relay_factory(max_per_uid=2, bytes_per_second=20_000, burst_bytes=20_000)
    script = """
import socket, sys, time
path = sys.argv[1]
socks = []
for _ in range(5):
    s = socket.socket(socket.AF_UNIX); s.connect(path); socks.append(s)
time.sleep(0.5)
alive = []
for s in socks:
    s.settimeout(0.3)
    try:
        s.send(b"ping")
        alive.append(s.recv(4) == b"ping")
    except (OSError, TimeoutError):
        alive.append(False)
print(sum(alive), flush=True)
s = [x for x, ok in zip(socks, alive) if ok][0]
s.settimeout(10)
started = time.monotonic()
total = 100_000
import threading
threading.Thread(target=s.sendall, args=(b"x" * total,), daemon=True).start()
got = 0
while got < total:
    got += len(s.recv(65536))
print(f"{time.monotonic() - started:.2f}", flush=True)
"""
    child = _as_nobody(script, relay.public_path)
    out, _ = child.communicate(timeout=60)
    alive, seconds = out.split()
    assert int(alive) == 2  # nobody keeps 2 links; the other 3 were closed at once
    # 100 kB at 20 kB/s with 20 kB saved up: at least about 4 s, not instant.
    assert float(seconds) >= 3.0, seconds
