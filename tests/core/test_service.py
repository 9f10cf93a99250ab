"""The service with an injected clock and accounts, on a real SQLite file."""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pyotp
import pytest

from otpgate.core.crypto import Keyring
from otpgate.core.gate import Gate, Verdict
from otpgate.core.records import Account, AccountDetails, PasswordResult
from otpgate.core.service import TwoFactorService, VerifyResult
from otpgate.core.settings import EnrollmentPolicy
from otpgate.errors import FailedPrecondition, InvalidArgument, KeyMismatch, NotFound
from otpgate.store.sqlite import SQLiteStore

T0 = 1_750_000_020.0  # the start of a 30-second step


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Accounts:
    def __init__(self) -> None:
        self.table: dict[str, Account] = {}
        self.details_asked: list[str] = []

    def add(self, name: str, uid: int) -> Account:
        account = Account(name, uid, uid, name.title(), f"/home/{name}", "/bin/sh")
        self.table[name] = account
        return account

    def __call__(self, username: str) -> Account | None:
        return self.table.get(username)

    def details(self, account: Account) -> AccountDetails:
        self.details_asked.append(account.username)
        return AccountDetails(**vars(account), groups=(account.gid, 27), local=True)


@pytest.fixture
def env(tmp_path: Path) -> tuple[TwoFactorService, Clock, Accounts, SQLiteStore]:
    clock, accounts = Clock(), Accounts()
    accounts.add("alice", 1000)
    accounts.add("bob", 1001)
    store = SQLiteStore(str(tmp_path / "db.sqlite3"))
    service = TwoFactorService(
        store,
        Keyring(b"k" * 32),
        default_issuer="Test",
        hostname="h",
        accounts=accounts,
        details=accounts.details,
        clock=clock,
    )
    return service, clock, accounts, store


def _secret(service: TwoFactorService, user: str) -> pyotp.TOTP:
    uri = service.provisioning_uri(user)
    return pyotp.parse_uri(uri)  # type: ignore[no-any-return]


def code_at(service: TwoFactorService, user: str, at: float) -> str:
    return str(_secret(service, user).at(at))


def test_renew_returns_uri_and_secret_verifies_once(env: tuple) -> None:
    service, clock, _, _ = env
    view = service.renew_secret("alice")
    assert view.provisioning_uri and view.provisioning_uri.startswith(
        "otpauth://totp/Test:alice%40h?"
    )
    code = code_at(service, "alice", clock.now)
    assert service.verify("alice", code, via="t").result is VerifyResult.VALID
    assert service.verify("alice", code, via="t").result is VerifyResult.REPLAYED


def test_older_step_refused_after_newer_accepted(env: tuple) -> None:
    service, clock, _, _ = env
    service.update_config({"window": 1})
    service.renew_secret("alice")
    newer, older = code_at(service, "alice", clock.now + 30), code_at(service, "alice", clock.now)
    assert service.verify("alice", newer, via="t").valid
    assert service.verify("alice", older, via="t").result is VerifyResult.REPLAYED


def test_window_applies(env: tuple) -> None:
    service, clock, _, _ = env
    service.renew_secret("alice")
    next_code = code_at(service, "alice", clock.now + 30)
    assert service.verify("alice", next_code, via="t").result is VerifyResult.INVALID
    service.update_config({"window": 1})
    assert service.verify("alice", next_code, via="t").valid


def test_renewal_options_and_bounds(env: tuple) -> None:
    service, clock, _, _ = env
    view = service.renew_secret("alice", otp_digits=8, interval=60)
    assert view.record and (view.record.otp_digits, view.record.interval) == (8, 60)
    totp = _secret(service, "alice")
    assert (totp.digits, totp.interval) == (8, 60)
    assert service.verify("alice", totp.at(clock.now), via="t").valid
    for kwargs, field in [({"otp_digits": 9}, "otp_digits"), ({"interval": 4}, "interval")]:
        with pytest.raises(InvalidArgument, match=f"^{field}:"):
            service.renew_secret("alice", **kwargs)
    # Refusals changed nothing: the same secret is still in place.
    assert service.provisioning_uri("alice") == view.provisioning_uri


def test_unknown_user_and_bad_names(env: tuple) -> None:
    service, _, _, _ = env
    with pytest.raises(NotFound):
        service.renew_secret("nobody-here")
    with pytest.raises(InvalidArgument, match="^username:"):
        service.renew_secret("../etc")
    with pytest.raises(NotFound, match="has no 2FA secret"):
        service.provisioning_uri("bob")


def test_not_enrolled_is_its_own_answer(env: tuple) -> None:
    service, _, _, _ = env
    assert service.verify("bob", "123456", via="t").result is VerifyResult.NOT_ENROLLED


def test_recreated_account_is_not_enrolled(env: tuple) -> None:
    service, clock, accounts, _ = env
    service.renew_secret("alice")
    code = code_at(service, "alice", clock.now)
    accounts.add("alice", 2000)  # deleted and recreated with another uid
    assert service.get_user("alice").record is None
    assert service.verify("alice", code, via="t").result is VerifyResult.NOT_ENROLLED
    assert [v.account.username for v in service.list_users()] == []


def test_a_new_secret_is_bound_to_the_uid_nss_reports_now(tmp_path: Path) -> None:
    cached, current = Accounts(), Accounts()
    cached.add("alice", 1000)  # what a cache still remembers
    current.add("alice", 2000)  # recreated a moment ago
    service = TwoFactorService(
        SQLiteStore(str(tmp_path / "db.sqlite3")),
        Keyring(b"k" * 32),
        default_issuer="Test",
        accounts=cached,
        accounts_for_enrollment=current,
    )
    view = service.renew_secret("alice")
    assert view.record is not None and view.record.uid == 2000


def test_lockout_after_threshold_and_doubling(env: tuple) -> None:
    service, clock, _, _ = env
    service.update_config({"lockout_threshold": 3, "lockout_seconds": 60})
    service.renew_secret("alice")
    wrong = "000000" if code_at(service, "alice", clock.now) != "000000" else "111111"
    for _ in range(3):
        assert service.verify("alice", wrong, via="t").result is VerifyResult.INVALID
    right = code_at(service, "alice", clock.now)
    locked = service.verify("alice", right, via="t")
    # Whole seconds: a lock lasts its time plus at most one second, never less.
    assert locked.result is VerifyResult.LOCKED and 60 <= locked.locked_seconds <= 61
    clock.now += 61
    for _ in range(3):
        service.verify("alice", wrong, via="t")
    assert service.get_user("alice").locked_seconds == 121  # second lockout in a row: doubled
    clock.now += 121
    assert service.verify("alice", code_at(service, "alice", clock.now), via="t").valid
    assert service.get_user("alice").record.lockouts == 0  # type: ignore[union-attr]


def test_success_resets_failures(env: tuple) -> None:
    service, clock, _, _ = env
    service.update_config({"lockout_threshold": 3})
    service.renew_secret("alice")
    service.verify("alice", "000001", via="t")
    service.verify("alice", "000002", via="t")
    assert service.verify("alice", code_at(service, "alice", clock.now), via="t").valid
    assert service.get_user("alice").record.failures == 0  # type: ignore[union-attr]


def test_update_config_all_or_nothing(env: tuple) -> None:
    service, _, _, _ = env
    before = service.get_config()
    with pytest.raises(InvalidArgument, match="^window:"):
        service.update_config({"enabled": True, "window": 11})
    assert service.get_config() == before
    after = service.update_config({"enabled": True, "enrollment_policy": EnrollmentPolicy.REQUIRED})
    assert after.enabled and after.enrollment_policy is EnrollmentPolicy.REQUIRED


def test_unset_secret(env: tuple) -> None:
    service, _, _, _ = env
    service.renew_secret("alice")
    assert service.unset_secret("alice").record is None
    assert service.get_user("alice").record is None


def test_wrong_key_refused_without_change(tmp_path: Path) -> None:
    accounts = Accounts()
    accounts.add("alice", 1000)
    path = str(tmp_path / "db")
    store = SQLiteStore(path)
    TwoFactorService(store, Keyring(b"a" * 32), default_issuer="T", accounts=accounts).renew_secret(
        "alice"
    )
    store.close()
    before = _dump(path)
    store = SQLiteStore(path)
    with pytest.raises(KeyMismatch, match="refusing to start"):
        TwoFactorService(store, Keyring(b"b" * 32), default_issuer="T", accounts=accounts)
    store.close()
    assert _dump(path) == before


def _dump(path: str) -> list[str]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def _parallel(n: int, work: Callable[[int], object]) -> list[object]:
    results: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_one_code_accepted_once_under_concurrency(env: tuple) -> None:
    service, clock, _, _ = env
    service.update_config({"lockout_threshold": 100})
    service.renew_secret("alice")
    code = code_at(service, "alice", clock.now)
    results = _parallel(16, lambda _: service.verify("alice", code, via="t").result)
    assert results.count(VerifyResult.VALID) == 1
    assert results.count(VerifyResult.REPLAYED) == 15


def test_concurrent_replays_count_toward_lockout(env: tuple) -> None:
    service, clock, _, _ = env
    service.update_config({"lockout_threshold": 5})
    service.renew_secret("alice")
    code = code_at(service, "alice", clock.now)
    results = _parallel(16, lambda _: service.verify("alice", code, via="t").result)
    assert results.count(VerifyResult.VALID) == 1
    assert set(results) <= {VerifyResult.VALID, VerifyResult.REPLAYED, VerifyResult.LOCKED}


def test_concurrent_wrong_guesses_never_exceed_threshold(env: tuple) -> None:
    service, _, _, _ = env
    service.update_config({"lockout_threshold": 5})
    service.renew_secret("alice")
    results = _parallel(32, lambda i: service.verify("alice", f"{i:06d}", via="t").result)
    checked = [r for r in results if r is not VerifyResult.LOCKED]
    assert len(checked) == 5


def test_parallel_renewals_leave_one_consistent_secret(env: tuple) -> None:
    service, clock, _, _ = env
    uris = _parallel(12, lambda _: service.renew_secret("alice").provisioning_uri)
    assert len(set(uris)) == 12
    final = service.provisioning_uri("alice")
    assert final in uris
    assert service.verify("alice", code_at(service, "alice", clock.now), via="t").valid


def test_secret_never_on_disk_in_plaintext(env: tuple, tmp_path: Path) -> None:
    service, _, _, _ = env
    secrets = []
    for user in ("alice", "bob"):
        uri = service.renew_secret(user).provisioning_uri
        assert uri
        secrets.append(pyotp.parse_uri(uri).secret)
    files = [p for p in tmp_path.iterdir() if p.name.startswith("db.sqlite3")]
    assert any(p.name.endswith("-wal") for p in files)
    blob = b"".join(p.read_bytes() for p in files)
    for secret in secrets:
        for form in (secret.encode(), secret.lower().encode(), base64.b32decode(secret)):
            assert form not in blob
    assert os.path.getsize(tmp_path / "db.sqlite3-wal") > 0


def test_unset_secret_of_a_deleted_account(env: tuple) -> None:
    service, _, accounts, store = env
    service.renew_secret("alice")
    del accounts.table["alice"]
    with pytest.raises(NotFound):
        service.get_user("alice")
    assert service.unset_secret("alice").account.uid == 1000
    assert store.get_secret("alice") is None
    with pytest.raises(NotFound):
        service.unset_secret("alice")


def test_renew_secret_only_replaces_what_the_caller_checked(tmp_path: Path) -> None:
    accounts = Accounts()
    accounts.add("alice", 1000)
    service = TwoFactorService(
        SQLiteStore(str(tmp_path / "db")), Keyring(b"k" * 32), default_issuer="T",
        accounts=accounts,
    )  # fmt: skip
    seen = service.get_user("alice").record  # None: not enrolled when the caller looked
    admins = service.renew_secret("alice")  # an admin enrolls alice in between
    with pytest.raises(FailedPrecondition, match="changed meanwhile"):
        service.renew_secret("alice", expected=seen)
    assert service.get_user("alice").record == admins.record
    assert admins.record is not None
    mine = service.renew_secret("alice", expected=admins.record.sealed)
    assert service.get_user("alice").record == mine.record


def test_a_right_code_on_the_attempt_that_locks_still_lets_in(env: tuple) -> None:
    service, clock, _, store = env
    service.update_config({"lockout_threshold": 3, "lockout_seconds": 60})
    service.renew_secret("alice")
    for wrong in ("000001", "000002"):
        service.verify("alice", wrong, via="t")
    # The third attempt locks as it is counted, then its code is checked: a right
    # one clears the lock, as any accepted code does.
    assert service.verify("alice", code_at(service, "alice", clock.now), via="t").valid
    record = store.get_secret("alice")
    assert (record.failures, record.lockouts, record.locked_until) == (0, 0, 0)


class LosesOneLock:
    """A store whose first lock never lands, as if otpgated died between counting
    the attempt that reached the threshold and writing its lock."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self.lost = 0

    def lock(self, *args: object, **kwargs: object) -> bool:
        if not self.lost:
            self.lost += 1
            return False
        return self._store.lock(*args, **kwargs)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_lock_lost_between_two_statements_is_written_by_the_next_attempt(
    tmp_path: Path,
) -> None:
    clock, accounts = Clock(), Accounts()
    accounts.add("alice", 1000)
    store = LosesOneLock(SQLiteStore(str(tmp_path / "db")))
    service = TwoFactorService(
        store, Keyring(b"k" * 32), default_issuer="T", accounts=accounts,  # type: ignore[arg-type]
        details=accounts.details, clock=clock,
    )  # fmt: skip
    service.update_config({"lockout_threshold": 3, "lockout_seconds": 60})
    service.renew_secret("alice")
    for wrong in ("000001", "000002", "000003"):
        assert service.verify("alice", wrong, via="t").result is VerifyResult.INVALID
    assert store.lost == 1 and service.get_user("alice").locked_seconds == 0  # the lost lock
    # Past the threshold with no lock in force: refused unseen, and the lock is written.
    refused = service.verify("alice", code_at(service, "alice", clock.now), via="t")
    assert refused.result is VerifyResult.LOCKED and refused.locked_seconds == 61
    assert service.get_user("alice").locked_seconds == 61
    clock.now += 61
    assert service.verify("alice", code_at(service, "alice", clock.now), via="t").valid


def test_audit_rows_carry_the_services_clock(env: tuple) -> None:
    service, clock, _, store = env
    service.update_config({"lockout_threshold": 1})
    clock.now += 100
    service.renew_secret("alice")
    clock.now += 100
    service.verify("alice", "000000" if code_at(service, "alice", clock.now) != "000000"
                   else "111111", via="t")  # fmt: skip
    clock.now += 100
    service.unset_secret("alice")
    rows = store._query("SELECT at, event FROM audit_events ORDER BY id")
    start = int(T0)
    assert rows == [
        (start, "settings_updated"),
        (start + 100, "secret_renewed"),
        (start + 200, "locked"),
        (start + 200, "verify"),
        (start + 300, "secret_unset"),
    ]


def test_deciding_and_verifying_resolve_no_display_facts(env: tuple) -> None:
    service, clock, accounts, _ = env
    service.renew_secret("alice")
    service.renew_secret("bob")
    accounts.details_asked.clear()
    assert service.verify("alice", code_at(service, "alice", clock.now), via="t").valid
    service.verify("bob", "000000", via="t")
    state = service.enrollment("alice")
    assert state.account == accounts.table["alice"] and state.record is not None
    gate = Gate(service, lambda username, password: PasswordResult.BAD)
    service.update_config({"enabled": True, "services_ssh": True})
    assert gate.check("alice", "sshd").verdict is Verdict.OTP_REQUIRED
    assert accounts.details_asked == []
    # Shown: resolved once per account, into the value the view carries.
    view = service.get_user("alice")
    assert (view.account.groups, view.account.local, view.account.api_id) == (
        (1000, 27),
        True,
        1000,
    )
    assert accounts.details_asked == ["alice"]
    assert [v.account.username for v in service.list_users()] == ["alice", "bob"]
    assert accounts.details_asked == ["alice", "alice", "bob"]


# -- confirmed enrollment ---------------------------------------------------------------


def _pending_totp(view: object) -> pyotp.TOTP:
    uri = view.provisioning_uri  # type: ignore[attr-defined]
    return pyotp.parse_uri(uri)  # type: ignore[no-any-return]


def test_a_renewal_waits_for_a_code_while_the_old_secret_works(env: tuple) -> None:
    service, clock, _, _ = env
    service.renew_secret("alice")
    old = _secret(service, "alice")
    view = service.renew_secret("alice", pending=True)
    new = _pending_totp(view)
    assert new.secret != old.secret
    assert view.record is not None and view.pending_expires_in == 15 * 60
    assert _secret(service, "alice").secret == old.secret  # still the old one
    clock.now += 30
    assert service.verify("alice", old.at(clock.now), via="t").valid  # no gap
    # A code of the new secret does not log in before it is confirmed...
    clock.now += 30
    assert service.verify("alice", new.at(clock.now), via="t").result is VerifyResult.INVALID
    # ...a wrong one does not confirm; a right one does, and is spent by it.
    with pytest.raises(InvalidArgument, match="not a current code of the pending secret"):
        service.confirm_secret("alice", old.at(clock.now))
    confirming = new.at(clock.now)
    view = service.confirm_secret("alice", confirming)
    assert view.pending_expires_in == 0
    assert service.verify("alice", confirming, via="t").result is VerifyResult.REPLAYED
    clock.now += 30
    assert service.verify("alice", old.at(clock.now), via="t").result is VerifyResult.INVALID
    assert service.verify("alice", new.at(clock.now), via="t").valid
    with pytest.raises(FailedPrecondition, match="no pending 2FA secret"):
        service.confirm_secret("alice", new.at(clock.now))


def test_a_pending_secret_expires_and_never_enrolls(env: tuple) -> None:
    service, clock, _, _ = env
    service.update_config(
        {"enabled": True, "services_ssh": True, "enrollment_policy": EnrollmentPolicy.REQUIRED}
    )
    view = service.renew_secret("bob", pending=True)
    assert view.record is None  # a first enrollment: nothing active yet
    assert service.verify("bob", "123456", via="t").result is VerifyResult.NOT_ENROLLED
    gate = Gate(service, lambda user, password: PasswordResult.OK)
    assert gate.check("bob", "sshd").verdict is Verdict.NOT_ENROLLED
    clock.now += 15 * 60
    with pytest.raises(FailedPrecondition, match="expired"):
        service.confirm_secret("bob", _pending_totp(view).at(clock.now))
    assert service.get_user("bob").pending_expires_in == 0


def test_renewing_again_replaces_the_pending_secret(env: tuple) -> None:
    service, clock, _, _ = env
    first = _pending_totp(service.renew_secret("alice", pending=True))
    second = _pending_totp(service.renew_secret("alice", pending=True))
    with pytest.raises(InvalidArgument):
        service.confirm_secret("alice", first.at(clock.now))
    assert service.confirm_secret("alice", second.at(clock.now)).record is not None
