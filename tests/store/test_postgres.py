"""The PostgreSQL store beyond the contract: password file, bounded calls (schema
versions: test_schema.py)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from otpgate.core.crypto import Sealed
from otpgate.core.records import SecretRecord
from otpgate.core.settings import Settings
from otpgate.errors import ConfigError, StoreError, StoreUnavailable
from otpgate.store.postgres import PostgresStore, _is_outage
from tests.store.pg_harness import PASSWORD, PASSWORD_ROLE, PgServer, private_server


def _record(name: str = "alice", uid: int = 1000) -> SecretRecord:
    return SecretRecord(name, uid, Sealed("k", b"n" * 12, b"c" * 48), 6, 30, 0)


@pytest.fixture
def url(pg_server: PgServer) -> str:
    return pg_server.url(pg_server.create_database())


def test_a_change_through_another_store_holds_within_a_second(url: str) -> None:
    """Several daemons share the database: one's change is the others' within a
    second (the copy each keeps is at most half a second old), its own at once."""
    first, second = PostgresStore(url), PostgresStore(url)
    assert first.load_settings() == Settings()
    second.save_settings(Settings(enabled=True), audit="changed enabled", now=1)
    assert second.load_settings() == Settings(enabled=True)
    changed = time.monotonic()
    while first.load_settings() != Settings(enabled=True):
        assert time.monotonic() - changed < 1.0, "the change did not reach the other store"
        time.sleep(0.01)
    first.close()
    second.close()


def test_daemons_starting_at_once_on_an_empty_database(url: str) -> None:
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        try:
            stores.append(PostgresStore(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(stores) == 6
    assert all(store.load_settings() == Settings() for store in stores)
    for store in stores:
        store.close()


# -- the password file -----------------------------------------------------------------


@pytest.fixture
def password_url(pg_server: PgServer) -> str:
    """A database owned by the role that must give a password; the URL has none."""
    return pg_server.url(pg_server.create_database(PASSWORD_ROLE), user=PASSWORD_ROLE)


def _password_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "db.password"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_password_file_authenticates(tmp_path: Path, password_url: str) -> None:
    assert "password" not in password_url
    store = PostgresStore(password_url, password_file=_password_file(tmp_path, PASSWORD + "\n"))
    assert store.put_secret(_record())
    assert store.get_secret("alice") == _record()
    assert store._query("SELECT current_user") == [(PASSWORD_ROLE,)]
    store.close()


def test_only_one_trailing_newline_is_stripped(tmp_path: Path, password_url: str) -> None:
    with pytest.raises(StoreError, match="password authentication failed"):
        PostgresStore(password_url, password_file=_password_file(tmp_path, PASSWORD + "\n\n"))


def test_without_the_password_the_role_is_refused(password_url: str) -> None:
    with pytest.raises(StoreError, match="cannot connect"):
        PostgresStore(password_url, timeout=2)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_password_file_readable_by_others_refused(
    tmp_path: Path, password_url: str, mode: int
) -> None:
    path = _password_file(tmp_path, PASSWORD, mode)
    with pytest.raises(ConfigError, match=f"has mode {mode:04o}; it must be 0600"):
        PostgresStore(password_url, password_file=path)


def test_password_file_must_be_a_regular_file(tmp_path: Path, password_url: str) -> None:
    real = _password_file(tmp_path, PASSWORD)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="cannot open password file"):  # O_NOFOLLOW
        PostgresStore(password_url, password_file=str(link))
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        PostgresStore(password_url, password_file=str(directory))
    with pytest.raises(ConfigError, match="cannot open password file"):
        PostgresStore(password_url, password_file=str(tmp_path / "missing"))


def test_password_file_must_be_owned_by_root_or_us(tmp_path: Path, password_url: str) -> None:
    path = _password_file(tmp_path, PASSWORD)
    os.chown(path, 12345, -1)
    with pytest.raises(ConfigError, match="owned by uid 12345"):
        PostgresStore(password_url, password_file=path)


def test_a_password_in_the_url_and_a_file_refused(tmp_path: Path, password_url: str) -> None:
    with pytest.raises(ConfigError, match="has a password and a password file"):
        PostgresStore(
            f"{password_url} password=x", password_file=_password_file(tmp_path, PASSWORD)
        )


# -- a dead database ---------------------------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A server of this test's own, to stop and start without disturbing the others."""
    with private_server() as server:
        yield server


def _fails_within(call: object, bound: float, error: type[StoreError] = StoreUnavailable) -> float:
    start = time.monotonic()
    with pytest.raises(error):
        call()  # type: ignore[operator]
    elapsed = time.monotonic() - start
    assert elapsed < bound, f"took {elapsed:.1f} s"
    return elapsed


def test_a_stopped_database_fails_calls_in_time_and_the_pool_recovers(
    own_server: PgServer,
) -> None:
    timeout = 2.0
    store = PostgresStore(own_server.url(own_server.create_database()), timeout=timeout)
    assert store.put_secret(_record())
    own_server.stop()
    for call in (
        lambda: store.get_secret("alice"),
        lambda: store.count_attempt("alice", 1000, now=100),
        lambda: store.lock("alice", 1000, count=1, lockouts=0, until=160, now=100),
        lambda: store.accept_step("alice", 1000, 7),
        lambda: store.load_settings(),
    ):
        _fails_within(call, timeout + 1.5)
    assert not store.healthy()
    own_server.start()
    # The same store, no reopening: the pool reconnects on its own.
    deadline = time.monotonic() + 15
    while not store.healthy():
        assert time.monotonic() < deadline, "the pool did not reconnect"
        time.sleep(0.2)
    record = store.count_attempt("alice", 1000, now=100)
    assert record is not None and record.failures == 1  # nothing counted while it was down
    assert store.accept_step("alice", 1000, 7)
    store.close()


def test_opening_on_a_stopped_database_fails_in_time(own_server: PgServer) -> None:
    url = own_server.url(own_server.create_database())
    own_server.stop()
    _fails_within(lambda: PostgresStore(url, timeout=1.0), 1.0 + 1.5, StoreError)


def test_a_stuck_statement_is_cut_off(url: str) -> None:
    """A statement that waits (here on a row another session holds) ends at the bound."""
    store = PostgresStore(url, timeout=1.0)
    store.put_secret(_record())
    with psycopg.connect(url) as blocker:
        blocker.execute("SELECT 1 FROM secrets WHERE username = 'alice' FOR UPDATE")
        elapsed = _fails_within(lambda: store.count_attempt("alice", 1000, now=1), 2.5)
        assert elapsed >= 0.9
        blocker.rollback()
    record = store.count_attempt("alice", 1000, now=1)
    assert record is not None and record.failures == 1
    store.close()


def test_a_refused_connection_is_not_an_outage(tmp_path: Path, password_url: str) -> None:
    # The password changes under a running store (as a wrong certificate or a new
    # pg_hba rule would refuse it): its new connections are refused. That must
    # deny, not pass for "the database is down", on which fail=safe lets people in.
    store = PostgresStore(
        password_url, password_file=_password_file(tmp_path, PASSWORD), timeout=1.0
    )
    assert store.put_secret(_record())
    admin_url = password_url.replace(f"user={PASSWORD_ROLE}", "user=postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {PASSWORD_ROLE} PASSWORD 'another one'")
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            (PASSWORD_ROLE,),
        )
    try:
        # The connections it held were cut (an outage, rightly: "terminating
        # connection"); the new ones it then makes are refused.
        refusal = None
        for _ in range(8):
            try:
                store.get_secret("alice")
            except StoreUnavailable:
                time.sleep(0.3)
                continue
            except StoreError as exc:
                refusal = exc
                break
        assert refusal is not None, "every call came back as an outage"
        assert "refused us" in str(refusal)
        assert "password authentication failed" in str(refusal)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"ALTER ROLE {PASSWORD_ROLE} PASSWORD '{PASSWORD}'")
        store.close()


# What libpq printed in this project's experiments (PostgreSQL 15): a server that
# crashed, restarts and recovers says each of the first three to a new connection.
_OUTAGES = [
    "server closed the connection unexpectedly",
    "FATAL: the database system is in recovery mode",
    "FATAL: the database system is not yet accepting connections "
    "DETAIL: Consistent recovery state has not been yet reached.",
    "FATAL: the database system is starting up",
    "FATAL: the database system is shutting down",
    "SSL SYSCALL error: EOF detected",
    'connection to server at "127.0.0.1", port 5432 failed: Connection refused',
]
_REFUSALS = [
    'FATAL: password authentication failed for user "otpgate"',
    'FATAL: no pg_hba.conf entry for host "127.0.0.1"',
    "server does not support SSL, but SSL was required",
    "SSL error: certificate verify failed",
    "FATAL: sorry, too many clients already",
    'FATAL: database "otpgate" does not exist',
    # One refusal among several addresses tried: the refusal wins.
    'connection to server at "::1" failed: Connection refused '
    'connection to server at "127.0.0.1" failed: FATAL: password authentication failed',
]


@pytest.mark.parametrize("text", _OUTAGES)
def test_what_libpq_says_of_a_server_that_is_away_is_an_outage(text: str) -> None:
    assert _is_outage(psycopg.OperationalError(f"connection failed: {text}"))


@pytest.mark.parametrize("text", _REFUSALS)
def test_what_libpq_says_of_a_server_that_refuses_us_is_not_an_outage(text: str) -> None:
    assert not _is_outage(psycopg.OperationalError(f"connection failed: {text}"))
