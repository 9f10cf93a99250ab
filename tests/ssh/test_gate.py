"""The SSH stacks' in-process gate (core.gate_files, server.gate_writer) end to end:
a private sshd with the shipped stacks, the hook, a real otpgated and its gate
files runtime_dir/gate/ask and networks.conf.

The hook is started through a counting launcher (a root-owned copy of
pam_hook/otpgate-pam-hook that first appends its mode to a log), so each test can
say how many hook processes a login cost and which ones.
"""

# ruff: noqa: F811 - `make_group` is a fixture imported from tests.cli.test_policy
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pyotp
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.cli.test_policy import make_group  # noqa: F401 - a fixture
from tests.conftest import REPO, RUNUSER, Daemon, LocalUser
from tests.ssh.conftest import HOOK, Login, Sshd, authorize_key, ssh_login
from tests.ssh.test_flows import enroll, wrong
from tests.ssh.test_policy import BASTION, enable

OPTIONAL = pb.ENROLLMENT_POLICY_OPTIONAL
VERIFY = [("verify", True)]  # one hook process, after the first factor
CHECK = [("check", True)]
CHECK_VERIFY = [("check", True), ("verify", True)]  # the old path: two processes

# The shipped launcher's body, with one line more: the mode, and whether sshd
# reported a passed first factor (SSH_AUTH_INFO_0), appended to a log.
_LAUNCHER = """\
import posix
import sys

with open({log!r}, "a") as log:
    done = posix.environ.get(b"SSH_AUTH_INFO_0", b"").strip()
    log.write(sys.argv[1] + (" after-first-factor" if done else " alone") + "\\n")
sys.path[:0] = [{hook_dir!r}]
from otpgate_pam_hook import main

status = main()
try:
    sys.stdout.flush()
finally:
    posix._exit(status)
"""


@dataclass
class Hooks:
    """The counting launcher and what it has counted."""

    launcher: Path
    log: Path

    def take(self) -> list[tuple[str, bool]]:
        """The hook processes started since the last call: (mode, after a first factor)."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        self.log.write_text("")
        return [(mode, where == "after-first-factor") for mode, where in map(str.split, lines)]


@pytest.fixture
def hooks(tmp_path: Path) -> Hooks:
    home = tmp_path / "launcher"
    home.mkdir(mode=0o755)
    log = home / "hooks.log"
    launcher = home / "counting-pam-hook"
    launcher.write_text(_LAUNCHER.format(log=str(log), hook_dir=str(REPO / "pam_hook")))
    os.chown(launcher, 0, 0)
    launcher.chmod(0o755)
    return Hooks(launcher, log)


GateSshd = Callable[..., Sshd]


@pytest.fixture
def gate_sshd(make_sshd: Callable[..., Sshd], hooks: Hooks) -> GateSshd:
    """A private sshd whose stack starts the hook through the counting launcher; with
    `gate_dir`, its gate lines read that directory instead of the daemon's."""

    def make(
        flow: str, daemon: Daemon, *, prompt: str = "when-needed", gate_dir: Path | None = None
    ) -> Sshd:
        def counted(text: str) -> str:
            assert str(HOOK) in text
            text = text.replace(str(HOOK), str(hooks.launcher))
            # Every program the stack starts is the launcher or a /bin/sh test: the
            # launcher counts every Python process a login costs.
            rules = [line for line in text.splitlines() if line.strip() and line[0] != "#"]
            programs = [line.partition("pam_exec.so")[2] for line in rules if "pam_exec.so" in line]
            launched = f"/usr/bin/python3 -I -S {hooks.launcher} "
            assert programs and all(
                launched in program or (program.split()[1:3] == ["/bin/sh", "-c"])
                for program in programs
            ), programs
            assert all(launched in line for line in rules if "python" in line)
            if gate_dir is not None:
                ours = f"{daemon.runtime_dir / 'gate'}/"
                assert text.count(ours) == 2, text  # pam_listfile's file=, pam_access's accessfile=
                text = text.replace(ours, f"{gate_dir}/")
            return text

        return make_sshd(flow, daemon, prompt=prompt, edit=counted)

    return make


@dataclass
class Factor:
    """What a user shows first in an sshd's flow (single-prompt: nothing)."""

    password: str | None = None
    key: paramiko.PKey | None = None


def first_factor(sshd: Sshd, user: LocalUser) -> Factor:
    if sshd.flow == "publickey":
        return Factor(key=authorize_key(sshd, user))
    if sshd.flow == "password":
        return Factor(password=user.password)
    return Factor()


def login_as(
    sshd: Sshd, user: LocalUser, factor: Factor, answers: list[str] | None = None, source: str = ""
) -> Login:
    return ssh_login(
        sshd.port, user.name, password=factor.password, key=factor.key, answers=answers,
        source=source,
    )  # fmt: skip


def gate_text(daemon: Daemon, name: str) -> str:
    path = daemon.runtime_dir / "gate" / name
    return path.read_text() if path.exists() else ""


def listed(daemon: Daemon) -> list[str]:
    """The accounts the daemon's own ask file lists."""
    return gate_text(daemon, "ask").splitlines()


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 3.0) -> float:
    """Poll until predicate() holds; the seconds it took. Fails at the deadline."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def wait_listed(
    daemon: Daemon, *users: LocalUser, networks: tuple[str, ...] = (), timeout: float = 3.0
) -> float:
    """Until ask lists exactly these users and networks.conf has these lines (the
    daemon writes ask first, then networks.conf)."""
    names = sorted(u.name for u in users)

    def written() -> bool:
        rules = gate_text(daemon, "networks.conf").splitlines()
        return listed(daemon) == names and all(line in rules for line in networks)

    return wait_for(f"ask lists {names}, networks.conf has {networks}", written, timeout)


# -- 1. one hook process per login ---------------------------------------------------


@pytest.mark.parametrize("flow", ["password", "publickey"])
def test_one_hook_process_per_login(
    flow: str,
    daemon: Daemon,
    make_user: Callable[..., LocalUser],
    gate_sshd: GateSshd,
    hooks: Hooks,
) -> None:
    enable(daemon, enrollment_policy=OPTIONAL)
    asked, free = make_user(), make_user()
    totp = enroll(daemon, asked)
    wait_listed(daemon, asked)
    sshd = gate_sshd(flow, daemon)
    asked_in, free_in = first_factor(sshd, asked), first_factor(sshd, free)

    # Enrolled: listed, so straight to the prompt and verify. One process.
    login = login_as(sshd, asked, asked_in, answers=[totp.now()])
    assert login.ok and len(login.prompts) == 1, sshd.log_path.read_text()
    assert "Verification code" in login.text
    assert hooks.take() == VERIFY
    bad = login_as(sshd, asked, asked_in, answers=[wrong(totp.now())])
    assert not bad.ok and "Invalid code" in bad.text
    assert hooks.take() == VERIFY

    # No secret, "optional": not listed, so check, which says no code. One process, no prompt.
    login = login_as(sshd, free, free_in)
    assert login.ok and login.prompts == [], sshd.log_path.read_text()
    assert hooks.take() == CHECK

    if flow == "password":
        # The first round (the password method) alone starts no hook: a wrong password
        # ends there. With the counts above (one process in all, after the first
        # factor), no Python ran in the first round of those logins either.
        login = ssh_login(sshd.port, asked.name, password="x" + asked.password, answers=["1"])
        assert not login.ok and login.prompts == []
        assert hooks.take() == []


@pytest.mark.parametrize(
    ("flow", "prompt", "expected"),
    [
        ("password", "always", VERIFY),
        ("publickey", "always", VERIFY),
        ("single-prompt", "when-needed", [("single-prompt", False)]),
    ],
)
def test_one_hook_process_with_the_other_stacks(
    flow: str,
    prompt: str,
    expected: list[tuple[str, bool]],
    login_daemon: Daemon,
    make_user: Callable[..., LocalUser],
    gate_sshd: GateSshd,
    hooks: Hooks,
) -> None:
    daemon = login_daemon
    enable(daemon, enrollment_policy=OPTIONAL)
    asked, free = make_user(), make_user()
    totp = enroll(daemon, asked)
    sshd = gate_sshd(flow, daemon, prompt=prompt)
    asked_in, free_in = first_factor(sshd, asked), first_factor(sshd, free)
    single = flow == "single-prompt"

    code = (asked.password if single else "") + totp.now()
    login = login_as(sshd, asked, asked_in, answers=[code])
    assert login.ok and len(login.prompts) == 1, sshd.log_path.read_text()
    assert hooks.take() == expected
    # Not enrolled: the always stacks prompt anyway and take any answer; single-prompt
    # takes the password alone. One process either way.
    login = login_as(sshd, free, free_in, answers=[free.password if single else "anything"])
    assert login.ok and len(login.prompts) == 1, sshd.log_path.read_text()
    assert hooks.take() == expected


# -- 2. the policy through the gate ----------------------------------------------------------


@pytest.mark.parametrize("flow", ["password", "publickey"])
def test_exempt_network_and_required_group_through_the_gate(
    flow: str,
    daemon: Daemon,
    make_user: Callable[..., LocalUser],
    make_group: Callable[..., str],
    gate_sshd: GateSshd,
    hooks: Hooks,
) -> None:
    plain, member = make_user(), make_user()
    group = make_group(member.name)
    enable(
        daemon,
        exempt_networks=[f"{BASTION}/32"],
        required_groups=[group],
        enrollment_policy=OPTIONAL,
    )
    plain_totp, member_totp = enroll(daemon, plain), enroll(daemon, member)
    wait_listed(
        daemon, plain, member, networks=(f"+ : {member.name} : ALL", f"- : ALL : {BASTION}/32")
    )
    networks = gate_text(daemon, "networks.conf")
    assert networks.index(member.name) < networks.index(BASTION)  # pam_access: first match wins
    sshd = gate_sshd(flow, daemon)
    plain_in, member_in = first_factor(sshd, plain), first_factor(sshd, member)

    # Listed, but from the exempt network: pam_access fails, so check runs and says
    # no code. One process, no prompt.
    login = login_as(sshd, plain, plain_in, source=BASTION)
    assert login.ok and login.prompts == [], sshd.log_path.read_text()
    assert hooks.take() == CHECK
    # The same account from 127.0.0.1: asked, one process.
    login = login_as(sshd, plain, plain_in, answers=[plain_totp.now()])
    assert login.ok and len(login.prompts) == 1
    assert hooks.take() == VERIFY

    # A required group's member is asked from the exempt network too, for one process.
    for answer in ("", wrong(member_totp.now())):
        bad = login_as(sshd, member, member_in, answers=[answer], source=BASTION)
        assert not bad.ok and len(bad.prompts) == 1
        assert hooks.take() == VERIFY
    login = login_as(sshd, member, member_in, answers=[member_totp.now()], source=BASTION)
    assert login.ok and len(login.prompts) == 1
    assert hooks.take() == VERIFY


# -- 3. fail closed: a broken gate file never skips the code -----------------------------


@dataclass
class Rig:
    gate: Path  # the directory the stack reads: the test's, which nobody rewrites
    asked: LocalUser  # enrolled, listed in the copied files
    free: LocalUser  # no secret, enrollment_policy optional: needs no code
    seed: dict[str, bytes]


def _hostile(rig: Rig, name: str, text: str) -> None:
    """The file replaced by one an ordinary user owns, with `text`."""
    path = rig.gate / name
    path.unlink()
    path.write_text(text)
    os.chown(path, rig.free.uid, rig.free.uid)
    path.chmod(0o644)


def _symlink(rig: Rig) -> None:
    # To a file that lists everyone: were it followed, the free account would be
    # prompted (and the asked one would skip check).
    target = rig.gate.parent / "ask-elsewhere"
    target.write_text(f"{rig.asked.name}\n{rig.free.name}\n")
    target.chmod(0o600)
    (rig.gate / "ask").unlink()
    (rig.gate / "ask").symlink_to(target)


def _replace_with_dir(rig: Rig, name: str) -> None:
    (rig.gate / name).unlink()
    (rig.gate / name).mkdir(mode=0o700)
    (rig.gate / name / rig.asked.name).write_text("")


BREAKAGES: dict[str, Callable[[Rig], object]] = {
    "intact": lambda rig: None,  # the control: the copy works as the daemon's own
    "dir-missing": lambda rig: shutil.rmtree(rig.gate),
    "ask-missing": lambda rig: (rig.gate / "ask").unlink(),
    "ask-empty": lambda rig: (rig.gate / "ask").write_text(""),
    "ask-cut-mid-name": lambda rig: (rig.gate / "ask").write_text(rig.asked.name[:5]),
    "ask-stale": lambda rig: None,  # a second account enrolled after the copy
    "ask-world-writable": lambda rig: (rig.gate / "ask").chmod(0o666),
    "ask-foreign-lists-nobody": lambda rig: _hostile(rig, "ask", "\n"),
    "ask-foreign-lists-everyone": lambda rig: _hostile(
        rig, "ask", f"root\n{rig.asked.name}\n{rig.free.name}\nALL\n*\n"
    ),
    "ask-symlink": _symlink,
    "ask-directory": lambda rig: _replace_with_dir(rig, "ask"),
    "networks-missing": lambda rig: (rig.gate / "networks.conf").unlink(),
    "networks-garbage": lambda rig: (rig.gate / "networks.conf").write_bytes(
        b"\x00\xff garbage :\n: : : :\n-\n+ : \n" + b"x" * 5000 + b"\n- ALL\n"
    ),
    "networks-directory": lambda rig: _replace_with_dir(rig, "networks.conf"),
    "networks-foreign-exempts-everyone": lambda rig: _hostile(
        rig, "networks.conf", "- : ALL : ALL\n"
    ),
}
# Where the files still list the asked account and pam_access lets it pass, its login
# skips check (one process); everywhere else it pays for check too. Either way it is
# asked. (pam_access refuses when its file is missing, and lets pass when it holds no
# rule it can read.)
SKIPS_CHECK = {"intact", "ask-foreign-lists-everyone", "networks-garbage", "networks-directory"}
LISTS_FREE = {"ask-foreign-lists-everyone"}  # a needless prompt for the free account


# The gate lines after the first factor are the same in both flows (publickey's check
# adds first-factor=required): every breakage with the password flow, a few with the key.
CASES = [(breakage, "password") for breakage in BREAKAGES] + [
    (breakage, "publickey")
    for breakage in ("intact", "ask-missing", "ask-stale", "ask-foreign-lists-everyone",
                     "networks-missing")
]  # fmt: skip


@pytest.mark.parametrize(("breakage", "flow"), CASES)
def test_a_broken_gate_file_never_skips_the_code(
    breakage: str,
    flow: str,
    daemon: Daemon,
    make_user: Callable[..., LocalUser],
    gate_sshd: GateSshd,
    hooks: Hooks,
    tmp_path: Path,
) -> None:
    # An exempt network, so networks.conf has something to get wrong; every login
    # here comes from 127.0.0.1, where a code is asked.
    enable(daemon, enrollment_policy=OPTIONAL, exempt_networks=[f"{BASTION}/32"])
    asked, free = make_user(), make_user()
    totp = enroll(daemon, asked)
    wait_listed(daemon, asked, networks=(f"- : ALL : {BASTION}/32",))
    gate = tmp_path / "gate"
    gate.mkdir(mode=0o700)
    seed = {name: (daemon.runtime_dir / "gate" / name).read_bytes()
            for name in ("ask", "networks.conf")}  # fmt: skip
    for name, data in seed.items():
        (gate / name).write_bytes(data)
        (gate / name).chmod(0o600)
    assert seed["ask"] == f"{asked.name}\n".encode() and BASTION.encode() in seed["networks.conf"]
    rig = Rig(gate, asked, free, seed)
    who = asked
    if breakage == "ask-stale":
        who = make_user()
        totp = enroll(daemon, who)
        wait_listed(daemon, asked, who)  # the daemon's own file has it; the copy never will
    BREAKAGES[breakage](rig)
    sshd = gate_sshd(flow, daemon, gate_dir=gate)
    who_in, free_in = first_factor(sshd, who), first_factor(sshd, free)
    expected = VERIFY if breakage in SKIPS_CHECK else CHECK_VERIFY

    # Asked, whatever the file says: no answer and a wrong code are refused...
    for answer in ("", wrong(totp.now())):
        bad = login_as(sshd, who, who_in, answers=[answer])
        assert not bad.ok and len(bad.prompts) == 1, (bad, sshd.log_path.read_text())
        assert "Verification code" in bad.text
        assert hooks.take() == expected
    assert "Invalid code" in bad.text
    # ...and the right code lets in.
    login = login_as(sshd, who, who_in, answers=[totp.now()])
    assert login.ok and len(login.prompts) == 1, sshd.log_path.read_text()
    assert hooks.take() == expected

    # The account that needs no code gets in, whatever it types at a needless prompt.
    login = login_as(sshd, free, free_in, answers=["not a code"])
    assert login.ok, (login, sshd.log_path.read_text())
    if breakage in LISTS_FREE:
        assert len(login.prompts) == 1 and hooks.take() == VERIFY
    else:
        assert login.prompts == [] and hooks.take() == CHECK
    # The daemon never writes the test's directory: what the stack read was the test's.
    if breakage == "intact":
        assert {p.name: p.read_bytes() for p in gate.iterdir()} == seed


# -- 4. an ordinary local user ---------------------------------------------------------------


@pytest.fixture
def open_daemon(make_daemon: Callable[..., Daemon]) -> Iterator[Daemon]:
    """A daemon whose directories above runtime_dir others can traverse, as /run."""
    root = Path(tempfile.mkdtemp(prefix="otpgate-test-gate-"))
    root.chmod(0o755)
    daemon = make_daemon(root=root)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def as_user(user: LocalUser, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RUNUSER, "-u", user.name, "--", *command],
        capture_output=True, text=True, timeout=30, cwd="/",
    )  # fmt: skip


def test_an_ordinary_user_can_neither_read_nor_plant_gate_files(
    open_daemon: Daemon, make_user: Callable[..., LocalUser], tmp_path: Path
) -> None:
    daemon = open_daemon
    enable(daemon)
    victim, attacker = make_user(), make_user()
    enroll(daemon, victim)
    wait_listed(daemon, victim)
    gate = daemon.runtime_dir / "gate"
    info = gate.lstat()
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == 0
    assert stat.S_IMODE(info.st_mode) == 0o700
    for name in ("ask", "networks.conf"):
        info = (gate / name).lstat()
        assert stat.S_ISREG(info.st_mode) and info.st_uid == 0
        assert stat.S_IMODE(info.st_mode) == 0o600

    # The way there is open (as /run is): only the gate directory itself stops them.
    seen = as_user(attacker, "ls", str(daemon.runtime_dir))
    assert seen.returncode == 0 and "gate" in seen.stdout.split(), seen
    assert as_user(attacker, "test", "-d", str(gate)).returncode == 0

    # Who is enrolled is private.
    for command in (["cat", str(gate / "ask")], ["cat", str(gate / "networks.conf")],
                    ["ls", str(gate)]):  # fmt: skip
        result = as_user(attacker, *command)
        assert result.returncode != 0 and "Permission denied" in result.stderr, result
        assert victim.name not in result.stdout

    # Nothing can be put there: not a new file, not a replacement, not a link.
    own = Path(tempfile.mkdtemp(prefix="otpgate-test-attacker-"))
    try:
        os.chown(own, attacker.uid, attacker.uid)
        planted = own / "ask"
        assert as_user(attacker, "sh", "-c", f"echo {attacker.name} > {planted}").returncode == 0
        attempts = [
            ["sh", "-c", f"echo {attacker.name} > {gate / 'ask'}"],
            ["sh", "-c", f"echo {attacker.name} >> {gate / 'ask'}"],
            ["touch", str(gate / "new")],
            ["cp", str(planted), str(gate / ".ask.tmp")],
            ["mv", "-f", str(planted), str(gate / "ask")],
            ["ln", "-sf", str(planted), str(gate / "ask")],
            ["ln", "-s", str(planted), str(gate / ".ask.tmp")],
            ["rm", "-f", str(gate / "ask")],
            ["chmod", "0666", str(gate / "ask")],
        ]
        for command in attempts:
            result = as_user(attacker, *command)
            assert result.returncode != 0, (command, result)
    finally:
        shutil.rmtree(own, ignore_errors=True)
    assert sorted(p.name for p in gate.iterdir()) == ["ask", "networks.conf"]
    assert listed(daemon) == [victim.name]


# -- 5. the daemon keeps the files in step -------------------------------------------------


def test_the_daemon_rewrites_the_gate_after_each_change(
    daemon: Daemon,
    make_user: Callable[..., LocalUser],
    gate_sshd: GateSshd,
    hooks: Hooks,
) -> None:
    enable(daemon, enrollment_policy=OPTIONAL)
    first, second = make_user(), make_user()

    def rewrite(*users: LocalUser, networks: tuple[str, ...] = ()) -> None:
        # "Soon after every change": the writer waits at least 1 s between two writes,
        # so 5 s leaves room for a loaded machine and still fails the 30 s periodic one.
        wait_listed(daemon, *users, networks=networks, timeout=5.0)

    # Written at start, before the daemon serves: nobody enrolled, nobody listed.
    assert (daemon.runtime_dir / "gate" / "ask").read_text() == ""
    totps: dict[str, pyotp.TOTP] = {first.name: enroll(daemon, first)}
    rewrite(first)
    sshd = gate_sshd("password", daemon)  # the daemon's own gate directory

    # A login right after an enrollment is asked, whether the file has caught up or not.
    totps[second.name] = enroll(daemon, second)
    bad = ssh_login(sshd.port, second.name, password=second.password, answers=[""])
    assert not bad.ok and len(bad.prompts) == 1, sshd.log_path.read_text()
    assert hooks.take() in (VERIFY, CHECK_VERIFY)
    login = ssh_login(
        sshd.port, second.name, password=second.password, answers=[totps[second.name].now()]
    )
    assert login.ok and len(login.prompts) == 1
    hooks.take()
    rewrite(first, second)

    # The administrator removes a secret: gone from the file, and no code asked.
    daemon.admin().UnsetSecret(pb.UnsetSecretRequest(username=first.name), timeout=5)
    rewrite(second)
    login = ssh_login(sshd.port, first.name, password=first.password)
    assert login.ok and login.prompts == []
    assert hooks.take() == CHECK
    # Enrolled again: listed again, asked for one process.
    totps[first.name] = enroll(daemon, first)
    rewrite(first, second)
    bad = ssh_login(sshd.port, first.name, password=first.password, answers=[""])
    assert not bad.ok and len(bad.prompts) == 1
    assert hooks.take() == VERIFY

    # A settings change rewrites networks.conf.
    enable(daemon, exempt_networks=[f"{BASTION}/32"])
    rewrite(first, second, networks=(f"- : ALL : {BASTION}/32",))
    # 2FA off: nobody is asked, and the file says so.
    daemon.admin().UpdateConfig(pb.UpdateConfigRequest(enabled=False), timeout=5)
    rewrite()

    # A file tampered with (by root: nobody else can) is put right at the next change.
    ask = daemon.runtime_dir / "gate" / "ask"
    ask.write_text(f"{first.name}\n{second.name}\nsomeone\n")
    ask.chmod(0o666)
    enable(daemon)
    rewrite(first, second)
    info = ask.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0


# -- 6. an edge: its files come from the central ------------------------------------------


def test_an_edge_lists_from_the_central_and_runs_one_hook_process(
    make_central: Callable[..., Any],
    make_edge: Callable[..., Daemon],
    make_user: Callable[..., LocalUser],
    gate_sshd: GateSshd,
    hooks: Hooks,
) -> None:
    central = make_central(None)
    enable(central.daemon, enrollment_policy=OPTIONAL)
    asked, free = make_user(), make_user()
    totp = enroll(central.daemon, asked)
    edge = make_edge(central.address)
    # The edge holds no secret: it asks the central (HostGate.AskList) about this
    # host's accounts, at start and every 30 s.
    wait_for(
        f"the edge lists {asked.name} and not {free.name}",
        lambda: asked.name in listed(edge) and free.name not in listed(edge),
        timeout=10,
    )
    sshd = gate_sshd("publickey", edge)
    asked_in, free_in = first_factor(sshd, asked), first_factor(sshd, free)
    login = login_as(sshd, asked, asked_in, answers=[totp.now()])
    assert login.ok and len(login.prompts) == 1, (sshd.log_path.read_text(), edge.log())
    assert hooks.take() == VERIFY
    login = login_as(sshd, free, free_in)
    assert login.ok and login.prompts == [], (sshd.log_path.read_text(), edge.log())
    assert hooks.take() == CHECK
    # A secret the central removes is gone from the edge's list at the next refresh
    # (30 s, or sooner after a name the edge has not seen); until then the account
    # is only prompted needlessly: verify lets any answer through.
    central.daemon.admin().UnsetSecret(pb.UnsetSecretRequest(username=asked.name), timeout=5)
    login = login_as(sshd, asked, asked_in, answers=["000000"])
    assert login.ok, (sshd.log_path.read_text(), edge.log())
    assert hooks.take() in (VERIFY, CHECK)  # stale: prompted, any answer; fresh: no prompt
