"""Edge hosts end to end: a private sshd on an edge otpgated, codes judged centrally.

Each "host" is a private sshd (tests.ssh.conftest) whose PAM stack runs the shipped
hook against an edge otpgated's pam.sock; the edge holds no key and no database and
asks one or more central otpgated processes (tests.fleet_harness) over mutual TLS
with its `host` certificate. Enrollment happens centrally (admin.sock); ordinary
users renew their own secret through the edge's user.sock with the CLI.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import RUNUSER, Daemon, LocalUser
from tests.fleet_harness import Central, Pki, edge_toml
from tests.ssh.conftest import Login, Sshd, ssh_login
from tests.ssh.test_flows import enable, enroll, wrong
from tests.store.pg_harness import PgServer

MakeSshd = Callable[..., Sshd]
MakeCentral = Callable[..., Central]
MakeEdge = Callable[..., Daemon]
Python = tuple[str, dict[str, str]]
HOOK_TIMEOUT = 3.0  # the hook's default timeout=, which the edge's budget stays under


def login(sshd: Sshd, user: LocalUser, code: str) -> Login:
    return ssh_login(sshd.port, user.name, password=user.password, answers=[code])


def parse_totp(uri: str) -> pyotp.TOTP:
    totp = pyotp.parse_uri(uri)
    assert isinstance(totp, pyotp.TOTP), uri
    return totp


def step_codes(totp: pyotp.TOTP, count: int) -> list[str]:
    """Codes of `count` consecutive time steps from now on, each newer than the last:
    with window >= 1 the first two are good now and for at least 30 s more."""
    step = int(time.time()) // totp.interval
    return [totp.at((step + i) * totp.interval) for i in range(count)]


def wait_for_log(daemon: Daemon, pattern: str, count: int = 1, timeout: float = 5.0) -> list[str]:
    """The matches of `pattern` in the daemon's log once there are `count` of them
    (the daemon writes its log in batches)."""
    compiled = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while len(compiled.findall(daemon.log())) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    found = compiled.findall(daemon.log())
    assert len(found) >= count, (pattern, daemon.log())
    return found


def verdicts(central: Central, sshd: Sshd, user: LocalUser, count: int) -> list[str]:
    """The results of the central's `verify` lines for codes from this sshd's PAM service."""
    pattern = rf"verify user={user.name} via=pam:{sshd.name} result=(\S+)"
    return wait_for_log(central.daemon, pattern, count)


# -- 1. a login through an edge, the code checked centrally ---------------------------


def test_login_through_an_edge_is_judged_centrally(
    make_central: MakeCentral, make_edge: MakeEdge, make_sshd: MakeSshd, user: LocalUser
) -> None:
    central = make_central()
    edge = make_edge(central.address)
    enable(central.daemon)  # window=1
    totp = enroll(central.daemon, user)
    sshd = make_sshd("password", edge)
    now, following = step_codes(totp, 2)

    right = login(sshd, user, now)
    assert right.ok, (sshd.log_path.read_text(), edge.log())
    assert len(right.prompts) == 1 and "code" in right.text.lower()
    bad = login(sshd, user, wrong(following))
    assert not bad.ok and "Invalid code" in bad.text
    replayed = login(sshd, user, now)  # spent centrally by the first login
    assert not replayed.ok and "already used" in replayed.text

    assert verdicts(central, sshd, user, 3) == ["valid", "invalid", "replayed"]
    assert f"verify user={user.name}" not in edge.log()  # the edge judged nothing itself
    events = central.daemon.admin().ListAuditEvents(
        pb.ListAuditEventsRequest(username=user.name), timeout=5
    )
    from_edge = [
        (e.detail, e.caller)
        for e in reversed(events.events)  # newest first: put them in order
        if e.event == "verify" and e.path == f"pam:{sshd.name}"
    ]
    assert [detail for detail, _ in from_edge] == [
        "result=valid",
        "result=invalid",
        "result=replayed",
    ], events
    assert all(re.search(r"(^| )cert=edge1( |$)", caller) for _, caller in from_edge), from_edge
    assert all("role=host" in caller for _, caller in from_edge), from_edge


# -- 2. the central away ------------------------------------------------------------


def test_central_stopped_denies_within_the_hook_timeout(
    make_central: MakeCentral, make_edge: MakeEdge, make_sshd: MakeSshd, user: LocalUser
) -> None:
    central = make_central()
    edge = make_edge(central.address)
    enable(central.daemon)
    totp = enroll(central.daemon, user)
    secure = make_sshd("password", edge)  # the hook's default: fail=secure
    safe = make_sshd("password", edge, "fail=safe")
    now, following = step_codes(totp, 2)
    assert login(secure, user, now).ok, (secure.log_path.read_text(), edge.log())

    central.daemon.stop()
    denied = login(secure, user, following)  # a right, unused code
    assert not denied.ok
    # Two hook calls (check, verify) of at most 3 s each, plus sshd's own work.
    assert denied.seconds < 10, denied
    started = time.monotonic()
    decision = edge.pam().Verify(
        pb.PamRequest(username=user.name, service="sshd", authtok=following), timeout=10
    )
    assert decision.verdict == pb.VERDICT_UNAVAILABLE, decision
    assert time.monotonic() - started < HOOK_TIMEOUT
    wait_for_log(edge, r"upstream_unavailable method=(?:Check|Verify)")

    # fail=safe lets the first factor through while nobody can decide; a wrong
    # password is still refused.
    allowed = login(safe, user, "000000")
    assert allowed.ok, (safe.log_path.read_text(), edge.log())
    assert allowed.seconds < 10, allowed
    wrong_password = ssh_login(safe.port, user.name, password=user.password + "x")
    assert not wrong_password.ok


# -- 3. two centrals on one PostgreSQL --------------------------------------------------


@dataclass
class Pair:
    first: Central
    second: Central
    edge: Daemon
    sshd: Sshd


@pytest.fixture
def pair(
    pg_server: PgServer,
    make_central: MakeCentral,
    make_edge: MakeEdge,
    make_sshd: MakeSshd,
    tmp_path_factory: pytest.TempPathFactory,
) -> Pair:
    """Two centrals sharing one database and key, an edge that knows both (first
    first), and an sshd on the edge."""
    url = pg_server.daemon_url(pg_server.create_database())
    first = make_central(None, "--database-url", url)
    root = tmp_path_factory.mktemp("central")
    (root / "etc").mkdir(mode=0o700)
    shutil.copy2(first.daemon.key_file, root / "etc" / "otpgate.key")  # one key for both
    second = make_central(None, "--database-url", url, root=root)
    assert second.daemon.key_file.read_bytes() == first.daemon.key_file.read_bytes()
    edge = make_edge(first.address, second.address)
    return Pair(first, second, edge, make_sshd("password", edge))


def test_a_stopped_central_is_replaced_by_the_second(pair: Pair, user: LocalUser) -> None:
    enable(pair.first.daemon)
    totp = enroll(pair.first.daemon, user)
    now, following = step_codes(totp, 2)
    assert login(pair.sshd, user, now).ok, (pair.sshd.log_path.read_text(), pair.edge.log())
    assert verdicts(pair.first, pair.sshd, user, 1) == ["valid"]

    pair.first.daemon.stop()
    through_second = login(pair.sshd, user, following)
    assert through_second.ok, (pair.sshd.log_path.read_text(), pair.edge.log())
    assert through_second.seconds < 10
    wait_for_log(pair.edge, rf"upstream_switched to={re.escape(pair.second.address)} ")
    assert verdicts(pair.second, pair.sshd, user, 1) == ["valid"]
    # The code the first central saw spent is spent for the second: the database's.
    replayed = login(pair.sshd, user, now)
    assert not replayed.ok and "already used" in replayed.text
    assert verdicts(pair.second, pair.sshd, user, 2) == ["valid", "replayed"]


def test_a_frozen_central_is_replaced_within_the_hook_timeout(pair: Pair, user: LocalUser) -> None:
    enable(pair.first.daemon)
    totp = enroll(pair.first.daemon, user)
    now, following = step_codes(totp, 2)
    # A first login through the first central: the edge's connection to it is open.
    assert login(pair.sshd, user, now).ok, (pair.sshd.log_path.read_text(), pair.edge.log())
    assert verdicts(pair.first, pair.sshd, user, 1) == ["valid"]

    # The edge's gate files list the account (HostGate.AskList): its logins ask
    # Verify straight away, no Check first.
    ask = pair.edge.runtime_dir / "gate" / "ask"
    deadline = time.monotonic() + 15
    while user.name not in ask.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert user.name in ask.read_text().split(), pair.edge.log()

    proc = pair.first.daemon.proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)  # it hangs: accepts, never answers
    try:
        # A Verify the frozen central may yet judge is denied, never sent on; the
        # edge starts the next call at the second.
        denied = login(pair.sshd, user, following)
        through_second = login(pair.sshd, user, following)
        started = time.monotonic()
        check = pair.edge.pam().Check(pb.PamRequest(username=user.name, service="sshd"), timeout=10)
        checked_in = time.monotonic() - started
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # fail=secure (the default): the login went through only if every hook call
    # got the second central's answer within the hook's 3 s.
    assert not denied.ok
    assert through_second.ok, (pair.sshd.log_path.read_text(), pair.edge.log())
    assert through_second.seconds < 10
    switched = wait_for_log(
        pair.edge, rf"upstream_switched to={re.escape(pair.second.address)} after=(\S+: \S+)"
    )
    assert switched == [f"{pair.first.address}: DEADLINE_EXCEEDED"], pair.edge.log()
    assert verdicts(pair.second, pair.sshd, user, 1) == ["valid"]
    # The edge now asks the second first: no wait for the frozen one.
    assert check.verdict == pb.VERDICT_OTP_REQUIRED and checked_in < HOOK_TIMEOUT


# -- 4. the edge holds no secret ------------------------------------------------------


@pytest.fixture
def make_public_edge(
    make_daemon: Callable[..., Daemon], fleet_pki: Pki, password_pam_service: str
) -> Iterator[MakeEdge]:
    """make_edge, with a root other users can traverse (to reach user.sock) and the
    shipped password PAM service (the edge checks passwords itself)."""
    made: list[Daemon] = []

    def make(*upstreams: str) -> Daemon:
        root = Path(tempfile.mkdtemp(prefix="otpgate-test-edge-"))
        root.chmod(0o755)
        config = root / "otpgated.toml"
        extra = f'password_pam_service = "{password_pam_service}"'
        config.write_text(edge_toml(fleet_pki, "edge1", list(upstreams), extra))
        edge: Daemon = make_daemon("--config", str(config), root=root, start=False)
        made.append(edge)
        return edge.start()

    yield make
    for edge in made:
        edge.stop()  # before its directory goes
        shutil.rmtree(edge.root, ignore_errors=True)


def as_user(
    python: Python, user: LocalUser, edge: Daemon, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """`otpgate --socket EDGE/user.sock --password-stdin ARGS` as `user`, no terminal."""
    executable, env = python
    return subprocess.run(
        [RUNUSER, "-u", user.name, "--", executable, "-m", "otpgate.cli.main",
         "--socket", edge.socket("user"), "--password-stdin", *args],
        input=stdin, capture_output=True, text=True, timeout=60, cwd="/",
        env={"PATH": "/usr/bin:/bin", **env}, start_new_session=True,
    )  # fmt: skip


def secret_needles(uri: str) -> dict[str, bytes]:
    """A secret as it could be found: base32 as in the URI, either case, and raw."""
    secret = parse_totp(uri).secret
    raw = base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))
    assert len(raw) >= 10
    return {
        "base32 upper": secret.upper().encode(),
        "base32 lower": secret.lower().encode(),
        "raw": raw,
    }


def _hits(where: str, data: bytes, needles: dict[str, bytes]) -> list[str]:
    return [f"{name} in {where}" for name, needle in needles.items() if needle in data]


def scan_tree(root: Path, needles: dict[str, bytes]) -> list[str]:
    """Every regular file under root (symlinks not followed) that holds a needle."""
    found: list[str] = []
    files = 0
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if stat.S_ISREG(path.lstat().st_mode):
                files += 1
                found += _hits(str(path), path.read_bytes(), needles)
    assert files, f"nothing to scan under {root}"
    return found


def scan_process(pid: int, needles: dict[str, bytes]) -> list[str]:
    """The process's environment, command line and every regular file it holds open."""
    proc = Path(f"/proc/{pid}")
    found = _hits(f"{proc}/environ", (proc / "environ").read_bytes(), needles)
    found += _hits(f"{proc}/cmdline", (proc / "cmdline").read_bytes(), needles)
    for fd in (proc / "fd").iterdir():
        try:
            if not stat.S_ISREG(os.stat(fd).st_mode):
                continue
            target = os.readlink(fd)
            with open(fd, "rb") as f:  # reopened through /proc: deleted files too
                data = f.read()
        except FileNotFoundError:
            continue  # closed meanwhile
        found += _hits(f"{fd} ({target})", data, needles)
    return found


def children(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def test_scanner_finds_a_planted_secret(tmp_path: Path) -> None:
    """The positive control: the scans of the next test cannot pass by looking nowhere."""
    needles = secret_needles(pyotp.totp.TOTP(pyotp.random_base32()).provisioning_uri(name="x"))
    for name, needle in needles.items():
        planted = tmp_path / name.replace(" ", "-")
        planted.write_bytes(b"before " + needle + b" after")
        (tmp_path / "innocent").write_bytes(b"nothing here")
        assert scan_tree(tmp_path, needles) == [f"{name} in {planted}"]
        planted.unlink()
    raw = tmp_path / "raw"
    raw.write_bytes(needles["raw"])
    with open(raw, "rb") as held:
        # A process holding the raw bytes open and the base32 in its environment.
        sleeper = subprocess.Popen(
            [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
            stdin=held, stdout=subprocess.PIPE, env={"X": needles["base32 lower"].decode()},
        )  # fmt: skip
    try:
        assert sleeper.stdout is not None
        assert sleeper.stdout.readline() == b"ready\n"  # running its own program now
        raw.unlink()  # open but deleted: still found
        hits = scan_process(sleeper.pid, needles)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert f"base32 lower in /proc/{sleeper.pid}/environ" in hits, hits
    assert any(h.startswith(f"raw in /proc/{sleeper.pid}/fd/0 ") for h in hits), hits


def test_an_edge_holds_no_secret(
    make_central: MakeCentral,
    make_public_edge: MakeEdge,
    make_sshd: MakeSshd,
    user: LocalUser,
    cli_python: Python,
) -> None:
    central = make_central()
    edge = make_public_edge(central.address)
    enable(central.daemon, window=2)
    entry = central.daemon.admin().RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    enrolled = entry.twofactor_config.provisioning_uri
    totp = parse_totp(enrolled)
    sshd = make_sshd("password", edge)
    first, second, third = step_codes(totp, 3)
    assert login(sshd, user, first).ok, (sshd.log_path.read_text(), edge.log())
    assert not login(sshd, user, first).ok  # replayed
    assert not login(sshd, user, wrong(second)).ok
    assert login(sshd, user, second).ok
    # A self-service renewal through the edge: its new (pending) secret passes through.
    renewed = as_user(cli_python, user, edge, "renew-secret", "--qr", "none",
                      stdin=f"{user.password}\n{third}\n")  # fmt: skip
    assert renewed.returncode == 0, (renewed.stderr, edge.log())
    pending = renewed.stdout.strip()
    assert pending.startswith("otpauth://totp/") and pending != enrolled
    assert verdicts(central, sshd, user, 4) == ["valid", "replayed", "invalid", "valid"]

    needles = {f"enrolled {k}": v for k, v in secret_needles(enrolled).items()}
    needles |= {f"pending {k}": v for k, v in secret_needles(pending).items()}
    key_text = central.daemon.key_file.read_bytes().strip()
    needles |= {"central key": key_text, "central raw key": base64.b64decode(key_text)}
    assert edge.proc is not None
    found: list[str] = []
    for pid in [edge.proc.pid, *children(edge.proc.pid)]:
        found += scan_process(pid, needles)
    # Log lines are written in batches: stopped (cleanly), the edge has written them all.
    assert edge.stop() == 0
    found += scan_tree(edge.root, needles)
    assert found == []
    assert not edge.key_file.exists() and not edge.state_dir.exists()
    assert not [p for p in edge.root.rglob("*") if p.name == central.daemon.key_file.name]


# -- 5. self-service through an edge ---------------------------------------------------


def test_renew_and_confirm_through_an_edge(
    make_central: MakeCentral,
    make_public_edge: MakeEdge,
    make_sshd: MakeSshd,
    user: LocalUser,
    cli_python: Python,
) -> None:
    central = make_central()
    edge = make_public_edge(central.address)
    # window=2: the old secret has a code left that it would still take at the end.
    enable(central.daemon, window=2)
    old = enroll(central.daemon, user)
    sshd = make_sshd("password", edge)
    for_renew, for_confirm, unused = step_codes(old, 3)

    renewed = as_user(cli_python, user, edge, "renew-secret", "--qr", "none",
                      stdin=f"{user.password}\n{for_renew}\n")  # fmt: skip
    assert renewed.returncode == 0, (renewed.stderr, edge.log())
    uri = renewed.stdout.strip()
    assert uri.startswith("otpauth://totp/") and f"{user.name}%40" in uri, renewed
    assert "pending" in renewed.stderr
    new = parse_totp(uri)
    assert new.secret != old.secret
    shown = central.daemon.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert shown.twofactor_auth_configured and shown.pending_expires_in > 0

    confirming, logging_in = step_codes(new, 2)
    confirmed = as_user(cli_python, user, edge, "confirm", confirming,
                        stdin=f"{user.password}\n{for_confirm}\n")  # fmt: skip
    assert confirmed.returncode == 0, (confirmed.stderr, edge.log())
    assert "confirmed" in confirmed.stdout
    shown = central.daemon.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert shown.pending_expires_in == 0

    # The old secret is gone: its unused code is wrong now (not "already used").
    refused = login(sshd, user, unused)
    assert not refused.ok and "Invalid code" in refused.text
    accepted = login(sshd, user, logging_in)
    assert accepted.ok, (sshd.log_path.read_text(), edge.log())
    assert verdicts(central, sshd, user, 2) == ["invalid", "valid"]
    assert wait_for_log(central.daemon, rf"secret_confirmed user={user.name}\b")


def test_what_an_edge_refuses_to_do(
    make_central: MakeCentral,
    make_public_edge: MakeEdge,
    make_user: Callable[..., LocalUser],
    cli_python: Python,
) -> None:
    central = make_central()
    edge = make_public_edge(central.address)
    enable(central.daemon)
    enrolled, newcomer = make_user(), make_user()
    totp = enroll(central.daemon, enrolled)
    first, second = step_codes(totp, 2)

    def unchanged(who: LocalUser) -> pb.UserEntry:
        entry: pb.UserEntry = central.daemon.admin().GetUser(
            pb.GetUserRequest(username=who.name), timeout=5
        )
        assert entry.pending_expires_in == 0, entry
        return entry

    # An account without a secret: enrolled by an administrator, not through an edge.
    alone = as_user(cli_python, newcomer, edge, "renew-secret", "--qr", "none",
                    stdin=f"{newcomer.password}\n")  # fmt: skip
    assert alone.returncode != 0 and alone.stdout == "", alone
    assert "Traceback" not in alone.stderr, alone.stderr
    assert "administrator" in alone.stderr and "help desk" in alone.stderr, alone.stderr
    assert not unchanged(newcomer).twofactor_auth_configured

    # An enrolled account, right password and code: still no secret replaced at once.
    now = as_user(cli_python, enrolled, edge, "renew-secret", "--now", "--qr", "none",
                  stdin=f"{enrolled.password}\n{first}\n")  # fmt: skip
    assert now.returncode != 0 and now.stdout == "", now
    assert now.stderr.startswith("FailedPrecondition:"), now.stderr
    assert "otpauth://" not in now.stderr
    # ... and the secret in use is never read out through an edge.
    uri = as_user(cli_python, enrolled, edge, "provisioning-uri",
                  stdin=f"{enrolled.password}\n{second}\n")  # fmt: skip
    assert uri.returncode != 0 and uri.stdout == "", uri
    assert uri.stderr.startswith("PermissionDenied:"), uri.stderr
    assert "otpauth://" not in uri.stderr and totp.secret not in uri.stderr
    entry = unchanged(enrolled)
    assert entry.twofactor_auth_configured
    # Both were refused after a right code, not for a wrong one.
    proven = wait_for_log(central.daemon, rf"verify user={enrolled.name} via=host result=(\S+)", 2)
    assert proven == ["valid", "valid"]
