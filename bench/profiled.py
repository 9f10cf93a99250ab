"""otpgated with wall-clock timers on its verification path, for bench.pg_profile:

    python -m bench.profiled OUT.json [otpgated options...]

Nothing in the daemon changes but that these functions are wrapped in a timer:
Gate.verify (a whole PAM Verify minus gRPC), the store's calls on that path,
Settings.from_dict (parsing the stored settings), the pool's checkout (with its
liveness check) and return, and every psycopg statement, named by its first words
(the pool's check is the empty query). When the daemon stops, OUT.json gets
{timer: [seconds, ...]}. A timer costs about a microsecond.

With OTPGATE_BENCH_CPROFILE=PATH in the environment, every thread also runs under
its own cProfile with a CPU-time clock (time.thread_time: what each function
costs the process, whatever else runs), and their merged stats go to PATH
(pstats format) when the daemon stops. That costs about as much CPU again.

With OTPGATE_BENCH_WHATIF=FLAG[,FLAG...] the PostgreSQL store is changed in this
process only, to measure what a proposed change would save (the daemon's code on
disk stays as it is; these are experiments, not fixes):
  nocheck     no liveness check (an empty query) at each pool checkout
  parsecache  the settings parsed again only when their stored text changed
  onesettings the settings read once per Verify (Gate.verify's read serves the
              service's too) instead of twice
  cachesettings  the settings read once and kept: the bound for a cache that a
              NOTIFY from save_settings would invalidate (not done here)
  asyncaudit  a verification's audit row written by a background thread, off the
              login's path (a queue; the CPU is spent all the same)
"""

from __future__ import annotations

import contextlib
import cProfile
import functools
import json
import os
import pstats
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

SAMPLES: dict[str, list[float]] = {}
PROFILES: list[cProfile.Profile] = []


def _timer(owner: Any, attribute: str, name: Callable[..., str] | str) -> None:
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            label = name if isinstance(name, str) else name(*args, **kwargs)
            # list.append is atomic under the GIL: safe from the worker threads.
            SAMPLES.setdefault(label, []).append(time.perf_counter() - started)

    setattr(owner, attribute, timed)


def _statement(_conn: Any, query: Any, *args: Any, **kwargs: Any) -> str:
    text = " ".join(str(query).split())
    return "SQL: (empty: the pool's check)" if not text else "SQL: " + " ".join(text.split()[:4])


def install() -> None:
    import psycopg
    import psycopg_pool

    from otpgate.core.gate import Gate
    from otpgate.core.settings import Settings
    from otpgate.store.postgres import PostgresStore
    from otpgate.store.sqlite import SQLiteStore

    _timer(Gate, "verify", "Gate.verify (whole Verify but gRPC)")
    for store in (PostgresStore, SQLiteStore):
        for method in (
            "load_settings", "count_attempt", "lock", "accept_step", "get_secret", "record_event"
        ):  # fmt: skip
            if hasattr(store, method):  # record_event: the audit of a verification
                _timer(store, method, f"store.{method}")
    _timer(Settings, "with_changes", "Settings.from_dict (parse)")
    _timer(psycopg_pool.ConnectionPool, "getconn", "pool.getconn (with check)")
    _timer(psycopg_pool.ConnectionPool, "putconn", "pool.putconn")
    _timer(psycopg.Connection, "execute", _statement)


def install_whatif(flags: set[str]) -> None:
    from otpgate.core.gate import Gate
    from otpgate.core.settings import Settings
    from otpgate.store.postgres import PostgresStore

    unknown = flags - {"nocheck", "parsecache", "onesettings", "cachesettings", "asyncaudit"}
    if unknown:
        raise SystemExit(f"bench.profiled: unknown OTPGATE_BENCH_WHATIF {sorted(unknown)}")
    if "asyncaudit" in flags:
        import queue

        pending: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        write = PostgresStore.record_event

        def writer() -> None:
            while True:
                store, args, kwargs = pending.get()
                with contextlib.suppress(Exception):  # as the service: a failure changes nothing
                    write(store, *args, **kwargs)

        threading.Thread(target=writer, name="bench-audit", daemon=True).start()
        PostgresStore.record_event = (  # type: ignore[method-assign]
            lambda self, *args, **kwargs: pending.put((self, args, kwargs))
        )
    if "nocheck" in flags:
        PostgresStore._check = lambda self, conn: None  # type: ignore[method-assign]
    read = PostgresStore.load_settings
    if "parsecache" in flags:
        parsed: dict[str, Settings] = {}

        def read_cached(self: PostgresStore) -> Settings:
            rows = self._query("SELECT value FROM settings WHERE id = 1")
            text = rows[0][0]
            if text not in parsed:
                parsed.clear()
                parsed[text] = Settings.from_dict(json.loads(text))
            return parsed[text]

        read = read_cached
    if "cachesettings" in flags:
        kept: list[Settings] = []

        def read_kept(
            self: PostgresStore, read: Callable[[PostgresStore], Settings] = read
        ) -> Settings:
            if not kept:
                kept.append(read(self))
            return kept[0]

        read = read_kept
    if "onesettings" in flags:
        this_call = threading.local()
        verify = Gate.verify

        def verify_once(self: Gate, *args: Any, **kwargs: Any) -> Any:
            this_call.settings = None
            this_call.active = True
            try:
                return verify(self, *args, **kwargs)
            finally:
                this_call.active = False
                this_call.settings = None

        def read_once(
            self: PostgresStore, read: Callable[[PostgresStore], Settings] = read
        ) -> Settings:
            if not getattr(this_call, "active", False):
                return read(self)  # not within a Verify: as before
            settings: Settings | None = this_call.settings
            if settings is None:
                settings = this_call.settings = read(self)
            return settings

        Gate.verify = verify_once  # type: ignore[method-assign]
        read = read_once
    PostgresStore.load_settings = read  # type: ignore[method-assign]


def _profile_threads() -> None:
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profile = cProfile.Profile(time.thread_time)
        PROFILES.append(profile)
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    threading.Thread.run = run  # type: ignore[method-assign]


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    whatif = os.environ.get("OTPGATE_BENCH_WHATIF")
    if whatif:
        install_whatif(set(whatif.split(",")))
    install()
    cprofile = os.environ.get("OTPGATE_BENCH_CPROFILE")
    if cprofile:
        _profile_threads()
        PROFILES.append(cProfile.Profile(time.thread_time))
        PROFILES[-1].enable()
    from otpgate.server.main import main as otpgated

    try:
        return otpgated(argv)
    finally:
        with open(out, "w") as f:
            json.dump(SAMPLES, f)
        if cprofile:
            for profile in PROFILES:
                profile.disable()  # threads still running stop adding to their own
            pstats.Stats(*PROFILES).dump_stats(cprofile)


if __name__ == "__main__":
    sys.exit(main())
