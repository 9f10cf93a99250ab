"""A real grpcio server playing otpgated's PamGate, with replies the test controls."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc
from tests.conftest import REPO

HOOK_MODULE = REPO / "pam_hook" / "otpgate_pam_hook.py"
HOOK_LAUNCHER = REPO / "pam_hook" / "otpgate-pam-hook"


def load_hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("otpgate_pam_hook", HOOK_MODULE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def hook() -> ModuleType:
    return load_hook()


Reply = Callable[[pb.PamRequest, grpc.ServicerContext], pb.PamDecision]


@dataclass
class FakeGate(pb_grpc.PamGateServicer):
    reply: Reply = lambda request, context: pb.PamDecision(verdict=pb.VERDICT_ALLOW)
    seen: list[tuple[str, pb.PamRequest]] = field(default_factory=list)

    def _answer(
        self, name: str, request: pb.PamRequest, context: grpc.ServicerContext
    ) -> pb.PamDecision:
        self.seen.append((name, request))
        return self.reply(request, context)

    def Check(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("Check", request, context)

    def Verify(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("Verify", request, context)

    def VerifySinglePrompt(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("VerifySinglePrompt", request, context)


@pytest.fixture
def fake_gate(tmp_path: Path) -> Iterator[tuple[FakeGate, str]]:
    gate = FakeGate()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_PamGateServicer_to_server(gate, server)
    path = str(tmp_path / "pam.sock")
    server.add_insecure_port("unix:" + path)
    server.start()
    yield gate, path
    server.stop(0)


@pytest.fixture
def raw_server(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """A Unix socket server whose behaviour is a function of the accepted connection."""
    listeners: list[socket.socket] = []

    def start(behaviour: Callable[[socket.socket], None]) -> str:
        path = str(tmp_path / f"raw{len(listeners)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4)
        listeners.append(listener)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                behaviour(conn)
                time.sleep(0.2)

        threading.Thread(target=serve, daemon=True).start()
        return path

    yield start
    for listener in listeners:
        listener.close()
