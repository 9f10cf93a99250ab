"""Is the database answering? Asked once a second, told to the health service.

The health service (grpc.health.v1 on every socket) says NOT_SERVING while the
store's database does not answer within its bound, SERVING again once it does;
each change is logged once (database_unreachable / database_back), which is
also why a failed call on the login path logs nothing of its own.

The watchdog (systemd's WatchdogSec) must restart a daemon that is wedged, not
one that waits for its database: a restart cannot bring PostgreSQL back, and a
fleet of daemons restarting in a loop would only add load to a database that is
recovering. So what it asks here is whether the probe itself keeps coming
back, in time (each probe is bounded by the store's own timeout); whether the
answer was yes matters only for a local store (SQLite), whose file not answering
is a failure of this process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from grpc_health.v1 import health, health_pb2

from otpgate.core.ports import Store

log = logging.getLogger("otpgated")


class DatabaseMonitor:
    def __init__(
        self,
        store: Store,
        on_change: Callable[[bool], None],
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._on_change = on_change
        self._interval = interval
        self._clock = clock
        self._stopping = threading.Event()
        self.serving = True  # the store answered when it opened
        self.last_probe = clock()
        self._thread = threading.Thread(target=self._run, name="db-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def probe(self) -> None:
        """One question to the database; a change of answer is logged and told."""
        answered = self._store.healthy()
        self.last_probe = self._clock()
        if answered != self.serving:
            self.serving = answered
            if answered:
                log.info("database_back: serving again")
            else:
                log.warning("database_unreachable: calls fail as unavailable until it is back")
            self._on_change(answered)

    def fresh(self, within: float) -> bool:
        """The last probe came back less than `within` seconds ago."""
        return self._clock() - self.last_probe < within

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self.probe()
            except Exception as exc:  # a bug here must not end the probes silently
                log.error("database_probe_failed error=%s", type(exc).__name__)


def set_health(servicer: health.HealthServicer, names: Iterable[str], serving: bool) -> None:
    """Every service of one socket (and the server as a whole, "") to one status."""
    status = health_pb2.HealthCheckResponse.SERVING
    if not serving:
        status = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *names):
        servicer.set(name, status)
