"""The fleet, end to end on one machine: many hosts, one PostgreSQL.

Two real otpgated processes share one database (and its key), and two private sshds,
one per "host", log users in through the shipped password-then-code stack: sshd A
asks daemon A, sshd B asks daemon B. An enrollment, a setting and a used code are
the database's, so each holds on both hosts whichever daemon saw it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyotp
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser
from tests.server.test_postgres_daemons import _pair
from tests.ssh.conftest import Login, Sshd, ssh_login
from tests.ssh.test_flows import enable, enroll, wrong
from tests.store.pg_harness import PgServer


@dataclass
class Fleet:
    a: Daemon
    b: Daemon
    sshd_a: Sshd
    sshd_b: Sshd


@pytest.fixture
def fleet(
    pg_server: PgServer,
    make_daemon: Callable[..., Daemon],
    make_sshd: Callable[..., Sshd],
) -> Fleet:
    a, b = _pair(make_daemon, pg_server.daemon_url(pg_server.create_database()))
    return Fleet(a, b, make_sshd("password", a), make_sshd("password", b))


def login(sshd: Sshd, user: LocalUser, code: str) -> Login:
    return ssh_login(sshd.port, user.name, password=user.password, answers=[code])


def assert_answered(daemon: Daemon, sshd: Sshd, user: LocalUser, *results: str) -> None:
    """The daemon judged exactly these codes from this sshd (its PAM service name), in
    order: the host asked its own daemon, and no other daemon answered for it."""
    pattern = re.compile(rf"verify user={user.name} via=pam:{sshd.name} result=(\S+)")
    deadline = time.monotonic() + 5  # the daemon writes its log in batches
    while pattern.findall(daemon.log()) != list(results) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pattern.findall(daemon.log()) == list(results), daemon.log()


def codes(totp: pyotp.TOTP) -> tuple[str, str]:
    """This time step's code and the next one's: with window=1 both are good now and
    a few seconds from now, and the second is newer, so it is not a replay of the first."""
    step = int(time.time()) // totp.interval
    return totp.at(step * totp.interval), totp.at((step + 1) * totp.interval)


def enroll_with_cli(daemon: Daemon, user: LocalUser) -> pyotp.TOTP:
    """`otpgate --socket ADMIN.sock renew-secret USER`, the way an administrator enrolls."""
    result = subprocess.run(
        [sys.executable, "-m", "otpgate.cli.main", "--socket", daemon.admin_socket,
         "--json", "renew-secret", "--now", user.name, "--qr", "none"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    totp = pyotp.parse_uri(json.loads(result.stdout)["twofactor_config"]["provisioning_uri"])
    assert isinstance(totp, pyotp.TOTP)
    return totp


def held_within_a_second(daemon: Daemon, **wanted: object) -> None:
    """A setting changed through the other daemon holds on this one within a second."""
    changed = time.monotonic()
    while True:
        config = daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=5)
        if all(getattr(config, name) == value for name, value in wanted.items()):
            return
        assert time.monotonic() - changed < 1.0, "the other daemon's setting did not hold"
        time.sleep(0.01)


def test_one_enrollment_serves_both_hosts(fleet: Fleet, user: LocalUser) -> None:
    totp = enroll_with_cli(fleet.a, user)  # once, through daemon A
    enable(fleet.b)  # 2FA on for SSH, window=1, through daemon B
    held_within_a_second(fleet.a, enabled=True, window=1)
    shown = fleet.b.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert shown.twofactor_auth_configured
    now, following = codes(totp)
    # Host A asks for a code (B's setting holds on A) and takes A's enrollment's code.
    on_a = login(fleet.sshd_a, user, now)
    assert on_a.ok, fleet.sshd_a.log_path.read_text()
    assert len(on_a.prompts) == 1 and "code" in on_a.text.lower()
    # Host B knows the same secret: a wrong code is refused, the next step's is taken.
    bad = login(fleet.sshd_b, user, wrong(following))
    assert not bad.ok and "Invalid code" in bad.text
    on_b = login(fleet.sshd_b, user, following)
    assert on_b.ok, fleet.sshd_b.log_path.read_text()
    assert len(on_b.prompts) == 1
    assert_answered(fleet.a, fleet.sshd_a, user, "valid")
    assert_answered(fleet.b, fleet.sshd_b, user, "invalid", "valid")


def test_a_code_is_good_once_across_hosts(fleet: Fleet, user: LocalUser) -> None:
    enable(fleet.a)
    held_within_a_second(fleet.b, enabled=True, window=1)
    totp = enroll(fleet.a, user)
    first, second = codes(totp)
    assert login(fleet.sshd_a, user, first).ok, fleet.sshd_a.log_path.read_text()
    replayed = login(fleet.sshd_b, user, first)  # the same code on the other host
    assert not replayed.ok and "already used" in replayed.text
    assert login(fleet.sshd_b, user, second).ok, fleet.sshd_b.log_path.read_text()
    replayed = login(fleet.sshd_a, user, second)  # and the other way round
    assert not replayed.ok and "already used" in replayed.text
    assert_answered(fleet.a, fleet.sshd_a, user, "valid", "replayed")
    assert_answered(fleet.b, fleet.sshd_b, user, "replayed", "valid")
    assert_answered(fleet.a, fleet.sshd_b, user)  # each host asked only its own daemon
    assert_answered(fleet.b, fleet.sshd_a, user)


def test_enrollment_required_on_every_host(fleet: Fleet, user: LocalUser) -> None:
    enable(fleet.b, enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED)
    held_within_a_second(fleet.a, enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED)
    for sshd in (fleet.sshd_a, fleet.sshd_b):
        refused = login(sshd, user, "123456")
        assert not refused.ok and "otpgate renew-secret" in refused.text, sshd.name
    totp = enroll(fleet.b, user)
    on_a = login(fleet.sshd_a, user, totp.now())
    assert on_a.ok, fleet.sshd_a.log_path.read_text()
    assert len(on_a.prompts) == 1
    assert_answered(fleet.a, fleet.sshd_a, user, "not_enrolled", "valid")
    assert_answered(fleet.b, fleet.sshd_b, user, "not_enrolled")
