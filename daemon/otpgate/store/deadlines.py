"""A client-side bound on a blocking socket conversation: cut it at its deadline.

PostgreSQL's statement_timeout is enforced by the server, and TCP keepalives and
tcp_user_timeout only notice a peer that stopped acknowledging. A server that is
alive but stuck (stopped by SIGSTOP, swapping, its disk hung) keeps acknowledging
and never answers, and over a Unix socket nothing notices at all: libpq would
wait forever, holding a daemon thread and the login behind it. So each pooled
conversation registers its socket here with a deadline, and one thread shuts the
socket down (both directions) when the deadline passes: the blocked read returns
at once with an error, the driver marks the connection broken, and the pool
replaces it. The deadline holds a duplicate of the descriptor (dup()), and
shuts the socket down through it: should libpq close its own descriptor first
(the server ended the connection) and the number go to another socket of this
process, the duplicate still names the old socket, never the stranger.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable


class Deadline:
    """One registered conversation; `expired` tells afterwards whether it was cut."""

    __slots__ = ("at", "done", "expired", "fd")

    def __init__(self, at: float, fd: int) -> None:
        self.at, self.fd = at, fd
        self.expired = False
        self.done = False


class Deadlines:
    """Shuts down the socket of every conversation still open at its deadline."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self, fd: int, seconds: float) -> Deadline:
        deadline = Deadline(self._clock() + seconds, os.dup(fd))
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="db-deadlines", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if self._heap[0][2] is deadline:
                self._cond.notify()
        return deadline

    def finish(self, deadline: Deadline) -> None:
        # Under the lock: once finish() returns, the socket is never touched again.
        with self._cond:
            if not deadline.done:
                deadline.done = True
                os.close(deadline.fd)

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - self._clock()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                _, _, deadline = heapq.heappop(self._heap)
                deadline.expired = True
                _shutdown(deadline.fd)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()


def _shutdown(fd: int) -> None:
    try:
        # socket(fileno=) takes over the descriptor: detach() hands it back unclosed.
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer: the read has its error anyway
    finally:
        sock.detach()
