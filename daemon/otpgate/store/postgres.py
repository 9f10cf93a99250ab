"""The shared store: PostgreSQL, for several daemons on one database.

The same contract as the SQLite store (core.ports.Store, tests/store/test_contract.py),
kept by PostgreSQL's row locking: every change that must be atomic is one
statement (a counted attempt, a lock with its audit row, a spent step, a
deletion with its audit row) or one transaction. Under READ COMMITTED a
conditional UPDATE re-checks its WHERE on the row as the winner left it, so of
concurrent compare-and-sets at most one applies; two first enrollments meet
on the primary key (INSERT ... ON CONFLICT), and exactly one wins.

Nothing is cached in the process: several daemons share the database, so the
settings are read at every call. Every call is bounded in time: connecting
(connect_timeout), waiting for a pooled connection (the pool's timeout) and
every statement (statement_timeout, lock_timeout), and, for a server that is
stuck rather than gone, a client-side deadline on every conversation
(store.deadlines): a dead or frozen database fails a call with StoreUnavailable
within about `timeout` seconds, never hangs. A broken pooled connection is
noticed before use (itself under a deadline) and replaced, so the store recovers
by itself once the database is back.

Only a database that cannot be reached or does not answer in time is
StoreUnavailable (the hook's fail mode may act on it); any other failure (a
constraint, a full disk on the server, a bug) is StoreError, and denies.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from otpgate.core import audit
from otpgate.core.crypto import Sealed
from otpgate.core.records import ANY_SECRET, SecretRecord
from otpgate.core.settings import Settings
from otpgate.errors import ConfigError, InvalidArgument, StoreError, StoreUnavailable
from otpgate.store import rows as codec
from otpgate.store import schema
from otpgate.store.deadlines import Deadlines

log = logging.getLogger("otpgated")

_SETTINGS_SECONDS = 0.5  # how stale this daemon's copy of the shared settings may be
_TRUSTED_SECONDS = 1.0  # a pooled connection this fresh is not checked again before use
_POOL_MAX = 8  # connections per store: more threads wait their turn (bounded by `timeout`)
_MIGRATION_LOCK = 0x6F747067  # "otpg": advisory lock serialising daemons that start at once

# Version 1, as SQLite's: same tables, same columns, same checks; store.schema's
# migrations bring it up to date.
_SCHEMA_V1 = """
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE settings (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value TEXT NOT NULL
);
CREATE TABLE secrets (
    username     TEXT PRIMARY KEY,
    uid          BIGINT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'pending')),
    key_id       TEXT NOT NULL,
    nonce        BYTEA NOT NULL,
    ciphertext   BYTEA NOT NULL,
    otp_digits   INTEGER NOT NULL CHECK (otp_digits BETWEEN 6 AND 8),
    interval     INTEGER NOT NULL CHECK (interval BETWEEN 5 AND 120),
    created_at   BIGINT NOT NULL,
    last_step    BIGINT NOT NULL DEFAULT -1,
    failures     BIGINT NOT NULL DEFAULT 0,
    lockouts     BIGINT NOT NULL DEFAULT 0,
    locked_until BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE recovery_codes (
    username  TEXT NOT NULL REFERENCES secrets(username) ON DELETE CASCADE,
    code_hash BYTEA NOT NULL,
    used_at   BIGINT,
    PRIMARY KEY (username, code_hash)
);
CREATE TABLE audit_events (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       BIGINT NOT NULL,
    event    TEXT NOT NULL,
    username TEXT NOT NULL,
    detail   TEXT NOT NULL
);
"""

# Text columns that key a table's rows (the others are numbers or bytes).
_TEXT_KEYS = frozenset({"name", "username"})

_COLUMNS = codec.SECRET_NAMES
_SECRET_COLUMNS = codec.SECRET_COLUMNS
_PLACEHOLDERS = ", ".join(["%s"] * len(_COLUMNS))
# A new secret replaces every column of the old row (and makes it active).
_REPLACE = ", ".join(f"{c} = EXCLUDED.{c}" for c in _COLUMNS[1:]) + ", status = 'active'"
_AUDIT = (
    "INSERT INTO audit_events (at, event, username, detail, host, path, caller) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s)"
)


def read_password_file(path: str) -> str:
    """The password in `path`, one trailing newline stripped; checked as the key file
    is: a regular file (no symlink), owned by root or this process's user, with no
    group or other permission bits."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot open password file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"password file {path} is not a regular file")
        if info.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                f"password file {path} is owned by uid {info.st_uid}; it must be owned by "
                f"root or uid {os.geteuid()}"
            )
        if info.st_mode & 0o077:
            raise ConfigError(
                f"password file {path} has mode {stat.S_IMODE(info.st_mode):04o}; "
                "it must be 0600 or tighter"
            )
        data = b""
        while chunk := os.read(fd, 4096):
            data += chunk
            if len(data) > 65536:
                raise ConfigError(f"password file {path} is too large")
    finally:
        os.close(fd)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"password file {path} is not UTF-8 text") from None
    return text.removesuffix("\n")


class PostgresStore:
    """core.ports.Store on a PostgreSQL database. Thread-safe: a pool of connections,
    one per call at a time."""

    def __init__(
        self,
        url: str,
        *,
        password_file: str | None = None,
        timeout: float = 3.0,
        upgrade: bool = False,
        host: str = "",
    ) -> None:
        if not timeout > 0:
            raise ConfigError(f"database timeout must be positive, not {timeout}")
        self.timeout = timeout
        self.host = host  # written into every audit row
        self.upgraded_from: int | None = None  # the version an upgrade started from
        self._deadlines = Deadlines()
        self._connect_error: psycopg.Error | None = None
        self._parsed_settings: tuple[str, Settings] | None = None
        self._settings_read: tuple[float, Settings] | None = None  # (monotonic, settings)
        # When each pooled connection last finished a conversation (see _check).
        self._last_used: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ConfigError(f"invalid database URL: {_clean(exc)}") from None
        self.where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
        self.where += f"/{params.get('dbname', '')}"
        kwargs: dict[str, Any] = {
            "autocommit": True,
            # libpq's connect_timeout is whole seconds (at least 2 are used).
            "connect_timeout": max(2, math.ceil(timeout)),
            "options": (
                f"-c statement_timeout={int(timeout * 1000)} "
                f"-c lock_timeout={int(timeout * 1000)} "
                f"-c idle_in_transaction_session_timeout={int(timeout * 2000)}"
            ),
            # Over TCP: a peer that vanished without a word fails the call, too.
            "tcp_user_timeout": int(timeout * 1000),
            "keepalives": 1,
            "keepalives_idle": max(1, int(timeout)),
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "application_name": "otpgated",
        }
        if password_file is not None:
            if "password" in params:
                raise ConfigError("database URL has a password and a password file is given")
            # Given to libpq beside the URL, never written into it (nor into a message).
            kwargs["password"] = read_password_file(password_file)
        self._url, self._kwargs = url, kwargs
        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            url,
            kwargs=kwargs,
            connection_class=self._recording_connection_class(),
            min_size=1,
            max_size=_POOL_MAX,
            open=False,
            timeout=timeout,
            # A connection broken while idle in the pool (the server restarted) is
            # found out before use and replaced, not handed to a login.
            check=self._check,
            # Keep trying to reconnect, however long the database is gone: each call
            # waits only `timeout` for a connection anyway.
            reconnect_timeout=max(timeout * 2, 5.0),
            reconnect_failed=self._reconnect_failed,
            name="otpgate",
        )
        # The first connection by hand: its error says why (the pool's only that it
        # timed out), and it creates or checks the schema before the pool opens.
        try:
            with psycopg.connect(url, **kwargs) as conn:
                self._migrate(conn, upgrade)
        except psycopg.errors.QueryCanceled:
            raise StoreError(f"database {self.where} did not answer within {timeout:g} s") from None
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to database {self.where}: {_clean(exc)}") from None
        try:
            self._pool.open(wait=True, timeout=timeout)
        except psycopg.Error as exc:
            self._pool.close(timeout=0)
            raise StoreError(f"cannot connect to database {self.where}: {_clean(exc)}") from None

    @staticmethod
    def _reconnect_failed(pool: ConnectionPool[Any]) -> None:
        # Once per pooled connection: the monitor (server.monitor) tells the outage once.
        log.debug("database_pool_reconnect_failed pool=%s: retried at the next call", pool.name)

    def _check(self, conn: psycopg.Connection[Any]) -> None:
        # A connection that answered less than a second ago is taken on trust: the
        # check is a round trip of its own, half of a login's. One that did not
        # (idle, maybe broken by a restart since) is checked, under a deadline.
        # A connection that breaks within that second fails its call as unavailable.
        used = self._last_used.get(conn)
        if used is not None and time.monotonic() - used < _TRUSTED_SECONDS:
            return
        deadline = self._deadlines.start(conn.pgconn.socket, self.timeout)
        try:
            conn.execute("")
        finally:
            self._deadlines.finish(deadline)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        deadline = None
        try:
            with self._pool.connection(timeout=self.timeout) as conn:
                deadline = self._deadlines.start(conn.pgconn.socket, self.timeout)
                try:
                    yield conn
                finally:
                    self._deadlines.finish(deadline)
                    if not deadline.expired and not conn.broken:
                        self._last_used[conn] = time.monotonic()
        except psycopg.Error as exc:
            raise self._failure(exc, cut=deadline is not None and deadline.expired) from None

    def _recording_connection_class(self) -> type[psycopg.Connection[tuple[Any, ...]]]:
        """A connection class that keeps why the pool's last connection attempt
        failed: the pool itself only says that none came in time, and "a
        certificate that does not verify" must not pass for "the server is down"."""
        store = self

        class RecordingConnection(psycopg.Connection[tuple[Any, ...]]):
            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Any:
                try:
                    conn = super().connect(*args, **kwargs)
                except psycopg.Error as exc:
                    store._connect_error = exc
                    raise
                store._connect_error = None
                return conn

        return RecordingConnection

    def _failure(self, exc: psycopg.Error, *, cut: bool) -> StoreError:
        """StoreUnavailable for an outage (no connection, no answer in time, the
        connection lost, the server shutting down or starting); StoreError for
        everything else, a refused connection (TLS, authentication) included."""
        late = f"database {self.where} did not answer within {self.timeout:g} s"
        if cut or isinstance(exc, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
            return StoreUnavailable(late)
        if isinstance(exc, PoolTimeout):
            refusal = self._connect_error
            if refusal is not None and not _is_outage(refusal):
                return StoreError(f"database {self.where} refused us: {_clean(refusal)}")
            return StoreUnavailable(f"{late} (no connection: it is unreachable or overloaded)")
        if _is_outage(exc):
            return StoreUnavailable(f"database {self.where} unreachable: {_clean(exc)}")
        return StoreError(f"database {self.where}: {_clean(exc)}")

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        with self._connection() as conn, conn.transaction():
            yield conn

    def _query(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        with self._connection() as conn:
            return conn.execute(sql, params).fetchall()

    def _migrate(self, conn: psycopg.Connection[tuple[Any, ...]], upgrade: bool) -> None:
        # One transaction (PostgreSQL's DDL is transactional): creation or upgrade,
        # and its version, all or nothing.
        with conn.transaction():
            # Daemons that start at once take turns: one creates, the others check.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            row = conn.execute("SELECT to_regclass('meta')").fetchone()
            self.upgraded_from = schema.migrate(
                conn.execute,
                fresh=row is None or row[0] is None,
                v1_ddl=[_SCHEMA_V1],
                backend="postgres",
                mark="%s",
                where=self.where,
                upgrade=upgrade,
            )

    # -- settings -------------------------------------------------------------------

    def load_settings(self) -> Settings:
        # Another daemon on this database may have changed them: read again when the
        # copy is older than _SETTINGS_SECONDS, so a change holds on every daemon
        # within that (the fleet's promise is a second), at most one read each
        # _SETTINGS_SECONDS instead of one per login. Parsed again only when the
        # stored text changed.
        cached = self._settings_read
        if cached is not None and time.monotonic() - cached[0] < _SETTINGS_SECONDS:
            return cached[1]
        read_at = time.monotonic()
        rows = self._query("SELECT value FROM settings WHERE id = 1")
        if not rows:
            raise StoreError("database has no settings row")
        text = rows[0][0]
        parsed = self._parsed_settings
        if parsed is not None and parsed[0] == text:
            settings = parsed[1]
        else:
            try:
                settings = Settings.from_dict(json.loads(text))
            except (ValueError, InvalidArgument) as exc:
                raise StoreError(f"stored settings are invalid: {exc}") from None
            self._parsed_settings = (text, settings)
        self._settings_read = (read_at, settings)
        return settings

    def save_settings(self, settings: Settings, *, audit: str, now: int) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE settings SET value = %s WHERE id = 1", (json.dumps(settings.to_dict()),)
            )
            conn.execute(_AUDIT, self._event(now, "settings_updated", "", audit))
        self._settings_read = None  # this daemon sees its own change at once

    # -- key check --------------------------------------------------------------------

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
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO meta VALUES ('key_check', %s) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                (value,),
            )

    def key_ids_in_use(self) -> set[str]:
        rows = self._query(
            "SELECT key_id FROM secrets UNION SELECT key_id FROM pending_secrets "
            "UNION SELECT value::json->>'key_id' FROM meta WHERE name = 'recovery_key'"
        )
        return {row[0] for row in rows}

    # -- secrets --------------------------------------------------------------------

    def put_secret(self, record: SecretRecord, *, expected: object = ANY_SECRET) -> bool:
        values = codec.secret_values(record)
        insert = f"INSERT INTO secrets ({_SECRET_COLUMNS}) VALUES ({_PLACEHOLDERS})"
        with self._transaction() as conn:
            if expected is ANY_SECRET:
                cursor = conn.execute(
                    f"{insert} ON CONFLICT (username) DO UPDATE SET {_REPLACE}", values
                )
            elif expected is None:
                # Only if this uid has no (active) secret: a row of another uid is a
                # deleted account's. Racing first enrollments meet on the key: the
                # others wait for the first to commit, then find its row and lose.
                cursor = conn.execute(
                    f"""{insert} ON CONFLICT (username) DO UPDATE SET {_REPLACE}
                        WHERE secrets.uid <> EXCLUDED.uid OR secrets.status <> 'active'""",
                    values,
                )
            elif isinstance(expected, Sealed):
                cursor = conn.execute(
                    f"""UPDATE secrets SET ({_SECRET_COLUMNS}, status) = ({_PLACEHOLDERS}, 'active')
                        WHERE username = %s AND uid = %s AND status = 'active'
                            AND nonce = %s AND ciphertext = %s""",
                    (*values, record.username, record.uid, expected.nonce, expected.ciphertext),
                )
            else:
                return False
            if cursor.rowcount != 1:
                return False
            # As SQLite's delete-and-insert: the old secret's recovery codes go with it.
            conn.execute("DELETE FROM recovery_codes WHERE username = %s", (record.username,))
            conn.execute(
                _AUDIT,
                (
                    record.created_at,
                    "secret_renewed",
                    record.username,
                    f"uid={record.uid}",
                    self.host,
                    *codec.origin(),
                ),
            )
        return True

    def get_secret(self, username: str) -> SecretRecord | None:
        rows = self._query(
            f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE username = %s AND status = 'active'",
            (username,),
        )
        return codec.secret_record(rows[0]) if rows else None

    def list_secrets(self) -> list[SecretRecord]:
        rows = self._query(
            f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE status = 'active' "
            'ORDER BY username COLLATE "C"'
        )
        return [codec.secret_record(row) for row in rows]

    def delete_secret(self, username: str, *, now: int) -> bool:
        # One transaction: the rows (active and pending) and their audit row together.
        with self._transaction() as conn:
            pending = conn.execute("DELETE FROM pending_secrets WHERE username = %s", (username,))
            active = conn.execute("DELETE FROM secrets WHERE username = %s", (username,))
            if not (pending.rowcount or active.rowcount):
                return False
            conn.execute(_AUDIT, self._event(now, "secret_unset", username, ""))
        return True

    def count_attempt(self, username: str, uid: int, *, now: int) -> SecretRecord | None:
        rows = self._query(
            f"""UPDATE secrets SET failures = CASE WHEN locked_until <= %(now)s
                    THEN failures + 1 ELSE failures END
                WHERE username = %(user)s AND uid = %(uid)s AND status = 'active'
                RETURNING {_SECRET_COLUMNS}""",
            {"now": now, "user": username, "uid": uid},
        )
        return codec.secret_record(rows[0]) if rows else None

    def lock(
        self, username: str, uid: int, *, count: int, lockouts: int, until: int, now: int
    ) -> bool:
        # One conditional UPDATE, its audit row in the same statement.
        rows = self._query(
            """WITH locked AS (
                   UPDATE secrets SET failures = 0, lockouts = lockouts + 1, locked_until = %s
                   WHERE username = %s AND uid = %s AND status = 'active'
                       AND failures >= %s AND lockouts = %s
                   RETURNING username)
               INSERT INTO audit_events (at, event, username, detail, host, path, caller)
               SELECT %s, 'locked', username, %s, %s, %s, %s FROM locked RETURNING id""",
            (
                until,
                username,
                uid,
                count,
                lockouts,
                now,
                f"failures={count} until={until}",
                self.host,
                *codec.origin(),
            ),
        )
        return bool(rows)

    def accept_step(self, username: str, uid: int, step: int) -> bool:
        """Spend `step` and every earlier one; False if it (or a later one) was spent."""
        with self._connection() as conn:
            cursor = conn.execute(
                """UPDATE secrets SET last_step = %s, failures = 0, lockouts = 0, locked_until = 0
                   WHERE username = %s AND uid = %s AND last_step < %s""",
                (step, username, uid, step),
            )
            return cursor.rowcount == 1

    # -- health -----------------------------------------------------------------------

    def unlock(self, username: str, uid: int, *, now: int) -> bool:
        rows = self._query(
            """WITH cleared AS (
                   UPDATE secrets SET failures = 0, lockouts = 0, locked_until = 0
                   WHERE username = %s AND uid = %s AND status = 'active' RETURNING username)
               INSERT INTO audit_events (at, event, username, detail, host, path, caller)
               SELECT %s, 'unlocked', username, '', %s, %s, %s FROM cleared RETURNING id""",
            (username, uid, now, self.host, *codec.origin()),
        )
        return bool(rows)

    # -- pending secrets (confirmed enrollment) ------------------------------------------

    def put_pending(self, record: SecretRecord, *, expires_at: int) -> None:
        with self._transaction() as conn:
            conn.execute(
                f"""INSERT INTO pending_secrets ({codec.PENDING_COLUMNS}, expires_at)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                    ON CONFLICT (username) DO UPDATE SET
                    {", ".join(f"{c} = EXCLUDED.{c}" for c in codec.PENDING_NAMES[1:])},
                    expires_at = EXCLUDED.expires_at""",
                (*codec.pending_values(record), expires_at),
            )
            conn.execute(
                _AUDIT,
                (
                    record.created_at,
                    "secret_pending",
                    record.username,
                    f"uid={record.uid}",
                    self.host,
                    *codec.origin(),
                ),
            )

    def get_pending(self, username: str) -> tuple[SecretRecord, int] | None:
        rows = self._query(
            f"SELECT {codec.PENDING_COLUMNS}, expires_at FROM pending_secrets WHERE username = %s",
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
        with self._transaction() as conn:
            if expected is not ANY_SECRET:
                # The active row locked until commit: nobody replaces it in between.
                current = conn.execute(
                    "SELECT uid, nonce, ciphertext FROM secrets WHERE username = %s "
                    "AND status = 'active' FOR UPDATE",
                    (username,),
                ).fetchone()
                mine = current if current is not None and current[0] == uid else None
                if expected is None and mine is not None:
                    return False
                if expected is not None and (
                    not isinstance(expected, Sealed)
                    or mine is None
                    or (bytes(mine[1]), bytes(mine[2])) != (expected.nonce, expected.ciphertext)
                ):
                    return False
            # DELETE ... RETURNING takes the row: of two confirmations one gets it.
            row = conn.execute(
                f"""DELETE FROM pending_secrets WHERE username = %s AND uid = %s
                        AND nonce = %s AND ciphertext = %s AND expires_at > %s
                    RETURNING {codec.PENDING_COLUMNS}, expires_at""",
                (username, uid, sealed.nonce, sealed.ciphertext, now),
            ).fetchone()
            if row is None:
                return False
            record, _ = codec.pending_record(row)
            values = (*codec.pending_values(record), step, 0, 0, 0)
            conn.execute(
                f"""INSERT INTO secrets ({_SECRET_COLUMNS}) VALUES ({_PLACEHOLDERS})
                    ON CONFLICT (username) DO UPDATE SET {_REPLACE}""",
                values,
            )
            conn.execute("DELETE FROM recovery_codes WHERE username = %s", (username,))
            conn.execute(
                _AUDIT,
                self._event(now, "secret_confirmed", username, f"uid={uid}"),
            )
        return True

    # -- key rotation: each row re-sealed on its own, only if it is still as read ----

    def list_pending(self) -> list[SecretRecord]:
        rows = self._query(
            f"SELECT {codec.PENDING_COLUMNS}, expires_at FROM pending_secrets "
            'ORDER BY username COLLATE "C"'
        )
        return [codec.pending_record(row)[0] for row in rows]

    def reseal(self, table: str, username: str, old: Sealed, new: Sealed) -> bool:
        if table not in ("secrets", "pending_secrets"):
            raise ValueError(f"no sealed rows in {table}")
        with self._connection() as conn:
            cursor = conn.execute(
                f"UPDATE {table} SET key_id = %s, nonce = %s, ciphertext = %s "
                "WHERE username = %s AND nonce = %s AND ciphertext = %s",
                (new.key_id, new.nonce, new.ciphertext, username, old.nonce, old.ciphertext),
            )
            return cursor.rowcount == 1

    def reseal_meta(self, name: str, old: Sealed, new: Sealed) -> bool:
        with self._connection() as conn:
            cursor = conn.execute(
                "UPDATE meta SET value = %s WHERE name = %s AND value = %s",
                (codec.sealed_json(new), name, codec.sealed_json(old)),
            )
            return cursor.rowcount == 1

    # -- recovery codes -----------------------------------------------------------------

    def recovery_key(self) -> Sealed | None:
        rows = self._query("SELECT value FROM meta WHERE name = 'recovery_key'")
        return codec.sealed_from_json(rows[0][0]) if rows else None

    def init_recovery_key(self, sealed: Sealed) -> Sealed:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO meta VALUES ('recovery_key', %s) ON CONFLICT (name) DO NOTHING",
                (codec.sealed_json(sealed),),
            )
            stored = conn.execute("SELECT value FROM meta WHERE name = 'recovery_key'").fetchone()
        assert stored is not None
        return codec.sealed_from_json(stored[0])

    def put_recovery_codes(self, username: str, uid: int, hashes: list[bytes], *, now: int) -> bool:
        with self._transaction() as conn:
            active = conn.execute(
                "SELECT 1 FROM secrets WHERE username = %s AND uid = %s AND status = 'active' "
                "FOR UPDATE",
                (username, uid),
            ).fetchone()
            if active is None:
                return False
            conn.execute("DELETE FROM recovery_codes WHERE username = %s", (username,))
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO recovery_codes (username, code_hash) VALUES (%s, %s)",
                    [(username, h) for h in hashes],
                )
            conn.execute(
                _AUDIT,
                (
                    now,
                    "recovery_codes_made",
                    username,
                    f"count={len(hashes)}",
                    self.host,
                    *codec.origin(),
                ),
            )
        return True

    def use_recovery_code(
        self, username: str, uid: int, hashes: list[bytes], *, now: int
    ) -> int | None:
        with self._transaction() as conn:
            # The row lock on the account orders concurrent uses: each code once.
            used = conn.execute(
                """UPDATE recovery_codes SET used_at = %s
                   WHERE username = %s AND used_at IS NULL AND code_hash = ANY(%s)
                     AND EXISTS (SELECT 1 FROM secrets WHERE username = %s AND uid = %s
                                 AND status = 'active')""",
                (now, username, hashes, username, uid),
            ).rowcount
            if not used:
                return None
            conn.execute(
                "UPDATE secrets SET failures = 0, lockouts = 0, locked_until = 0 "
                "WHERE username = %s AND uid = %s",
                (username, uid),
            )
            row = conn.execute(
                "SELECT count(*) FROM recovery_codes WHERE username = %s AND used_at IS NULL",
                (username,),
            ).fetchone()
            left = int(row[0]) if row else 0
            conn.execute(
                _AUDIT,
                self._event(now, "recovery_code_used", username, f"left={left}"),
            )
        return left

    def import_secrets(
        self, items: list[tuple[SecretRecord, list[bytes]]], *, now: int
    ) -> list[str]:
        insert = f"INSERT INTO secrets ({_SECRET_COLUMNS}) VALUES ({_PLACEHOLDERS})"
        try:
            with self._transaction() as conn:
                taken = [
                    r.username for r, _ in items if not self._import_one(conn, insert, r, _, now)
                ]
                if taken:
                    raise _Taken(taken)  # all or nothing: the transaction takes all back
        except _Taken as refused:
            return refused.names
        return []

    def _import_one(
        self,
        conn: psycopg.Connection[tuple[Any, ...]],
        insert: str,
        record: SecretRecord,
        hashes: list[bytes],
        now: int,
    ) -> bool:
        # Only where this uid has no secret (a row of another uid is a deleted
        # account's), as put_secret(expected=None).
        cursor = conn.execute(
            f"""{insert} ON CONFLICT (username) DO UPDATE SET {_REPLACE}
                WHERE secrets.uid <> EXCLUDED.uid OR secrets.status <> 'active'""",
            codec.secret_values(record),
        )
        if cursor.rowcount != 1:
            return False
        conn.execute("DELETE FROM recovery_codes WHERE username = %s", (record.username,))
        with conn.cursor() as many:
            many.executemany(
                "INSERT INTO recovery_codes (username, code_hash) VALUES (%s, %s)",
                [(record.username, h) for h in hashes],
            )
        detail = f"uid={record.uid} recovery_codes={len(hashes)}"
        conn.execute(_AUDIT, self._event(now, "secret_imported", record.username, detail))
        return True

    def _event(self, at: int, event: str, username: str, detail: str) -> tuple[Any, ...]:
        """An audit row's values (_AUDIT): this host, the call's path and caller."""
        return (at, event, username, detail, self.host, *codec.origin())

    def record_event(self, event: str, username: str, detail: str, *, now: int) -> None:
        with self._connection() as conn:
            conn.execute(_AUDIT, self._event(now, event, username, detail))

    def audit_events(
        self,
        *,
        username: str | None = None,
        since: int | None = None,
        until: int | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[audit.Event]:
        where, params = codec.audit_filter(username, since, until, before_id, "%s")
        rows = self._query(
            f"SELECT {codec.AUDIT_READ} FROM audit_events {where} ORDER BY id DESC LIMIT %s",
            (*params, limit),
        )
        return [audit.Event(*row) for row in rows]

    def purge_audit(self, *, before: int) -> int:
        with self._connection() as conn:
            return conn.execute("DELETE FROM audit_events WHERE at < %s", (before,)).rowcount

    def recovery_codes_left(self, username: str) -> int:
        rows = self._query(
            "SELECT count(*) FROM recovery_codes WHERE username = %s AND used_at IS NULL",
            (username,),
        )
        return int(rows[0][0])

    # -- copying a whole database (otpgated migrate) ------------------------------------

    @contextmanager
    def _bulk(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A connection of its own for copying a whole database: no statement bound
        (a million rows take longer than a login may), outside the pool."""
        try:
            with psycopg.connect(self._url, **self._kwargs) as conn:
                conn.execute("SET statement_timeout = 0")
                conn.execute("SET idle_in_transaction_session_timeout = 0")
                yield conn
        except psycopg.Error as exc:
            raise StoreError(f"database {self.where}: {_clean(exc)}") from None

    @contextmanager
    def snapshot(self) -> Iterator[Callable[[str], Iterator[tuple[Any, ...]]]]:
        """Every table's rows (store.schema.TABLES' columns, in key order), all as of
        one moment (a REPEATABLE READ transaction), streamed by a server-side cursor."""
        with self._bulk() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

            def rows(table: str) -> Iterator[tuple[Any, ...]]:
                columns, key = schema.TABLES[table]
                # COLLATE "C": byte order, as SQLite's, so two copies compare row by row.
                order = ", ".join(
                    f'{k.strip()} COLLATE "C"' if k.strip() in _TEXT_KEYS else k.strip()
                    for k in key.split(",")
                )
                with conn.cursor(name=f"otpgate_copy_{table}") as cursor:
                    cursor.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")
                    yield from cursor

            yield rows

    def is_empty(self) -> bool:
        """Nothing but what a new database holds: no key check, secret, code or event."""
        return not self._query(
            "SELECT 1 FROM meta WHERE name = 'key_check' UNION ALL SELECT 1 FROM secrets "
            "UNION ALL SELECT 1 FROM recovery_codes UNION ALL SELECT 1 FROM audit_events LIMIT 1"
        )

    def fill(self, rows: Callable[[str], Iterable[tuple[Any, ...]]]) -> None:
        """Replace everything with `rows(table)` for every table, in one transaction
        (COPY, so a million rows take seconds; a failure leaves the database as it was)."""
        with self._bulk() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(f"TRUNCATE {', '.join(reversed(schema.TABLES))}")
            for table, (columns, _) in schema.TABLES.items():
                with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows(table):
                        copy.write_row(row)
            # Events made after the copy number on from the copied ones.
            conn.execute(
                "SELECT setval(pg_get_serial_sequence('audit_events', 'id'), "
                "COALESCE((SELECT max(id) FROM audit_events), 0) + 1, false)"
            )

    def healthy(self) -> bool:
        """Whether a login could be decided now: the database answers, takes writes
        (not a standby, not read-only) and the tables a login writes are not locked
        against it (VACUUM FULL, ALTER TABLE). Nothing is written: the transaction
        is rolled back, and ROW EXCLUSIVE, the lock every UPDATE takes, conflicts
        with no other daemon's."""
        try:
            with self._connection() as conn, conn.transaction(force_rollback=True):
                row = conn.execute(
                    "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'"
                ).fetchone()
                if row is None or row[0]:
                    return False
                # Without NOWAIT: a lock a login would wait out (lock_timeout) is no
                # reason to say NOT_SERVING; one held longer is.
                conn.execute(
                    "LOCK TABLE settings, secrets, recovery_codes, audit_events "
                    "IN ROW EXCLUSIVE MODE"
                )
        except StoreError:
            return False
        return True

    def close(self) -> None:
        self._pool.close(timeout=self.timeout)
        self._deadlines.stop()


# libpq's words for "nobody answered" (it gives no SQLSTATE for its own failures).
# A refusal (TLS, password, pg_hba, no such database) is not among them: that
# is a configuration error or an attack, and must deny, not fall to the fail mode.
_OUTAGE_WORDS = (
    "connection refused",
    "no such file or directory",  # no socket: the server is not running
    "timeout expired",
    "timed out",
    "server closed the connection",
    "connection reset",
    "no route to host",
    "network is unreachable",
    "could not translate host name",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    # After a backend crash the server restarts itself and, until recovery is
    # consistent, refuses connections with these words and no SQLSTATE.
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "could not receive data",
    "could not send data",
    "consuming input failed",
    "eof detected",
    "connection is lost",
    "the connection is closed",
    "connection is bad",
)


# A refusal wins over an outage in the same message: libpq reports every address
# it tried (host=a,b; a name with an IPv6 and an IPv4 address), and one "connection
# refused" among them must not hide the server that refused us. Full connection
# slots are not an outage either: any local user who reaches the port can fill them
# (they are taken before authentication), and fail=safe would then let everyone in
# on the first factor. A TLS session that breaks ("SSL error: unexpected eof") is
# an outage like any other; one that is refused names its certificate.
_REFUSAL_WORDS = (
    "password authentication failed",
    "authentication failed",
    "pg_hba.conf",
    "certificate",
    "does not support ssl",
    "does not match host name",
    "does not exist",
    "permission denied",
    "too many clients",
    "remaining connection slots",
)


def _is_outage(exc: psycopg.Error) -> bool:
    state = exc.sqlstate or ""
    if state:
        # 08: connection exception; 57P: shutting down, crashed, cannot connect now.
        return state.startswith(("08", "57P"))
    if not isinstance(exc, psycopg.OperationalError):
        return False
    text = str(exc).lower()
    if any(words in text for words in _REFUSAL_WORDS):
        return False
    return any(words in text for words in _OUTAGE_WORDS)


class _Taken(Exception):
    """Accounts an import found enrolled already: it writes nothing."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


def _clean(exc: BaseException) -> str:
    """psycopg's message on one line (libpq's may span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
