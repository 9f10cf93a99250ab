"""`otpgate` run as an ordinary user: user.sock, the login, and what the CLI says.

Each command runs as a real local user (runuser) against a real otpgated that checks
passwords through PAM; codes come from oathtool.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.cli.test_cli import cli, oathtool, ok, renew, secret_of, wrong_code
from tests.conftest import RUNUSER, Daemon, LocalUser

Python = tuple[str, dict[str, str]]
NOT_ACCEPTED = "wrong, or already used (wait for the next code)"
ADMINS = "root or a member of the group root"  # the test daemons' admin group


def as_user(
    python: Python,
    user: LocalUser,
    daemon: Daemon,
    *args: str,
    stdin: str = "",
    password_stdin: bool = True,
) -> subprocess.CompletedProcess[str]:
    """The CLI as `user`, in a session of its own: no controlling terminal."""
    executable, env = python
    extra = ["--password-stdin"] if password_stdin else []
    return subprocess.run(
        [RUNUSER, "-u", user.name, "--", executable, "-m", "otpgate.cli.main",
         "--socket", daemon.admin_socket, *extra, *args],
        input=stdin, capture_output=True, text=True, timeout=60, cwd="/",
        env={"PATH": "/usr/bin:/bin", **env}, start_new_session=True,
    )  # fmt: skip


def one_line(result: subprocess.CompletedProcess[str], line: str, status: int = 2) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stdout, result.stderr) == (status, "", line + "\n")


@pytest.fixture
def enrolled(public_login_daemon: Daemon, user: LocalUser) -> str:
    """`user` enrolled by an admin, window 1 (a code read just before a step boundary
    still counts); its secret."""
    ok(public_login_daemon, "update", "window=1")
    return secret_of(renew(public_login_daemon, user.name))


def test_no_terminal_is_one_line(
    public_login_daemon: Daemon, user: LocalUser, cli_python: Python
) -> None:
    result = as_user(cli_python, user, public_login_daemon, "user", "show", password_stdin=False)
    one_line(
        result, "ClientError: no terminal to ask for the password or code: use --password-stdin"
    )


def test_wrong_and_replayed_codes_say_so(
    public_login_daemon: Daemon, user: LocalUser, cli_python: Python, enrolled: str
) -> None:
    daemon = public_login_daemon
    refused = f"Unauthenticated: login failed: the code was not accepted: {NOT_ACCEPTED}"
    wrong = as_user(cli_python, user, daemon, "user", "show",
                    stdin=f"{user.password}\n{wrong_code(enrolled)}\n")  # fmt: skip
    one_line(wrong, refused)
    code = oathtool(enrolled)
    shown = as_user(cli_python, user, daemon, "user", "show", stdin=f"{user.password}\n{code}\n")
    assert shown.returncode == 0, shown.stderr
    replayed = as_user(cli_python, user, daemon, "user", "show",
                       stdin=f"{user.password}\n{code}\n")  # fmt: skip
    one_line(replayed, refused)
    # Three refused codes end the attempt; the message says the account may be locked.
    codes = "".join(f"{wrong_code(enrolled)}\n" for _ in range(3))
    three = as_user(cli_python, user, daemon, "user", "show", stdin=f"{user.password}\n{codes}")
    one_line(
        three,
        "Unauthenticated: login failed: 3 codes not accepted (wrong, or already used); "
        "too many wrong codes lock the account",
    )


def test_locked_account_says_so(
    public_login_daemon: Daemon, user: LocalUser, cli_python: Python, enrolled: str
) -> None:
    daemon = public_login_daemon
    ok(daemon, "update", "lockout_threshold=1")
    # The first wrong code locks it: the second try is refused without a look at the code.
    answers = f"{user.password}\n{wrong_code(enrolled)}\n{oathtool(enrolled)}\n"
    locked = as_user(cli_python, user, daemon, "user", "show", stdin=answers)
    assert locked.returncode == 2 and "Traceback" not in locked.stderr
    assert locked.stderr.startswith(
        "Unauthenticated: login failed: the account is locked after too many wrong codes"
    ), locked.stderr
    # Now the password itself is refused as if wrong (otpgated answers both alike).
    again = as_user(cli_python, user, daemon, "user", "show", stdin=f"{user.password}\n")
    one_line(
        again,
        f"Unauthenticated: login failed: wrong password for {user.name}, or the account is "
        "locked after too many wrong codes",
    )


def test_throttled_password_says_so(
    public_login_daemon: Daemon, user: LocalUser, cli_python: Python
) -> None:
    daemon = public_login_daemon
    wrong = as_user(cli_python, user, daemon, "user", "show", stdin="not-the-password\n")
    one_line(
        wrong,
        f"Unauthenticated: login failed: wrong password for {user.name}, or the account is "
        "locked after too many wrong codes",
    )
    # After a wrong password otpgated checks none of the account's for a while: 3 s
    # after the first, 6 s after a second in a row. Two, so that the next login's start
    # (runuser, Python, gRPC: slow on a loaded machine) surely lands inside the pause.
    time.sleep(3.2)
    again = as_user(cli_python, user, daemon, "user", "show", stdin="not-the-password\n")
    assert again.returncode == 2 and "wrong password" in again.stderr, again
    throttled = as_user(cli_python, user, daemon, "user", "show", stdin=f"{user.password}\n")
    assert throttled.returncode == 2, throttled
    assert re.fullmatch(
        rf"TooManyAttempts: too many wrong passwords for {user.name}: try again in \d+ s\n",
        throttled.stderr,
    ), throttled.stderr


def _converse(
    argv: list[str], env: dict[str, str], answers: list[tuple[str, str]]
) -> tuple[int, str]:
    """Run `argv` on a new terminal, answering each prompt (text, answer) in turn;
    (exit status, everything the terminal showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the new terminal is its controlling one
        os.execve(argv[0], argv, env)  # noqa: S606 - the test's own command
    shown, searched_to = "", 0
    pending = list(answers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode(errors="replace")
            except OSError:  # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        if pending and (at := shown.find(pending[0][0], searched_to)) >= 0:
            os.write(fd, pending.pop(0)[1].encode() + b"\n")
            searched_to = at + 1
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown.replace("\r\n", "\n")


def test_wrong_code_at_the_terminal_is_explained_and_asked_again(
    public_login_daemon: Daemon, user: LocalUser, cli_python: Python, enrolled: str
) -> None:
    executable, env = cli_python
    argv = [RUNUSER, "-u", user.name, "--", executable, "-m", "otpgate.cli.main",
            "--socket", public_login_daemon.admin_socket, "user", "show", "--json"]  # fmt: skip
    status, shown = _converse(
        argv,
        {"PATH": "/usr/bin:/bin", **env},
        [
            (f"Password for {user.name}: ", user.password),
            ("One-time code: ", wrong_code(enrolled)),
            ("One-time code: ", oathtool(enrolled)),
        ],
    )
    assert status == 0, shown
    assert f"otpgate: code not accepted: {NOT_ACCEPTED}; 2 tries left\n" in shown, shown
    assert shown.count("One-time code: ") == 2
    assert '"twofactor_auth_configured": true' in shown


def test_verify_uses_its_code_as_the_login_factor(
    public_login_daemon: Daemon, user: LocalUser, cli_python: Python, enrolled: str
) -> None:
    daemon = public_login_daemon
    code = oathtool(enrolled)
    # Only the password is read: the code given is the login's second factor.
    first = as_user(cli_python, user, daemon, "verify", code, stdin=f"{user.password}\n")
    assert (first.returncode, first.stdout, first.stderr) == (0, "true\n", "")
    # It was spent: an admin sees a replay, and says why.
    replay = cli(daemon, "verify", user.name, code)
    assert (replay.returncode, replay.stdout, replay.stderr) == (
        1, "false\n", "reason: replayed (already used; wait for the next code)\n",
    )  # fmt: skip
    again = as_user(cli_python, user, daemon, "verify", user.name, code,
                    stdin=f"{user.password}\n")  # fmt: skip
    assert (again.returncode, again.stdout, again.stderr) == (
        1, "false\n", f"reason: not accepted: {NOT_ACCEPTED}\n",
    )  # fmt: skip
    data = as_user(cli_python, user, daemon, "verify", "--json", wrong_code(enrolled),
                   stdin=f"{user.password}\n")  # fmt: skip
    assert data.returncode == 1, data.stderr
    assert json.loads(data.stdout) == {
        "valid": False, "result": "invalid_or_replayed", "locked_seconds": 0,
    }  # fmt: skip
    # A malformed code is refused before the login, where it would count as a wrong one.
    before = json.loads(ok(daemon, "user", "show", user.name, "--json"))["failed_attempts"]
    malformed = as_user(cli_python, user, daemon, "verify", "12ab", stdin=f"{user.password}\n")
    one_line(malformed, "InvalidArgument: token: must be 6 to 8 ASCII digits")
    after = json.loads(ok(daemon, "user", "show", user.name, "--json"))["failed_attempts"]
    assert after == before


def test_verify_of_an_account_without_a_secret(
    public_login_daemon: Daemon, user: LocalUser, cli_python: Python
) -> None:
    result = as_user(cli_python, user, public_login_daemon, "verify", "123456",
                     stdin=f"{user.password}\n")  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "false\n", "reason: not enrolled\n",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["config"], "config"),
        (["update", "enabled=true"], "update"),
        (["unset-secret", "root"], "unset-secret"),
        (["user", "list"], "user list"),
        (["doctor"], "doctor"),
        (["setup", "ssh", "--flow", "password", "--dry-run"], "setup ssh"),
    ],
)
def test_admin_commands_name_themselves_and_the_way_out(
    public_login_daemon: Daemon,
    user: LocalUser,
    cli_python: Python,
    args: list[str],
    command: str,
) -> None:
    # Refused before any password is asked for (stdin is empty) or anything probed.
    result = as_user(cli_python, user, public_login_daemon, *args)
    one_line(result, f"PermissionDenied: {command} needs admin rights: run it as {ADMINS}")


def test_another_account_is_refused_before_the_password(
    public_login_daemon: Daemon,
    user: LocalUser,
    make_user: Callable[..., LocalUser],
    cli_python: Python,
) -> None:
    other = make_user()
    for args in (["renew-secret", other.name], ["user", "show", other.name],
                 ["verify", other.name, "123456"], ["provisioning-uri", other.name]):  # fmt: skip
        result = as_user(cli_python, user, public_login_daemon, *args)
        one_line(
            result,
            f"PermissionDenied: {args[0] if args[0] != 'user' else 'user show'}: as {user.name} "
            f"you may act on your own account only, not on {other.name}'s: for that, run it "
            f"as {ADMINS}",
        )
