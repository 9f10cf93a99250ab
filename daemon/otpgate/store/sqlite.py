"""The embedded store: one SQLite file in WAL mode, one transaction per change.

Every change that must be atomic is a single SQL statement or an explicit
transaction, so a crash or kill at any moment leaves either the old or the new
state; synchronous=FULL makes a committed change survive power loss too.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from otpgate.core import audit
from otpgate.core.crypto import Sealed
from otpgate.core.records import ANY_SECRET, SecretRecord
from otpgate.core.settings import Settings
from otpgate.errors import InvalidArgument, StoreError
from otpgate.store import rows as codec
from otpgate.store import schema

log = logging.getLogger("otpgated")

_CHECKPOINT_INTERVAL = 1.0  # seconds
_FALLBACK_CHECKPOINT_PAGES = 10_000  # about 40 MB of log

# Version 1; store.schema's migrations bring it up to date. Room left for what
# comes next: `status` for unconfirmed (pending) secrets, a recovery_codes table,
# key ids for rotation.
_SCHEMA_V1 = """
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
CREATE TABLE settings (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value TEXT NOT NULL
) STRICT;
CREATE TABLE secrets (
    username     TEXT PRIMARY KEY,
    uid          INTEGER NOT NULL,
    status       TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'pending')),
    key_id       TEXT NOT NULL,
    nonce        BLOB NOT NULL,
    ciphertext   BLOB NOT NULL,
    otp_digits   INTEGER NOT NULL CHECK (otp_digits BETWEEN 6 AND 8),
    interval     INTEGER NOT NULL CHECK (interval BETWEEN 5 AND 120),
    created_at   INTEGER NOT NULL,
    last_step    INTEGER NOT NULL DEFAULT -1,
    failures     INTEGER NOT NULL DEFAULT 0,
    lockouts     INTEGER NOT NULL DEFAULT 0,
    locked_until INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE recovery_codes (
    username TEXT NOT NULL REFERENCES secrets(username) ON DELETE CASCADE,
    code_hash BLOB NOT NULL,
    used_at  INTEGER,
    PRIMARY KEY (username, code_hash)
) STRICT;
CREATE TABLE audit_events (
    id       INTEGER PRIMARY KEY,
    at       INTEGER NOT NULL,
    event    TEXT NOT NULL,
    username TEXT NOT NULL,
    detail   TEXT NOT NULL
) STRICT;
"""

_SECRET_COLUMNS = codec.SECRET_COLUMNS


class SQLiteStore:
    """core.ports.Store in one SQLite file. Thread-safe: one connection, one lock
    (lookups take microseconds)."""

    def __init__(self, path: str, *, upgrade: bool = False, host: str = "") -> None:
        self.path = path
        self.host = host  # written into every audit row
        self.upgraded_from: int | None = None  # the version an upgrade started from
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
            self._db.execute("PRAGMA journal_mode=WAL").fetchone()
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA secure_delete=ON")
            # Checkpoints run on their own thread (_Checkpointer); this one only if
            # that thread falls far behind, so the log cannot grow without end.
            self._db.execute(f"PRAGMA wal_autocheckpoint={_FALLBACK_CHECKPOINT_PAGES}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None
        self._lock = threading.Lock()
        self._durable = True
        self._settings: Settings | None = None
        try:
            self._migrate(upgrade)
        except BaseException:
            self._db.close()
            raise
        try:
            self._checkpointer = _Checkpointer(path)
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot open database {path}: {exc}") from None

    @contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock.

        Secrets and settings wait for the disk (synchronous=FULL). Attempt counters,
        locks and spent steps (durable=False, and see _statement) use
        synchronous=NORMAL, which in WAL mode survives a crash or kill of the
        process but may lose the last commits on power loss; it saves an fsync on
        every login.
        """
        with self._lock:
            self._set_durable(durable)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _statement(self) -> Iterator[sqlite3.Connection]:
        """Single-statement writes on the login path: atomic on their own (autocommit),
        so no BEGIN/COMMIT round trips; synchronous=NORMAL as for durable=False."""
        with self._lock:
            self._set_durable(False)
            yield self._db

    def _set_durable(self, durable: bool) -> None:
        if durable != self._durable:
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _migrate(self, upgrade: bool) -> None:
        # One transaction: creation or upgrade, and its version, all or nothing.
        with self._transaction() as db:
            has_meta = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            self.upgraded_from = schema.migrate(
                db.execute,
                fresh=not has_meta,
                v1_ddl=[s for s in _SCHEMA_V1.split(";") if s.strip()],
                backend="sqlite",
                mark="?",
                where=self.path,
                upgrade=upgrade,
            )

    # -- settings -------------------------------------------------------------------

    def load_settings(self) -> Settings:
        # Every login reads the settings; this process is the database's only writer.
        cached = self._settings
        if cached is not None:
            return cached
        with self._lock:
            rows = self._db.execute("SELECT value FROM settings WHERE id = 1").fetchall()
            if not rows:
                raise StoreError("database has no settings row")
            try:
                settings = Settings.from_dict(json.loads(rows[0][0]))
            except (ValueError, InvalidArgument) as exc:
                raise StoreError(f"stored settings are invalid: {exc}") from None
            # Kept under the lock that save_settings clears it under: a read that
            # raced a save can never put the old row back after the save.
            self._settings = settings
        return settings

    def save_settings(self, settings: Settings, *, audit: str, now: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE settings SET value = ? WHERE id = 1", (json.dumps(settings.to_dict()),)
            )
            self._audit(db, now, "settings_updated", "", audit)
            self._settings = None  # under the lock: the next read fetches the committed row

    # -- key check: proves at start that the loaded key is the database's -------------

    def key_check(self) -> Sealed | None:
        rows = self._query("SELECT value FROM meta WHERE name = 'key_check'")
        if not rows:
            return None
        data = json.loads(rows[0][0])
        return Sealed(data["key_id"], bytes.fromhex(data["nonce"]), bytes.fromhex(data["ct"]))

    def set_key_check(self, sealed: Sealed) -> None:
        value = json.dumps(
            {"key_id": sealed.key_id, "nonce": sealed.nonce.hex(), "ct": sealed.ciphertext.hex()}
        )
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('key_check', ?)", (value,))

    def key_ids_in_use(self) -> set[str]:
        rows = self._query(
            "SELECT key_id FROM secrets UNION SELECT key_id FROM pending_secrets "
            "UNION SELECT json_extract(value, '$.key_id') FROM meta WHERE name = 'recovery_key'"
        )
        return {row[0] for row in rows}

    # -- secrets --------------------------------------------------------------------

    def put_secret(self, record: SecretRecord, *, expected: object = ANY_SECRET) -> bool:
        with self._transaction() as db:
            if not _still(db, record.username, record.uid, expected):
                return False
            db.execute("DELETE FROM secrets WHERE username = ?", (record.username,))
            db.execute(
                f"INSERT INTO secrets ({_SECRET_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                codec.secret_values(record),
            )
            self._audit(
                db, record.created_at, "secret_renewed", record.username, f"uid={record.uid}"
            )
        return True

    def get_secret(self, username: str) -> SecretRecord | None:
        rows = self._query(
            f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE username = ? AND status = 'active'",
            (username,),
        )
        return codec.secret_record(rows[0]) if rows else None

    def list_secrets(self) -> list[SecretRecord]:
        rows = self._query(
            f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE status = 'active' ORDER BY username"
        )
        return [codec.secret_record(row) for row in rows]

    def delete_secret(self, username: str, *, now: int) -> bool:
        with self._transaction() as db:
            pending = db.execute("DELETE FROM pending_secrets WHERE username = ?", (username,))
            deleted = db.execute("DELETE FROM secrets WHERE username = ?", (username,)).rowcount
            deleted += pending.rowcount
            if deleted:
                self._audit(db, now, "secret_unset", username, "")
            return bool(deleted)

    def count_attempt(self, username: str, uid: int, *, now: int) -> SecretRecord | None:
        # The row is written even while locked (counting nothing), so that one
        # statement answers every case: a second read could see another state.
        with self._statement() as db:
            cursor = db.execute(
                f"""UPDATE secrets SET failures = CASE WHEN locked_until <= :now
                        THEN failures + 1 ELSE failures END
                    WHERE username = :user AND uid = :uid AND status = 'active'
                    RETURNING {_SECRET_COLUMNS}""",
                {"now": now, "user": username, "uid": uid},
            )
            row = cursor.fetchone()
            cursor.close()  # ends the statement, and with it the implicit transaction
            return None if row is None else codec.secret_record(row)

    def lock(
        self, username: str, uid: int, *, count: int, lockouts: int, until: int, now: int
    ) -> bool:
        # A transaction only so that the audit row goes with the lock; the lock
        # itself is the one conditional UPDATE.
        with self._transaction(durable=False) as db:
            locked = db.execute(
                """UPDATE secrets SET failures = 0, lockouts = lockouts + 1, locked_until = ?
                   WHERE username = ? AND uid = ? AND status = 'active'
                       AND failures >= ? AND lockouts = ?""",
                (until, username, uid, count, lockouts),
            ).rowcount
            if locked:
                self._audit(db, now, "locked", username, f"failures={count} until={until}")
            return bool(locked)

    def accept_step(self, username: str, uid: int, step: int) -> bool:
        """Spend `step` and every earlier one; False if it (or a later one) was spent."""
        with self._statement() as db:
            cursor = db.execute(
                """UPDATE secrets SET last_step = ?, failures = 0, lockouts = 0, locked_until = 0
                   WHERE username = ? AND uid = ? AND last_step < ?""",
                (step, username, uid, step),
            )
            return cursor.rowcount == 1

    def unlock(self, username: str, uid: int, *, now: int) -> bool:
        with self._transaction(durable=False) as db:
            cleared = db.execute(
                """UPDATE secrets SET failures = 0, lockouts = 0, locked_until = 0
                   WHERE username = ? AND uid = ? AND status = 'active'""",
                (username, uid),
            ).rowcount
            if cleared:
                self._audit(db, now, "unlocked", username, "")
            return bool(cleared)

    # -- pending secrets (confirmed enrollment) ------------------------------------------

    def put_pending(self, record: SecretRecord, *, expires_at: int) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO pending_secrets VALUES (?,?,?,?,?,?,?,?,?)",
                (*codec.pending_values(record), expires_at),
            )
            self._audit(
                db, record.created_at, "secret_pending", record.username, f"uid={record.uid}"
            )

    def get_pending(self, username: str) -> tuple[SecretRecord, int] | None:
        rows = self._query(
            f"SELECT {codec.PENDING_COLUMNS}, expires_at FROM pending_secrets WHERE username = ?",
            (username,),
        )
        return codec.pending_record(rows[0]) if rows else None

    def confirm_pending(
        self,
        username: str,
        uid: int,
        sealed: Sealed,
        step: int,
        *,
        now: int,
        expected: object = ANY_SECRET,
    ) -> bool:
        with self._transaction() as db:
            if not _still(db, username, uid, expected):
                return False
            row = db.execute(
                f"SELECT {codec.PENDING_COLUMNS}, expires_at FROM pending_secrets "
                "WHERE username = ? AND uid = ? AND nonce = ? AND ciphertext = ? "
                "AND expires_at > ?",
                (username, uid, sealed.nonce, sealed.ciphertext, now),
            ).fetchone()
            if row is None:
                return False
            record, _ = codec.pending_record(row)
            db.execute("DELETE FROM pending_secrets WHERE username = ?", (username,))
            db.execute("DELETE FROM secrets WHERE username = ?", (username,))
            db.execute(
                f"INSERT INTO secrets ({_SECRET_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (*codec.pending_values(record)[:8], step, 0, 0, 0),
            )
            self._audit(db, now, "secret_confirmed", username, f"uid={uid}")
        return True

    # -- key rotation: each row re-sealed on its own, only if it is still as read ----

    def list_pending(self) -> list[SecretRecord]:
        rows = self._query(
            f"SELECT {codec.PENDING_COLUMNS}, expires_at FROM pending_secrets ORDER BY username"
        )
        return [codec.pending_record(row)[0] for row in rows]

    def reseal(self, table: str, username: str, old: Sealed, new: Sealed) -> bool:
        if table not in ("secrets", "pending_secrets"):
            raise ValueError(f"no sealed rows in {table}")
        with self._transaction() as db:
            return bool(
                db.execute(
                    f"UPDATE {table} SET key_id = ?, nonce = ?, ciphertext = ? "
                    "WHERE username = ? AND nonce = ? AND ciphertext = ?",
                    (new.key_id, new.nonce, new.ciphertext, username, old.nonce, old.ciphertext),
                ).rowcount
            )

    def reseal_meta(self, name: str, old: Sealed, new: Sealed) -> bool:
        with self._transaction() as db:
            return bool(
                db.execute(
                    "UPDATE meta SET value = ? WHERE name = ? AND value = ?",
                    (codec.sealed_json(new), name, codec.sealed_json(old)),
                ).rowcount
            )

    # -- recovery codes -----------------------------------------------------------------

    def recovery_key(self) -> Sealed | None:
        rows = self._query("SELECT value FROM meta WHERE name = 'recovery_key'")
        return codec.sealed_from_json(rows[0][0]) if rows else None

    def init_recovery_key(self, sealed: Sealed) -> Sealed:
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('recovery_key', ?)",
                (codec.sealed_json(sealed),),
            )
            stored = db.execute("SELECT value FROM meta WHERE name = 'recovery_key'").fetchone()
        return codec.sealed_from_json(stored[0])

    def put_recovery_codes(self, username: str, uid: int, hashes: list[bytes], *, now: int) -> bool:
        with self._transaction() as db:
            active = db.execute(
                "SELECT 1 FROM secrets WHERE username = ? AND uid = ? AND status = 'active'",
                (username, uid),
            ).fetchone()
            if active is None:
                return False
            db.execute("DELETE FROM recovery_codes WHERE username = ?", (username,))
            db.executemany(
                "INSERT INTO recovery_codes (username, code_hash) VALUES (?, ?)",
                [(username, h) for h in hashes],
            )
            self._audit(db, now, "recovery_codes_made", username, f"count={len(hashes)}")
        return True

    def use_recovery_code(
        self, username: str, uid: int, hashes: list[bytes], *, now: int
    ) -> int | None:
        marks = ", ".join("?" * len(hashes))
        with self._transaction(durable=False) as db:
            used = db.execute(
                f"""UPDATE recovery_codes SET used_at = ?
                    WHERE username = ? AND used_at IS NULL AND code_hash IN ({marks})
                      AND EXISTS (SELECT 1 FROM secrets WHERE username = ? AND uid = ?
                                  AND status = 'active')""",
                (now, username, *hashes, username, uid),
            ).rowcount
            if not used:
                return None
            db.execute(
                "UPDATE secrets SET failures = 0, lockouts = 0, locked_until = 0 "
                "WHERE username = ? AND uid = ?",
                (username, uid),
            )
            left = db.execute(
                "SELECT count(*) FROM recovery_codes WHERE username = ? AND used_at IS NULL",
                (username,),
            ).fetchone()[0]
            self._audit(db, now, "recovery_code_used", username, f"left={left}")
        return int(left)

    def import_secrets(
        self, items: list[tuple[SecretRecord, list[bytes]]], *, now: int
    ) -> list[str]:
        with self._transaction() as db:
            taken = [
                record.username
                for record, _ in items
                if not _still(db, record.username, record.uid, None)
            ]
            if taken:
                return taken
            for record, hashes in items:
                db.execute("DELETE FROM secrets WHERE username = ?", (record.username,))
                db.execute(
                    f"INSERT INTO secrets ({_SECRET_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    codec.secret_values(record),
                )
                db.executemany(
                    "INSERT INTO recovery_codes (username, code_hash) VALUES (?, ?)",
                    [(record.username, h) for h in hashes],
                )
                self._audit(
                    db, now, "secret_imported", record.username,
                    f"uid={record.uid} recovery_codes={len(hashes)}",
                )  # fmt: skip
        return []

    def recovery_codes_left(self, username: str) -> int:
        rows = self._query(
            "SELECT count(*) FROM recovery_codes WHERE username = ? AND used_at IS NULL",
            (username,),
        )
        return int(rows[0][0])

    # -- audit ----------------------------------------------------------------------

    def _audit(
        self, db: sqlite3.Connection, at: int, event: str, username: str, detail: str
    ) -> None:
        # `at` from the service's clock, not SQLite's: one clock for locks and audit.
        db.execute(
            f"INSERT INTO audit_events ({codec.AUDIT_WRITTEN}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (at, event, username, detail, self.host, *codec.origin()),
        )

    def record_event(self, event: str, username: str, detail: str, *, now: int) -> None:
        with self._statement() as db:
            db.execute(
                f"INSERT INTO audit_events ({codec.AUDIT_WRITTEN}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (now, event, username, detail, self.host, *codec.origin()),
            )

    def audit_events(
        self,
        *,
        username: str | None = None,
        since: int | None = None,
        until: int | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[audit.Event]:
        where, params = codec.audit_filter(username, since, until, before_id, "?")
        rows = self._query(
            f"SELECT {codec.AUDIT_READ} FROM audit_events {where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [audit.Event(*row) for row in rows]

    def purge_audit(self, *, before: int) -> int:
        with self._transaction(durable=False) as db:
            return db.execute("DELETE FROM audit_events WHERE at < ?", (before,)).rowcount

    # -- copying a whole database (otpgated migrate) ------------------------------------

    @contextmanager
    def snapshot(self) -> Iterator[Callable[[str], Iterator[tuple[Any, ...]]]]:
        """Every table's rows (store.schema.TABLES' columns, in key order), all as of
        one moment: a read transaction on a connection of its own (WAL keeps it
        steady while writers go on), so a migration never holds the store lock."""
        reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        try:
            reader.execute("BEGIN")

            def rows(table: str) -> Iterator[tuple[Any, ...]]:
                columns, key = schema.TABLES[table]
                yield from reader.execute(
                    f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}"
                )

            yield rows
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read database {self.path}: {exc}") from None
        finally:
            reader.close()

    def is_empty(self) -> bool:
        """Nothing but what a new database holds: no key check, secret, code or event."""
        return not self._query(
            "SELECT 1 FROM meta WHERE name = 'key_check' UNION ALL SELECT 1 FROM secrets "
            "UNION ALL SELECT 1 FROM recovery_codes UNION ALL SELECT 1 FROM audit_events LIMIT 1"
        )

    def fill(self, rows: Callable[[str], Iterable[tuple[Any, ...]]]) -> None:
        """Replace everything with `rows(table)` for every table, in one transaction
        (a crash leaves the database as it was)."""
        try:
            with self._transaction() as db:
                for table in schema.TABLES:
                    db.execute(f"DELETE FROM {table}")
                for table, (columns, _) in schema.TABLES.items():
                    marks = ", ".join("?" * len(columns))
                    db.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                        rows(table),
                    )
                self._settings = None
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write database {self.path}: {exc}") from None

    def healthy(self) -> bool:
        """The database answers (the watchdog's question); False if it is stuck or gone."""
        if not self._lock.acquire(timeout=5):
            return False
        try:
            self._db.execute("SELECT 1 FROM settings WHERE id = 1").fetchone()
            return True
        except sqlite3.Error:
            return False
        finally:
            self._lock.release()

    def close(self) -> None:
        self._checkpointer.stop()
        with self._lock:
            self._db.close()


class _Checkpointer:
    """Copies the write-ahead log into the database from a thread of its own.

    SQLite's automatic checkpoint runs inside whichever write crosses the threshold:
    with two fsyncs it held the store lock for about 20 ms every thousand logins,
    stalling every login in flight. A passive checkpoint on another connection
    runs beside the writers (WAL mode allows it) and never blocks them.
    """

    def __init__(self, path: str, interval: float = _CHECKPOINT_INTERVAL) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # A checkpoint syncs as its own connection says: FULL, whatever the build's default.
        self._db.execute("PRAGMA synchronous=FULL")
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except Exception as exc:  # retried next round; the fallback bounds the log
                log.warning("checkpoint_failed error=%s: %s", type(exc).__name__, exc)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._db.close()


def _still(db: sqlite3.Connection, username: str, uid: int, expected: object) -> bool:
    """Whether the account's active secret is still `expected` (Store.put_secret's
    compare-and-set: ANY_SECRET, None for "no secret of this uid", or a Sealed)."""
    if expected is ANY_SECRET:
        return True
    rows = db.execute(
        "SELECT uid, nonce, ciphertext FROM secrets WHERE username = ? AND status = 'active'",
        (username,),
    ).fetchall()
    # A row of another uid is a deleted account's: "no secret" for this one.
    current = rows[0] if rows and rows[0][0] == uid else None
    if expected is None:
        return current is None
    return (
        isinstance(expected, Sealed)
        and current is not None
        and (bytes(current[1]), bytes(current[2])) == (expected.nonce, expected.ciphertext)
    )
