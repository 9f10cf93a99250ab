"""The schema's versions, shared by every backend: what each version adds, and the
rule for a database of another version (pure).

A new database is made at version 1 (each backend's own DDL, the same tables and
columns) and then brought up through every migration here, so a fresh database
and an upgraded one are the same by construction and every migration runs in
every test. A migration is portable SQL, run in one transaction with the version
bump: a crash leaves the old version or the new one.

otpgated never guesses: a database newer than it knows is refused (an older
otpgated could misread what it does not know), and an older one is upgraded
only when told (`otpgated upgrade-schema`), because an upgrade is a one-way step
every daemon sharing that database must be ready for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from otpgate.core.settings import Settings
from otpgate.errors import StoreError

# Every table, its columns in a fixed order, and the key that orders its rows:
# what `otpgated migrate` copies and compares, row by row.
TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "meta": (("name", "value"), "name"),
    "settings": (("id", "value"), "id"),
    "secrets": (
        (
            "username",
            "uid",
            "status",
            "key_id",
            "nonce",
            "ciphertext",
            "otp_digits",
            "interval",
            "created_at",
            "last_step",
            "failures",
            "lockouts",
            "locked_until",
        ),
        "username",
    ),
    "recovery_codes": (("username", "code_hash", "used_at"), "username, code_hash"),
    "pending_secrets": (
        (
            "username",
            "uid",
            "key_id",
            "nonce",
            "ciphertext",
            "otp_digits",
            "interval",
            "created_at",
            "expires_at",
        ),
        "username",
    ),
    "audit_events": (
        ("id", "at", "event", "username", "detail", "host", "path", "caller"),
        "id",
    ),
}

# version: the statements that bring a database of the version before to it.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # Many daemons write one audit table in a fleet: which host did it. Audit
    # queries go by time.
    2: (
        "ALTER TABLE audit_events ADD COLUMN host TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX audit_events_at ON audit_events (at)",
    ),
    # Confirmed enrollment: a renewed secret waits here, beside the one in use,
    # until a code from it confirms it (or it expires). Portable types only: BIGINT
    # and BYTEA-or-BLOB are spelled per backend in PENDING_DDL.
    3: ("{pending_secrets}",),
    # The audit trail says by which path (admin, user, pam:SERVICE) and, where
    # known, by whom; it is read newest first, per account.
    4: (
        "ALTER TABLE audit_events ADD COLUMN path TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE audit_events ADD COLUMN caller TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX audit_events_user ON audit_events (username, id)",
    ),
}
# The one statement whose column types differ between the backends.
PENDING_DDL = {
    "sqlite": """CREATE TABLE pending_secrets (
        username   TEXT PRIMARY KEY,
        uid        INTEGER NOT NULL,
        key_id     TEXT NOT NULL,
        nonce      BLOB NOT NULL,
        ciphertext BLOB NOT NULL,
        otp_digits INTEGER NOT NULL CHECK (otp_digits BETWEEN 6 AND 8),
        interval   INTEGER NOT NULL CHECK (interval BETWEEN 5 AND 120),
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    ) STRICT""",
    "postgres": """CREATE TABLE pending_secrets (
        username   TEXT PRIMARY KEY,
        uid        BIGINT NOT NULL,
        key_id     TEXT NOT NULL,
        nonce      BYTEA NOT NULL,
        ciphertext BYTEA NOT NULL,
        otp_digits INTEGER NOT NULL CHECK (otp_digits BETWEEN 6 AND 8),
        interval   INTEGER NOT NULL CHECK (interval BETWEEN 5 AND 120),
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    )""",
}


def statements(version: int, backend: str) -> list[str]:
    """Migration `version`'s statements as `backend` ("sqlite", "postgres") runs them."""
    return [s.format(pending_secrets=PENDING_DDL[backend]) for s in MIGRATIONS[version]]


SCHEMA_VERSION = max(MIGRATIONS)


def stored_version(row: tuple[object, ...] | None) -> int:
    """The version in a meta row; 0 (refused by steps) if missing or garbled."""
    try:
        return int(str(row[0])) if row else 0
    except ValueError:
        return 0


def migrate(
    execute: Callable[..., Any],
    *,
    fresh: bool,
    v1_ddl: Iterable[str],
    backend: str,
    mark: str,
    where: str,
    upgrade: bool,
) -> int | None:
    """Create (`fresh`) or bring up a database, inside the caller's transaction.

    `execute(sql[, params])` is the backend's own (it returns a cursor), `mark` its
    parameter marker. The version an upgrade started from, or None when nothing
    was upgraded (a new database, or one already current).
    """
    if fresh:
        for statement in v1_ddl:
            execute(statement)
        execute("INSERT INTO meta VALUES ('schema_version', '1')")
        execute(f"INSERT INTO settings VALUES (1, {mark})", (json.dumps(Settings().to_dict()),))
        found = 1
    else:
        found = stored_version(
            execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        )
    for version in steps(found, upgrade=upgrade or fresh, where=where):
        for statement in statements(version, backend):
            execute(statement)
        execute(f"UPDATE meta SET value = {mark} WHERE name = 'schema_version'", (str(version),))
    return found if not fresh and found < SCHEMA_VERSION else None


def steps(found: int, *, upgrade: bool, where: str) -> list[int]:
    """The migrations to run on a database of version `found`, in order.

    Raises StoreError for a database this otpgated must not use: newer than it
    knows, or older while no upgrade was asked for.
    """
    if found < 1:
        raise StoreError(f"database {where} has no schema version: it is damaged or not ours")
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"database {where} has schema version {found}, newer than this otpgated "
            f"knows ({SCHEMA_VERSION}): upgrade otpgated"
        )
    if found < SCHEMA_VERSION and not upgrade:
        raise StoreError(
            f"database {where} has schema version {found}; this otpgated needs "
            f"{SCHEMA_VERSION}: back it up, then run `otpgated upgrade-schema` "
            "(with the same database options) once"
        )
    return list(range(found + 1, SCHEMA_VERSION + 1))
