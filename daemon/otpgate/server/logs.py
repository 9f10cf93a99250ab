"""otpgated's log: one line per event on stderr (the journal under systemd).

Every line of it is written by this module's formatter, whoever had something to say.
Text a caller controls gets in through more doors than otpgate's own messages: gRPC
core (C) writes a peer's GOAWAY debug text to file descriptor 2 verbatim, newlines
and all, and grpc's Python layer logs undecodable request metadata. So:

- `LineFormatter` escapes, in the finished line, every character that is not
  printable (controls, line and paragraph separators, bidi and other format
  characters, bytes that were not UTF-8) and the backslash: the message, its
  %-arguments, an exception's text and a whole traceback end up on one line. It
  names the logger of every record that is not otpgated's own ("ERROR grpc.core:
  ..."), and cuts a line at `LINE_MAX_BYTES` (the journal splits longer ones itself).
- `StderrCapture` puts a pipe on file descriptor 2, so nothing else reaches the real
  stderr (the handler writes to a private copy of it). A thread turns what arrives
  into records: a line that starts with gRPC core's own prefix (absl's
  "E1201 21:41:08.123456  1234 file.cc:123] ") begins a "grpc.core" record, any
  other line is folded into the record before it ("\\n" in the output), so text
  written in one go with a gRPC line never starts a line of its own.
- `RateLimit` keeps the lines a caller can cause (gRPC's loggers, stray stderr) to a
  few a second per logger, and says how many it dropped.

Every verification writes a line. Written one by one, each line is a system call
that hands the interpreter lock to another thread: at 64 concurrent logins,
dropping the line altogether raised verifications by 9 to 18 points of the
empty-RPC rate in the benchmark. Lines are therefore written at once while
they are rare, and gathered for at most `interval` seconds when they come faster
than that; warnings and errors always go out at once, and whatever is pending is
written at shutdown (logging.shutdown runs at exit) and before a traceback. An
end without exit handlers (SIGKILL, the watchdog's abort, a crash in C code) can
drop the last `interval` seconds of lines, and what C code wrote to stderr just
before (gRPC's last words before an abort among it): the pipe dies with the process.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from otpgate.core import audit

BATCH_INTERVAL = 0.1  # seconds
# The journal cuts a longer line itself (LineMax=, 48K by default) and the rest
# would start a line of its own.
LINE_MAX_BYTES = 16 * 1024
OWN_LOGGER = "otpgated"
# Loggers whose lines a caller can cause, and how many of those a second each.
LIMITED_LOGGERS = ("grpc", "stderr")
LIMIT_PER_SECOND = 10

# ---------------------------------------------------------------------------------
# One line per record, nothing unprintable in it.

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# All but printable ASCII: the characters that may need a look.
_SUSPECT = re.compile(r"[^\x20-\x5b\x5d-\x7e]")
_TRUNCATED = " [line truncated]"


def _escape_char(c: str) -> str:
    if c.isprintable() and c != "\\":
        return c
    named = _NAMED.get(c)
    if named is not None:
        return named
    n = ord(c)
    if 0xDC80 <= n <= 0xDCFF:  # a byte that was not UTF-8 (decoded "surrogateescape")
        return f"\\x{n - 0xDC00:02x}"
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def escape(text: str, max_bytes: int = LINE_MAX_BYTES) -> str:
    """`text` as one printable line of at most `max_bytes` UTF-8 bytes: each character
    that str.isprintable() refuses, and the backslash, written as an escape
    (\\n, \\x1b, \\u2028, ...); a longer line is cut and says so."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        line = text  # the usual case, at C speed
    else:
        line = _SUSPECT.sub(lambda m: _escape_char(m.group()), text)
    if len(line) * 4 <= max_bytes or len(line.encode()) <= max_bytes:
        return line
    budget = max_bytes - len(_TRUNCATED)
    pieces: list[str] = []
    for c in text:  # cut between escapes, never inside one
        piece = _escape_char(c)
        budget -= len(piece.encode())
        if budget < 0:
            break
        pieces.append(piece)
    return "".join(pieces) + _TRUNCATED


class LineFormatter(logging.Formatter):
    """`fmt` for otpgated's own records; "<logger>: " before the message of any other
    (gRPC's, stray stderr), so none can pass for one of ours. The finished line,
    traceback included, goes through escape()."""

    def __init__(self, fmt: str, *, own: str = OWN_LOGGER, max_bytes: int = LINE_MAX_BYTES) -> None:
        super().__init__(fmt)
        self._own = own
        self._max_bytes = max_bytes
        self._foreign = logging.PercentStyle(fmt.replace("%(message)s", "%(name)s: %(message)s"))

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.name == self._own:
            return super().formatMessage(record)
        return self._foreign.format(record)

    def format(self, record: logging.LogRecord) -> str:
        return escape(super().format(record), self._max_bytes)


def keep_metadata_out(record: logging.LogRecord) -> bool:
    """Handler filter: grpc's Python layer logs request metadata (an authorization
    header: a credential) that is not UTF-8, whole, with a traceback. Keep the value
    out: its length and what was wrong with it are enough."""
    if (
        record.name.startswith("grpc._cython")
        and record.msg == "Invalid encoding on %s"
        and isinstance(record.args, tuple)
        and len(record.args) == 1
        and isinstance(record.args[0], bytes | str)
    ):
        error = record.exc_info[1] if record.exc_info else None
        reason = (
            f"{error.reason} at byte {error.start}"
            if isinstance(error, UnicodeDecodeError)
            else "undecodable"
        )
        record.msg = "invalid UTF-8 in a call's metadata or method: %d bytes, not shown (%s)"
        record.args = (len(record.args[0]), reason)
        record.exc_info = record.exc_text = None
    return True


# ---------------------------------------------------------------------------------
# A few lines a second per logger for what callers can cause.


def name_the_certificate(record: logging.LogRecord) -> bool:
    """A line otpgated writes while serving a call from the network listener ends with
    the certificate's name, serial and role (the call's audit origin), so that every
    change made remotely says who made it, in the log as in the audit trail."""
    caller = audit.origin().caller
    if record.name != OWN_LOGGER or not caller.startswith("cert="):
        return True
    try:
        message = record.getMessage()
    except (TypeError, ValueError):
        return True  # a bad format: logging's own error handling reports it, not us
    if "cert=" not in message:  # the guard's own lines name it already
        record.msg, record.args = f"{message} by {caller}", None
    return True


def _own_record(level: int, msg: str, args: tuple[object, ...]) -> logging.LogRecord:
    return logging.LogRecord(OWN_LOGGER, level, "", 0, msg, args, None)


@dataclasses.dataclass
class _Window:
    start: float
    count: int = 0
    suppressed: int = 0


class RateLimit:
    """At most `lines` records per `seconds` from each logger named in `names` (or
    below one of them); then one "log_suppressed" line per logger and window with
    the count. Not thread-safe: BatchingHandler calls it under its lock."""

    def __init__(
        self,
        names: tuple[str, ...] = LIMITED_LOGGERS,
        lines: int = LIMIT_PER_SECOND,
        seconds: float = 1.0,
    ) -> None:
        self._names = names
        self.lines, self.seconds = lines, seconds
        self._limited: dict[str, bool] = {}  # logger name: limited? (a few names)
        self._windows: dict[str, _Window] = {}
        self._ended: list[tuple[str, int]] = []  # windows over, their count not yet told
        self.dropping = False  # some window has lines dropped: due() has work

    def _is_limited(self, name: str) -> bool:
        limited = self._limited.get(name)
        if limited is None:
            limited = any(name == n or name.startswith(n + ".") for n in self._names)
            self._limited[name] = limited
        return limited

    def admit(self, name: str, now: float) -> bool:
        if not self._is_limited(name):
            return True
        window = self._windows.get(name)
        if window is None or now - window.start >= self.seconds:
            if window is not None and window.suppressed:
                self._ended.append((name, window.suppressed))
            window = self._windows[name] = _Window(now)
        window.count += 1
        if window.count <= self.lines:
            return True
        window.suppressed += 1
        self.dropping = True
        return False

    def due(self, now: float, *, everything: bool = False) -> list[logging.LogRecord]:
        """Summaries of the windows that have ended with lines dropped (of every
        window with lines dropped when `everything`: at close)."""
        if not self.dropping:
            return []
        ended, self._ended = self._ended, []
        for name, window in list(self._windows.items()):
            if now - window.start >= self.seconds:
                del self._windows[name]
            elif not everything:
                continue
            if window.suppressed:
                ended.append((name, window.suppressed))
                window.suppressed = 0
        self.dropping = any(w.suppressed for w in self._windows.values())
        return [
            _own_record(
                logging.WARNING,
                "log_suppressed logger=%s lines=%d limit=%d/%gs",
                (name, count, self.lines, self.seconds),
            )
            for name, count in ended
        ]

    def next_due(self) -> float | None:
        """When the first window with lines dropped ends."""
        ends = [w.start + self.seconds for w in self._windows.values() if w.suppressed]
        return min(ends) if ends else None


# ---------------------------------------------------------------------------------
# The handler: rare lines at once, bursts gathered, nothing lost at exit.


class BatchingHandler(logging.Handler):
    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = BATCH_INTERVAL,
        rate_limit: RateLimit | None = None,
    ) -> None:
        super().__init__()
        self._stream = stream
        self._interval = interval
        self._limit = rate_limit
        self._pending: list[str] = []
        self._last_write = float("-inf")
        self._wake = threading.Event()
        self._closed = False
        self.lost_writes = 0
        self.unformattable = 0
        self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        # handle() holds self.lock around emit: _pending, _last_write, _limit are ours.
        now = time.monotonic()
        if self._limit is not None:
            if self._limit.dropping:
                self._summaries(now)
            if not self._limit.admit(record.name, now):
                self._wake.set()  # the writer reports the count when the window ends
                return
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        quiet = now - self._last_write >= self._interval
        if quiet or record.levelno >= logging.WARNING or self._closed:
            self.flush()
        else:
            self._wake.set()

    def handleError(self, record: logging.LogRecord) -> None:
        # logging's default prints the record to sys.stderr: the capture pipe, whose
        # reader may be waiting for the lock held here. Say it in a line of ours.
        self.unformattable += 1
        error = sys.exc_info()[1]
        note = _own_record(
            logging.ERROR,
            "log_record_unformattable logger=%s message=%r error=%s",
            (record.name, str(record.msg), type(error).__name__),
        )
        with contextlib.suppress(Exception):
            self._pending.append(self.format(note) + "\n")
            self.flush()

    def _summaries(self, now: float) -> None:
        assert self._limit is not None
        for summary in self._limit.due(now, everything=self._closed):
            self._pending.append(self.format(summary) + "\n")

    def flush(self) -> None:
        # Under the handler's lock, which handle() already holds around emit: batches
        # reach the stream in order, and a write never interleaves with another.
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            if self._limit is not None:
                self._summaries(time.monotonic())
            text = "".join(self._pending)
            self._pending.clear()
            self._last_write = time.monotonic()
            if text:
                try:
                    self._stream.write(text)
                    self._stream.flush()
                except Exception:  # a failing stderr must never fail a login...
                    self.lost_writes += 1  # ...and there is nowhere else to tell

    def _run(self) -> None:
        # Signals are for the main thread: one delivered here would take its default
        # action (SIGTERM: death) before the daemon's handler could drain the calls.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while not self._closed:
            timeout = None
            if self._limit is not None:
                with self.lock:  # type: ignore[union-attr]
                    due = self._limit.next_due()
                if due is not None:
                    timeout = max(0.0, due - time.monotonic())
            woken = self._wake.wait(timeout)
            if self._closed:
                break
            if woken:
                time.sleep(self._interval)
                self._wake.clear()  # before taking the batch: a later line sets it again
            self.flush()  # and the summaries of windows that have ended

    def close(self) -> None:
        # logging.shutdown calls this with the handler's lock held: no join here (the
        # writer may be waiting for that lock); it sees _closed and ends by itself.
        self._closed = True
        self._wake.set()
        self.flush()
        super().close()


# ---------------------------------------------------------------------------------
# File descriptor 2: a pipe, read into records.

# absl's prefix, as grpcio 1.85 writes it ("I1201 21:45:55.105508   18923
# chttp2_transport.cc:1403] "); older gRPC (gpr_log) wrote nanoseconds.
_CORE_PREFIX = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d\d\.\d{6,9} +\d+ (\S+:\d+\] ?)")
_CORE_LEVELS = {
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}
CORE_LOGGER = "grpc.core"
STDERR_LOGGER = "stderr"  # what arrives without gRPC's prefix and no record to join
RECORD_MAX_CHARS = 4096  # of one record's text; beyond, counted, not kept
_READ_SIZE = 65536
# An unfinished line is waited for up to this long: more than absl's longest message
# (15,000 bytes), so no line of gRPC's is ever cut where its (caller's) text could
# then pass for the start of a line.
_PARTIAL_MAX = 65536


def _fd_above_2(fd: int) -> int:
    """`fd` moved to a number above 2 (close-on-exec): with 0, 1 or 2 closed at start,
    a new descriptor could otherwise take the place of one of them."""
    if fd > 2:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    r, w = _fd_above_2(r), _fd_above_2(w)
    os.set_blocking(r, False)
    return r, w


def _to_logging(record: logging.LogRecord) -> None:
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


class StderrCapture:
    """Replace file descriptor `fd` by a pipe and turn what is written there into
    records (to logging, or `sink`). A line that starts with gRPC core's prefix begins
    a record of logger "grpc.core" at its severity; any other line is folded into the
    open record, or begins a "stderr" record when none is open. A record is complete
    at the next gRPC line, after `idle` seconds without data, or at drain().
    Records of gRPC core below `floor` are dropped, their folded lines with them."""

    def __init__(
        self,
        fd: int = 2,
        *,
        sink: Callable[[logging.LogRecord], None] = _to_logging,
        idle: float = 0.05,
        floor: int = logging.NOTSET,
        max_chars: int = RECORD_MAX_CHARS,
    ) -> None:
        self._fd = fd
        self._sink = sink
        self._idle = idle
        self._floor = floor
        self._max_chars = max_chars
        self._read, write = _pipe()
        self._wake_read, self._wake_write = _pipe()
        os.set_blocking(self._wake_write, False)  # a full wake pipe already wakes
        os.dup2(write, fd)  # inheritable: children's stderr comes here too
        os.close(write)
        self._partial = b""  # the start of a line whose end has not come yet
        self._open: tuple[str, int, list[str]] | None = None  # logger, level, lines
        self._open_chars = 0
        self._dropped_chars = 0
        self._drained = threading.Event()
        self.ended = threading.Event()  # the reader saw every writer go (tests)
        self._reader = threading.Thread(target=self._run, name="log-stderr", daemon=True)
        self._reader.start()

    def drain(self, timeout: float = 1.0) -> bool:
        """Turn everything written so far into records, waiting at most `timeout`."""
        with contextlib.suppress(Exception):
            if sys.stderr is not None:
                sys.stderr.flush()
        if self.ended.is_set():
            return True
        self._drained.clear()
        try:
            os.write(self._wake_write, b"d")
        except OSError:
            return False
        return self._drained.wait(timeout)

    def _run(self) -> None:
        # Signals are for the main thread (see BatchingHandler._run).
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        poller = select.poll()
        poller.register(self._read, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        try:
            while True:
                waiting = self._open is not None or self._partial
                ready = {fd for fd, _ in poller.poll(self._idle * 1000 if waiting else None)}
                drain = self._wake_read in ready
                if drain:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, _READ_SIZE)
                eof = self._read_all()
                if not ready or drain or eof:
                    self._complete()
                if drain:
                    self._drained.set()
                if eof:
                    break
        except BaseException:
            # Nobody reads the pipe any more: writers to stderr would block once it is
            # full. Send them to /dev/null (never raw to the log), and say so.
            with contextlib.suppress(Exception):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self._fd)
                os.close(null)
                logging.getLogger(OWN_LOGGER).exception("log_stderr_capture_failed")
            raise
        finally:
            self.ended.set()
            self._drained.set()

    def _read_all(self) -> bool:
        """Read what the pipe holds; True at end of file (no writer left)."""
        while True:
            try:
                data = os.read(self._read, _READ_SIZE)
            except BlockingIOError:
                return False
            if not data:
                return True
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()
            for line in lines:
                self._line(line)
            if len(self._partial) > _PARTIAL_MAX:
                self._line(self._partial)
                self._partial = b""

    def _complete(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        self._emit()

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "surrogateescape")  # bytes kept, escaped as \xNN
        core = _CORE_PREFIX.match(text)
        if core is not None:
            self._emit()
            self._start(CORE_LOGGER, _CORE_LEVELS[core[1]], text[core.start(2) :])
        elif self._open is None:
            self._start(STDERR_LOGGER, logging.WARNING, text)
        else:
            self._add(text)

    def _start(self, name: str, level: int, text: str) -> None:
        self._open = (name, level, [])
        self._open_chars = self._dropped_chars = 0
        self._add(text)

    def _add(self, text: str) -> None:
        assert self._open is not None
        room = self._max_chars - self._open_chars
        if room <= 0:
            self._dropped_chars += len(text) + 1
            return
        if len(text) > room:
            self._dropped_chars += len(text) - room
            text = text[:room]
        self._open[2].append(text)
        self._open_chars += len(text) + 1

    def _emit(self) -> None:
        if self._open is None:
            return
        name, level, lines = self._open
        self._open = None
        if name == CORE_LOGGER and level < self._floor:
            return
        message = "\n".join(lines)
        if self._dropped_chars:
            message += f" [{self._dropped_chars} more characters not kept]"
        record = logging.LogRecord(name, level, "", 0, message, None, None)
        try:
            self._sink(record)
        except Exception:  # the reader must go on: writers block on a full pipe
            with contextlib.suppress(Exception):
                logging.getLogger(OWN_LOGGER).exception("log_stderr_record_failed")


def _core_floor() -> int:
    # gRPC core reads GRPC_VERBOSITY once, when grpc is imported (main.py sets it
    # first unless the operator did). Should grpc have been imported without it,
    # gRPC's info and warning lines (a peer's GOAWAY text among them) are dropped
    # here instead: what GRPC_VERBOSITY=ERROR would have done.
    return logging.NOTSET if os.environ.get("GRPC_VERBOSITY") else logging.ERROR


# ---------------------------------------------------------------------------------


def flush() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM to "device:inode" of the stream it connected.
    try:
        info = os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # None when started with fd 2 closed
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{info.st_dev}:{info.st_ino}"


def _private_stderr() -> TextIO:
    """The real stderr, on a descriptor of our own (fd 2 is about to be the pipe)."""
    try:
        fd = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 3)
    except OSError:  # started with fd 2 closed: nowhere to write (not fd 2 itself)
        fd = _fd_above_2(os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC))
    return open(fd, "w", encoding="utf-8", errors="backslashreplace")


_capture: StderrCapture | None = None


def configure() -> None:
    global _capture
    # The record skips what no format here uses (the logging HOWTO's "Optimization"
    # switches): about half of a line's cost.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller frame lookup
    if _stderr_is_journal():
        fmt = "%(levelname)s %(message)s"  # the journal records time and pid itself
    else:
        fmt = f"%(asctime)s otpgated[{os.getpid()}] %(levelname)s %(message)s"
    handler = BatchingHandler(_private_stderr(), rate_limit=RateLimit())
    handler.setFormatter(LineFormatter(fmt))
    handler.addFilter(keep_metadata_out)
    handler.addFilter(name_the_certificate)
    logging.basicConfig(handlers=[handler], level=logging.INFO)
    # psycopg's pool logs every checkout at INFO: built, then dropped, per login.
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
    if _capture is None:
        _capture = StderrCapture(2, floor=_core_floor())
        # Registered after logging's own: runs before logging.shutdown, so what C
        # code and Python's last traceback wrote to stderr is written out with the rest.
        atexit.register(_capture.drain)
