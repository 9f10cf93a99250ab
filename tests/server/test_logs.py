"""The daemon's log handler: rare lines at once, bursts gathered, nothing lost at exit."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from otpgate.server.logs import BatchingHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


Batching = Callable[..., tuple[CountingStream, BatchingHandler, logging.Logger]]


@pytest.fixture
def batching(request: pytest.FixtureRequest) -> Iterator[Batching]:
    """A handler on a counting stream and a logger of its own; closed afterwards."""
    handlers: list[BatchingHandler] = []

    def make(
        interval: float, stream: CountingStream | None = None
    ) -> tuple[CountingStream, BatchingHandler, logging.Logger]:
        stream = stream if stream is not None else CountingStream()
        handler = BatchingHandler(stream, interval=interval)
        handlers.append(handler)
        logger = logging.getLogger(f"otpgate-test-{request.node.name}-{len(handlers)}")
        logger.propagate = False
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        return stream, handler, logger

    yield make
    for handler in handlers:
        handler.close()


def test_a_rare_line_is_written_at_once(batching: Batching) -> None:
    stream, _, log = batching(0.5)
    log.info("first")
    assert stream.getvalue() == "first\n"


def test_a_burst_is_gathered_into_few_writes_in_order(batching: Batching) -> None:
    stream, _, log = batching(0.2)
    for i in range(200):
        log.info("line %d", i)
    assert stream.writes < 200  # the first went out alone, the rest wait
    deadline = time.monotonic() + 5
    while stream.getvalue().count("\n") < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stream.getvalue() == "".join(f"line {i}\n" for i in range(200))
    assert stream.writes <= 3


def test_warnings_are_never_held_back(batching: Batching) -> None:
    stream, _, log = batching(60)
    log.info("a")
    log.info("b")  # held: within the interval of "a"
    log.warning("c")
    assert stream.getvalue() == "a\nb\nc\n"


def test_close_writes_what_is_pending_and_ends_the_writer(batching: Batching) -> None:
    stream, handler, log = batching(60)
    log.info("a")
    log.info("b")
    assert stream.getvalue() == "a\n"
    handler.close()
    assert stream.getvalue() == "a\nb\n"
    handler._writer.join(timeout=5)
    assert not handler._writer.is_alive()


def test_lines_pending_at_exit_reach_stderr() -> None:
    # logging.shutdown at interpreter exit flushes, with the handler's lock held.
    program = (
        "import logging, sys\n"
        "from otpgate.server import logs\n"
        "logs.configure()\n"
        "log = logging.getLogger('otpgated')\n"
        "for i in range(500): log.info('line %d', i)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line.rsplit(" ", 1)[-1] for line in lines] == [str(i) for i in range(500)]
    assert time.monotonic() - started < 10


class BrokenStream(CountingStream):
    def write(self, text: str) -> int:
        raise RuntimeError("stream broken")


def test_a_failing_stream_never_reaches_the_caller(batching: Batching) -> None:
    _, handler, log = batching(0.05, BrokenStream())
    for i in range(50):
        log.info("line %d", i)  # would raise inside a verification otherwise
    log.warning("w")
    handler.close()
    log.info("after close")
    assert handler.lost_writes >= 2


def test_lines_after_close_are_written_at_once(batching: Batching) -> None:
    stream, handler, log = batching(60)
    handler.close()
    log.info("a")
    log.info("b")
    assert stream.getvalue() == "a\nb\n"


def _blocked_signals(native_id: int) -> int:
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("SigBlk:")), 16)  # fmt: skip


def test_the_writer_thread_takes_no_signals(batching: Batching) -> None:
    _, handler, log = batching(0.05)
    log.info("a")
    log.info("b")  # wakes the writer, which has set its mask by the time it writes
    deadline = time.monotonic() + 5
    while handler._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler._writer.native_id is not None
    blocked = _blocked_signals(handler._writer.native_id)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        assert blocked & (1 << (sig - 1)), sig


def test_starts_with_standard_error_closed() -> None:
    program = (
        "import logging\n"
        "from otpgate.server import logs\n"
        "logs.configure()\n"
        "logging.getLogger('otpgated').warning('nowhere to go')\n"
        "print('alive')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=30, preexec_fn=lambda: os.close(2))  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "alive"
