"""What every store must do (core.ports.Store), run against every backend.

A backend joins by adding an entry to BACKENDS: a function that makes a fresh,
empty database and returns how to open stores on it and how to read its audit
rows (no Store method reads them: core never does). PostgreSQL's runs on the
session's private server (tests/store/pg_harness.py) and skips only when no
PostgreSQL binaries are installed.

Concurrency is tested with many threads on one store and on two stores of one
database at once, as several server threads and several daemons would use it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from otpgate.core import lockout
from otpgate.core.crypto import Sealed
from otpgate.core.ports import Store
from otpgate.core.records import ANY_SECRET, SecretRecord
from otpgate.core.settings import EnrollmentPolicy, Settings
from otpgate.store.postgres import PostgresStore
from otpgate.store.sqlite import SQLiteStore
from tests.store.pg_harness import PgServer

AuditRow = tuple[int, str, str]  # (at, event, username)


@dataclasses.dataclass
class Backend:
    open: Callable[[], Store]  # one more store on the same database
    audit: Callable[[Store], list[AuditRow]]  # oldest first


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    path = str(tmp_path / "contract.sqlite3")

    def audit(store: Store) -> list[AuditRow]:
        assert isinstance(store, SQLiteStore)
        rows = store._query("SELECT at, event, username FROM audit_events ORDER BY id")
        return [(at, event, username) for at, event, username in rows]

    return Backend(open=lambda: SQLiteStore(path), audit=audit)


def _postgres(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    server: PgServer = request.getfixturevalue("pg_server")  # skips without PostgreSQL
    url = server.url(server.create_database())

    def audit(store: Store) -> list[AuditRow]:
        assert isinstance(store, PostgresStore)
        rows = store._query("SELECT at, event, username FROM audit_events ORDER BY id")
        return [(at, event, username) for at, event, username in rows]

    return Backend(open=lambda: PostgresStore(url), audit=audit)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {
    "sqlite": _sqlite,
    "postgres": _postgres,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made = BACKENDS[request.param](request, tmp_path)
    opened: list[Store] = []

    def open_store() -> Store:
        store = made.open()
        opened.append(store)
        return store

    yield Backend(open=open_store, audit=made.audit)
    for store in opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()


def _record(
    name: str = "alice", uid: int = 1000, *, fill: bytes = b"c", **fields: int
) -> SecretRecord:
    return SecretRecord(name, uid, Sealed("k1", b"n" * 12, fill * 48), 6, 30, 0, **fields)


def _parallel(n: int, work: Callable[[int], object]) -> list[object]:
    """`work(i)` for i in range(n), each on its own thread, all started at once."""
    results: list[object] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # re-raised below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _current(store: Store, name: str = "alice") -> SecretRecord:
    record = store.get_secret(name)
    assert record is not None
    return record


# -- settings and key check -----------------------------------------------------------


def test_a_new_store_has_the_default_settings(store: Store) -> None:
    assert store.load_settings() == Settings()


def test_settings_round_trip(backend: Backend, store: Store) -> None:
    changed = Settings().with_changes(
        {"enabled": True, "window": 2, "issuer": "Corp", "lockout_threshold": 7,
         "enrollment_policy": EnrollmentPolicy.REQUIRED}
    )  # fmt: skip
    store.save_settings(changed, audit="changed enabled", now=1)
    assert store.load_settings() == changed
    assert backend.open().load_settings() == changed  # in the database, not one handle


def test_key_check_round_trip(store: Store) -> None:
    assert store.key_check() is None and store.key_ids_in_use() == set()
    first, second = Sealed("k1", b"a" * 12, b"b" * 40), Sealed("k2", b"c" * 12, b"d" * 40)
    store.set_key_check(first)
    assert store.key_check() == first
    store.set_key_check(second)
    assert store.key_check() == second
    store.put_secret(_record("alice"))
    store.put_secret(dataclasses.replace(_record("bob", 1001), sealed=Sealed("k2", b"n", b"c")))
    assert store.key_ids_in_use() == {"k1", "k2"}


# -- secrets --------------------------------------------------------------------------


def test_put_get_list_delete(backend: Backend, store: Store) -> None:
    bob = _record("bob", 1001, last_step=5, failures=2, lockouts=1, locked_until=99)
    alice = _record("alice", 1000)
    for record in (bob, alice):
        assert store.put_secret(record)
    assert store.get_secret("bob") == bob  # every field as written
    assert store.get_secret("carol") is None
    assert store.list_secrets() == [alice, bob]  # by username
    assert backend.open().list_secrets() == [alice, bob]
    assert store.delete_secret("bob", now=1)
    assert not store.delete_secret("bob", now=1)
    assert store.get_secret("bob") is None and store.list_secrets() == [alice]


def test_a_new_secret_replaces_the_name_whatever_its_uid(store: Store) -> None:
    store.put_secret(_record("alice", 1000, last_step=9, failures=3))
    newer = _record("alice", 2000, fill=b"x")
    assert store.put_secret(newer)
    assert store.list_secrets() == [newer]


def test_put_secret_compare_and_set(store: Store) -> None:
    first, other = _record(fill=b"c"), _record(fill=b"d")
    assert store.put_secret(first, expected=None)  # nothing there yet
    assert not store.put_secret(other, expected=None)  # someone enrolled meanwhile
    assert not store.put_secret(other, expected=other.sealed)  # not what is there
    assert store.get_secret("alice") == first
    assert store.put_secret(other, expected=first.sealed)
    assert store.get_secret("alice") == other
    # A deleted account's row (another uid) counts as no secret for the new one.
    assert store.put_secret(_record("alice", 2000), expected=None)
    assert not store.put_secret(other, expected=_record("alice", 2000).sealed)  # uid 1000's
    assert store.put_secret(first, expected=ANY_SECRET)  # no condition
    assert store.get_secret("alice") == first


def test_concurrent_first_enrollments_one_wins(backend: Backend, store: Store) -> None:
    stores = [store, backend.open()]
    records = [_record(fill=bytes([65 + i])) for i in range(16)]
    won = _parallel(16, lambda i: stores[i % 2].put_secret(records[i], expected=None))
    assert won.count(True) == 1
    assert store.get_secret("alice") == records[won.index(True)]


def test_concurrent_replacements_of_one_secret_one_wins(backend: Backend, store: Store) -> None:
    seen = _record(fill=b"0")
    store.put_secret(seen)
    stores = [store, backend.open()]
    records = [_record(fill=bytes([65 + i])) for i in range(16)]
    won = _parallel(16, lambda i: stores[i % 2].put_secret(records[i], expected=seen.sealed))
    assert won.count(True) == 1
    assert store.get_secret("alice") == records[won.index(True)]


# -- counting attempts ----------------------------------------------------------------


def test_count_attempt_counts_and_returns_the_record(store: Store) -> None:
    written = _record(last_step=4)
    store.put_secret(written)
    assert store.count_attempt("carol", 1000, now=100) is None  # no secret
    assert store.count_attempt("alice", 1001, now=100) is None  # another uid's secret
    for count in (1, 2, 3):
        assert store.count_attempt("alice", 1000, now=100) == dataclasses.replace(
            written, failures=count
        )
    assert _current(store).failures == 3


def test_nothing_is_counted_while_locked(store: Store) -> None:
    store.put_secret(_record())
    store.count_attempt("alice", 1000, now=100)
    assert store.lock("alice", 1000, count=1, lockouts=0, until=160, now=100)
    for now in (100, 159):
        record = store.count_attempt("alice", 1000, now=now)
        assert record is not None and (record.failures, record.locked_until) == (0, 160)
    record = store.count_attempt("alice", 1000, now=160)  # over: counted again
    assert record is not None and (record.failures, record.lockouts) == (1, 1)


def test_concurrent_counts_are_each_handed_out_once(backend: Backend, store: Store) -> None:
    store.put_secret(_record())
    stores = [store, backend.open()]
    threads, per_thread = 16, 25

    def attempts(i: int) -> list[int]:
        counts = []
        for _ in range(per_thread):
            record = stores[i % 2].count_attempt("alice", 1000, now=100)
            assert record is not None
            counts.append(record.failures)
        return counts

    counts = [c for part in _parallel(threads, attempts) for c in part]  # type: ignore[attr-defined]
    assert sorted(counts) == list(range(1, threads * per_thread + 1))
    assert _current(store).failures == threads * per_thread


# -- locks ------------------------------------------------------------------------------


def test_lock_is_a_compare_and_set_on_count_and_lockouts(backend: Backend, store: Store) -> None:
    store.put_secret(_record())
    for _ in range(3):
        store.count_attempt("alice", 1000, now=100)
    assert not store.lock("alice", 1000, count=4, lockouts=0, until=160, now=100)  # not yet 4
    assert not store.lock("alice", 1000, count=3, lockouts=1, until=160, now=100)  # not 1
    assert not store.lock("alice", 1001, count=3, lockouts=0, until=160, now=100)  # other uid
    assert not store.lock("bob", 1000, count=1, lockouts=0, until=160, now=100)  # no secret
    assert store.lock("alice", 1000, count=2, lockouts=0, until=160, now=100)  # 3 >= 2
    record = _current(store)
    assert (record.failures, record.lockouts, record.locked_until) == (0, 1, 160)
    assert not store.lock("alice", 1000, count=3, lockouts=0, until=999, now=100)  # done
    assert _current(store) == record
    assert [event for _, event, _ in backend.audit(store)].count("locked") == 1


def test_a_lock_after_an_accepted_code_changes_nothing(store: Store) -> None:
    store.put_secret(_record())
    for _ in range(3):
        store.count_attempt("alice", 1000, now=100)
    assert store.accept_step("alice", 1000, 7)  # a right code, between count and lock
    assert not store.lock("alice", 1000, count=3, lockouts=0, until=160, now=100)
    assert _current(store).locked_until == 0


def test_concurrent_lockers_lock_a_run_once(backend: Backend, store: Store) -> None:
    store.put_secret(_record(lockouts=2))
    for _ in range(5):
        store.count_attempt("alice", 1000, now=100)
    stores = [store, backend.open()]
    won = _parallel(
        16, lambda i: stores[i % 2].lock("alice", 1000, count=5, lockouts=2, until=200 + i, now=100)
    )
    assert won.count(True) == 1
    record = _current(store)
    assert (record.failures, record.lockouts, record.locked_until) == (0, 3, 200 + won.index(True))


def test_concurrent_guesses_never_check_more_than_the_threshold(
    backend: Backend, store: Store
) -> None:
    """The guarantee the lockout rests on, with the policy core applies."""
    store.put_secret(_record())
    stores = [store, backend.open()]
    threshold = 5

    def guess(i: int) -> bool:
        mine = stores[i % 2]
        record = mine.count_attempt("alice", 1000, now=100)
        assert record is not None
        judgement = lockout.judge(record, now=100, threshold=threshold, base_seconds=60)
        if judgement.lock_until is not None:
            mine.lock(
                "alice", 1000, count=record.failures, lockouts=record.lockouts,
                until=judgement.lock_until, now=100,
            )  # fmt: skip
        return judgement.check_code

    checked = _parallel(48, guess)
    assert checked.count(True) == threshold
    record = _current(store)
    assert (record.lockouts, record.locked_until) == (1, 161)
    assert [event for _, event, _ in backend.audit(store)].count("locked") == 1


# -- spending steps ---------------------------------------------------------------------


def test_accept_step_spends_a_step_once_and_clears_the_counters(store: Store) -> None:
    store.put_secret(_record(failures=2, lockouts=3, locked_until=500))
    assert store.accept_step("alice", 1000, 10)
    record = _current(store)
    assert (record.last_step, record.failures, record.lockouts, record.locked_until) == (
        10, 0, 0, 0,
    )  # fmt: skip
    assert not store.accept_step("alice", 1000, 10)  # replayed
    assert not store.accept_step("alice", 1000, 9)  # older than one spent
    assert not store.accept_step("alice", 1001, 11)  # another uid
    assert not store.accept_step("bob", 1000, 11)  # no secret
    assert store.accept_step("alice", 1000, 11)
    assert _current(store).last_step == 11


def test_concurrent_accepts_of_one_step_one_wins(backend: Backend, store: Store) -> None:
    store.put_secret(_record())
    stores = [store, backend.open()]
    won = _parallel(32, lambda i: stores[i % 2].accept_step("alice", 1000, 57))
    assert won.count(True) == 1
    assert _current(store).last_step == 57


def test_concurrent_accepts_of_several_steps_end_at_the_newest(
    backend: Backend, store: Store
) -> None:
    store.put_secret(_record())
    stores = [store, backend.open()]
    won = _parallel(24, lambda i: stores[i % 2].accept_step("alice", 1000, 100 + i % 8))
    by_step = [won[step::8].count(True) for step in range(8)]
    assert all(n <= 1 for n in by_step)  # each step at most once
    assert by_step[7] == 1  # the newest always gets through: nothing newer is spent first
    assert _current(store).last_step == 107


# -- audit ------------------------------------------------------------------------------


def test_audit_times_come_from_the_callers_clock(backend: Backend, store: Store) -> None:
    # Far from the machine's clock, so a row stamped by the database would show.
    store.save_settings(Settings(enabled=True), audit="changed enabled", now=111)
    store.put_secret(dataclasses.replace(_record(), created_at=222))
    store.count_attempt("alice", 1000, now=300)
    assert not store.lock("alice", 1000, count=2, lockouts=0, until=400, now=333)  # no row
    assert store.lock("alice", 1000, count=1, lockouts=0, until=400, now=334)
    assert store.delete_secret("alice", now=444)
    assert not store.delete_secret("alice", now=555)  # nothing deleted: no row
    assert backend.audit(store) == [
        (111, "settings_updated", ""),
        (222, "secret_renewed", "alice"),
        (334, "locked", "alice"),
        (444, "secret_unset", "alice"),
    ]


def test_state_outlives_the_store_that_wrote_it(backend: Backend) -> None:
    first = backend.open()
    first.put_secret(_record())
    first.count_attempt("alice", 1000, now=100)
    first.accept_step("alice", 1000, 42)
    first.count_attempt("alice", 1000, now=100)
    first.close()
    record = _current(backend.open())
    assert (record.last_step, record.failures) == (42, 1)


# -- unlock, pending secrets, recovery codes ------------------------------------------


def test_unlock_clears_the_lock_and_counters_only(backend: Backend, store: Store) -> None:
    store.put_secret(_record(failures=4, lockouts=2, locked_until=500, last_step=9))
    assert store.unlock("alice", 1000, now=100)
    record = _current(store)
    assert (record.failures, record.lockouts, record.locked_until) == (0, 0, 0)
    assert record.last_step == 9 and record.sealed == _record().sealed
    assert not store.unlock("alice", 1001, now=100)  # another uid's account
    assert not store.unlock("bob", 1000, now=100)
    assert backend.audit(store)[-1] == (100, "unlocked", "alice")


def test_a_pending_secret_waits_beside_the_active_one(backend: Backend, store: Store) -> None:
    store.put_secret(_record(last_step=5))
    new = dataclasses.replace(_record(fill=b"p"), created_at=50)
    store.put_pending(new, expires_at=950)
    assert _current(store).sealed == _record().sealed  # the old one still works
    pending = store.get_pending("alice")
    assert pending is not None and pending[0].sealed == new.sealed and pending[1] == 950
    assert not store.confirm_pending("alice", 1000, _record(fill=b"x").sealed, 7, now=60)
    assert not store.confirm_pending("alice", 1000, new.sealed, 7, now=950)  # expired
    assert not store.confirm_pending("alice", 1001, new.sealed, 7, now=60)  # another uid
    assert store.confirm_pending("alice", 1000, new.sealed, 7, now=60)
    active = _current(store)
    assert active.sealed == new.sealed and active.last_step == 7 and active.failures == 0
    assert store.get_pending("alice") is None
    assert not store.confirm_pending("alice", 1000, new.sealed, 8, now=61)  # once
    assert [e for _, e, _ in backend.audit(store)][-2:] == ["secret_pending", "secret_confirmed"]
    assert store.key_ids_in_use() == {"k1"}


def test_concurrent_confirmations_one_wins(backend: Backend, store: Store) -> None:
    store.put_pending(_record(fill=b"p"), expires_at=10_000)
    stores = [backend.open() for _ in range(4)]
    won = _parallel(16, lambda i: stores[i % 4].confirm_pending(
        "alice", 1000, _record(fill=b"p").sealed, 7, now=60))  # fmt: skip
    assert won.count(True) == 1


def test_unset_removes_a_pending_secret_too(store: Store) -> None:
    store.put_pending(_record(fill=b"p"), expires_at=10_000)
    assert store.delete_secret("alice", now=5)
    assert store.get_pending("alice") is None


def test_recovery_codes_are_spent_once_and_counted(backend: Backend, store: Store) -> None:
    hashes = [bytes([i]) * 32 for i in range(10)]
    assert not store.put_recovery_codes("alice", 1000, hashes, now=1)  # no secret yet
    store.put_secret(_record(failures=3, locked_until=900))
    assert store.put_recovery_codes("alice", 1000, hashes, now=1)
    assert store.recovery_codes_left("alice") == 10
    assert store.use_recovery_code("alice", 1000, [b"?" * 32, hashes[3]], now=5) == 9
    record = _current(store)
    assert (record.failures, record.locked_until) == (0, 0)  # as an accepted code
    assert store.use_recovery_code("alice", 1000, [hashes[3]], now=6) is None  # spent
    assert store.use_recovery_code("alice", 1001, [hashes[4]], now=6) is None  # other uid
    assert store.put_recovery_codes("alice", 1000, hashes[:2], now=7)  # a new set replaces
    assert store.recovery_codes_left("alice") == 2
    store.put_secret(_record(fill=b"n"))  # a new secret comes without codes
    assert store.recovery_codes_left("alice") == 0
    events = [e for _, e, _ in backend.audit(store)]
    assert events.count("recovery_codes_made") == 2 and events.count("recovery_code_used") == 1


def test_concurrent_uses_of_one_recovery_code_one_wins(backend: Backend, store: Store) -> None:
    store.put_secret(_record())
    hashes = [bytes([i]) * 32 for i in range(10)]
    store.put_recovery_codes("alice", 1000, hashes, now=1)
    stores = [backend.open() for _ in range(4)]
    results = _parallel(16, lambda i: stores[i % 4].use_recovery_code(
        "alice", 1000, [hashes[0]], now=2))  # fmt: skip
    assert results.count(9) == 1 and results.count(None) == 15


def test_the_recovery_key_is_set_once(backend: Backend, store: Store) -> None:
    first, second = Sealed("k1", b"a" * 12, b"x" * 48), Sealed("k1", b"b" * 12, b"y" * 48)
    assert store.recovery_key() is None
    assert store.init_recovery_key(first) == first
    assert backend.open().init_recovery_key(second) == first
    assert store.recovery_key() == first


def test_import_is_all_or_nothing(backend: Backend, store: Store) -> None:
    store.put_secret(_record("carol", 1002))
    items = [
        (dataclasses.replace(_record("alice", 1000), last_step=7), [b"a" * 32, b"b" * 32]),
        (_record("carol", 1002, fill=b"x"), []),
    ]
    assert store.import_secrets(items, now=5) == ["carol"]
    assert store.get_secret("alice") is None  # nothing written
    assert _current(store, "carol").sealed == _record("carol", 1002).sealed
    assert store.import_secrets(items[:1], now=6) == []
    imported = _current(store, "alice")
    assert imported.last_step == 7 and store.recovery_codes_left("alice") == 2
    assert backend.audit(store)[-1] == (6, "secret_imported", "alice")
    # A row of another uid is a deleted account's: an import may take the name.
    assert store.import_secrets([(_record("carol", 2002), [])], now=7) == []


def test_audit_events_filter_page_and_purge(backend: Backend, store: Store) -> None:
    from otpgate.core import audit

    with audit.from_origin("pam:sshd", "rhost=192.0.2.7"):
        for at in (10, 20, 30):
            store.record_event("verify", "alice", "result=valid", now=at)
    store.record_event("login", "bob", "result=success level=LEVEL_2", now=40)
    everything = store.audit_events()
    assert [e.at for e in everything] == [40, 30, 20, 10]  # newest first
    assert (everything[1].path, everything[1].caller) == ("pam:sshd", "rhost=192.0.2.7")
    assert (everything[0].path, everything[0].caller) == ("", "")
    assert [e.at for e in store.audit_events(username="alice", since=20, until=31)] == [30, 20]
    first = store.audit_events(limit=2)
    rest = store.audit_events(before_id=first[-1].id, limit=2)
    assert [e.at for e in first + rest] == [40, 30, 20, 10]
    assert store.purge_audit(before=25) == 2
    assert [e.at for e in store.audit_events()] == [40, 30]
