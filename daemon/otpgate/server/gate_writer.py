"""Keeps the SSH stacks' gate files (core.gate_files) in step with the store.

A thread rewrites them at start, soon after every change this daemon makes
(TwoFactorService's on_change), and every REFRESH_SECONDS for what it cannot see
happen: another daemon's change in a shared database, a group's new member, an
enrollment deadline passing. Each file is written whole beside itself and renamed
over the old one, so pam_listfile and pam_access read the old list or the new one,
never half of one. The two may disagree for a moment (networks.conf is written
first, so a newly listed required-group member is already excepted from the
exempt networks); every mix of old and new fails closed, as any stale file does.
When the lists cannot be made (the database is away), the files stay as they
were: core.gate_files says why a stale list costs a prompt or a hook call, never
a code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from otpgate.core.gate_files import (
    ASK_FILE,
    NETWORKS_FILE,
    GateLists,
    render_ask,
    render_networks,
)
from otpgate.core.paths import write_atomic

__all__ = ["REFRESH_SECONDS", "GateWriter", "remove_lists", "write_lists"]

log = logging.getLogger("otpgated")

REFRESH_SECONDS = 30.0
BUSY_SHARE_PERIODIC = 10.0
BUSY_SHARE_CHANGES = 4.0
SLOW_SECONDS = 1.0


def write_lists(directory: str, lists: GateLists) -> None:
    """Both files, root-only (0600), each replaced in one rename; networks.conf
    first (see above)."""
    write_atomic(os.path.join(directory, NETWORKS_FILE), render_networks(lists), 0o600)
    write_atomic(os.path.join(directory, ASK_FILE), render_ask(lists), 0o600)


def remove_lists(directory: str) -> None:
    for name in (NETWORKS_FILE, ASK_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))


class GateWriter:
    def __init__(
        self,
        directory: str,
        build: Callable[[], GateLists | None],
        *,
        refresh_seconds: float = REFRESH_SECONDS,
        min_spacing: float = 0.0,
    ) -> None:
        self._directory = directory
        self._build = build
        self._refresh = refresh_seconds
        self._spacing = min_spacing
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gate-writer", daemon=True)

    def changed(self) -> None:
        """Ask for a rewrite soon (called by the service after each change)."""
        self._wanted.set()

    def write_now(self) -> bool:
        """Make the lists and write both files; False when it failed.

        Written whole each time, changed or not: a file someone replaced, truncated
        or chmod-ed is put right at the next periodic rewrite (tens of bytes per
        account, on the runtime directory's tmpfs)."""
        try:
            lists = self._build()
            if lists is None:  # the source says "not now" and has said why
                return False
            write_lists(self._directory, lists)
        except Exception as exc:  # the old files stay: see the module's docstring
            detail = f" {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else ""
            log.warning("gate_files_not_written error=%s%s", type(exc).__name__, detail)
            return False
        return True

    def start(self) -> None:
        """Write soon, in the thread: files of an earlier run are safe to read
        meanwhile, and a daemon's start waits for no list of every account."""
        self._wanted.set()
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and, if it ran, remove the files: nobody keeps them
        current any more (while no daemon answers, the files change nothing)."""
        self._stopping.set()
        self._wanted.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
            remove_lists(self._directory)

    def _loop(self) -> None:
        took = 0.0
        while not self._stopping.is_set():
            # A list that is dear to make (many accounts, groups from a directory)
            # is made less often: the writer takes at most about a tenth of the time
            # between its periodic rewrites, a fifth between rewrites on changes.
            self._wanted.wait(max(self._refresh, BUSY_SHARE_PERIODIC * took))
            self._wanted.clear()
            if not self._stopping.is_set():
                started = time.monotonic()
                self.write_now()
                took = time.monotonic() - started
                if took >= SLOW_SECONDS:
                    log.info("gate_files_slow seconds=%.1f", took)
                self._stopping.wait(max(self._spacing, BUSY_SHARE_CHANGES * took))
