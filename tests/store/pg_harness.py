"""A real PostgreSQL server for the store tests, started and removed by the tests.

PostgreSQL refuses to run as root, so the server runs as the `postgres` system
user (made by Debian's package) in a temporary directory of its own (0700):
the data directory and the Unix socket live there, and it listens on nothing
else (listen_addresses=''). Only postgres and root (who passes any directory
mode) reach the socket, so local connections are trusted, except for one role
that must give a password (scram-sha-256), for the password file's tests.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
PASSWORD_ROLE = "otpgate_pw"
PASSWORD = "s3cret with spaces"


def find_bindir() -> str | None:
    """Where initdb, pg_ctl and postgres are (the newest installed), or None."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(candidate, "pg_ctl"), os.X_OK) and os.access(
            os.path.join(candidate, "initdb"), os.X_OK
        ):
            return candidate
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl and shutil.which("initdb"):
        return os.path.dirname(os.path.realpath(pg_ctl))
    return None


def skip_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None."""
    if find_bindir() is None:
        return "no PostgreSQL binaries (install Debian's postgresql; scripts/test.sh does)"
    if os.geteuid() != 0:
        return "the PostgreSQL harness runs the server as `postgres` via runuser: needs root"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no `postgres` system user (Debian's postgresql package creates it)"
    return None


class PgServer:
    """One private server: `start`, `stop` (fast shutdown), `remove`."""

    _ports = itertools.count(0)

    def __init__(self) -> None:
        bindir = find_bindir()
        assert bindir is not None
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="otpgate-pg-"))
        self.data = self.root / "data"
        # Only a name for the socket (.s.PGSQL.<port>): nothing listens on TCP.
        self.port = 45432 + (os.getpid() % 2000) * 10 + next(self._ports)
        self._databases = itertools.count(1)
        entry = pwd.getpwnam("postgres")
        os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o700)
        self._as_postgres(
            "initdb", "-D", str(self.data), "--auth-local=trust", "--auth-host=reject",
            "--username=postgres", "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        # First match wins: the password role must prove it, everyone else is trusted.
        (self.data / "pg_hba.conf").write_text(
            f"local all {PASSWORD_ROLE} scram-sha-256\nlocal all all trust\n"
        )
        os.chown(self.data / "pg_hba.conf", entry.pw_uid, entry.pw_gid)
        self.start()
        self.psql(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'", dbname="postgres")

    def _as_postgres(self, program: str, *args: str) -> None:
        subprocess.run(
            [RUNUSER, "-u", "postgres", "--", os.path.join(self.bindir, program), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.root,
            timeout=60,
        )

    def start(self) -> None:
        options = (
            f"-c listen_addresses='' -c unix_socket_directories={self.root} -p {self.port} "
            "-c fsync=off -c max_connections=300"
        )
        self._as_postgres(
            "pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data),
            "-l", str(self.root / "server.log"), "-o", options,
        )  # fmt: skip

    def stop(self) -> None:
        self._as_postgres("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))

    def remove(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str, user: str = "postgres") -> str:
        return f"host={self.root} port={self.port} user={user} dbname={dbname}"

    def psql(self, sql: str, *, dbname: str) -> None:
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, owner: str = "postgres") -> str:
        """A new, empty database; its name."""
        name = f"otpgate_{next(self._databases)}"
        self.psql(f"CREATE DATABASE {name} OWNER {owner}", dbname="postgres")
        return name
