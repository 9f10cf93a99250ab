"""The SQLite store: schema guard, validation on read, and no loss under SIGKILL."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from otpgate.core.crypto import Sealed
from otpgate.core.records import SecretRecord
from otpgate.errors import StoreError
from otpgate.store.sqlite import SQLiteStore


def _record(name: str, uid: int) -> SecretRecord:
    return SecretRecord(name, uid, Sealed("k", b"n" * 12, b"c" * 48), 6, 30, 0)


def test_wal_mode_and_private_rows(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "db"))
    store.put_secret(_record("alice", 1000))
    assert store.get_secret("alice") == _record("alice", 1000)
    assert store._query("PRAGMA journal_mode")[0][0] == "wal"
    store.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    SQLiteStore(str(path)).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SQLiteStore(str(path))


def test_tampered_settings_refused_on_read(tmp_path: Path) -> None:
    path = tmp_path / "db"
    SQLiteStore(str(path)).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE settings SET value = ?", (json.dumps({"window": 1000}),))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="window"):
        SQLiteStore(str(path)).load_settings()


def test_schema_checks_refuse_out_of_bounds_rows(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "db"))
    bad = SecretRecord("x", 1, Sealed("k", b"n", b"c"), 9, 30, 0)
    with pytest.raises(sqlite3.IntegrityError):
        store.put_secret(bad)
    assert store.get_secret("x") is None


def test_accept_step_is_compare_and_set(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "db"))
    store.put_secret(_record("alice", 1000))
    assert store.accept_step("alice", 1000, 10)
    assert not store.accept_step("alice", 1000, 10)
    assert not store.accept_step("alice", 1000, 9)
    assert not store.accept_step("alice", 1001, 11)  # another uid
    assert store.accept_step("alice", 1000, 11)


_WRITER = textwrap.dedent(
    """
    import sys
    from otpgate.core.crypto import Sealed
    from otpgate.core.records import SecretRecord
    from otpgate.store.sqlite import SQLiteStore
    store = SQLiteStore(sys.argv[1])
    store.put_secret(SecretRecord("steps", 1, Sealed("k", b"n" * 12, b"c" * 48), 6, 30, 0))
    i = 0
    while True:
        i += 1
        store.put_secret(SecretRecord(f"u{i}", i, Sealed("k", b"n" * 12, b"c" * 48), 6, 30, 0))
        assert store.accept_step("steps", 1, i)
        print(i, flush=True)
    """
)


@pytest.mark.parametrize("kill_after", [5, 40, 200])
def test_sigkill_mid_write_loses_no_committed_change(tmp_path: Path, kill_after: int) -> None:
    path = tmp_path / "db"
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    committed = 0
    for line in child.stdout:
        committed = int(line)
        if committed >= kill_after:
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    store = SQLiteStore(str(path))
    assert store._query("PRAGMA integrity_check")[0][0] == "ok"
    names = {r.username for r in store.list_secrets()}
    assert {f"u{i}" for i in range(1, committed + 1)} <= names
    steps = store.get_secret("steps")
    assert steps is not None and steps.last_step >= committed


def test_changes_leave_audit_events(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "db"))
    store.put_secret(_record("alice", 1000))
    for _ in range(2):
        store.count_attempt("alice", 1000, now=100)
    assert store.lock("alice", 1000, count=2, lockouts=0, until=161, now=100)
    store.delete_secret("alice", now=200)
    events = [row[0] for row in store._query("SELECT event FROM audit_events ORDER BY id")]
    assert events == ["secret_renewed", "locked", "secret_unset"]


def test_log_is_copied_into_the_database_by_the_checkpoint_thread(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = SQLiteStore(str(path))
    # Far below the fallback threshold: only the checkpoint thread can move these
    # pages into the database file.
    assert store._query("PRAGMA wal_autocheckpoint")[0][0] >= 10_000
    store.put_secret(_record("alice", 1000))
    for step in range(1, 50):
        assert store.accept_step("alice", 1000, step)
    deadline = time.monotonic() + 10
    while True:
        # The database file alone, without its log, as a backup copy of it would be.
        copy = tmp_path / "copy"
        shutil.copyfile(path, copy)
        try:
            found = sqlite3.connect(copy).execute("SELECT last_step FROM secrets").fetchall()
        except sqlite3.DatabaseError:  # no table copied yet, or a copy torn mid-checkpoint
            found = []
        if found == [(49,)] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    store.close()
    assert found == [(49,)]
    assert not store._checkpointer._thread.is_alive()


def test_put_secret_compare_and_set(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "db"))
    first = _record("alice", 1000)
    other = SecretRecord("alice", 1000, Sealed("k", b"m" * 12, b"d" * 48), 6, 30, 0)
    assert store.put_secret(first, expected=None)  # nothing there yet
    assert not store.put_secret(other, expected=None)  # someone enrolled meanwhile
    assert not store.put_secret(other, expected=other.sealed)  # not what is there
    assert store.get_secret("alice") == first
    assert store.put_secret(other, expected=first.sealed)
    assert store.get_secret("alice") == other
    # A deleted account's row (another uid) counts as no secret for the new one.
    assert store.put_secret(_record("alice", 2000), expected=None)
    assert store.put_secret(first)  # no condition: replaces whatever is there
    store.close()
