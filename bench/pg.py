"""PostgreSQL for the benchmarks: one private server (tests/store/pg_harness.py,
started as the tests start theirs) that also listens on 127.0.0.1, databases for
daemons, the store filled by COPY, and the size of the secrets table.

The daemons connect as the harness's password role (scram-sha-256, password from a
0600 file as in production), over TCP loopback (the fleet case) or, for
comparison, over the server's Unix socket. The bench itself reads and fills the
databases as the superuser over the Unix socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bench.lib import cpu_seconds
from tests.store.pg_harness import PASSWORD, PASSWORD_ROLE, PgServer, skip_reason

Transport = str  # "tcp" (127.0.0.1) or "unix"

SECRET_COLUMNS = (
    "username", "uid", "key_id", "nonce", "ciphertext", "otp_digits", "interval", "created_at"
)  # fmt: skip
_COPY_TYPES = ("text", "int8", "text", "bytea", "bytea", "int4", "int4", "int8")


class BenchPg:
    """The server and the password file the daemons read."""

    def __init__(self) -> None:
        self.server = PgServer(tcp=True)
        self._dir = Path(tempfile.mkdtemp(prefix="otpgate-bench-pg-"))
        self.password_file = self._dir / "db.pw"
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(PASSWORD + "\n")

    def create_database(self) -> str:
        return self.server.create_database(owner=PASSWORD_ROLE)

    def daemon_args(self, dbname: str, transport: Transport = "tcp") -> tuple[str, ...]:
        """otpgated's options for `dbname`."""
        if transport == "tcp":
            url = self.server.tcp_url(dbname)
        else:
            host = urllib.parse.quote(str(self.server.root), safe="")
            url = f"postgresql://{PASSWORD_ROLE}@/{dbname}?host={host}&port={self.server.port}"
        return ("--database-url", url, "--database-password-file", str(self.password_file))

    @contextlib.contextmanager
    def connect(self, dbname: str) -> Iterator[Any]:
        """A superuser connection over the Unix socket (autocommit)."""
        import psycopg

        with psycopg.connect(self.server.url(dbname), autocommit=True) as conn:
            yield conn

    def query(self, dbname: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """The rows of one statement (none for a statement that returns none)."""
        with self.connect(dbname) as conn:
            cursor = conn.execute(sql, params)
            rows: list[tuple[Any, ...]] = cursor.fetchall() if cursor.description else []
            return rows

    def fill(self, dbname: str, rows: Iterable[tuple[object, ...]]) -> None:
        """COPY the rows (SECRET_COLUMNS) into `secrets`, then VACUUM ANALYZE it."""
        with self.connect(dbname) as conn:
            columns = ", ".join(SECRET_COLUMNS)
            with (
                conn.cursor() as cur,
                cur.copy(f"COPY secrets ({columns}) FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.set_types(list(_COPY_TYPES))
                for row in rows:
                    copy.write_row(row)
            conn.execute("VACUUM (ANALYZE) secrets")

    def secrets_bytes(self, dbname: str) -> int:
        """pg_total_relation_size of `secrets`: its heap, TOAST and indexes."""
        return int(self.query(dbname, "SELECT pg_total_relation_size('secrets')")[0][0])

    def pids(self) -> list[int]:
        """The postmaster and its processes (backends, background workers)."""
        pid = int((self.server.data / "postmaster.pid").read_text().split()[0])
        found = [pid]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        return found

    def cpu_seconds(self) -> float:
        """CPU time of the server's processes so far (those alive now)."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def pin(self, cpus: set[int] | None) -> None:
        """Pin the postmaster and its processes (new backends inherit it) to `cpus`."""
        if not cpus:
            return
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, cpus)

    def unpin(self) -> None:
        self.pin(set(range(os.cpu_count() or 1)))

    def remove(self) -> None:
        self.server.remove()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def bench_pg() -> Iterator[BenchPg]:
    reason = skip_reason()
    if reason is not None:
        raise RuntimeError(f"PostgreSQL bench rows cannot run: {reason}")
    pg = BenchPg()
    try:
        yield pg
    finally:
        pg.remove()
