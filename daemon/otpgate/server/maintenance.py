"""otpgated's maintenance commands: `upgrade-schema` and `migrate`.

    otpgated upgrade-schema [DAEMON OPTIONS]
        Bring the daemon's database (as its options and configuration name it) to
        this otpgated's schema version; a newer one is refused. Run once per
        database, before otpgated starts on it.

    otpgated migrate [--from-password-file F] [--to-password-file F] SOURCE TARGET
        Copy a whole database into an empty one: SQLite to PostgreSQL or back
        (SOURCE and TARGET: the absolute path of a SQLite file, or a postgresql://
        URL). Every row of every table goes over as it is (secrets stay sealed:
        the daemons on TARGET need the same key), in one transaction; then both are
        read again and compared row by row. A non-empty TARGET is refused.

Each prints what it did on standard output and exits 0, or `Type: message` on
standard error and exits 1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Any

from otpgate.errors import ConfigError, OtpgateError, StoreError
from otpgate.server import config as daemon_config
from otpgate.store import backends, schema

COMMANDS = ("upgrade-schema", "migrate")


def run(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    try:
        if command == "upgrade-schema":
            upgrade_schema(rest)
        else:
            migrate(rest)
    except OtpgateError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def upgrade_schema(argv: list[str]) -> None:
    from otpgate.server.main import open_daemon_store  # main imports this module

    config = daemon_config.load(argv, prog="otpgated upgrade-schema")
    if not config.database_url:
        backup = _backup_if_older(config.database)
        if backup:
            print(f"{config.database}: backed up to {backup} before the upgrade")
    store = open_daemon_store(config, upgrade=True)
    try:
        found = getattr(store, "upgraded_from", None)
    finally:
        store.close()
    where = config.database_where
    if found is None:
        print(f"{where}: already at schema version {schema.SCHEMA_VERSION}")
    else:
        print(f"{where}: schema upgraded from version {found} to {schema.SCHEMA_VERSION}")


def _backup_if_older(path: str) -> str | None:
    """A SQLite file of an older schema is copied (SQLite's online backup, 0600)
    beside itself first: an upgrade is one-way. The copy's path, or None."""
    import sqlite3

    if not os.path.isfile(path):
        return None
    try:
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = source.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            found = schema.stored_version(row)
            if not 0 < found < schema.SCHEMA_VERSION:
                return None  # current, newer or not ours: opening it will say
            backup = f"{path}.schema-v{found}.bak"
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            target = sqlite3.connect(backup)
            try:
                source.backup(target)
            finally:
                target.close()
            return backup
        finally:
            source.close()
    except FileExistsError:
        raise StoreError(
            f"{path}.schema-v{found}.bak exists already: move it away (it is the backup of "
            "an earlier try) and run upgrade-schema again"
        ) from None
    except sqlite3.Error as exc:
        raise StoreError(f"cannot back up {path}: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="otpgated migrate",
        description="Copy an otpgate database into an empty one (SQLite <-> PostgreSQL), "
        "then compare every row.",
    )
    p.add_argument("source", help="SQLite file (absolute path) or postgresql:// URL")
    p.add_argument("target", help="SQLite file (absolute path) or postgresql:// URL; empty")
    p.add_argument("--from-password-file", help="password of the source database")
    p.add_argument("--to-password-file", help="password of the target database")
    return p


def _check_location(location: str, password_file: str | None, *, what: str) -> None:
    if backends.is_url(location):
        return
    if not os.path.isabs(location):
        raise ConfigError(
            f"{what} {location!r} is neither a postgresql:// URL nor an absolute path"
        )
    if password_file is not None:
        raise ConfigError(f"{what} is a SQLite file: it takes no password file")


def migrate(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    _check_location(args.source, args.from_password_file, what="source")
    _check_location(args.target, args.to_password_file, what="target")
    if args.source == args.target:
        raise ConfigError("source and target are the same database")
    if not backends.is_url(args.source) and not os.path.isfile(args.source):
        # Opening a missing file would make an empty database and copy nothing.
        raise ConfigError(f"source {args.source} does not exist")
    timeout = daemon_config.DaemonConfig().database_timeout
    source = backends.open_store(
        args.source, password_file=args.from_password_file, timeout=timeout
    )
    try:
        target = backends.open_store(
            args.target, password_file=args.to_password_file, timeout=timeout
        )
        try:
            _copy(source, target)
        finally:
            target.close()
    finally:
        source.close()


def _copy(source: Any, target: Any) -> None:
    # The store's own name for its database: a URL's password never shows.
    where = getattr(target, "where", None) or target.path
    if not target.is_empty():
        raise StoreError(
            f"target {where} is not empty (it holds secrets, audit events or a key "
            "check): migrate copies into an empty database only"
        )
    with source.snapshot() as rows:
        target.fill(rows)
    counts = _compare(source, target)
    for table, count in counts.items():
        print(f"{table}: {count} rows copied, identical")
    print(f"copied to {where}; the daemons on it need the source's key")


def _compare(source: Any, target: Any) -> dict[str, int]:
    """Rows per table, after reading both databases again; StoreError at the first
    difference (naming the table and the row's position, never its values)."""
    counts: dict[str, int] = {}
    with source.snapshot() as ours, target.snapshot() as theirs:
        for table in schema.TABLES:
            count = 0
            for a, b in itertools.zip_longest(ours(table), theirs(table)):
                if a is None or b is None or _plain(a) != _plain(b):
                    raise StoreError(
                        f"the copy differs from the source in table {table} at row "
                        f"{count + 1}: was the source changed during the copy? Stop every "
                        "otpgated on it, empty the target and run migrate again"
                    )
                count += 1
            counts[table] = count
    return counts


def _plain(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
