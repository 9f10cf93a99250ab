"""The daemon's log handler: rare lines at once, bursts gathered, nothing lost at exit."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time

from otpgate.server.logs import BatchingHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(f"otpgate-test-{name}")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    return logger


def test_a_rare_line_is_written_at_once() -> None:
    stream = CountingStream()
    handler = BatchingHandler(stream, interval=0.5)
    log = _logger(handler, "rare")
    log.info("first")
    assert stream.getvalue() == "first\n"
    handler.close()


def test_a_burst_is_gathered_into_few_writes_in_order() -> None:
    stream = CountingStream()
    handler = BatchingHandler(stream, interval=0.2)
    log = _logger(handler, "burst")
    for i in range(200):
        log.info("line %d", i)
    assert stream.writes < 200  # the first went out alone, the rest wait
    deadline = time.monotonic() + 5
    while stream.getvalue().count("\n") < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stream.getvalue() == "".join(f"line {i}\n" for i in range(200))
    assert stream.writes <= 3
    handler.close()


def test_warnings_are_never_held_back() -> None:
    stream = CountingStream()
    handler = BatchingHandler(stream, interval=60)
    log = _logger(handler, "warning")
    log.info("a")
    log.info("b")  # held: within the interval of "a"
    log.warning("c")
    assert stream.getvalue() == "a\nb\nc\n"
    handler.close()


def test_close_writes_what_is_pending() -> None:
    stream = CountingStream()
    handler = BatchingHandler(stream, interval=60)
    log = _logger(handler, "close")
    log.info("a")
    log.info("b")
    assert stream.getvalue() == "a\n"
    handler.close()
    assert stream.getvalue() == "a\nb\n"
    assert not handler._writer.is_alive() or handler._writer.join(1) is None
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
