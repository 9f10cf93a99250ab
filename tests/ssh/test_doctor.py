"""`otpgate doctor`'s checks, on text and on PAM files in a temporary directory."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from otpgate.ssh import doctor
from otpgate.ssh import setup as ssh_setup

GOOD_SSHD = {
    "usepam": ["yes"],
    "kbdinteractiveauthentication": ["yes"],
    "authenticationmethods": ["password,keyboard-interactive"],
}


def _problems(**overrides: list[str]) -> list[str]:
    return doctor.check_sshd(GOOD_SSHD | overrides, "password")


def test_good_sshd_config_has_no_problem() -> None:
    assert _problems() == []


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"usepam": ["no"]}, "UsePAM is off"),
        ({"kbdinteractiveauthentication": ["no"]}, "KbdInteractiveAuthentication is off"),
        ({"authenticationmethods": ["any"]}, "'any'"),
        ({"authenticationmethods": ["publickey password,keyboard-interactive"]}, "'publickey'"),
        ({"authenticationmethods": ["keyboard-interactive"]}, "the password alone"),
    ],
)
def test_unsafe_sshd_settings_reported(overrides: dict[str, list[str]], needle: str) -> None:
    problems = _problems(**overrides)
    assert len(problems) == 1 and needle in problems[0], problems


def test_parse_sshd_t_lowercases_and_accumulates() -> None:
    parsed = doctor.parse_sshd_t("UsePAM yes\nport 22\nport 2222\n")
    assert parsed == {"usepam": ["yes"], "port": ["22", "2222"]}


HOOK = "/usr/local/lib/otpgate/otpgate-pam-hook"


def _write_stack(tmp_path: Path, body: str, name: str = "sshd-x") -> list[doctor.PamLine]:
    (tmp_path / name).write_text(body)
    return doctor.read_pam_auth(name, str(tmp_path))


def test_shipped_snippets_detected_and_clean(tmp_path: Path) -> None:
    packaging = Path(__file__).resolve().parents[2] / "packaging" / "pam.d"
    for flow in ("password", "publickey", "single-prompt"):
        snippet = (packaging / f"otpgate-ssh-{flow}").read_text()
        (tmp_path / f"otpgate-ssh-{flow}").write_text(snippet)
        stack = _write_stack(
            tmp_path, f"@include otpgate-ssh-{flow}\naccount required pam_unix.so\n", f"sshd-{flow}"
        )
        assert doctor.detect_flow(stack) == flow
        assert doctor.check_pam("sshd", stack, lambda _path: None) == []


def test_pam_without_hook_or_permit_reported(tmp_path: Path) -> None:
    stack = _write_stack(tmp_path, "auth required pam_unix.so\n")
    assert doctor.check_pam("sshd", stack, lambda _p: None) == [
        "pam: service sshd never runs otpgate-pam-hook: no code is ever asked"
    ]
    stack = _write_stack(
        tmp_path,
        f"auth [success=done default=ignore] pam_exec.so quiet /usr/bin/python3 -S {HOOK} check\n"
        f"auth requisite pam_exec.so quiet /usr/bin/python3 -I -S {HOOK} verify\n",
    )
    problems = doctor.check_pam("sshd", stack, lambda _p: None)
    assert any("does not end with pam_permit.so" in p for p in problems)
    assert any("lacks expose_authtok" in p for p in problems)
    assert any("without python3 -I" in p for p in problems)


def test_relative_or_writable_hook_reported(tmp_path: Path) -> None:
    stack = _write_stack(
        tmp_path,
        "auth requisite pam_exec.so quiet expose_authtok otpgate-pam-hook verify\n"
        "auth required pam_permit.so\n",
    )
    assert any("not absolute" in p for p in doctor.check_pam("sshd", stack, lambda _p: None))
    hook = tmp_path / "otpgate-pam-hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o666)
    assert "writable by group or others" in (doctor.root_owned_chain(str(hook)) or "")
    hook.chmod(0o755)
    assert doctor.root_owned_chain(str(hook)) is None  # /tmp is sticky: allowed
    os.chown(hook, 4242, 4242)
    assert "is not owned by root" in (doctor.root_owned_chain(str(hook)) or "")


# -- the gate files ---------------------------------------------------------------------


def _gate_stack(tmp_path: Path, flow: str = "password") -> tuple[list[doctor.PamLine], Path]:
    """The shipped stack wired as `setup ssh --hook-options socket=...` wires it to a
    daemon whose runtime directory is tmp_path/run; that directory's gate, made as
    otpgated makes it."""
    run = tmp_path / "run"
    gate = run / "gate"
    gate.mkdir(parents=True, mode=0o700)
    for name in doctor.GATE_FILES:
        (gate / name).write_text("")
        (gate / name).chmod(0o600)
    name = f"otpgate-ssh-{flow}"
    (tmp_path / name).write_text(ssh_setup.render_pam(name, HOOK, f"socket={run}/pam.sock"))
    return _write_stack(tmp_path, f"@include {name}\n"), gate


def test_the_gate_files_the_daemon_keeps_are_clean(tmp_path: Path) -> None:
    stack, gate = _gate_stack(tmp_path)
    assert set(doctor.hook_sockets(stack)) == {f"{gate.parent}/pam.sock"}
    assert doctor.gate_paths(stack) == [f"{gate}/ask", f"{gate}/networks.conf"]
    assert doctor.check_gate(stack, now=time.time()) == []
    # The stacks without a gate (prompt always, single prompt) have nothing to check.
    for flow in ("password-always", "single-prompt"):
        assert doctor.gate_paths(_gate_stack(tmp_path / flow, flow)[0]) == []


COST = ": logins still need their code, but each runs the hook twice"


@pytest.mark.parametrize(
    ("spoil", "trouble"),
    [
        (lambda g: (g / "ask").unlink(), "{g}/ask is missing"),
        (lambda g: (g / "ask").chmod(0o644),
         "{g}/ask is not root's alone (owner uid 0, mode 0644)"),
        (lambda g: os.chown(g / "networks.conf", 4242, 0),
         "{g}/networks.conf is not root's alone (owner uid 4242, mode 0600)"),
        (lambda g: ((g / "ask").unlink(), (g / "ask").symlink_to(g / "networks.conf")),
         "{g}/ask is not a regular file"),
        (lambda g: ((g / "ask").unlink(), (g / "ask").mkdir(mode=0o700)),
         "{g}/ask is not a regular file"),
        (lambda g: os.utime(g / "ask", (time.time() - 601, time.time() - 601)),
         "{g}/ask was last written 10 min ago (otpgated rewrites it every 30 s: is the daemon "
         "the hook asks running?)"),
        (lambda g: g.chmod(0o755), "{g} is not root's alone (owner uid 0, mode 0755)"),
        (lambda g: shutil.rmtree(g), "{g} is missing"),
    ],
)  # fmt: skip
def test_gate_files_that_would_not_spare_the_check_are_reported(
    tmp_path: Path, spoil: Callable[[Path], object], trouble: str
) -> None:
    stack, gate = _gate_stack(tmp_path)
    spoil(gate)
    problems = doctor.check_gate(stack, now=time.time())
    assert len(problems) == 1, problems
    assert problems[0].startswith("gate: " + trouble.format(g=gate)) and problems[0].endswith(COST)


def test_a_gate_only_root_may_look_into_is_said_so_to_another_uid() -> None:
    # As under /run: the runtime directory is searchable by all, its gate root's alone.
    top = Path(tempfile.mkdtemp(prefix="otpgate-doctor-"))
    try:
        top.chmod(0o755)
        stack, gate = _gate_stack(top)
        gate.parent.chmod(0o755)
        os.seteuid(65534)
        try:
            refused = doctor.check_gate(stack, now=time.time())
        finally:
            os.seteuid(0)
    finally:
        shutil.rmtree(top)
    # Its cost is unknown to that uid: not claimed.
    assert refused == [
        f"gate: {gate}/ask cannot be checked as uid 65534: run otpgate doctor as root",
        f"gate: {gate}/networks.conf cannot be checked as uid 65534: run otpgate doctor as root",
    ]


def test_gate_files_beside_another_socket_are_reported(tmp_path: Path) -> None:
    stack, gate = _gate_stack(tmp_path)
    moved = [
        dataclasses.replace(
            line,
            args=tuple(a.replace(f"{gate.parent}/pam.sock", "/other/pam.sock") for a in line.args),
        )
        for line in stack
    ]
    assert set(doctor.hook_sockets(moved)) == {"/other/pam.sock"}
    assert doctor.check_gate(moved, now=time.time()) == [
        f"gate: the stack reads files in {gate}, but its hook asks /other/pam.sock, whose "
        f"daemon writes them in /other/gate (otpgate setup ssh rewrites the gate lines){COST}"
    ]
    # Other spellings of the same place are the same place.
    for spelling in (f"{gate.parent}//pam.sock", f"{gate.parent}/./pam.sock"):
        respelled = [
            dataclasses.replace(
                line,
                args=tuple(a.replace(f"{gate.parent}/pam.sock", spelling) for a in line.args),
            )
            for line in stack
        ]
        assert doctor.check_gate(respelled, now=time.time()) == []
    # No socket= at all: the hook's default.
    bare = [
        dataclasses.replace(line, args=tuple(a for a in line.args if not a.startswith("socket=")))
        for line in stack
    ]
    assert set(doctor.hook_sockets(bare)) == {"/run/otpgate/pam.sock"}


# -- the access policy ------------------------------------------------------------------

# root and two admins in sudo (alice by listing, bob by primary group), carol and dave.
DIRECTORY = doctor.Directory(
    accounts=(
        ("root", 0, 0), ("alice", 1000, 1000), ("bob", 1001, 27), ("carol", 1002, 1002),
        ("dave", 1003, 100), ("nobody", 65534, 65534),
    ),
    groups={
        "root": (0, ()), "sudo": (27, ("alice",)), "users": (100, ("alice", "carol")),
        "staff": (50, ("alice", "carol", "dave")), "ops": (2000, ("carol",)),
        "admins": (2001, ("alice", "root")),
    },
)  # fmt: skip
ADMINS = ["alice", "bob", "root"]


def _policy(**given: object) -> list[str]:
    args: dict[str, object] = {
        "ssh_on": True,
        "required": False,
        "exempt_networks": (),
        "exempt_groups": (),
        "required_groups": (),
        "deadline": "",
        "enrolled": (),
        "admins": ADMINS,
        "directory": DIRECTORY,
    }
    return doctor.check_policy(**(args | given))  # type: ignore[arg-type]


def test_a_plain_policy_has_no_problem() -> None:
    assert _policy() == []
    assert _policy(exempt_networks=["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]) == []
    assert (
        _policy(exempt_groups=["ops"], required_groups=["admins"], enrolled=["alice", "root"]) == []
    )
    assert _policy(required=True, deadline="2027-01-31") == []


@pytest.mark.parametrize(
    ("network", "why"),
    [
        ("0.0.0.0/0", "0.0.0.0/0 holds every IPv4 address: no login over it is asked"),
        ("::/0", "::/0 holds every IPv6 address: no login over it is asked"),
        ("::ffff:0.0.0.0/96", "::ffff:0.0.0.0/96 holds every IPv4 address"),
        ("0.0.0.0/1", "0.0.0.0/1 is very wide (/1): it holds much of the Internet"),
        ("128.0.0.0/7", "128.0.0.0/7 is very wide (/7)"),
        ("2000::/3", "2000::/3 is very wide (/3)"),
        ("::ffff:64.0.0.0/98", "::ffff:64.0.0.0/98 is very wide (/2)"),
    ],
)
def test_exempting_everyone_by_network_is_reported(network: str, why: str) -> None:
    problems = _policy(exempt_networks=["10.0.0.0/8", network], ssh_on=False)
    assert len(problems) == 1 and problems[0].startswith(f"policy: exempt_networks: {why}")


def test_exempting_most_accounts_by_group_is_reported() -> None:
    # users: a catch-all by name; staff: 3 of the 4 people (uid 1000 and up, not nobody).
    problems = _policy(exempt_groups=["users", "staff", "ops"], ssh_on=False)
    assert problems == [
        "policy: exempt_groups: users holds most accounts (3 of 4 with uid 1000 or more): none "
        "of them is asked for a code",
        "policy: exempt_groups: staff holds most accounts (3 of 4 with uid 1000 or more): none "
        "of them is asked for a code",
    ]


def test_groups_that_do_not_exist_are_reported() -> None:
    problems = _policy(exempt_groups=["opps"], required_groups=["admns"], ssh_on=False)
    assert problems == [
        "policy: exempt_groups: no group opps here: the rule matches nobody (a directory group "
        "NSS cannot list is still matched at login)",
        "policy: required_groups: no group admns here: the rule matches nobody (a directory "
        "group NSS cannot list is still matched at login)",
    ]


def test_a_deadline_without_required_is_reported() -> None:
    assert _policy(deadline="2027-01-31") == [
        "policy: enrollment_deadline 2027-01-31 does nothing while enrollment_policy is optional"
    ]


def test_required_groups_that_refuse_administrators_are_reported() -> None:
    # Every admin in sudo (alice, bob) lacks a secret; root is enrolled but not in sudo.
    assert _policy(required_groups=["sudo"], enrolled=["root"]) == [
        "policy: required_groups: sudo: administrators alice, bob have no secret: their SSH "
        "logins are refused, from anywhere (otpgate renew-secret USER, then otpgate confirm "
        "USER CODE)"
    ]
    # admins holds alice and root: with bob out of it, not every administrator.
    assert "(every administrator)" not in _policy(required_groups=["admins"])[0]
    everyone = doctor.Directory(DIRECTORY.accounts, DIRECTORY.groups | {"all": (9, ("bob",))})
    (problem,) = _policy(required_groups=["all", "admins"], directory=everyone)[:1]
    assert "administrator bob has no secret" in problem
    assert "alice, root have no secret" in _policy(required_groups=["admins"])[0]
    all_admins = {"all": (9, tuple(ADMINS))}
    everyone = doctor.Directory(DIRECTORY.accounts, DIRECTORY.groups | all_admins)
    (problem,) = _policy(required_groups=["all"], directory=everyone)
    assert "alice, bob, root have no secret (every administrator)" in problem
    # Members who are not administrators: said too, as they are refused as well.
    assert _policy(required_groups=["ops"]) == [
        "policy: required_groups: ops: carol has no secret: their SSH logins are refused "
        "(otpgate renew-secret USER)"
    ]
    assert _policy(required_groups=["ops"], enrolled=["carol"]) == []
    assert _policy(required_groups=["sudo"], ssh_on=False) == []  # 2FA off for SSH: none


def test_long_lists_of_names_are_cut() -> None:
    many = doctor.Directory(
        tuple((f"u{i:02}", 1000 + i, 1000 + i) for i in range(25)),
        {"big": (5000, tuple(f"u{i:02}" for i in range(25)))},
    )
    (problem,) = _policy(required_groups=["big"], directory=many, admins=["root"])
    assert "u00, u01, u02, u03, u04, u05, u06, u07, u08, u09 and 15 more have no secret" in problem
