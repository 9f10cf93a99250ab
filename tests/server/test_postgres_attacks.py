"""Attacks on "unavailable": a real otpgated on a real PostgreSQL, played as an
attacker would. pam.sock's VERDICT_UNAVAILABLE lets a fail=safe hook admit on the
first factor alone, so it must come only from a database that is really away, and
never after a code has been judged; a refusal (TLS, password, pg_hba) and any
other database error must deny.

The database here fails on cue: a trigger the test installs makes one statement
wait past the daemon's --database-timeout (as a database that stops answering
between two statements would), an ordinary local user fills the server's
connection slots, a role's password changes under the daemon, a table is locked.
Servers that a test damages are the module's own, never the session's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pyotp
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from otpgate.store.postgres import PostgresStore
from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import RUNUSER, Daemon, LocalUser, hook_exit
from tests.store.pg_harness import PASSWORD, PASSWORD_ROLE, TLS_ROLE, PgServer, private_server

TIMEOUT = 1.0  # --database-timeout of the daemons here
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[PgServer]:
    """A server of this module's own, also on 127.0.0.1 (where any local user can
    connect, as on a fleet host that reaches its database over the network)."""
    with private_server(tcp=True) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server() -> Iterator[PgServer]:
    """A TLS server of this module's own (a test crashes it)."""
    with private_server(tls=True) as server:
        yield server


def _password_file(directory: Path) -> Path:
    path = directory / "db.password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(PASSWORD)
    return path


def _enroll(daemon: Daemon, user: LocalUser, **settings: int) -> pyotp.TOTP:
    config = {"window": 10, "lockout_threshold": 100, **settings}
    daemon.admin().UpdateConfig(
        pb.UpdateConfigRequest(enabled=True, services_ssh=True, **config), timeout=5
    )
    entry = daemon.admin().RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    return pyotp.parse_uri(entry.twofactor_config.provisioning_uri)


def _verify(daemon: Daemon, username: str, code: str) -> str:
    request = pb.PamRequest(username=username, service="sshd", authtok=code)
    try:
        return pb.Verdict.Name(daemon.pam().Verify(request, timeout=30).verdict)
    except grpc.RpcError as exc:
        return f"rpc:{exc.code().name}"


def _failures(url: str, username: str) -> tuple[int, int]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT failures, lockouts FROM secrets WHERE username = %s", (username,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def _end_daemon_connections(conn: psycopg.Connection[tuple[object, ...]], dbname: str) -> int:
    """End otpgated's pooled connections to `dbname`, as a database restart, a
    failover or the pool's own max_lifetime (an hour) does: it must reconnect."""
    row = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'otpgated' AND datname = %s",
        (dbname,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _settle(daemon: Daemon, username: str) -> None:
    """After _end_daemon_connections: a call may still meet a pooled connection that
    was lost (used within the last second, so taken without a check: "unavailable",
    rightly, for the connection is gone). Past that second the pool checks, drops
    them and must connect anew: what the calls get from then on is the question."""
    _verify(daemon, username, "000000")
    time.sleep(1.5)


def _slow_statements(url: str, pattern: str) -> None:
    """From now on, a statement on `secrets` whose text matches `pattern` waits
    far beyond the daemon's bound: the database "goes away" right there."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"""CREATE OR REPLACE FUNCTION attack_stall() RETURNS trigger AS $$
                BEGIN
                    IF current_query() LIKE '{pattern}' THEN PERFORM pg_sleep(10); END IF;
                    RETURN NULL;
                END $$ LANGUAGE plpgsql"""
        )
        conn.execute(
            "CREATE TRIGGER attack_stall BEFORE UPDATE ON secrets "
            "FOR EACH STATEMENT EXECUTE FUNCTION attack_stall()"
        )


def _health(daemon: Daemon) -> int:
    with grpc.insecure_channel("unix:" + daemon.admin_socket) as channel:
        status: int = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=5)
            .status
        )
        return status


# -- a code once judged keeps its verdict ----------------------------------------------


def test_a_replayed_code_is_never_allowed_when_the_database_fails_after_counting(
    pg_server: PgServer, make_daemon: Callable[..., Daemon], user: LocalUser
) -> None:
    # Someone watched alice type a code and replays it within its window. Normally:
    # "already used". If the database stops answering between the count and the
    # spend (accept_step), the daemon answers "unavailable" for a code it has
    # judged, and a fail=safe hook lets the replay in.
    dbname = pg_server.create_database()
    url = pg_server.daemon_url(dbname)
    daemon = make_daemon("--database-url", url, "--database-timeout", str(TIMEOUT))
    totp = _enroll(daemon, user)
    code = totp.at(int(time.time()) // 30 * 30)
    assert _verify(daemon, user.name, code) == "VERDICT_ALLOW"  # alice's own login
    assert _verify(daemon, user.name, code) == "VERDICT_DENY"  # a replay, normally

    _slow_statements(url, "%SET last_step%")  # only accept_step spends a step
    before = _failures(url, user.name)
    verdicts = [_verify(daemon, user.name, code) for _ in range(2)]
    assert _failures(url, user.name)[0] == before[0] + 2  # counted: the code was judged
    assert "VERDICT_UNAVAILABLE" not in verdicts, verdicts
    assert hook_exit(daemon, user.name, code, "safe") == 1, "fail=safe admitted a replayed code"


@pytest.mark.parametrize("guess", ["aaaa-bbbb-cccc", "12345678"])
def test_a_wrong_recovery_code_is_never_allowed_when_the_database_fails_after_counting(
    pg_server: PgServer, make_daemon: Callable[..., Daemon], user: LocalUser, guess: str
) -> None:
    # A recovery code is checked by the database itself (use_recovery_code), after
    # the attempt was counted; so is any 8 digits typed for a 6-digit account (a
    # google-authenticator scratch code). If the database stops answering there,
    # a wrong guess comes back "unavailable" and a fail=safe hook lets it in.
    dbname = pg_server.create_database()
    url = pg_server.daemon_url(dbname)
    daemon = make_daemon("--database-url", url, "--database-timeout", str(TIMEOUT))
    _enroll(daemon, user)
    assert _verify(daemon, user.name, guess) == "VERDICT_DENY"  # normally
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """CREATE FUNCTION attack_stall() RETURNS trigger AS $$
               BEGIN PERFORM pg_sleep(10); RETURN NULL; END $$ LANGUAGE plpgsql"""
        )
        conn.execute(
            "CREATE TRIGGER attack_stall BEFORE UPDATE ON recovery_codes "
            "FOR EACH STATEMENT EXECUTE FUNCTION attack_stall()"
        )
    before = _failures(url, user.name)
    verdict = _verify(daemon, user.name, guess)
    assert _failures(url, user.name)[0] == before[0] + 1  # counted first
    assert verdict != "VERDICT_UNAVAILABLE", verdict
    assert hook_exit(daemon, user.name, guess, "safe") == 1, "fail=safe admitted a wrong guess"


def test_wrong_codes_keep_their_verdict_when_the_database_fails_after_counting(
    pg_server: PgServer, make_daemon: Callable[..., Daemon], user: LocalUser
) -> None:
    # Regression guard: the lock that follows the threshold (Store.lock) and the
    # spend both stall; a wrong code is still "invalid" or "locked", never
    # "unavailable", and the lock is taken by a later attempt once it can be.
    dbname = pg_server.create_database()
    url = pg_server.daemon_url(dbname)
    daemon = make_daemon("--database-url", url, "--database-timeout", str(TIMEOUT))
    _enroll(daemon, user, lockout_threshold=2, lockout_seconds=60)
    _slow_statements(url, "%lockouts = lockouts + 1%")
    verdicts = [_verify(daemon, user.name, f"{n:06d}") for n in range(5)]
    assert set(verdicts) <= {"VERDICT_DENY", "VERDICT_LOCKED"}, verdicts
    assert verdicts[:2] == ["VERDICT_DENY", "VERDICT_DENY"], verdicts
    assert hook_exit(daemon, user.name, "123456", "safe") == 1
    assert "lock_deferred" in daemon.log()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER attack_stall ON secrets")
    assert _verify(daemon, user.name, "654321") == "VERDICT_LOCKED"
    assert _failures(url, user.name)[1] == 1  # locked once


# -- an ordinary local user fills the database's connection slots -----------------------

# Runs as the ordinary user, with the system Python: open connections, send a
# startup packet (any database name will do), read the server's password
# challenge and say nothing more. Each holds a backend slot for
# authentication_timeout (60 s); the slot is taken before authentication, so no
# password is needed, and superuser_reserved_connections does not help.
_FLOOD = r"""
import socket, struct, sys, time
host, port, role, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
body = struct.pack("!i", 196608) + b"user\0" + role.encode() + b"\0database\0x\0\0"
held = []
while True:
    held = [s for s in held if s.fileno() >= 0]
    while len(held) < count:
        s = socket.socket()
        try:
            s.connect((host, port))
            s.sendall(struct.pack("!i", len(body) + 4) + body)
            if s.recv(1) != b"R":
                raise OSError("refused")
        except OSError:
            s.close()
            break
        held.append(s)
    time.sleep(0.2)
"""


def _slots_full(server: PgServer) -> bool:
    try:
        psycopg.connect(
            f"host=127.0.0.1 port={server.port} user={PASSWORD_ROLE} dbname=postgres",
            password=PASSWORD,
            connect_timeout=3,
        ).close()
    except psycopg.OperationalError as exc:
        return "too many clients" in str(exc)
    return False


def test_an_ordinary_user_filling_the_connection_slots_does_not_open_fail_safe(
    tcp_server: PgServer,
    make_daemon: Callable[..., Daemon],
    make_user: Callable[..., LocalUser],
    tmp_path: Path,
) -> None:
    # Any local user of a fleet host (or anyone who reaches the database's port
    # from an address pg_hba lets try a password) can open a few hundred
    # connections that never authenticate: "sorry, too many clients already" for
    # everyone else. That is a refusal by a server that answers, caused by someone
    # without any credential: it must deny, not pass for "the database is away".
    victim, attacker = make_user(), make_user()
    dbname = tcp_server.create_database(owner=PASSWORD_ROLE)
    daemon = make_daemon(
        "--database-url", tcp_server.tcp_url(dbname),
        "--database-password-file", str(_password_file(tmp_path)),
        "--database-timeout", str(TIMEOUT),
    )  # fmt: skip
    _enroll(daemon, victim)
    assert hook_exit(daemon, victim.name, "000000", "safe") == 1
    admin = psycopg.connect(tcp_server.url(dbname), autocommit=True)  # before the flood
    flood = subprocess.Popen(
        [RUNUSER, "-u", attacker.name, "--", "/usr/bin/python3", "-I", "-c", _FLOOD,
         "127.0.0.1", str(tcp_server.port), PASSWORD_ROLE, "400"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _slots_full(tcp_server):
            assert time.monotonic() < deadline, "the flood did not fill the slots"
            assert flood.poll() is None, "the flood ended"
            time.sleep(0.5)
        # Connections already pooled still work...
        assert _verify(daemon, victim.name, "000000") == "VERDICT_DENY"
        # ...until the pool must make a new one (max_lifetime, a restart, a blip).
        assert _end_daemon_connections(admin, dbname) >= 1
        _settle(daemon, victim.name)
        verdicts = [_verify(daemon, victim.name, f"{n:06d}") for n in range(3)]
        assert "VERDICT_UNAVAILABLE" not in verdicts, verdicts
        assert hook_exit(daemon, victim.name, "123456", "safe") == 1, (
            "an ordinary user's connection flood let a wrong code in under fail=safe"
        )
    finally:
        flood.send_signal(signal.SIGTERM)
        try:
            flood.wait(10)
        except subprocess.TimeoutExpired:
            flood.kill()
            flood.wait(10)
        admin.close()
        deadline = time.monotonic() + 30  # the slots free again for the next test
        while _slots_full(tcp_server) and time.monotonic() < deadline:
            time.sleep(0.2)


# -- a refusal stays a refusal -----------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # nothing listens there once the probe is closed


@pytest.mark.parametrize("addresses", ["one", "two, the first down"])
def test_a_password_refused_at_reconnection_denies(
    tcp_server: PgServer,
    make_daemon: Callable[..., Daemon],
    user: LocalUser,
    tmp_path: Path,
    addresses: str,
) -> None:
    # The database's password was changed (rotated, or this host cut off on
    # purpose): a refusal, which denies in both fail modes. It must not matter that
    # the URL names more than one server (libpq's host=a,b for a primary and its
    # standby), or a name with an IPv6 address that does not answer besides the
    # IPv4 one that refuses: psycopg then reports every attempt in one message,
    # and one "connection refused" in it must not turn the refusal into an outage.
    dbname = tcp_server.create_database(owner=PASSWORD_ROLE)
    url = tcp_server.tcp_url(dbname)
    if addresses != "one":
        url = url.replace("@127.0.0.1:", f"@127.0.0.1:{_closed_port()},127.0.0.1:")
    daemon = make_daemon(
        "--database-url", url,
        "--database-password-file", str(_password_file(tmp_path)),
        "--database-timeout", str(TIMEOUT),
    )  # fmt: skip
    _enroll(daemon, user)
    with psycopg.connect(tcp_server.url(dbname), autocommit=True) as admin:
        admin.execute(f"ALTER ROLE {PASSWORD_ROLE} PASSWORD 'rotated meanwhile'")
        try:
            assert _end_daemon_connections(admin, dbname) >= 1
            _settle(daemon, user.name)
            verdicts = [_verify(daemon, user.name, f"{n:06d}") for n in range(3)]
            assert "VERDICT_UNAVAILABLE" not in verdicts, verdicts
            assert hook_exit(daemon, user.name, "123456", "safe") == 1
        finally:
            admin.execute(f"ALTER ROLE {PASSWORD_ROLE} PASSWORD '{PASSWORD}'")


def test_a_database_that_dies_under_a_tls_session_is_an_outage(
    tls_server: PgServer, make_daemon: Callable[..., Daemon], user: LocalUser
) -> None:
    # The other side of the refusal rule: over TLS (sslmode=verify-full, as a fleet
    # should run) libpq tells a server that died mid-session as "SSL error:
    # unexpected eof while reading". That is an outage, the hook's fail mode
    # decides, and a classification that takes every message naming SSL for a
    # refusal would deny on it even under fail=safe. The backend serving the
    # daemon is killed (PostgreSQL then restarts itself after the crash).
    dbname = tls_server.create_database(owner=TLS_ROLE)
    daemon = make_daemon(
        "--database-url", tls_server.tls_url(dbname), "--database-timeout", str(TIMEOUT)
    )  # fmt: skip
    _enroll(daemon, user)
    with psycopg.connect(tls_server.url(dbname), autocommit=True) as admin:
        assert _verify(daemon, user.name, "000000") == "VERDICT_DENY"  # a live session
        pids = [
            row[0]
            for row in admin.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE application_name = 'otpgated' AND datname = %s",
                (dbname,),
            ).fetchall()
        ]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    answers = [_verify(daemon, user.name, "000000")]
    deadline = time.monotonic() + 20
    while answers[-1] != "VERDICT_DENY" and time.monotonic() < deadline:
        answers.append(_verify(daemon, user.name, "000000"))
        time.sleep(0.1)
    assert answers[0] == "VERDICT_UNAVAILABLE", answers[:3]
    assert set(answers) <= {"VERDICT_UNAVAILABLE", "VERDICT_DENY"}, answers
    assert answers[-1] == "VERDICT_DENY", "not decided again after the crash"


# -- the client-side deadline ------------------------------------------------------------


def test_the_deadline_never_shuts_down_a_socket_that_is_no_longer_the_conversations(
    pg_server: PgServer,
) -> None:
    # When the server ends a connection, libpq closes its socket itself, inside the
    # conversation, and the number is free for the next socket this process opens
    # (a pam.sock call accepted by gRPC, a new pooled connection) before finish()
    # runs. Should the deadline pass in between (a thread that waits for the GIL;
    # over TCP tcp_user_timeout fires with the same value as the deadline), the
    # reaper shuts down that stranger: a hook's call cut before its answer is
    # "daemon unreachable", which fail=safe admits. Here the window is held open.
    dbname = pg_server.create_database()
    store = PostgresStore(pg_server.url(dbname), timeout=0.5)
    strangers: list[socket.socket] = []
    number = -1
    try:
        with contextlib.suppress(psycopg.Error), store._connection() as conn:
            number = conn.pgconn.socket
            with psycopg.connect(pg_server.url(dbname), autocommit=True) as admin:
                _end_daemon_connections(admin, dbname)
            with contextlib.suppress(psycopg.OperationalError):
                conn.execute("SELECT 1")
            # Other sockets of this process, until one has the conversation's number.
            while len(strangers) < 64 and number not in [s.fileno() for s in strangers]:
                strangers.extend(socket.socketpair())
            time.sleep(1.0)  # the deadline passes before finish()
        assert number in [s.fileno() for s in strangers], "libpq kept its socket open"
        for mine in strangers:
            try:
                mine.sendall(b"x")
            except OSError as exc:
                raise AssertionError(f"the deadline shut down another socket: {exc}") from None
    finally:
        for s in strangers:
            s.close()
        store.close()


# -- health --------------------------------------------------------------------------------


def _read_only(conn: psycopg.Connection[tuple[object, ...]], dbname: str, on: bool) -> None:
    conn.execute("SET default_transaction_read_only = off")
    if on:
        conn.execute(f"ALTER DATABASE {dbname} SET default_transaction_read_only = on")
    else:
        conn.execute(f"ALTER DATABASE {dbname} RESET default_transaction_read_only")


@pytest.mark.parametrize("trouble", ["secrets locked", "read-only"])
def test_health_is_not_serving_while_no_login_can_be_decided(
    pg_server: PgServer, make_daemon: Callable[..., Daemon], user: LocalUser, trouble: str
) -> None:
    # The probe reads the settings row, logins write the account's row. A table
    # lock (VACUUM FULL, an ALTER TABLE, upgrade-schema run from another host) or a
    # database that turned read-only (a failover onto a standby) fails every login
    # ("unavailable", or an error) while the health service says SERVING.
    dbname = pg_server.create_database()
    url = pg_server.daemon_url(dbname)
    daemon = make_daemon("--database-url", url, "--database-timeout", str(TIMEOUT))
    _enroll(daemon, user)
    locker = psycopg.connect(url)
    try:
        if trouble == "secrets locked":
            locker.execute("LOCK TABLE secrets IN ACCESS EXCLUSIVE MODE")
        else:
            locker.autocommit = True
            _read_only(locker, dbname, on=True)
            _end_daemon_connections(locker, dbname)
        time.sleep(3 * TIMEOUT + 1)  # a few probes
        verdicts = {_verify(daemon, user.name, "000000") for _ in range(3)}
        assert "VERDICT_DENY" not in verdicts, verdicts  # no login is decided
        assert _health(daemon) == NOT_SERVING, "SERVING while every login fails"
    finally:
        if trouble == "secrets locked":
            locker.rollback()
        else:
            _read_only(locker, dbname, on=False)
        locker.close()
