"""The access policy through the CLI against a real otpgated: `update` of the four
keys (and its refusals, which change nothing), `config`, `user show [--from]`, and
`doctor`'s warnings. Groups are made for the test and removed after it."""

# ruff: noqa: F811 - `paths` is a fixture imported from tests.ssh.test_setup
from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from otpgate.ssh import setup as ssh_setup
from tests.cli.test_cli import cli, config, daemon_config, ok, renew, run_many, set_config
from tests.cli.test_setup_doctor import doctor_args
from tests.conftest import Daemon, LocalUser
from tests.ssh.test_setup import paths  # noqa: F401 - the private pam.d/sshd copy, a fixture

POLICY_KEYS = ("exempt_networks", "exempt_groups", "required_groups", "enrollment_policy",
               "enrollment_deadline")  # fmt: skip


@pytest.fixture
def make_group() -> Iterator[Callable[..., str]]:
    """Create real local groups (removed afterwards), with these users as members."""
    made: list[str] = []

    def make(*members: str) -> str:
        name = f"ogtg{secrets.token_hex(4)}"
        subprocess.run(["groupadd", name], check=True)
        made.append(name)
        for member in members:
            subprocess.run(["usermod", "-aG", name, member], check=True)
        return name

    yield make
    for name in made:
        subprocess.run(["groupdel", "-f", name], capture_output=True)


def policy_of(daemon: Daemon) -> dict[str, Any]:
    return {key: value for key, value in daemon_config(daemon).items() if key in POLICY_KEYS}


def shown(daemon: Daemon, user: str, *extra: str) -> dict[str, str]:
    lines = ok(daemon, "user", "show", user, *extra).splitlines()
    return {line[:25].rstrip(): line[27:] for line in lines}


def access_json(daemon: Daemon, user: str, *extra: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok(daemon, "user", "show", user, "--json", *extra))
    access: dict[str, Any] = data["access"]
    return access


# -- update and config ----------------------------------------------------------------------


def test_update_sets_shows_and_clears_the_policy(daemon: Daemon) -> None:
    set_config(
        daemon,
        "exempt_networks=10.0.0.0/8,2001:DB8::/32, 192.0.2.7",
        "exempt_groups=ops,svc",
        "required_groups=admins",
        "enrollment_deadline=2027-01-31",
    )
    expected = {
        "exempt_networks": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"],
        "exempt_groups": ["ops", "svc"],
        "required_groups": ["admins"],
        "enrollment_deadline": "2027-01-31",
    }
    assert {k: v for k, v in config(daemon).items() if k in expected} == expected
    assert {k: v for k, v in daemon_config(daemon).items() if k in expected} == expected
    lines = ok(daemon, "config").splitlines()[-4:]
    assert lines == [
        "exempt_networks      10.0.0.0/8,2001:db8::/32,192.0.2.7/32",
        "exempt_groups        ops,svc",
        "required_groups      admins",
        "enrollment_deadline  2027-01-31 (end of the day, UTC)",
    ]
    # --json on update prints the new settings; one list changes, the others stay.
    updated = json.loads(ok(daemon, "update", "exempt_groups=ops", "--json"))
    assert updated["exempt_groups"] == ["ops"] and updated["required_groups"] == ["admins"]
    # KEY= clears.
    set_config(daemon, "exempt_networks=", "exempt_groups=", "required_groups=",
               "enrollment_deadline=")  # fmt: skip
    cleared = {"exempt_networks": [], "exempt_groups": [], "required_groups": []}
    assert {k: v for k, v in config(daemon).items() if k in expected} == cleared | {
        "enrollment_deadline": ""
    }
    assert ok(daemon, "config").splitlines()[-4:] == [
        "exempt_networks      none",
        "exempt_groups        none",
        "required_groups      none",
        "enrollment_deadline  none",
    ]


BAD_POLICY_UPDATES: list[tuple[list[str], str]] = [
    (["exempt_networks=10.0.0.5/8"],
     "exempt_networks: '10.0.0.5/8' has host bits set: write 10.0.0.0/8 for the network, or "
     "10.0.0.5 for the one host"),
    (["exempt_networks=10.0.0.0/8,bastion.example.org"],
     "exempt_networks: 'bastion.example.org' is not a network (CIDR, e.g. 10.0.0.0/8 or "
     "2001:db8::/32)"),
    (["exempt_networks=10.0.0.0/33"],
     "exempt_networks: '10.0.0.0/33' is not a network (CIDR, e.g. 10.0.0.0/8 or 2001:db8::/32)"),
    (["exempt_networks=10.0.0.0/8,"],
     "exempt_networks: an empty entry in '10.0.0.0/8,': separate entries with one comma, or "
     "KEY= to clear"),
    (["exempt_networks=" + ",".join(f"10.0.{i}.0/24" for i in range(257))],
     "exempt_networks: at most 256 entries (got 257)"),
    (["exempt_groups=-ops"],
     "exempt_groups: '-ops' is not a group name: must be 1 to 256 characters: letters, digits "
     "and _ . @ \\ - (not starting with . @ \\ or -)"),
    (["required_groups=adm ins"], "required_groups: 'adm ins' is not a group name: must be 1 to "
     "256 characters: letters, digits and _ . @ \\ - (not starting with . @ \\ or -)"),
    (["exempt_groups=ops,admins", "required_groups=admins"],
     "exempt_groups: admins is also in required_groups: a group is either exempt or required, "
     "never both"),
    # Against what is stored: the baseline's required_groups holds "wheel".
    (["exempt_groups=wheel"],
     "exempt_groups: wheel is also in required_groups: a group is either exempt or required, "
     "never both"),
    (["enrollment_deadline=2027-02-30"],
     "enrollment_deadline: must be a date YYYY-MM-DD, or empty to clear it (got '2027-02-30')"),
    (["enrollment_deadline=31.01.2027"],
     "enrollment_deadline: must be a date YYYY-MM-DD, or empty to clear it (got '31.01.2027')"),
    (["enrollment_deadline=1969-12-31"],
     "enrollment_deadline: must be 1970-01-01 or later (got '1969-12-31')"),
    # Mixed: all valid but one; none applied.
    (["exempt_networks=192.0.2.0/24", "exempt_groups=x", "enrollment_deadline=soon"],
     "enrollment_deadline: must be a date YYYY-MM-DD, or empty to clear it (got 'soon')"),
    (["enrollment_deadline=2030-01-01", "exempt_networks=::/129"],
     "exempt_networks: '::/129' is not a network (CIDR, e.g. 10.0.0.0/8 or 2001:db8::/32)"),
    (["exempt_groups=a", "exempt_groups=b"], "exempt_groups: given twice"),
]  # fmt: skip


def test_refused_policy_updates_change_nothing(daemon: Daemon) -> None:
    set_config(daemon, "exempt_networks=10.0.0.0/8", "exempt_groups=ops",
               "required_groups=wheel", "enrollment_deadline=2027-01-31",
               "enrollment_policy=required")  # fmt: skip
    before = daemon_config(daemon)
    results = run_many([["update", *args] for args, _ in BAD_POLICY_UPDATES], daemon.admin_socket)
    failures = [
        (args, result.returncode, result.stdout, result.stderr)
        for (args, message), result in zip(BAD_POLICY_UPDATES, results, strict=True)
        if (result.returncode, result.stdout, result.stderr)
        != (2, "", f"InvalidArgument: {message}\n")
    ]
    assert failures == []
    assert daemon_config(daemon) == before


# -- user show: the explanation -------------------------------------------------------------


def test_user_show_explains_networks(daemon: Daemon, user: LocalUser) -> None:
    set_config(
        daemon, "enabled=true", "services.ssh=true", "exempt_networks=10.0.0.0/8,2001:db8::/32"
    )
    assert shown(daemon, user.name)["access"] == (
        "would be asked for a code from an address outside exempt_networks: no, not enrolled "
        "(enrollment_policy=optional)"
    )
    renew(daemon, user.name)
    lines = shown(daemon, user.name)
    assert lines["access"] == (
        "would be asked for a code from an address outside exempt_networks: yes, enrolled"
    )
    assert lines["access_groups"] == "in no exempt or required group"
    for address, answer in [
        ("10.0.0.5", "no, exempt network 10.0.0.0/8"),
        ("::ffff:10.0.0.5", "no, exempt network 10.0.0.0/8"),
        ("2001:db8::7", "no, exempt network 2001:db8::/32"),
        ("11.0.0.5", "yes, enrolled"),
    ]:
        assert shown(daemon, user.name, "--from", address)["access"] == (
            f"would be asked for a code from {address}: {answer}"
        )
    assert shown(daemon, user.name, "--from", "bastion.example.org")["access"] == (
        "would be asked for a code from bastion.example.org (not an IP address: never exempt): "
        "yes, enrolled"
    )
    access = access_json(daemon, user.name, "--from", "10.1.2.3")
    assert access == {
        "asked": False,
        "refused": False,
        "reason": "exempt_network",
        "matched": "10.0.0.0/8",
        "grace_until": 0,
        "overridden": [],
        "explanation": "would be asked for a code from 10.1.2.3: no, exempt network 10.0.0.0/8",
        "exempt_groups": [],
        "required_groups": [],
    }
    # 2FA off for SSH: nothing is asked, whatever the lists say.
    set_config(daemon, "services.ssh=false")
    assert shown(daemon, user.name, "--from", "11.0.0.5")["access"] == (
        "would be asked for a code from 11.0.0.5: no, 2FA is off for this service "
        "(services.ssh=false)"
    )


def test_user_show_explains_groups_and_their_precedence(
    daemon: Daemon, make_user: Callable[..., LocalUser], make_group: Callable[..., str]
) -> None:
    admin, operator, plain = make_user(), make_user(), make_user()
    required = make_group(admin.name)
    exempt = make_group(admin.name, operator.name)
    set_config(daemon, "enabled=true", "services.ssh=true", "exempt_networks=10.0.0.0/8",
               f"exempt_groups={exempt}", f"required_groups={required}")  # fmt: skip
    lines = shown(daemon, admin.name, "--from", "10.0.0.5")
    assert lines["access"] == (
        f"would be asked for a code from 10.0.0.5: yes, required group {required} (overrides "
        f"exempt group {exempt} and exempt network 10.0.0.0/8), and refused: no secret set up"
    )
    assert lines["access_groups"] == (
        f"required group {required}: always asked; exempt group {exempt} (overridden)"
    )
    access = access_json(daemon, admin.name)
    assert (access["reason"], access["asked"], access["refused"]) == ("required_group", True, True)
    assert (access["required_groups"], access["exempt_groups"]) == ([required], [exempt])
    renew(daemon, admin.name)
    assert access_json(daemon, admin.name, "--from", "10.0.0.5")["refused"] is False
    lines = shown(daemon, operator.name)
    assert lines["access"] == (
        "would be asked for a code from an address outside exempt_networks: no, exempt group "
        + exempt
    )
    assert lines["access_groups"] == f"exempt group {exempt}"
    assert shown(daemon, plain.name, "--from", "10.0.0.5")["access"].endswith(
        "no, exempt network 10.0.0.0/8"
    )
    assert shown(daemon, plain.name)["access_groups"] == "in no exempt or required group"


def test_user_show_explains_the_deadline(daemon: Daemon, user: LocalUser) -> None:
    set_config(daemon, "enabled=true", "services.ssh=true", "enrollment_policy=required",
               "enrollment_deadline=2999-12-31")  # fmt: skip
    access = access_json(daemon, user.name)
    assert (access["reason"], access["asked"], access["grace_until"]) == (
        "enrollment_grace",
        False,
        32503680000,  # 3000-01-01T00:00:00Z: the end of 2999-12-31
    )
    assert shown(daemon, user.name)["access"] == (
        "would be asked for a code from anywhere: no, not enrolled, enrollment grace until the "
        "end of 2999-12-31 (UTC): the first factor alone, with the enrollment hint"
    )
    set_config(daemon, "enrollment_deadline=2020-01-31")
    assert shown(daemon, user.name)["access"] == (
        "would be asked for a code from anywhere: yes, not enrolled (enrollment_policy=required, "
        "enrollment_deadline 2020-01-31 passed), and refused until enrolled"
    )


def test_user_show_from_is_checked(daemon: Daemon, user: LocalUser) -> None:
    result = cli(daemon, "user", "show", user.name, "--from", "")
    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        "InvalidArgument: --from: must not be empty (leave it out for an address no exempt "
        "network holds)\n",
    )
    result = cli(daemon, "user", "show", user.name, "--from", "10.0.0.1\x1b[2J")
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.startswith("InvalidArgument: rhost: must be at most 256 printable")


# -- doctor ---------------------------------------------------------------------------------


def policy_problems(daemon: Daemon, paths: ssh_setup.Paths) -> list[str]:
    result = cli(daemon, *doctor_args(paths, "--json"))
    assert result.stderr == "", result
    report = json.loads(result.stdout)
    return [p["message"] for p in report["problems"] if p["area"] == "policy"]


def test_doctor_warns_about_policies_that_exempt_everyone_or_refuse_admins(
    daemon: Daemon,
    paths: ssh_setup.Paths,
    user: LocalUser,
    make_group: Callable[..., str],
) -> None:
    assert policy_problems(daemon, paths) == []
    set_config(daemon, "exempt_networks=10.0.0.0/8,0.0.0.0/0,::/0,2000::/3",
               "enrollment_deadline=2027-01-31")  # fmt: skip
    assert policy_problems(daemon, paths) == [
        "exempt_networks: 0.0.0.0/0 holds every IPv4 address: no login over it is asked",
        "exempt_networks: ::/0 holds every IPv6 address: no login over it is asked",
        "exempt_networks: 2000::/3 is very wide (/3): it holds much of the Internet",
        "enrollment_deadline 2027-01-31 does nothing while enrollment_policy is optional",
    ]
    group = make_group(user.name)
    set_config(daemon, "exempt_networks=", "enrollment_deadline=", "exempt_groups=users",
               f"required_groups={group},nosuchotpgategroup")  # fmt: skip
    problems = policy_problems(daemon, paths)
    assert problems[0].startswith("exempt_groups: users holds most accounts (")
    assert problems[1:] == [
        "required_groups: no group nosuchotpgategroup here: the rule matches nobody (a "
        "directory group NSS cannot list is still matched at login)"
    ]
    # Once 2FA is on for SSH: the group's members without a secret are refused.
    set_config(daemon, "enabled=true", "services.ssh=true", "exempt_groups=")
    assert (
        f"required_groups: {group}: {user.name} has no secret: their SSH logins are refused "
        "(otpgate renew-secret USER)"
    ) in policy_problems(daemon, paths)
    renew(daemon, user.name)
    assert not any(
        p.startswith(f"required_groups: {group}:") for p in policy_problems(daemon, paths)
    )
    # The root group holds root (by primary group), an administrator, who has no secret.
    set_config(daemon, "required_groups=root")
    (root_problem,) = [p for p in policy_problems(daemon, paths) if "required_groups" in p]
    assert root_problem.startswith("required_groups: root: administrator")
    assert "root" in root_problem.split(" have ")[0].split(" has ")[0]
    assert "their SSH logins are refused, from anywhere" in root_problem
