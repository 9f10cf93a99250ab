"""`otpgated migrate`: a SQLite database that a real daemon used goes into an empty
PostgreSQL one and back with every row of every table the same; a daemon on the
copy carries on where the first left off; a target that is not empty, or
arguments that do not name databases, are refused with nothing changed.
`otpgated upgrade-schema` brings an older database up when told to."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pyotp

from otpgate.store import schema, sqlite
from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser
from tests.store.pg_harness import PgServer


def _otpgated(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otpgate.server.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tables_sqlite(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {
            table: db.execute(
                f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}"  # noqa: S608
            ).fetchall()
            for table, (columns, key) in schema.TABLES.items()
        }
    finally:
        db.close()


def _tables_postgres(url: str) -> dict[str, list[tuple[Any, ...]]]:
    tables = {}
    with psycopg.connect(url) as conn:
        for table, (columns, key) in schema.TABLES.items():
            order = ", ".join(f'{k} COLLATE "C"' if k in ("name", "username") else k
                              for k in (k.strip() for k in key.split(",")))  # fmt: skip
            rows = conn.execute(
                f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}"  # type: ignore[arg-type]  # noqa: S608
            ).fetchall()
            tables[table] = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                             for r in rows]  # fmt: skip
    return tables


def _used_daemon(
    make_daemon: Callable[..., Daemon], user: LocalUser
) -> tuple[Daemon, pyotp.TOTP, int]:
    """A SQLite daemon with a history: settings, an enrollment, a spent code, wrong
    codes, a lockout, and the audit rows of all that."""
    daemon = make_daemon()
    admin = daemon.admin()
    admin.UpdateConfig(
        pb.UpdateConfigRequest(
            enabled=True, services_ssh=True, window=3, lockout_threshold=3, lockout_seconds=1
        ),
        timeout=5,
    )
    entry = admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    totp = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    wrong = pb.PamRequest(username=user.name, service="sshd", authtok="000000")
    for _ in range(3):
        daemon.pam().Verify(wrong, timeout=5)  # the third locks
    time.sleep(2.1)  # the one-second lock (rounded up) is over
    step = int(time.time()) // 30
    code = pb.PamRequest(username=user.name, service="sshd", authtok=totp.at(step * 30))
    assert daemon.pam().Verify(code, timeout=5).verdict == pb.VERDICT_ALLOW
    daemon.pam().Verify(wrong, timeout=5)  # one failure left counted
    daemon.stop()
    return daemon, totp, step


def test_migrate_there_and_back_keeps_every_row(
    pg_server: PgServer,
    make_daemon: Callable[..., Daemon],
    user: LocalUser,
    tmp_path: Path,
) -> None:
    first, totp, step = _used_daemon(make_daemon, user)
    original = _tables_sqlite(first.database)
    assert len(original["audit_events"]) >= 3 and len(original["secrets"]) == 1
    assert original["secrets"][0][9:11] == (step, 1)  # last_step, failures

    url = pg_server.daemon_url(pg_server.create_database())
    there = _otpgated("migrate", str(first.database), url)
    assert there.returncode == 0, there.stderr
    assert "secrets: 1 rows copied, identical" in there.stdout
    assert _tables_postgres(url) == original

    # A daemon on the copy, with the first one's key, goes on from there.
    second = make_daemon("--database-url", url, start=False)
    second.key_file.parent.mkdir(mode=0o700, parents=True)
    shutil.copy2(first.key_file, second.key_file)
    second.start()
    replay = pb.PamRequest(username=user.name, service="sshd", authtok=totp.at(step * 30))
    assert second.pam().Verify(replay, timeout=5).verdict == pb.VERDICT_DENY
    config = second.admin().GetConfig(pb.GetConfigRequest(), timeout=5)
    assert (config.lockout_threshold, config.window) == (3, 3)
    second.stop()
    used = _tables_postgres(url)
    # The replay is one more event, numbered on from the copied ones.
    assert len(used["audit_events"]) == len(original["audit_events"]) + 1
    assert used["audit_events"][-1][2:4] == ("verify", user.name)
    assert used["audit_events"][-1][0] > original["audit_events"][-1][0]
    assert used["secrets"][0][10] == 2  # the replay counted as a failure

    back_path = tmp_path / "back.sqlite3"
    back = _otpgated("migrate", url, str(back_path))
    assert back.returncode == 0, back.stderr
    assert _tables_sqlite(back_path) == used
    # And events written after a copy number on from the copied ones.
    store = sqlite.SQLiteStore(str(back_path))
    store.delete_secret(user.name, now=1)
    store.close()
    ids = [row[0] for row in _tables_sqlite(back_path)["audit_events"]]
    assert ids == sorted(set(ids)) and len(ids) == len(used["audit_events"]) + 1


def test_migrate_refuses_what_it_must_not_touch(
    pg_server: PgServer,
    make_daemon: Callable[..., Daemon],
    user: LocalUser,
    tmp_path: Path,
) -> None:
    first, _, _ = _used_daemon(make_daemon, user)
    url = pg_server.daemon_url(pg_server.create_database())
    assert _otpgated("migrate", str(first.database), url).returncode == 0
    before = _tables_postgres(url)

    again = _otpgated("migrate", str(first.database), url)
    assert again.returncode == 1
    assert again.stderr.startswith("StoreError: target ") and "is not empty" in again.stderr
    assert _tables_postgres(url) == before

    into_used_sqlite = _otpgated("migrate", url, str(first.database))
    assert into_used_sqlite.returncode == 1 and "is not empty" in into_used_sqlite.stderr

    cases = {
        ("relative.sqlite3", url): "neither a postgresql:// URL nor an absolute path",
        (str(tmp_path / "missing.sqlite3"), url): "does not exist",
        (url, url): "the same database",
    }
    for (source, target), message in cases.items():
        result = _otpgated("migrate", source, target)
        assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "missing.sqlite3").exists()
    assert _tables_postgres(url) == before


def test_upgrade_schema_only_when_told(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = make_daemon(start=False)
    daemon.state_dir.mkdir(mode=0o700)
    db = sqlite3.connect(daemon.database, isolation_level=None)
    db.executescript(sqlite._SCHEMA_V1)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("""INSERT INTO settings VALUES (1, '{"enabled": true}')""")
    db.close()

    refused = daemon.run_to_exit()
    assert refused.returncode == 1
    assert "schema version 1" in refused.stderr and "otpgated upgrade-schema" in refused.stderr

    options = ["--state-dir", str(daemon.state_dir)]
    done = _otpgated("upgrade-schema", *options)
    assert done.returncode == 0, done.stderr
    assert f"upgraded from version 1 to {schema.SCHEMA_VERSION}" in done.stdout
    backup = daemon.database.with_name(daemon.database.name + ".schema-v1.bak")
    assert f"backed up to {backup}" in done.stdout
    assert (backup.stat().st_mode & 0o777) == 0o600
    kept = sqlite3.connect(backup)
    assert kept.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == ("1",)
    kept.close()
    assert "already at" in _otpgated("upgrade-schema", *options).stdout
    daemon.start()
    assert daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=5).enabled
