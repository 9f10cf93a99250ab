"""systemd's notify protocol (sd_notify) and watchdog, with the standard library.

A datagram to $NOTIFY_SOCKET per state change; no dependency for ten lines.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for, in seconds; None when there is none."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


class Watchdog:
    """Pings systemd while `healthy()` says so; a wedged daemon gets restarted."""

    def __init__(self, interval: float, healthy: Callable[[], bool]) -> None:
        self._interval = interval
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._healthy():
                notify("WATCHDOG=1")
