"""The daemon's log handler: rare lines at once, bursts gathered, nothing lost at exit."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise RuntimeError("stream broken")


def test_a_failing_stream_never_reaches_the_caller() -> None:
    handler = BatchingHandler(BrokenStream(), interval=0.05)
    log = _logger(handler, "broken")
    for i in range(50):
        log.info("line %d", i)  # would raise inside a verification otherwise
    log.warning("w")
    handler.close()
    log.info("after close")
    assert handler.lost_writes >= 2


def test_lines_after_close_are_written_at_once() -> None:
    stream = CountingStream()
    handler = BatchingHandler(stream, interval=60)
    log = _logger(handler, "after")
    handler.close()
    log.info("a")
    log.info("b")
    assert stream.getvalue() == "a\nb\n"


def _blocked_signals(native_id: int) -> int:
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("SigBlk:")), 16)  # fmt: skip


def test_the_writer_thread_takes_no_signals() -> None:
    handler = BatchingHandler(CountingStream(), interval=0.05)
    log = _logger(handler, "signals")
    log.info("a")
    log.info("b")  # wakes the writer, which has set its mask by the time it writes
    deadline = time.monotonic() + 5
    while handler._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler._writer.native_id is not None
    blocked = _blocked_signals(handler._writer.native_id)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        assert blocked & (1 << (sig - 1)), sig
    handler.close()


def test_a_stop_signal_during_start_reaches_the_daemon_s_handler() -> None:
    # The daemon blocks stop signals before the log writer starts and installs its
    # handler later: a SIGTERM in between must wait for the handler, not kill.
    program = (
        "import os, signal, sys\n"
        "from otpgate.server import logs\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
        "logs.configure()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "got = []\n"
        "signal.signal(signal.SIGTERM, lambda *_: got.append(1))\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})\n"
        "print('handled' if got else 'missed')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "handled", done


def test_starts_with_standard_error_closed() -> None:
    program = (
        "import logging\n"
        "from otpgate.server import logs\n"
        "logs.configure()\n"
        "logging.getLogger('otpgated').warning('nowhere to go')\n"
        "print('alive')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          stderr=None, timeout=30, pass_fds=(),
                          preexec_fn=lambda: os.close(2))  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "alive"
