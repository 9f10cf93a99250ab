"""`otpgate setup ssh` and `otpgate doctor` through the CLI: --dry-run's diff, --json,
and their messages. The files are a private copy (pam.d, sshd_config) under tmp_path;
sshd is the system binary under a unique name, never reloaded."""

# ruff: noqa: F811 - `paths` is a fixture imported from tests.ssh.test_setup
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from otpgate.ssh import setup as ssh_setup
from tests.cli.test_cli import cli, run
from tests.conftest import REPO, Daemon
from tests.ssh.test_setup import paths  # noqa: F401 - the private pam.d/sshd copy, a fixture

HOOK = str(REPO / "pam_hook" / "otpgate-pam-hook")


def setup_args(paths: ssh_setup.Paths, *extra: str) -> list[str]:
    return [
        "setup", "ssh", "--hook", HOOK, "--no-reload", "--sshd", paths.sshd,
        "--sshd-config", paths.sshd_config, "--sshd-config-dir", paths.sshd_config_dir,
        "--pam-dir", paths.pam_dir, "--backup-dir", paths.backup_dir, *extra,
    ]  # fmt: skip


def doctor_args(paths: ssh_setup.Paths, *extra: str) -> list[str]:
    return ["doctor", "--sshd", paths.sshd, "--sshd-config", paths.sshd_config,
            "--pam-dir", paths.pam_dir, *extra]  # fmt: skip


def files(paths: ssh_setup.Paths) -> dict[str, str]:
    found = {}
    for directory in (paths.pam_dir, paths.sshd_config_dir):
        for name in sorted(os.listdir(directory)):
            found[os.path.join(directory, name)] = Path(directory, name).read_text()
    return found


def diff(path: str, old: str | None, new: str | None) -> str:
    """What `diff -u` shows, computed here from the files themselves."""
    return "".join(
        difflib.unified_diff(
            (old or "").splitlines(keepends=True),
            (new or "").splitlines(keepends=True),
            path if old is not None else "/dev/null",
            path if new is not None else "/dev/null",
        )
    )


def test_dry_run_shows_the_diff_of_what_a_real_run_writes(
    daemon: Daemon, paths: ssh_setup.Paths
) -> None:
    before = files(paths)
    dry = cli(daemon, *setup_args(paths, "--flow", "password", "--dry-run"))
    assert (dry.returncode, dry.stderr) == (0, ""), dry
    assert files(paths) == before  # nothing changed
    dry_json = cli(daemon, *setup_args(paths, "--flow", "password", "--dry-run", "--json"))
    assert (dry_json.returncode, dry_json.stderr) == (0, ""), dry_json
    planned: dict[str, Any] = json.loads(dry_json.stdout)
    assert (planned["dry_run"], planned["reloaded"]) == (True, None)
    snippet = os.path.join(paths.pam_dir, "otpgate-ssh-password")
    assert [(c["action"], c["path"]) for c in planned["changes"]] == [
        ("write", snippet), ("write", paths.pam_file), ("write", paths.dropin),
    ]  # fmt: skip

    real = cli(daemon, *setup_args(paths, "--flow", "password", "--json"))
    assert (real.returncode, real.stderr) == (0, ""), real
    done: dict[str, Any] = json.loads(real.stdout)
    assert (done["dry_run"], done["reloaded"]) == (False, "sshd not reloaded (--no-reload)")
    after = files(paths)
    # The dry run's diffs are exactly today's files against what the real run wrote.
    for change in planned["changes"]:
        expected = diff(change["path"], before.get(change["path"]), after[change["path"]])
        assert change["diff"] == expected != ""
    assert done["changes"] == planned["changes"]
    # The text form: each file, then its diff.
    expected_text = "dry run, nothing changed:\n" + "".join(
        f"write {c['path']}\n{c['diff']}" for c in planned["changes"]
    )
    assert dry.stdout == expected_text
    assert "-@include common-auth\n+# @include common-auth" in dry.stdout
    assert f"--- /dev/null\n+++ {snippet}\n" in dry.stdout

    # Again: nothing left to write, and it says so.
    again = cli(daemon, *setup_args(paths, "--flow", "password", "--dry-run"))
    assert again.stdout == "dry run, nothing changed:\n" + "".join(
        f"write {c['path']} (no change)\n" for c in planned["changes"]
    )
    # --undo --dry-run and --undo, as JSON; --undo needs no daemon.
    undo_plan = json.loads(cli(daemon, *setup_args(paths, "--undo", "--dry-run", "--json")).stdout)
    assert {(c["action"], c["path"]) for c in undo_plan["changes"]} == {
        ("remove", snippet), ("restore", paths.pam_file), ("remove", paths.dropin),
    }  # fmt: skip
    undone = run(*setup_args(paths, "--undo", "--json"), "--socket", "/nonexistent/admin.sock")
    assert (undone.returncode, undone.stderr) == (0, ""), undone
    assert json.loads(undone.stdout)["changes"] == undo_plan["changes"]
    assert {p: t for p, t in files(paths).items() if p != snippet} == before


def test_unreachable_daemon_message_has_no_nested_parentheses(paths: ssh_setup.Paths) -> None:
    result = run(*setup_args(paths, "--flow", "password"), "--socket", "/nonexistent/admin.sock")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "FailedPrecondition: otpgated is not reachable: no otpgated socket at "
        "/nonexistent/admin.sock: is otpgated running? (--socket or OTPGATE_SOCKET name another "
        "socket); with fail=secure every login would be refused; fix that first, or pass "
        "--force\n"
    )
    depth = deepest = 0
    for ch in result.stderr:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        deepest = max(deepest, depth)
    assert deepest == 1


def test_doctor_json(daemon: Daemon, paths: ssh_setup.Paths) -> None:
    broken = cli(daemon, *doctor_args(paths, "--json"))
    assert (broken.returncode, broken.stderr) == (1, ""), broken
    report: dict[str, Any] = json.loads(broken.stdout)
    assert (report["ok"], report["flow"]) == (False, None)
    assert {p["area"] for p in report["problems"]} == {"sshd", "pam"}
    assert {
        "area": "pam",
        "message": f"service {os.path.basename(paths.sshd)} never runs otpgate-pam-hook: "
        "no code is ever asked",
    } in report["problems"]
    # The text form is the same problems, one line each.
    text = cli(daemon, *doctor_args(paths))
    assert text.returncode == 1
    assert text.stdout == "".join(f"{p['area']}: {p['message']}\n" for p in report["problems"])

    # Wired to another daemon's socket: the hook would ask nobody, and the gate files
    # beside that socket are not there.
    elsewhere = str(Path(daemon.root, "elsewhere", "pam.sock"))
    wired = cli(daemon, *setup_args(paths, "--flow", "publickey", "--hook-options",
                                    f"socket={elsewhere}"))  # fmt: skip
    assert wired.returncode == 0, wired
    astray = json.loads(cli(daemon, *doctor_args(paths, "--json")).stdout)
    pam_socket = daemon.socket("pam")
    assert astray["problems"] == [
        {"area": "pam", "message": f"the hook asks {elsewhere}, but the otpgated at "
         f"{daemon.admin_socket} listens at {pam_socket}: logins are decided by another "
         "daemon, or refused when none answers (otpgate setup ssh --hook-options "
         f"socket={pam_socket}, with the line's other options)"},
        {"area": "gate", "message": f"{os.path.dirname(elsewhere)}/gate is missing (otpgated "
         "writes it at start: is that daemon running? its log says gate_files_not_written "
         "when it cannot): logins still need their code, but each runs the hook twice"},
    ]  # fmt: skip

    # Wired to this daemon: its gate files, which it keeps, are what the stack reads.
    wired = cli(daemon, *setup_args(paths, "--flow", "publickey", "--hook-options",
                                    f"socket={pam_socket}"))  # fmt: skip
    assert wired.returncode == 0, wired
    clean = cli(daemon, *doctor_args(paths, "--json"))
    assert (clean.returncode, clean.stderr) == (0, ""), clean
    assert json.loads(clean.stdout) == {"ok": True, "flow": "publickey", "problems": []}
    assert cli(daemon, *doctor_args(paths)).stdout == "ok: no problems found (flow: publickey)\n"
    # A daemon that is not there is one more problem, not an error.
    daemon.stop()
    down = json.loads(cli(daemon, *doctor_args(paths, "--json")).stdout)
    assert [p["area"] for p in down["problems"]] == ["daemon", "daemon"]
    assert down["problems"][1]["message"].startswith("not reachable: ")
