"""The daemon's log handler: rare lines at once, bursts gathered, nothing lost at exit."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from otpgate.server.logs import (
    BatchingHandler,
    LineFormatter,
    RateLimit,
    StderrCapture,
    keep_metadata_out,
)


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


# --- One line per record: everything unprintable escaped --------------------------


def _record(name: str, msg: str, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_the_formatter_escapes_controls_in_the_message_and_its_arguments() -> None:
    formatter = LineFormatter("%(levelname)s %(message)s")
    line = formatter.format(
        _record("otpgated", "verify user=%s note=%r", "x\nverify user=root result=valid", "a\\b")
    )
    assert line == r"INFO verify user=x\nverify user=root result=valid note='a\\\\b'"
    hostile = "\r\x1b[2J\x00\x07\x7f\x85\u2028\u2029\u202e\ufeff\udcff\t\\"
    assert formatter.format(_record("otpgated", "%s", hostile)) == (
        r"INFO \r\x1b[2J\x00\x07\x7f\x85\u2028\u2029\u202e\ufeff\xff\t\\"
    )
    ordinary = "verify user=élodie via=pam:sshd result=valid 😀"  # printable stays as is
    assert formatter.format(_record("otpgated", ordinary)) == f"INFO {ordinary}"


def test_a_traceback_and_a_multi_line_exception_message_become_one_line() -> None:
    formatter = LineFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("first\nverify user=root result=valid\x1b[0m")
    except ValueError:
        record = logging.LogRecord("otpgated", logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())  # fmt: skip
    line = formatter.format(record)
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith(r"ERROR failed\nTraceback (most recent call last):\n  File ")
    assert line.endswith(r"ValueError: first\nverify user=root result=valid\x1b[0m")


def test_records_of_other_loggers_say_whose_they_are() -> None:
    formatter = LineFormatter("otpgated[1] %(levelname)s %(message)s")
    assert formatter.format(_record("otpgated", "started")) == "otpgated[1] INFO started"
    assert formatter.format(_record("grpc.core", "verify user=root", level=logging.ERROR)) == (
        "otpgated[1] ERROR grpc.core: verify user=root"
    )


def test_a_line_is_cut_below_the_journals_limit_never_inside_an_escape() -> None:
    formatter = LineFormatter("%(message)s", max_bytes=100)
    for text in ("a" * 500, "\x1b" * 500, "é" * 500, "a\\" * 300, "\U0001f600" * 100):
        line = formatter.format(_record("otpgated", "%s", text))
        assert len(line.encode()) <= 100 and line.endswith(" [line truncated]"), line
        kept = line.removesuffix(" [line truncated]")
        unescaped = kept.encode("ascii", "backslashreplace").decode("unicode_escape")
        assert text.startswith(unescaped)  # whole escapes only
    assert formatter.format(_record("otpgated", "%s", "a" * 100)) == "a" * 100


def test_undecodable_metadata_is_reported_without_its_value() -> None:
    # What grpc's Cython layer logs for a header value that is not UTF-8.
    value = b"Bearer \xff\xfe secret-token\n"
    try:
        value.decode("utf8")
    except UnicodeDecodeError:
        record = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "", 0,
                                   "Invalid encoding on %s", (value,), sys.exc_info())  # fmt: skip
    assert keep_metadata_out(record)
    line = LineFormatter("%(levelname)s %(message)s").format(record)
    assert line == (
        "ERROR grpc._cython.cygrpc: invalid UTF-8 in a call's metadata or method: "
        f"{len(value)} bytes, not shown (invalid start byte at byte 7)"
    )


def test_a_record_that_cannot_be_formatted_is_said_in_a_line_of_ours(batching: Batching) -> None:
    # logging's default would print it to sys.stderr: the capture pipe, whose reader
    # may be waiting for the lock held here.
    stream, handler, log = batching(60)
    handler.setFormatter(LineFormatter("%(levelname)s %(message)s"))
    log.info("count=%d", "not a number\n")
    assert stream.getvalue() == (
        f"ERROR log_record_unformattable logger={log.name} message='count=%d' error=TypeError\n"
    )
    assert handler.unformattable == 1


# --- Rate limit -----------------------------------------------------------------------


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_flood_of_grpc_lines_is_cut_to_the_limit_and_counted() -> None:
    stream = CountingStream()
    handler = BatchingHandler(stream, interval=0.01, rate_limit=RateLimit(lines=3, seconds=0.3))
    handler.setFormatter(LineFormatter("%(levelname)s %(message)s"))
    try:
        for i in range(50):
            handler.handle(_record("grpc.core", "goaway %d", i, level=logging.ERROR))
            handler.handle(_record("grpc._server", "exception %d", i, level=logging.ERROR))
        for i in range(20):
            handler.handle(_record("otpgated", "verify %d", i, level=logging.WARNING))
        # No further line comes: the writer tells the counts when the window ends.
        _wait_until(lambda: "log_suppressed" in stream.getvalue())
        _wait_until(lambda: stream.getvalue().count("log_suppressed") == 2)
        lines = stream.getvalue().splitlines()
        assert [line for line in lines if "grpc.core" in line] == [
            "ERROR grpc.core: goaway 0", "ERROR grpc.core: goaway 1", "ERROR grpc.core: goaway 2",
            "WARNING log_suppressed logger=grpc.core lines=47 limit=3/0.3s",
        ]  # fmt: skip
        assert "WARNING log_suppressed logger=grpc._server lines=47 limit=3/0.3s" in lines
        assert [line for line in lines if "verify" in line] == [
            f"WARNING verify {i}"
            for i in range(20)  # otpgated's own: never limited
        ]
        time.sleep(0.35)  # a new window: lines go out again
        handler.handle(_record("grpc.core", "later", level=logging.ERROR))
        assert stream.getvalue().endswith("ERROR grpc.core: later\n")
    finally:
        handler.close()


def test_lines_dropped_in_the_last_window_are_counted_at_close() -> None:
    stream = CountingStream()
    handler = BatchingHandler(stream, interval=60, rate_limit=RateLimit(lines=1, seconds=60))
    handler.setFormatter(LineFormatter("%(levelname)s %(message)s"))
    for _ in range(5):
        handler.handle(_record("stderr", "noise", level=logging.WARNING))
    handler.close()
    assert stream.getvalue() == (
        "WARNING stderr: noise\nWARNING log_suppressed logger=stderr lines=4 limit=1/60s\n"
    )


# --- File descriptor 2 as a pipe: gRPC core's lines, folded ---------------------------


Captured = tuple[int, list[logging.LogRecord], StderrCapture]


@pytest.fixture
def captured() -> Iterator[Callable[..., Captured]]:
    """A StderrCapture on a descriptor of the test's own (not 2), records to a list."""
    made: list[tuple[int, StderrCapture]] = []

    def make(**options: object) -> Captured:
        target = os.open(os.devnull, os.O_WRONLY)
        records: list[logging.LogRecord] = []
        capture = StderrCapture(target, sink=records.append, **options)  # type: ignore[arg-type]
        made.append((target, capture))
        return target, records, capture

    yield make
    for target, capture in made:
        os.close(target)  # the last writer: the reader sees the end and stops
        assert capture.ended.wait(5)


CORE = "E1201 21:41:08.123456    1234 chttp2_transport.cc:1403] "


def _messages(records: list[logging.LogRecord]) -> list[tuple[str, str, str]]:
    return [(r.name, r.levelname, r.getMessage()) for r in records]


def test_text_written_with_a_grpc_line_is_folded_into_its_record(
    captured: Callable[..., Captured],
) -> None:
    fd, records, capture = captured()
    goaway = (
        f"{CORE.replace('E', 'I', 1)}Got goaway; Debug Text: \n"
        "verify user=root via=pam:sshd result=valid\n\x1b[2J\r {http2_error:2}\n"
    )
    os.write(fd, goaway.encode() + b"\xff\xfe\n")
    os.write(fd, f"{CORE}Error parsing ':method' metadata: invalid value\n".encode())
    os.write(fd, b"W1201 21:41:09.000001 99 log.cc:102] Log level\n")
    assert capture.drain()
    assert _messages(records) == [
        ("grpc.core", "INFO", "chttp2_transport.cc:1403] Got goaway; Debug Text: \n"
         "verify user=root via=pam:sshd result=valid\n\x1b[2J\r {http2_error:2}\n\udcff\udcfe"),
        ("grpc.core", "ERROR", "chttp2_transport.cc:1403] Error parsing ':method' metadata: "
         "invalid value"),
        ("grpc.core", "WARNING", "log.cc:102] Log level"),
    ]  # fmt: skip
    line = LineFormatter("%(levelname)s %(message)s").format(records[0])
    assert line.endswith(r"Debug Text: \nverify user=root via=pam:sshd result=valid"
                         r"\n\x1b[2J\r {http2_error:2}\n\xff\xfe")  # fmt: skip


def test_a_record_is_complete_after_a_quiet_moment(captured: Callable[..., Captured]) -> None:
    fd, records, _ = captured(idle=0.05)
    os.write(fd, f"{CORE}first\ncontinued".encode())  # even without its newline
    _wait_until(lambda: bool(records))
    assert _messages(records) == [("grpc.core", "ERROR", "chttp2_transport.cc:1403] first\n"
                                   "continued")]  # fmt: skip
    time.sleep(0.1)
    os.write(fd, b"later, no prefix\n")  # nothing open to join: a record of its own
    _wait_until(lambda: len(records) == 2)
    assert _messages(records)[1] == ("stderr", "WARNING", "later, no prefix")


def test_lines_without_the_prefix_before_any_grpc_line_are_one_stderr_record(
    captured: Callable[..., Captured],
) -> None:
    fd, records, capture = captured()
    os.write(fd, b"Exception in thread x:\nTraceback (most recent call last):\n")
    os.write(fd, b'  File "x.py", line 1\nValueError: v\n')
    assert capture.drain()
    assert _messages(records) == [("stderr", "WARNING", "Exception in thread x:\nTraceback "
                                   "(most recent call last):\n  File \"x.py\", line 1\n"
                                   "ValueError: v")]  # fmt: skip


def test_grpc_lines_below_the_floor_go_with_their_folded_text(
    captured: Callable[..., Captured],
) -> None:
    fd, records, capture = captured(floor=logging.ERROR)
    os.write(fd, f"{CORE.replace('E', 'I', 1)}Got goaway\nverify user=root\n".encode())
    os.write(fd, f"{CORE}kept\n".encode())
    assert capture.drain()
    assert _messages(records) == [("grpc.core", "ERROR", "chttp2_transport.cc:1403] kept")]


def test_a_record_keeps_at_most_max_chars(captured: Callable[..., Captured]) -> None:
    fd, records, capture = captured(max_chars=100)
    os.write(fd, (CORE + "x" * 300 + "\n" + "y" * 50 + "\n").encode())
    os.write(fd, b"z" * 5000)  # one line, never ended: kept to the bound as well
    assert capture.drain()
    assert _messages(records) == [
        ("grpc.core", "ERROR", "chttp2_transport.cc:1403] " + "x" * 74
         + " [5278 more characters not kept]")
    ]  # fmt: skip


def test_the_reader_thread_takes_no_signals(captured: Callable[..., Captured]) -> None:
    fd, _, capture = captured()
    os.write(fd, b"x\n")
    assert capture.drain()  # the reader has run its loop: its mask is set
    assert capture._reader.native_id is not None
    blocked = _blocked_signals(capture._reader.native_id)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        assert blocked & (1 << (sig - 1)), sig


def _run_configured(body: str) -> subprocess.CompletedProcess[str]:
    program = (
        "import logging, os, sys\n"
        "from otpgate.server import logs\n"
        "logs.configure()\n"
        "log = logging.getLogger('otpgated')\n" + body
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "JOURNAL_STREAM")}
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=30, env=env)  # fmt: skip


OWN_LINE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} otpgated\[\d+\] (INFO|WARNING|ERROR) \S"


def test_what_c_code_and_python_write_to_fd_2_comes_out_as_our_lines() -> None:
    done = _run_configured(
        "import time\n"
        "log.info('before')\n"
        f"os.write(2, b'{CORE}Got goaway: \\nverify user=root result=valid\\n tail\\n')\n"
        "os.write(2, b'I1201 21:41:08.123456 1 x.cc:1] an info line, dropped\\nfolded\\n')\n"
        "time.sleep(0.3)\n"  # a record ends after a quiet moment: the next one is not folded
        "print('printed\\r\\x1b[2J', file=sys.stderr)\n"
        "time.sleep(0.3)\n"
        "log.info('after')\n"
        "raise SystemExit(3)\n"
    )
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    assert all(re.match(OWN_LINE, line) for line in lines), lines
    assert [line.split("] ", 1)[1] for line in lines] == [
        "INFO before",
        r"ERROR grpc.core: chttp2_transport.cc:1403] Got goaway: \nverify user=root "
        r"result=valid\n tail",
        r"WARNING stderr: printed\r\x1b[2J",  # GRPC_VERBOSITY unset: no info line
        "INFO after",
    ]


def test_an_uncaught_exception_at_exit_is_one_line_and_still_written() -> None:
    done = _run_configured("log.info('one')\nraise RuntimeError('bad\\nverify user=root')\n")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all(re.match(OWN_LINE, line) for line in lines), lines
    assert lines[1].split("] ", 1)[1].startswith(r"WARNING stderr: Traceback (most recent")
    assert lines[1].endswith(r"RuntimeError: bad\nverify user=root")


def test_children_write_through_the_pipe_too() -> None:
    done = _run_configured(
        "import subprocess\n"
        "subprocess.run(['sh', '-c', 'printf \"child\\\\nverify user=root\\\\n\" >&2'])\n"
    )
    assert done.returncode == 0
    assert [line.split("] ", 1)[1] for line in done.stderr.splitlines()] == [
        r"WARNING stderr: child\nverify user=root"
    ]
