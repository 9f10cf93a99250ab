"""Schema versions on every backend: a newer database is refused, an older one is
upgraded only when asked, an upgrade keeps every row and is all or nothing."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from otpgate.core.ports import Store
from otpgate.errors import StoreError
from otpgate.store import postgres, schema, sqlite
from tests.store.pg_harness import PgServer

# A version-1 database as otpgate 0.1 made it, with one secret and one audit row.
_V1_ROWS = (
    "INSERT INTO meta VALUES ('schema_version', '1')",
    """INSERT INTO settings VALUES (1, '{{"enabled": true}}')""",
    "INSERT INTO secrets (username, uid, key_id, nonce, ciphertext, otp_digits, interval,"
    " created_at, last_step, failures) VALUES ('alice', 1000, 'k1', {nonce}, {ct}, 6, 30,"
    " 100, 7, 2)",
    "INSERT INTO audit_events (at, event, username, detail) VALUES (100, 'e', 'alice', 'd')",
)


@dataclasses.dataclass
class Db:
    open: Callable[..., Store]  # upgrade=...
    run: Callable[[str], list[tuple[Any, ...]]]  # raw SQL, outside any store
    v1_ddl: str
    blob: Callable[[bytes], str]  # a literal of the backend's bytes type


def _sqlite_db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    path = str(tmp_path / "schema.sqlite3")

    def run(sql: str) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    return Db(
        open=lambda **kw: sqlite.SQLiteStore(path, **kw),
        run=run,
        v1_ddl=sqlite._SCHEMA_V1,
        blob=lambda data: f"X'{data.hex()}'",
    )


def _postgres_db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    server: PgServer = request.getfixturevalue("pg_server")
    url = server.url(server.create_database())

    def run(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            cursor = conn.execute(sql)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    return Db(
        open=lambda **kw: postgres.PostgresStore(url, **kw),
        run=run,
        v1_ddl=postgres._SCHEMA_V1,
        blob=lambda data: f"'\\x{data.hex()}'::bytea",
    )


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    make = {"sqlite": _sqlite_db, "postgres": _postgres_db}[request.param]
    return make(request, tmp_path)


def _make_v1(db: Db) -> None:
    for statement in db.v1_ddl.split(";"):
        if statement.strip():
            db.run(statement)
    for statement in _V1_ROWS:
        db.run(statement.format(nonce=db.blob(b"n" * 12), ct=db.blob(b"c" * 48)))


def _version(db: Db) -> int:
    return int(db.run("SELECT value FROM meta WHERE name = 'schema_version'")[0][0])


def _has_host_column(db: Db) -> bool:
    try:
        db.run("SELECT host FROM audit_events")
    except (sqlite3.Error, psycopg.Error):
        return False
    return True


def test_steps_is_the_rule() -> None:
    latest = schema.SCHEMA_VERSION
    assert schema.steps(latest, upgrade=False, where="db") == []
    assert schema.steps(1, upgrade=True, where="db") == list(range(2, latest + 1))
    with pytest.raises(StoreError, match="newer than this otpgated knows"):
        schema.steps(latest + 1, upgrade=True, where="db")
    with pytest.raises(StoreError, match="otpgated upgrade-schema"):
        schema.steps(1, upgrade=False, where="db")
    with pytest.raises(StoreError, match="no schema version"):
        schema.steps(0, upgrade=True, where="db")
    assert schema.stored_version(("2",)) == 2
    assert schema.stored_version(("two",)) == 0 and schema.stored_version(None) == 0


def test_a_new_database_is_at_the_latest_version(db: Db) -> None:
    store = db.open()
    assert store.upgraded_from is None  # type: ignore[attr-defined]
    store.close()
    assert _version(db) == schema.SCHEMA_VERSION and _has_host_column(db)


def test_a_newer_database_is_refused_and_left_alone(db: Db) -> None:
    db.open().close()
    newer = schema.SCHEMA_VERSION + 1
    db.run(f"UPDATE meta SET value = '{newer}' WHERE name = 'schema_version'")  # noqa: S608
    for upgrade in (False, True):
        with pytest.raises(StoreError, match="newer than this otpgated knows"):
            db.open(upgrade=upgrade)
    assert _version(db) == schema.SCHEMA_VERSION + 1


def test_an_older_database_is_upgraded_only_when_asked(db: Db) -> None:
    _make_v1(db)
    with pytest.raises(StoreError, match=r"schema version 1; .*otpgated upgrade-schema"):
        db.open()
    assert _version(db) == 1 and not _has_host_column(db)  # untouched

    store = db.open(upgrade=True)
    assert store.upgraded_from == 1  # type: ignore[attr-defined]
    record = store.get_secret("alice")
    assert record is not None and (record.uid, record.last_step, record.failures) == (1000, 7, 2)
    assert store.load_settings().enabled
    store.close()
    assert _version(db) == schema.SCHEMA_VERSION
    assert db.run("SELECT at, event, username, detail, host FROM audit_events") == [
        (100, "e", "alice", "d", "")
    ]
    again = db.open(upgrade=True)  # nothing left to do
    assert again.upgraded_from is None  # type: ignore[attr-defined]
    again.close()


def test_a_failed_upgrade_changes_nothing(db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its first statement succeeds, the second fails: the transaction takes both back.
    _make_v1(db)
    broken = (*schema.MIGRATIONS[2][:1], "CREATE INDEX nowhere ON no_such_table (x)")
    monkeypatch.setitem(schema.MIGRATIONS, 2, broken)
    with pytest.raises((StoreError, sqlite3.Error, psycopg.Error)):
        db.open(upgrade=True)
    assert _version(db) == 1 and not _has_host_column(db)


def test_audit_rows_name_the_host(db: Db) -> None:
    store = db.open(host="edge-7")
    store.delete_secret("nobody", now=5)  # no row, no audit
    from otpgate.core.settings import Settings

    store.save_settings(Settings(enabled=True), audit="enabled=true", now=6)
    store.close()
    assert db.run("SELECT at, event, host FROM audit_events") == [(6, "settings_updated", "edge-7")]
