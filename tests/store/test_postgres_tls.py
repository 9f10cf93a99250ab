"""The PostgreSQL store over TLS, against a real server (PgServer(tls=True)) that lets
only TLS in on 127.0.0.1: libpq's sslmode and sslrootcert in the URL reach every
connection the store makes (the pool's too, and otpgated's), a certificate from
another CA or for another name is refused, and so is a connection without TLS."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pyotp
import pytest

from otpgate.core.crypto import Sealed
from otpgate.core.records import SecretRecord
from otpgate.core.settings import Settings
from otpgate.errors import StoreError
from otpgate.store.postgres import PostgresStore
from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser
from tests.store.pg_harness import (
    CA_NAME,
    TLS_PASSWORD,
    TLS_ROLE,
    CertificateAuthority,
    PgServer,
)

WRONG_NAME = "db.otpgate.invalid"  # .invalid: never resolved, never anyone's certificate


def _record(name: str = "alice", uid: int = 1000) -> SecretRecord:
    return SecretRecord(name, uid, Sealed("k", b"n" * 12, b"c" * 48), 6, 30, 0)


def _otpgated_backends(server: PgServer, dbname: str) -> list[tuple[bool, str, str]]:
    """(ssl, role, client address) of every connection named otpgated to `dbname`, as
    the server sees them, asked over the Unix socket."""
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        # Control: without TLS pg_stat_ssl does say false, so a true below means TLS.
        own = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchall()
        assert own == [(False,)]
        return conn.execute(
            """SELECT s.ssl, a.usename, host(a.client_addr)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
               WHERE a.application_name = 'otpgated' AND a.datname = %s""",
            (dbname,),
        ).fetchall()


@pytest.fixture
def dbname(pg_tls_server: PgServer) -> str:
    return pg_tls_server.create_database(owner=TLS_ROLE)


def test_verify_full_store_works_and_every_connection_is_tls(
    pg_tls_server: PgServer, dbname: str
) -> None:
    url = pg_tls_server.tls_url(dbname)
    assert "sslmode=verify-full" in url and "sslrootcert=" in url
    store = PostgresStore(url)
    try:
        assert store.put_secret(_record())
        assert store.get_secret("alice") == _record()
        store.save_settings(Settings(enabled=True), audit="enabled over TLS", now=1)
        assert store.load_settings() == Settings(enabled=True)
        ((ssl, version, cipher),) = store._query(
            "SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        assert ssl is True and version in ("TLSv1.2", "TLSv1.3") and cipher, (version, cipher)

        # Calls at once make the pool open more connections in the background: those
        # are the pool's own, not the one made by hand at start, and must be TLS too.
        seen: list[tuple[int, bool]] = []
        lock = threading.Lock()

        def call() -> None:
            rows = store._query(
                "SELECT pid, ssl FROM pg_stat_ssl, pg_sleep(0.5) WHERE pid = pg_backend_pid()"
            )
            with lock:
                seen.extend(rows)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        backends = []
        for _ in range(40):
            backends = _otpgated_backends(pg_tls_server, dbname)
            if len(backends) >= 2:
                break
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert len({pid for pid, _ in seen}) >= 2, seen
        assert all(ssl for _, ssl in seen), seen
        assert len(backends) >= 2, backends
        assert all(b == (True, TLS_ROLE, "127.0.0.1") for b in backends), backends
    finally:
        store.close()


def test_a_ca_that_did_not_sign_the_server_certificate_is_refused(
    pg_tls_server: PgServer, dbname: str, tmp_path: Path
) -> None:
    # The same subject as the real CA: only the signature can tell them apart.
    stranger = CertificateAuthority.create(CA_NAME)
    assert stranger.cert.subject == pg_tls_server.ca.cert.subject
    url = pg_tls_server.tls_url(dbname, sslrootcert=stranger.write_cert(tmp_path / "other.crt"))
    started = time.monotonic()
    with pytest.raises(StoreError, match="certificate verify failed") as caught:
        PostgresStore(url, timeout=2)
    assert time.monotonic() - started < 5
    assert f"127.0.0.1:{pg_tls_server.port}/{dbname}" in str(caught.value)
    assert TLS_PASSWORD not in str(caught.value)


def test_verify_full_refuses_a_certificate_for_another_name(
    pg_tls_server: PgServer, dbname: str
) -> None:
    # hostaddr: connect to 127.0.0.1 (where the server is) but check the name WRONG_NAME.
    wrong = pg_tls_server.tls_url(dbname, host=WRONG_NAME, hostaddr="127.0.0.1")
    started = time.monotonic()
    with pytest.raises(
        StoreError,
        match=rf'server certificate for "localhost" .*does not match host name "{WRONG_NAME}"',
    ):
        PostgresStore(wrong, timeout=2)
    assert time.monotonic() - started < 5
    # Controls: the name alone is the fault. verify-ca does not check names, and
    # verify-full accepts the certificate's DNS name as well as its IP address.
    for url in (
        pg_tls_server.tls_url(dbname, sslmode="verify-ca", host=WRONG_NAME, hostaddr="127.0.0.1"),
        pg_tls_server.tls_url(dbname, host="localhost", hostaddr="127.0.0.1"),
    ):
        store = PostgresStore(url, timeout=2)
        assert store.load_settings() == Settings()
        store.close()


def test_without_tls_the_server_rejects_the_store(pg_tls_server: PgServer, dbname: str) -> None:
    url = pg_tls_server.tls_url(dbname, sslmode="disable")
    with pytest.raises(
        StoreError,
        match=rf'pg_hba\.conf rejects connection for host "127\.0\.0\.1", user "{TLS_ROLE}", '
        rf'database "{dbname}", no encryption',
    ):
        PostgresStore(url, timeout=2)


def test_otpgated_over_tls_enrolls_and_verifies(
    pg_tls_server: PgServer,
    dbname: str,
    make_daemon: Callable[..., Daemon],
    user: LocalUser,
    tmp_path: Path,
) -> None:
    password_file = tmp_path / "db.password"
    password_file.write_text(TLS_PASSWORD + "\n")
    password_file.chmod(0o600)
    url = pg_tls_server.tls_url(dbname, password=None)  # the password from the file only
    daemon = make_daemon(
        "--database-url", url, "--database-password-file", str(password_file)
    )  # fmt: skip
    admin = daemon.admin()
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1), timeout=5)
    entry = admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    totp = pyotp.TOTP(pyotp.parse_uri(entry.twofactor_config.provisioning_uri).secret)
    pam = daemon.pam()

    def verify(code: str) -> int:
        request = pb.PamRequest(username=user.name, service="sshd", authtok=code)
        verdict: int = pam.Verify(request, timeout=10).verdict
        return verdict

    now = time.time()
    code = totp.at(now)
    near = {totp.at(now + shift) for shift in (-60, -30, 0, 30, 60)}
    wrong = next(c for c in (f"{n:06d}" for n in range(10**6)) if c not in near)
    assert verify(wrong) == pb.VERDICT_DENY
    assert verify(code) == pb.VERDICT_ALLOW
    # The spent step lives in the database: the same code again is a replay.
    assert verify(code) == pb.VERDICT_DENY

    backends = _otpgated_backends(pg_tls_server, dbname)
    assert backends, "otpgated holds no connection to its database"
    assert all(b == (True, TLS_ROLE, "127.0.0.1") for b in backends), backends
