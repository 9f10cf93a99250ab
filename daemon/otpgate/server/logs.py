"""otpgated's log: one line per event on stderr (the journal under systemd).

Every verification writes a line. Written one by one, each line is a system call
that hands the interpreter lock to another thread: at 64 concurrent logins,
dropping the line altogether raised verifications by 9 to 18 points of the
empty-RPC rate in the benchmark. Lines are therefore written at once while
they are rare, and gathered for at most `interval` seconds when they come faster
than that; warnings and errors always go out at once, and whatever is pending is
written at shutdown (logging.shutdown runs at exit) and before a traceback. An
end without exit handlers (SIGKILL, the watchdog's abort, a crash in C code) can
drop the last `interval` seconds of lines.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import TextIO

BATCH_INTERVAL = 0.1  # seconds


class BatchingHandler(logging.Handler):
    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = BATCH_INTERVAL,
    ) -> None:
        super().__init__()
        self._stream = stream
        self._interval = interval
        self._pending: list[str] = []
        self._last_write = float("-inf")
        self._wake = threading.Event()
        self._closed = False
        self.lost_writes = 0
        self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        # handle() holds self.lock around emit: _pending and _last_write are ours.
        self._pending.append(line)
        quiet = time.monotonic() - self._last_write >= self._interval
        if quiet or record.levelno >= logging.WARNING or self._closed:
            self.flush()
        else:
            self._wake.set()

    def flush(self) -> None:
        # Under the handler's lock, which handle() already holds around emit: batches
        # reach the stream in order, and a write never interleaves with another.
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
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
            self._wake.wait()
            if self._closed:
                break
            time.sleep(self._interval)
            self._wake.clear()  # before taking the batch: a later line sets it again
            self.flush()

    def close(self) -> None:
        # logging.shutdown calls this with the handler's lock held: no join here (the
        # writer may be waiting for that lock); it sees _closed and ends by itself.
        self._closed = True
        self._wake.set()
        self.flush()
        super().close()


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


def configure() -> None:
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
    stream = sys.stderr if sys.stderr is not None else open(os.devnull, "w")  # noqa: SIM115
    handler = BatchingHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(handlers=[handler], level=logging.INFO)
