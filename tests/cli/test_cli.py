"""`otpgate` (the admin CLI) end to end against a real otpgated.

Every command runs as a subprocess (`python -m otpgate.cli.main`), talks to a daemon
started for the test, and is checked on its exit status, stdout and stderr. Codes come
from oathtool, QR codes are read back with zbarimg: neither shares code with otpgate.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import socket
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from otpgate import __version__
from otpgate.v1 import otpgate_pb2 as pb
from tests.cli.test_qr_terminal import DARK, LIGHT, scan
from tests.conftest import REPO, Daemon, LocalUser, delete_user

CLI = [sys.executable, "-m", "otpgate.cli.main"]
HOST = socket.gethostname()
KNOWN_KEYS = (
    "enabled, window, services.ssh, otp_digits, interval, issuer, enrollment_policy, "
    "lockout_threshold, lockout_seconds, exempt_networks, exempt_groups, required_groups, "
    "enrollment_deadline"
)
QR_FORMATS = "ansi, utf8, none, png:FILE, svg:FILE"
DEFAULT_CONFIG: dict[str, Any] = {
    "enabled": False,
    "window": 0,
    "services": {"ssh": False},
    "otp_digits": 6,
    "interval": 30,
    "issuer": "",
    "effective_issuer": "otpgate-test",
    "enrollment_policy": "optional",
    "lockout_threshold": 5,
    "lockout_seconds": 300,
    "exempt_networks": [],
    "exempt_groups": [],
    "required_groups": [],
    "enrollment_deadline": "",
}
Result = subprocess.CompletedProcess[str]


# -- helpers -----------------------------------------------------------------------------


def run(*args: str, socket_env: str | None = None, stdin: str = "") -> Result:
    """The CLI with OTPGATE_SOCKET set to `socket_env` (or unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OTPGATE_SOCKET"}
    if socket_env is not None:
        env["OTPGATE_SOCKET"] = socket_env
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=60, env=env
    )


def cli(daemon: Daemon, *args: str, stdin: str = "") -> Result:
    return run(*args, socket_env=daemon.admin_socket, stdin=stdin)


def run_many(commands: list[list[str]], socket_env: str | None = None) -> list[Result]:
    """Several independent CLI runs at once (each start costs a Python + gRPC import)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda args: run(*args, socket_env=socket_env), commands))


def ok(daemon: Daemon, *args: str, stdin: str = "") -> str:
    """Run a command that must succeed quietly; its stdout."""
    result = cli(daemon, *args, stdin=stdin)
    assert (result.returncode, result.stderr) == (0, ""), (args, result)
    return result.stdout


def assert_error(result: Result, stderr: str) -> None:
    """Exit 2, nothing on stdout, exactly `stderr` as the one line on stderr."""
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stdout, result.stderr) == (2, "", stderr + "\n")


def assert_error_prefix(result: Result, prefix: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stdout) == (2, ""), result
    assert len(result.stderr.splitlines()) == 1 and result.stderr.endswith("\n"), result.stderr
    assert result.stderr.startswith(prefix), result.stderr


def assert_usage_error(result: Result, prog: str, message: str) -> None:
    """A usage error: exit 2 and one line, like every other error."""
    assert_error(result, f"UsageError: {prog}: {message} (see --help)")


def config(daemon: Daemon) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok(daemon, "config", "--json"))
    return data


def daemon_config(daemon: Daemon) -> dict[str, Any]:
    """The settings as the daemon reports them over gRPC (not through the CLI)."""
    c = daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=10)
    policies = {
        pb.ENROLLMENT_POLICY_OPTIONAL: "optional",
        pb.ENROLLMENT_POLICY_REQUIRED: "required",
    }
    return {
        "enabled": c.enabled,
        "window": c.window,
        "services": {"ssh": c.services.ssh},
        "otp_digits": c.otp_digits,
        "interval": c.interval,
        "issuer": c.issuer,
        "effective_issuer": c.effective_issuer,
        "enrollment_policy": policies[c.enrollment_policy],
        "lockout_threshold": c.lockout_threshold,
        "lockout_seconds": c.lockout_seconds,
        "exempt_networks": list(c.exempt_networks),
        "exempt_groups": list(c.exempt_groups),
        "required_groups": list(c.required_groups),
        "enrollment_deadline": c.enrollment_deadline,
    }


def renew(daemon: Daemon, user: str, *extra: str) -> str:
    """Enroll `user` (the CLI's --qr none output is the URI alone); the URI."""
    out = ok(daemon, "renew-secret", "--now", user, "--qr", "none", *extra)
    assert out.count("\n") == 1, out
    return out.strip()


def uri_parts(uri: str) -> tuple[str, dict[str, list[str]]]:
    """(label, query) of an otpauth URI, checked to be otpauth://totp/."""
    parsed = urlparse(uri)
    assert (parsed.scheme, parsed.netloc, parsed.params, parsed.fragment) == (
        "otpauth",
        "totp",
        "",
        "",
    ), uri
    assert parsed.path.startswith("/"), uri
    return unquote(parsed.path[1:]), parse_qs(parsed.query, strict_parsing=True)


def secret_of(uri: str) -> str:
    return uri_parts(uri)[1]["secret"][0]


def oathtool(secret: str, at: float | None = None, *, digits: int = 6, interval: int = 30) -> str:
    """The code for `secret` at time `at` (now by default), from oathtool."""
    args = ["oathtool", "--totp", "-b", secret, "-d", str(digits), "-s", str(interval)]
    if at is not None:
        args += ["-N", f"@{int(at)}"]
    code = subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    assert re.fullmatch(rf"\d{{{digits}}}", code), code
    return code


def wrong_code(secret: str, *, digits: int = 6, interval: int = 30) -> str:
    """A code that is right for no step within ten steps of now."""
    start = int(time.time()) - 10 * interval
    valid = subprocess.run(
        ["oathtool", "--totp", "-b", secret, "-d", str(digits), "-s", str(interval),
         "-w", "20", "-N", f"@{start}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert len(valid) == 21
    return next(str(n) * digits for n in range(10) if str(n) * digits not in valid)


def verify_json(daemon: Daemon, user: str, code: str) -> tuple[int, dict[str, Any]]:
    result = cli(daemon, "verify", user, code, "--json")
    assert result.stderr == "", result
    data: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, data


def user_json(daemon: Daemon, user: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok(daemon, "user", "show", user, "--json"))
    return data


def zbar(path: Path) -> str:
    """What zbarimg reads from an image (stderr ignored: it chatters about D-Bus)."""
    result = subprocess.run(["zbarimg", "--raw", "-q", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result
    return result.stdout


def set_config(daemon: Daemon, *assignments: str) -> None:
    assert ok(daemon, "update", *assignments) == "updated\n"


@contextlib.contextmanager
def recreated(user: LocalUser) -> Iterator[int]:
    """`user` deleted and created again under the same name with another uid."""
    delete_user(user.name)
    new_uid = user.uid + 1000
    subprocess.run(["useradd", "-u", str(new_uid), "-s", "/bin/sh", user.name], check=True)
    try:
        yield new_uid
    finally:
        delete_user(user.name)


# -- config --------------------------------------------------------------------------------


def test_config_human_output(daemon: Daemon) -> None:
    assert ok(daemon, "config") == (
        "enabled              false\n"
        "window               0\n"
        "services.ssh         false\n"
        "otp_digits           6\n"
        "interval             30\n"
        "issuer               otpgate-test (daemon default)\n"
        "enrollment_policy    optional\n"
        "lockout_threshold    5\n"
        "lockout_seconds      300\n"
        "exempt_networks      none\n"
        "exempt_groups        none\n"
        "required_groups      none\n"
        "enrollment_deadline  none\n"
    )
    set_config(daemon, "issuer=Acme Corp", "services.ssh=true", "enrollment_policy=required")
    lines = ok(daemon, "config").splitlines()
    assert lines[2] == "services.ssh         true"
    assert lines[5] == "issuer               Acme Corp"
    assert lines[6] == "enrollment_policy    required"


def test_config_json_before_and_after_the_command(daemon: Daemon) -> None:
    after = cli(daemon, "config", "--json")
    before = cli(daemon, "--json", "config")
    for result in (after, before):
        assert (result.returncode, result.stderr) == (0, "")
        assert json.loads(result.stdout) == DEFAULT_CONFIG
    assert list(json.loads(after.stdout)) == list(DEFAULT_CONFIG)  # key order
    assert daemon_config(daemon) == DEFAULT_CONFIG


def test_update_then_config_reflects_it(daemon: Daemon) -> None:
    set_config(daemon, "enabled=true", "window=1", "services.ssh=true")
    expected = DEFAULT_CONFIG | {"enabled": True, "window": 1, "services": {"ssh": True}}
    assert config(daemon) == expected
    assert daemon_config(daemon) == expected
    # --json on update prints the new settings, before or after the command.
    updated = json.loads(ok(daemon, "update", "enrollment_policy=required", "--json"))
    expected |= {"enrollment_policy": "required"}
    assert updated == expected
    updated = json.loads(ok(daemon, "--json", "update", "issuer=Acme Corp", "otp_digits=8"))
    expected |= {"issuer": "Acme Corp", "effective_issuer": "Acme Corp", "otp_digits": 8}
    assert updated == expected == config(daemon)
    # An empty issuer goes back to the daemon's default.
    set_config(daemon, "issuer=")
    assert config(daemon) == expected | {"issuer": "", "effective_issuer": "otpgate-test"}


def test_update_booleans_accept_common_spellings(daemon: Daemon) -> None:
    for enabled, ssh in [("yes", "no"), ("off", "on"), ("1", "0"), ("False", "TRUE")]:
        set_config(daemon, f"enabled={enabled}", f"services.ssh={ssh}")
        data = daemon_config(daemon)
        truth = {"yes": True, "on": True, "1": True, "true": True}
        assert (data["enabled"], data["services"]["ssh"]) == (
            truth.get(enabled.lower(), False),
            truth.get(ssh.lower(), False),
        ), (enabled, ssh)


# key, lowest, highest, refused values
BOUNDS = [
    ("window", 0, 10, [11, 1000]),
    ("otp_digits", 6, 8, [5, 9]),
    # Documented (proto, settings, --help) as 5..120 (NIST SP 800-63B: at most two minutes).
    ("interval", 5, 120, [4, 121, 300, 301]),
    ("lockout_threshold", 1, 100, [0, 101]),
    ("lockout_seconds", 1, 86400, [0, 86401]),
]


def test_update_bounds(daemon: Daemon) -> None:
    for side in (0, 1):  # every lowest value at once, then every highest
        values = {key: (low, high)[side] for key, low, high, _ in BOUNDS}
        set_config(daemon, *(f"{key}={value}" for key, value in values.items()))
        assert {key: daemon_config(daemon)[key] for key in values} == values
        assert {key: config(daemon)[key] for key in values} == values
    before = daemon_config(daemon)
    cases = [
        (f"{key}={value}", f"InvalidArgument: {key}: must be from {low} to {high} (got {value})")
        for key, low, high, bad in BOUNDS
        for value in bad
    ] + [
        (f"{key}=-{low or 1}",
         f"InvalidArgument: {key}: must be a non-negative integer (got '-{low or 1}')")
        for key, low, _, _ in BOUNDS
    ]  # fmt: skip
    results = run_many([["update", arg] for arg, _ in cases], daemon.admin_socket)
    for (arg, message), result in zip(cases, results, strict=True):
        assert (result.returncode, result.stdout, result.stderr) == (2, "", message + "\n"), arg
    assert daemon_config(daemon) == before


BAD_ISSUER = (
    "issuer: must be 1 to 64 printable characters without ':', or empty (issuer=) for "
    "otpgated's default, its own issuer option or else the host name"
)
BAD_BOOLEAN = "must be true or false, or one of yes, no, on, off, 1, 0"

REFUSED_UPDATES: list[tuple[list[str], str]] = [
    (["enrollment_policy=sometimes"],
     "enrollment_policy: must be one of optional, required (got 'sometimes')"),
    (["enrollment_policy="], "enrollment_policy: must be one of optional, required (got '')"),
    (["issuer=a:b"], BAD_ISSUER),
    (["issuer=" + "x" * 65], BAD_ISSUER),
    (["issuer=tab\there"], BAD_ISSUER),
    (["colour=blue"], f"colour: unknown setting; known: {KNOWN_KEYS}"),
    (["services_ssh=true"], f"services_ssh: unknown setting; known: {KNOWN_KEYS}"),
    (["=1"], f": unknown setting; known: {KNOWN_KEYS}"),
    (["window"], "window: expected KEY=VALUE"),
    (["window=1", "window=2"], "window: given twice"),
    (["issuer=X", "enabled=false", "issuer=Y"], "issuer: given twice"),
    (["window=-1"], "window: must be a non-negative integer (got '-1')"),
    (["lockout_seconds=-5"], "lockout_seconds: must be a non-negative integer (got '-5')"),
    (["window=+1"], "window: must be a non-negative integer (got '+1')"),
    (["window=1.0"], "window: must be a non-negative integer (got '1.0')"),
    (["window=\u0663"], "window: must be a non-negative integer (got '\u0663')"),
    (["window=4294967296"], "window: must be a non-negative integer (got '4294967296')"),
    (["window=1=2"], "window: must be a non-negative integer (got '1=2')"),
    (["enabled=perhaps"], f"enabled: {BAD_BOOLEAN} (got 'perhaps')"),
    (["enabled="], f"enabled: {BAD_BOOLEAN} (got '')"),
    (["services.ssh=2"], f"services.ssh: {BAD_BOOLEAN} (got '2')"),
    # Mixed: every field but one is valid; the daemon must apply none of them.
    (["enabled=false", "window=11"], "window: must be from 0 to 10 (got 11)"),
    (["issuer=Changed", "lockout_threshold=0"], "lockout_threshold: must be from 1 to 100 (got 0)"),
    (["otp_digits=7", "interval=121", "services.ssh=false"],
     "interval: must be from 5 to 120 (got 121)"),
    (["lockout_seconds=60", "issuer=a:b"],
     BAD_ISSUER),
    (["window=2", "colour=blue"], f"colour: unknown setting; known: {KNOWN_KEYS}"),
]  # fmt: skip


def test_refused_updates_change_nothing(daemon: Daemon) -> None:
    # A baseline away from the defaults, so that a partly applied update would show.
    set_config(
        daemon, "enabled=true", "window=3", "services.ssh=true", "otp_digits=8", "interval=60",
        "issuer=Base", "enrollment_policy=required", "lockout_threshold=7", "lockout_seconds=90",
    )  # fmt: skip
    before = config(daemon)
    assert before == DEFAULT_CONFIG | {
        "enabled": True, "window": 3, "services": {"ssh": True}, "otp_digits": 8,
        "interval": 60, "issuer": "Base", "effective_issuer": "Base",
        "enrollment_policy": "required", "lockout_threshold": 7, "lockout_seconds": 90,
    }  # fmt: skip
    results = run_many([["update", *args] for args, _ in REFUSED_UPDATES], daemon.admin_socket)
    failures = [
        (args, result.returncode, result.stdout, result.stderr)
        for (args, message), result in zip(REFUSED_UPDATES, results, strict=True)
        if (result.returncode, result.stdout, result.stderr)
        != (2, "", f"InvalidArgument: {message}\n")
    ]
    assert failures == []
    # Every one of them was refused as a whole: the settings are still the baseline.
    assert daemon_config(daemon) == before
    assert config(daemon) == before


def test_update_needs_an_assignment() -> None:
    assert_usage_error(
        run("update"), "otpgate update", "the following arguments are required: KEY=VALUE"
    )


# -- renew-secret and provisioning URIs ------------------------------------------------------


def test_renew_secret_prints_the_provisioning_uri(daemon: Daemon, user: LocalUser) -> None:
    result = cli(daemon, "renew-secret", "--now", user.name, "--qr", "none")
    assert (result.returncode, result.stderr) == (0, "")
    uri = result.stdout.removesuffix("\n")
    assert "\n" not in uri
    label, query = uri_parts(uri)
    assert label == f"otpgate-test:{user.name}@{HOST}"
    assert set(query) == {"secret", "issuer"}  # no digits/period for 6 digits, 30 s
    assert query["issuer"] == ["otpgate-test"]
    assert re.fullmatch(r"[A-Z2-7]{32}", query["secret"][0]), query
    # Every renewal makes a new secret.
    assert secret_of(renew(daemon, user.name)) != query["secret"][0]
    # Without a terminal the default is no QR code: the same single line.
    assert re.fullmatch(r"otpauth://totp/\S+\n", ok(daemon, "renew-secret", "--now", user.name))


def test_renew_secret_digits_and_interval(daemon: Daemon, user: LocalUser) -> None:
    uri = renew(daemon, user.name, "--otp-digits", "8", "--interval", "60")
    _, query = uri_parts(uri)
    assert set(query) == {"secret", "issuer", "digits", "period"}
    assert (query["digits"], query["period"]) == (["8"], ["60"])
    assert "digits=8&period=60" in uri
    shown = user_json(daemon, user.name)["twofactor_config"]
    assert (shown["otp_digits"], shown["interval"]) == (8, 60)
    for digits, interval in (("6", "5"), ("7", "120")):
        _, query = uri_parts(
            renew(daemon, user.name, "--otp-digits", digits, "--interval", interval)
        )
        assert (query.get("digits", ["6"]), query["period"]) == ([digits], [interval])
    uri = ok(daemon, "provisioning-uri", user.name).strip()
    refusals = [
        # Named as the flag that was given, not as the request field behind it.
        (["--otp-digits", "5"], "InvalidArgument: --otp-digits: must be from 6 to 8 (got 5)"),
        (["--otp-digits", "9"], "InvalidArgument: --otp-digits: must be from 6 to 8 (got 9)"),
        (["--interval", "4"], "InvalidArgument: --interval: must be from 5 to 120 (got 4)"),
        (["--interval", "121"], "InvalidArgument: --interval: must be from 5 to 120 (got 121)"),
        (
            ["--otp-digits", "0"],
            "InvalidArgument: --otp-digits: must be a positive integer (got 0)",
        ),
        (["--interval", "-5"], "InvalidArgument: --interval: must be a positive integer (got -5)"),
    ]
    results = run_many(
        [["renew-secret", user.name, "--qr", "none", *args] for args, _ in refusals],
        daemon.admin_socket,
    )
    for (_, message), result in zip(refusals, results, strict=True):
        assert_error(result, message)
    # A refused renewal keeps the secret that was there.
    assert ok(daemon, "provisioning-uri", user.name).strip() == uri
    assert_usage_error(
        cli(daemon, "renew-secret", "--now", user.name, "--otp-digits", "eight"),
        "otpgate renew-secret",
        "argument --otp-digits: invalid int value: 'eight'",
    )


def test_renew_secret_uses_the_configured_defaults(daemon: Daemon, user: LocalUser) -> None:
    set_config(daemon, "window=1")
    old = renew(daemon, user.name)  # 6 digits, 30 s
    other = renew(daemon, "root")
    set_config(daemon, "otp_digits=8", "interval=60")
    _, query = uri_parts(renew(daemon, user.name))
    assert (query["digits"], query["period"]) == (["8"], ["60"])
    # An existing secret keeps its own digits and interval.
    assert ok(daemon, "provisioning-uri", "root").strip() == other
    assert ok(daemon, "verify", "root", oathtool(secret_of(other))) == "true\n"
    assert set(uri_parts(old)[1]) == {"secret", "issuer"}


def test_renew_secret_json(daemon: Daemon, user: LocalUser) -> None:
    for args in (
        ["renew-secret", "--now", user.name, "--json"],
        ["--json", "renew-secret", "--now", user.name],
    ):
        result = cli(daemon, *args)
        assert (result.returncode, result.stderr) == (0, "")
        entry = json.loads(result.stdout)  # nothing but the JSON on stdout
        uri = entry["twofactor_config"]["provisioning_uri"]
        assert uri_parts(uri)[0] == f"otpgate-test:{user.name}@{HOST}"
        assert entry == {
            "id": user.uid,
            "uid": user.uid,
            "username": user.name,
            "full_name": "",
            "home": f"/home/{user.name}",
            "shell": "/bin/bash",
            "gid": entry["gid"],
            "groups": [entry["gid"]],
            "local": True,
            "twofactor_auth_configured": True,
            "twofactor_config": {
                "provisioning_uri": uri,
                "secret_configured": True,
                "interval": 30,
                "otp_digits": 6,
            },
            "failed_attempts": 0,
            "locked_seconds": 0,
            "recovery_codes_left": 0,
            "pending_expires_in": 0,
        }
        assert entry["gid"] == os.stat(f"/home/{user.name}").st_gid
        assert ok(daemon, "provisioning-uri", user.name).strip() == uri


def test_renew_secret_replaces_the_old_one(daemon: Daemon, user: LocalUser) -> None:
    set_config(daemon, "window=1")
    old = secret_of(renew(daemon, user.name))
    new = secret_of(renew(daemon, user.name))
    assert old != new
    code, data = verify_json(daemon, user.name, oathtool(old))
    assert (code, data["result"]) == (1, "invalid")
    assert ok(daemon, "verify", user.name, oathtool(new)) == "true\n"


def test_renew_secret_defaults_to_the_caller(daemon: Daemon) -> None:
    uri = ok(daemon, "renew-secret", "--now", "--qr", "none").strip()
    assert uri_parts(uri)[0] == f"otpgate-test:root@{HOST}"
    assert ok(daemon, "provisioning-uri").strip() == uri
    shown = json.loads(ok(daemon, "user", "show", "--json"))
    assert (shown["username"], shown["uid"], shown["twofactor_auth_configured"]) == (
        "root",
        0,
        True,
    )


def test_renew_secret_unknown_or_bad_user(daemon: Daemon) -> None:
    assert_error(
        cli(daemon, "renew-secret", "nosuchotpgateuser", "--qr", "none"),
        "NotFound: no such account: nosuchotpgateuser",
    )
    assert_error_prefix(
        cli(daemon, "renew-secret", "bad/user", "--qr", "none"), "InvalidArgument: username: "
    )
    assert json.loads(ok(daemon, "user", "list", "--json")) == []


@pytest.mark.parametrize("issuer", ["A&B #1/x?y=z%+", "\u00dcn\u00ef c\u00f8d\u00e9"])
def test_issuer_round_trips_through_the_uri(daemon: Daemon, user: LocalUser, issuer: str) -> None:
    set_config(daemon, f"issuer={issuer}")
    label, query = uri_parts(renew(daemon, user.name))
    assert label == f"{issuer}:{user.name}@{HOST}"
    assert query["issuer"] == [issuer]
    assert re.fullmatch(r"[A-Z2-7]{32}", query["secret"][0])


def test_provisioning_uri(
    daemon: Daemon, user: LocalUser, make_user: Callable[..., LocalUser]
) -> None:
    uri = renew(daemon, user.name, "--otp-digits", "8")
    assert ok(daemon, "provisioning-uri", user.name) == uri + "\n"
    assert ok(daemon, "provisioning-uri", user.name, "--qr", "none") == uri + "\n"
    for args in (
        ["provisioning-uri", user.name, "--json"],
        ["--json", "provisioning-uri", user.name],
    ):
        assert json.loads(ok(daemon, *args)) == {"provisioning_uri": uri}
    # The URI follows the issuer in effect now; the secret stays.
    set_config(daemon, "issuer=Later")
    later = ok(daemon, "provisioning-uri", user.name).strip()
    assert uri_parts(later)[0] == f"Later:{user.name}@{HOST}"
    assert secret_of(later) == secret_of(uri)
    other = make_user()
    assert_error(
        cli(daemon, "provisioning-uri", other.name),
        f"NotFound: account {other.name} has no 2FA secret",
    )
    assert_error(
        cli(daemon, "provisioning-uri", "nosuchotpgateuser"),
        "NotFound: no such account: nosuchotpgateuser",
    )


# -- QR codes ------------------------------------------------------------------------------


def test_qr_png_decodes_to_the_uri(daemon: Daemon, user: LocalUser, tmp_path: Path) -> None:
    png = tmp_path / "code.png"
    result = cli(daemon, "renew-secret", "--now", user.name, "--qr", f"png:{png}")
    assert result.returncode == 0
    assert result.stderr == f"QR code written to {png} (mode 0600: it holds the secret)\n"
    uri = result.stdout.removesuffix("\n")
    assert uri_parts(uri)[0] == f"otpgate-test:{user.name}@{HOST}"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert stat.S_IMODE(png.stat().st_mode) == 0o600
    assert zbar(png) == uri + "\n"
    # An existing, world-readable file is replaced and made private.
    again = tmp_path / "again.png"
    again.write_bytes(b"old")
    again.chmod(0o644)
    result = cli(daemon, "provisioning-uri", user.name, "--qr", f"png:{again}")
    assert (result.returncode, result.stdout) == (0, uri + "\n")
    assert stat.S_IMODE(again.stat().st_mode) == 0o600
    assert zbar(again) == uri + "\n"


def test_qr_png_with_json(daemon: Daemon, user: LocalUser, tmp_path: Path) -> None:
    png = tmp_path / "code.png"
    result = cli(daemon, "renew-secret", "--now", user.name, "--json", "--qr", f"png:{png}")
    assert result.returncode == 0
    uri = json.loads(result.stdout)["twofactor_config"]["provisioning_uri"]
    assert zbar(png) == uri + "\n"
    assert stat.S_IMODE(png.stat().st_mode) == 0o600


def test_qr_svg(daemon: Daemon, user: LocalUser, tmp_path: Path) -> None:
    uri = renew(daemon, user.name)
    svg = tmp_path / "code.svg"
    result = cli(daemon, "provisioning-uri", user.name, "--qr", f"svg:{svg}")
    assert (result.returncode, result.stdout) == (0, uri + "\n")
    assert result.stderr == f"QR code written to {svg} (mode 0600: it holds the secret)\n"
    root = ET.parse(svg).getroot()  # noqa: S314 - a file this test had written
    assert root.tag in ("svg", "{http://www.w3.org/2000/svg}svg")
    assert stat.S_IMODE(svg.stat().st_mode) == 0o600


def test_qr_utf8_and_ansi_decode_to_the_uri(
    daemon: Daemon, user: LocalUser, tmp_path: Path
) -> None:
    uri = renew(daemon, user.name)
    utf8 = ok(daemon, "provisioning-uri", user.name, "--qr", "utf8")
    first, _, picture = utf8.partition("\n")
    assert first == uri
    assert "\u2588" in picture and ("\u2580" in picture or "\u2584" in picture)
    for theme in (DARK, LIGHT):
        assert scan(picture, theme, tmp_path / f"utf8-{theme.name}.png") == uri + "\n"
    ansi = ok(daemon, "provisioning-uri", user.name, "--qr", "ansi")
    first, _, picture = ansi.partition("\n")
    assert first == uri
    assert "\x1b[" in picture
    for theme in (DARK, LIGHT):
        assert scan(picture, theme, tmp_path / f"ansi-{theme.name}.png") == uri + "\n"


def test_qr_defaults_to_utf8_on_a_terminal(daemon: Daemon, user: LocalUser, tmp_path: Path) -> None:
    uri = renew(daemon, user.name)
    master, slave = pty.openpty()
    env = {**os.environ, "OTPGATE_SOCKET": daemon.admin_socket}
    proc = subprocess.Popen(
        [*CLI, "provisioning-uri", user.name],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=30) == 0
    assert proc.stderr is not None and proc.stderr.read() == b""
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    first, _, picture = text.partition("\n")
    assert first == uri
    for theme in (DARK, LIGHT):
        assert scan(picture, theme, tmp_path / f"tty-{theme.name}.png") == uri + "\n"


def test_bad_qr_value_is_refused_before_renewing(daemon: Daemon, user: LocalUser) -> None:
    uri = renew(daemon, user.name)
    specs = ("gif:x.gif", "png:", "svg:", "utf8:x", "none:x", "PNG:x.png", "ascii", "")
    commands = [
        [c, user.name, "--qr", spec] for spec in specs for c in ("renew-secret", "provisioning-uri")
    ]
    for command, result in zip(commands, run_many(commands, daemon.admin_socket), strict=True):
        assert_error(
            result, f"InvalidArgument: --qr: must be one of {QR_FORMATS} (got {command[3]!r})"
        )
    assert ok(daemon, "provisioning-uri", user.name).strip() == uri


def test_qr_file_that_cannot_be_written_is_refused_first(
    daemon: Daemon, user: LocalUser, tmp_path: Path
) -> None:
    uri = renew(daemon, user.name)
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "target.png")
    missing = tmp_path / "missing" / "x.png"
    cases = [
        (missing, f"cannot create {missing}: no writable directory"),
        (tmp_path, f"{tmp_path} exists and is not a regular file (or is a symlink)"),
        (link, f"{link} exists and is not a regular file (or is a symlink)"),
    ]
    commands = [
        [command, user.name, "--qr", f"{kind}:{target}"]
        for target, _ in cases
        for kind in ("png", "svg")
        for command in ("renew-secret", "provisioning-uri")
    ]
    messages = [message for _, message in cases for _ in range(4)]
    for message, result in zip(messages, run_many(commands, daemon.admin_socket), strict=True):
        assert_error(result, f"InvalidArgument: --qr: {message}")
    # Refused before anything changed: the secret is the one there was, nothing was written.
    assert ok(daemon, "provisioning-uri", user.name) == uri + "\n"
    assert not (tmp_path / "target.png").exists() and not missing.parent.exists()


def test_qr_path_errors_are_one_line(daemon: Daemon, user: LocalUser, tmp_path: Path) -> None:
    uri = renew(daemon, user.name)
    (tmp_path / "plain").write_text("")
    (tmp_path / "loop").symlink_to("loop")
    targets = [
        tmp_path / "plain" / "x.png",  # ENOTDIR
        tmp_path / ("a" * 300 + ".png"),  # ENAMETOOLONG
        tmp_path / "loop" / "x.png",  # ELOOP
    ]
    commands = [
        [command, user.name, "--qr", f"png:{target}"]
        for target in targets
        for command in ("renew-secret", "provisioning-uri")
    ]
    failures = []
    for command, result in zip(commands, run_many(commands, daemon.admin_socket), strict=True):
        lines = result.stderr.splitlines()
        if not (
            result.returncode == 2
            and result.stdout == ""
            and len(lines) == 1
            and re.match(r"[A-Za-z]+: ", lines[0])
        ):
            failures.append((command[0], command[3][:40], result.returncode, lines[-1:]))
    assert ok(daemon, "provisioning-uri", user.name) == uri + "\n"  # nothing renewed
    assert failures == []


def test_qr_file_of_another_user_does_not_receive_the_secret(
    daemon: Daemon, user: LocalUser, make_user: Callable[..., LocalUser], tmp_path: Path
) -> None:
    uri = renew(daemon, user.name)
    mallory = make_user()
    planted = tmp_path / "planted.png"
    planted.write_bytes(b"")
    os.chown(planted, mallory.uid, -1)
    planted.chmod(0o644)
    result = cli(daemon, "provisioning-uri", user.name, "--qr", f"png:{planted}")
    info = planted.lstat()
    if result.returncode == 0:  # written: then only by and for the caller
        assert result.stdout == uri + "\n"
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.getuid(), 0o600)
    else:  # or refused, leaving the planted file empty
        assert_error_prefix(result, "InvalidArgument: --qr: ")
        assert planted.read_bytes() == b""


def test_qr_path_through_a_users_symlink_is_refused_before_renewing(
    daemon: Daemon, user: LocalUser, make_user: Callable[..., LocalUser], tmp_path: Path
) -> None:
    # An ordinary user owns a directory on root's QR path and points a middle component
    # at a directory only root may enter: following it would let her choose where root
    # creates (or truncates) a file.
    uri = renew(daemon, user.name)
    mallory = make_user()
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    home = Path(f"/home/{mallory.name}")
    as_mallory = ["runuser", "-u", mallory.name, "--"]
    subprocess.run([*as_mallory, "mkdir", str(home / "d")], check=True)
    subprocess.run([*as_mallory, "ln", "-s", str(private), str(home / "d" / "x")], check=True)
    link = home / "d" / "x"
    assert link.is_symlink() and link.lstat().st_uid == mallory.uid
    commands = [
        [command, user.name, "--qr", f"{kind}:{link}/qr.{kind}"]
        for kind in ("png", "svg")
        for command in ("renew-secret", "provisioning-uri")
    ]
    for command, result in zip(commands, run_many(commands, daemon.admin_socket), strict=True):
        target = command[3].partition(":")[2]
        assert_error(
            result,
            f"InvalidArgument: --qr: cannot write {target}: {link} is a symbolic link "
            "(no component of the path may be one)",
        )
    assert list(private.iterdir()) == []  # nothing written through the link
    assert ok(daemon, "provisioning-uri", user.name) == uri + "\n"  # the secret is unchanged


# -- verify --------------------------------------------------------------------------------


def test_verify_accepts_a_code_once(daemon: Daemon, user: LocalUser) -> None:
    set_config(daemon, "window=1")  # a code made just before a step boundary still counts
    secret = secret_of(renew(daemon, user.name))
    code = oathtool(secret)
    first = cli(daemon, "verify", user.name, code)
    assert (first.returncode, first.stdout, first.stderr) == (0, "true\n", "")
    again = cli(daemon, "verify", user.name, code)
    # Says why: the usual surprise is a code that logging in has just spent.
    assert (again.returncode, again.stdout, again.stderr) == (
        1,
        "false\n",
        "reason: replayed (already used; wait for the next code)\n",
    )
    assert verify_json(daemon, user.name, code) == (
        1,
        {"valid": False, "result": "replayed", "locked_seconds": 0},
    )


def test_verify_json(daemon: Daemon, user: LocalUser) -> None:
    set_config(daemon, "window=1")
    secret = secret_of(renew(daemon, user.name))
    now = time.time()
    result = cli(daemon, "verify", user.name, oathtool(secret, now), "--json")
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout) == {"valid": True, "result": "valid", "locked_seconds": 0}
    result = cli(daemon, "--json", "verify", user.name, oathtool(secret, now + 30))
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout) == {"valid": True, "result": "valid", "locked_seconds": 0}
    wrong = cli(daemon, "--json", "verify", user.name, wrong_code(secret))
    assert (wrong.returncode, wrong.stderr) == (1, "")
    assert json.loads(wrong.stdout) == {"valid": False, "result": "invalid", "locked_seconds": 0}


def test_verify_reads_the_code_from_stdin(daemon: Daemon, user: LocalUser) -> None:
    set_config(daemon, "window=1")
    secret = secret_of(renew(daemon, user.name))
    result = cli(daemon, "verify", user.name, "-", stdin=oathtool(secret) + "\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "true\n", "")
    wrong = cli(daemon, "verify", user.name, "-", stdin=f"  {wrong_code(secret)}  \n")
    assert (wrong.returncode, wrong.stdout, wrong.stderr) == (1, "false\n", "")
    empty = cli(daemon, "verify", user.name, "-", stdin="")
    assert_error(empty, "InvalidArgument: token: must be 6 to 8 ASCII digits, or a recovery code")


def test_verify_malformed_codes(daemon: Daemon, user: LocalUser) -> None:
    renew(daemon, user.name)
    tokens = ["abc", "12345", "123456789", "12 3456", "\u0661\u0662\u0663\u0664\u0665\u0666",
              "-123456", "1234567a", "", "\uff11\uff12\uff13\uff14\uff15\uff16"]  # fmt: skip
    commands = [["verify", user.name, "--", token] for token in tokens]
    for token, result in zip(tokens, run_many(commands, daemon.admin_socket), strict=True):
        assert "Traceback" not in result.stderr, (token, result.stderr)
        assert (result.returncode, result.stdout, result.stderr) == (
            2,
            "",
            "InvalidArgument: token: must be 6 to 8 ASCII digits, or a recovery code\n",
        ), token
    # Malformed codes are refused before they count as attempts.
    assert user_json(daemon, user.name)["failed_attempts"] == 0


def test_verify_usage_and_unknown_users(daemon: Daemon, user: LocalUser) -> None:
    assert_error(
        cli(daemon, "verify", "nosuchotpgateuser", "123456"),
        "NotFound: no such account: nosuchotpgateuser",
    )
    # One [USER] TOKEN pair, as the usage line says.
    assert_usage_error(
        cli(daemon, "verify", user.name, "123456", "extra"),
        "otpgate",
        "unrecognized arguments: extra",
    )
    assert_error_prefix(cli(daemon, "verify", "bad user", "123456"), "InvalidArgument: username: ")
    assert_usage_error(
        cli(daemon, "verify"),
        "otpgate verify",
        "the following arguments are required: TOKEN",
    )


def test_verify_eight_digit_secret(daemon: Daemon, user: LocalUser) -> None:
    set_config(daemon, "window=1")
    uri = renew(daemon, user.name, "--otp-digits", "8")
    secret = secret_of(uri)
    now = time.time()
    six = oathtool(secret, now + 30)  # right secret and step, wrong length
    assert verify_json(daemon, user.name, six)[1]["result"] == "invalid"
    result = cli(daemon, "verify", user.name, oathtool(secret, now, digits=8))
    assert (result.returncode, result.stdout) == (0, "true\n")


def test_verify_window_and_older_steps(daemon: Daemon, user: LocalUser) -> None:
    secret = secret_of(renew(daemon, user.name))
    now = time.time()
    ahead = oathtool(secret, now + 60)  # two steps ahead
    assert verify_json(daemon, user.name, ahead) == (
        1,
        {"valid": False, "result": "invalid", "locked_seconds": 0},
    )
    set_config(daemon, "window=2")
    assert verify_json(daemon, user.name, ahead)[1]["result"] == "valid"
    # Once a step is spent, it and every earlier step are refused as replays.
    for at in (now, now + 30):
        assert verify_json(daemon, user.name, oathtool(secret, at)) == (
            1,
            {"valid": False, "result": "replayed", "locked_seconds": 0},
        )


def test_verify_short_interval(daemon: Daemon, user: LocalUser) -> None:
    set_config(daemon, "window=1")
    uri = renew(daemon, user.name, "--interval", "5")
    assert uri_parts(uri)[1]["period"] == ["5"]
    secret = secret_of(uri)
    # Start at the beginning of a 5 s step: the checks below hold while the daemon is
    # at most one step past `now`, which leaves them ten seconds, not anything over five.
    time.sleep(5.05 - time.time() % 5)
    now = time.time()
    assert ok(daemon, "verify", user.name, oathtool(secret, now + 5, interval=5)) == "true\n"
    older = oathtool(secret, now, interval=5)
    assert verify_json(daemon, user.name, older)[1]["result"] == "replayed"
    # Two 5-second steps ahead is outside a window of one.
    ahead = oathtool(secret, now + 15, interval=5)
    assert verify_json(daemon, user.name, ahead)[1]["result"] == "invalid"


# -- lockout -------------------------------------------------------------------------------


def test_lockout(daemon: Daemon, user: LocalUser) -> None:
    set_config(daemon, "lockout_threshold=3", "window=1")
    secret = secret_of(renew(daemon, user.name))
    wrong = wrong_code(secret)
    for attempt in range(1, 4):
        result = cli(daemon, "verify", user.name, wrong)
        assert (result.returncode, result.stdout, result.stderr) == (1, "false\n", ""), attempt
        if attempt < 3:
            assert user_json(daemon, user.name)["failed_attempts"] == attempt
    right = oathtool(secret)
    locked = cli(daemon, "verify", user.name, right)
    assert (locked.returncode, locked.stdout) == (1, "false\n")
    # A lock lasts its full time in whole seconds: up to one second more than configured.
    seconds = int(re.fullmatch(r"account locked for (\d+) s\n", locked.stderr)[1])  # type: ignore[index]
    assert 290 <= seconds <= 301
    code, data = verify_json(daemon, user.name, right)
    assert code == 1 and data["valid"] is False and data["result"] == "locked"
    assert 290 <= data["locked_seconds"] <= 301
    shown = user_json(daemon, user.name)
    assert 290 <= shown["locked_seconds"] <= 301
    row = ok(daemon, "user", "list").splitlines()[1].split()
    assert row[0] == user.name and 290 <= int(row[5]) <= 301


def test_lockout_ends(daemon: Daemon, user: LocalUser) -> None:
    # Five seconds, not one: the "locked" check below must reach the daemon (an oathtool
    # run and a CLI start, slow on a loaded machine) while the lock is still in force.
    set_config(daemon, "lockout_threshold=1", "lockout_seconds=5", "window=1")
    secret = secret_of(renew(daemon, user.name))
    assert verify_json(daemon, user.name, wrong_code(secret))[1]["result"] == "invalid"
    locked_after = time.time()
    right = oathtool(secret)
    code, data = verify_json(daemon, user.name, right)
    assert (code, data["result"]) == (1, "locked") and 1 <= data["locked_seconds"] <= 6
    # Five seconds, counted in whole seconds: over six whole seconds after the lock at most.
    time.sleep(max(0.0, int(locked_after) + 6.05 - time.time()))
    assert user_json(daemon, user.name)["locked_seconds"] == 0
    assert ok(daemon, "verify", user.name, right) == "true\n"


# -- unset-secret, user show/list ----------------------------------------------------------


def test_unset_secret(daemon: Daemon, user: LocalUser) -> None:
    set_config(daemon, "window=1")
    secret = secret_of(renew(daemon, user.name))
    assert ok(daemon, "unset-secret", user.name) == f"2FA secret of {user.name} removed\n"
    shown = user_json(daemon, user.name)
    assert shown["twofactor_auth_configured"] is False
    assert shown["twofactor_config"] == {
        "provisioning_uri": None,
        "secret_configured": False,
        "interval": 0,
        "otp_digits": 0,
    }
    assert json.loads(ok(daemon, "user", "list", "--json")) == []
    assert ok(daemon, "user", "list") == "USERNAME  UID  DIGITS  INTERVAL  FAILED  LOCKED_S\n"
    result = cli(daemon, "verify", user.name, oathtool(secret))
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "false\n",
        "reason: not enrolled\n",
    )
    assert verify_json(daemon, user.name, oathtool(secret)) == (
        1,
        {"valid": False, "result": "not_enrolled", "locked_seconds": 0},
    )
    assert_error(
        cli(daemon, "provisioning-uri", user.name),
        f"NotFound: account {user.name} has no 2FA secret",
    )
    # --json gives the account as it is now.
    renew(daemon, user.name)
    entry = json.loads(ok(daemon, "unset-secret", user.name, "--json"))
    assert (entry["username"], entry["twofactor_auth_configured"]) == (user.name, False)
    assert_error(
        cli(daemon, "unset-secret", "nosuchotpgateuser"),
        "NotFound: no such account: nosuchotpgateuser",
    )
    assert_usage_error(
        cli(daemon, "unset-secret"),
        "otpgate unset-secret",
        "the following arguments are required: USER",
    )


def test_user_list(daemon: Daemon, make_user: Callable[..., LocalUser]) -> None:
    first, second = sorted((make_user(), make_user()), key=lambda u: u.name)
    make_user()  # never enrolled: not listed
    renew(daemon, second.name, "--otp-digits", "8", "--interval", "60")
    renew(daemon, first.name)
    rows = [
        ("USERNAME", "UID", "DIGITS", "INTERVAL", "FAILED", "LOCKED_S"),
        (first.name, str(first.uid), "6", "30", "0", "0"),
        (second.name, str(second.uid), "8", "60", "0", "0"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    expected = "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in rows
    )
    assert ok(daemon, "user", "list") == expected
    listing = json.loads(ok(daemon, "user", "list", "--json"))
    assert [(u["username"], u["uid"]) for u in listing] == [
        (first.name, first.uid),
        (second.name, second.uid),
    ]
    for entry in listing:
        # A listing never carries the secret.
        assert entry["twofactor_config"]["provisioning_uri"] is None
        assert entry["twofactor_auth_configured"] is True
    assert json.loads(ok(daemon, "--json", "user", "list")) == listing
    assert json.loads(ok(daemon, "user", "--json", "list")) == listing


def test_user_show(daemon: Daemon, user: LocalUser) -> None:
    renew(daemon, user.name, "--interval", "45")
    gid = os.stat(f"/home/{user.name}").st_gid
    pairs = [
        ("id", user.uid), ("uid", user.uid), ("username", user.name), ("full_name", ""),
        ("home", f"/home/{user.name}"), ("shell", "/bin/bash"), ("gid", gid), ("groups", gid),
        ("local", "true"), ("twofactor_auth_configured", "true"), ("failed_attempts", 0),
        ("locked_seconds", 0), ("recovery_codes_left", 0), ("pending_expires_in", 0),
        ("twofactor_interval", 45), ("twofactor_otp_digits", 6),
        # For an admin: the access policy's word on an SSH login (tests/cli/test_policy.py).
        ("access", "would be asked for a code from anywhere: no, 2FA is off (enabled=false)"),
        ("access_groups", "in no exempt or required group"),
    ]  # fmt: skip
    expected = "".join(f"{key:<25}  {value}\n" for key, value in pairs)
    assert ok(daemon, "user", "show", user.name) == expected
    shown = user_json(daemon, user.name)
    assert shown["twofactor_config"]["provisioning_uri"] is None  # never in `user show`
    assert_error(
        cli(daemon, "user", "show", "nosuchotpgateuser"),
        "NotFound: no such account: nosuchotpgateuser",
    )


# -- accounts that went away ---------------------------------------------------------------


def test_recreated_account_is_not_enrolled(daemon: Daemon, user: LocalUser) -> None:
    set_config(daemon, "window=1")
    old_secret = secret_of(renew(daemon, user.name))
    with recreated(user) as new_uid:
        shown = user_json(daemon, user.name)
        assert (shown["uid"], shown["twofactor_auth_configured"]) == (new_uid, False)
        assert shown["twofactor_config"]["secret_configured"] is False
        assert json.loads(ok(daemon, "user", "list", "--json")) == []
        # Even the earlier account's right code does not let the new one in.
        result = cli(daemon, "verify", user.name, oathtool(old_secret))
        assert (result.returncode, result.stdout, result.stderr) == (
            1,
            "false\n",
            "reason: not enrolled\n",
        )
        assert verify_json(daemon, user.name, oathtool(old_secret))[1]["result"] == "not_enrolled"
        # The earlier account's secret is not handed to the new one.
        assert_error(
            cli(daemon, "provisioning-uri", user.name),
            f"NotFound: account {user.name} has no 2FA secret",
        )
        # The new account can enroll for itself.
        new_secret = secret_of(renew(daemon, user.name))
        assert new_secret != old_secret
        assert user_json(daemon, user.name)["twofactor_auth_configured"] is True
        assert ok(daemon, "verify", user.name, oathtool(new_secret)) == "true\n"


def test_deleted_account(daemon: Daemon, user: LocalUser) -> None:
    renew(daemon, user.name)
    delete_user(user.name)
    assert json.loads(ok(daemon, "user", "list", "--json")) == []
    for args in (["user", "show", user.name], ["verify", user.name, "123456"],
                 ["provisioning-uri", user.name]):  # fmt: skip
        assert_error(cli(daemon, *args), f"NotFound: no such account: {user.name}")


# -- reaching the daemon -------------------------------------------------------------------


def test_no_socket() -> None:
    hint = "is otpgated running? (--socket or OTPGATE_SOCKET name another socket)"
    result = run("--socket", "/nonexistent/admin.sock", "config")
    assert_error(result, f"ClientError: no otpgated socket at /nonexistent/admin.sock: {hint}")
    result = run("config", socket_env="/nonexistent/admin.sock")
    assert_error(result, f"ClientError: no otpgated socket at /nonexistent/admin.sock: {hint}")


def test_not_a_socket(tmp_path: Path) -> None:
    hint = "is otpgated running? (--socket or OTPGATE_SOCKET name another socket)"
    plain = tmp_path / "plain"
    plain.write_text("")
    assert_error(
        run("config", "--socket", str(plain)), f"ClientError: {plain} is not a socket: {hint}"
    )
    assert_error(
        run("verify", "root", "123456", socket_env=str(tmp_path)),
        f"ClientError: {tmp_path} is not a socket: {hint}",
    )


def test_socket_nobody_listens_on(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # bound, never listening: connections are refused
        result = run("config", "--socket", str(path))
    assert_error_prefix(result, f"ClientError: cannot reach otpgated at {path}: ")


def test_daemon_that_does_not_answer(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        sock.listen(8)  # connections complete in the backlog; nothing ever answers
        started = time.monotonic()
        result = run("--timeout", "0.5", "config", "--socket", str(path))
        elapsed = time.monotonic() - started
    assert_error(result, f"ClientError: otpgated at {path} did not answer in time")
    assert elapsed < 10


def test_socket_option_wins_over_the_environment(daemon: Daemon, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.sock")
    for args in (["--socket", daemon.admin_socket, "config", "--json"],
                 ["config", "--json", "--socket", daemon.admin_socket]):  # fmt: skip
        result = run(*args, socket_env=missing)
        assert (result.returncode, result.stderr) == (0, "")
        assert json.loads(result.stdout) == DEFAULT_CONFIG
    assert_error_prefix(
        run("config", "--socket", missing, socket_env=daemon.admin_socket),
        f"ClientError: no otpgated socket at {missing}: ",
    )


def test_stopped_daemon(daemon: Daemon) -> None:
    assert config(daemon) == DEFAULT_CONFIG
    daemon.stop()
    result = cli(daemon, "config")
    assert_error_prefix(result, "ClientError: ")
    assert daemon.admin_socket in result.stderr


# -- usage and help ------------------------------------------------------------------------


def test_usage_errors() -> None:
    names = "config update renew-secret provisioning-uri verify confirm unset-secret unlock "
    names += "recovery-codes doctor setup audit rotate-key import user pki"
    choices = ", ".join(f"'{name}'" for name in names.split())
    cases = [
        ([], "otpgate", "the following arguments are required: COMMAND"),
        (["frobnicate"], "otpgate",
         f"argument COMMAND: invalid choice: 'frobnicate' (choose from {choices})"),
        (["user"], "otpgate user", "the following arguments are required: COMMAND"),
        (["setup"], "otpgate setup", "the following arguments are required: SERVICE"),
        (["config", "--colour"], "otpgate", "unrecognized arguments: --colour"),
        (["--timeout", "soon", "config"], "otpgate",
         "argument --timeout: invalid float value: 'soon'"),
    ]  # fmt: skip
    results = run_many([args for args, _, _ in cases])
    for (_, prog, message), result in zip(cases, results, strict=True):
        assert_usage_error(result, prog, message)


def test_help() -> None:
    top = run("--help")
    assert (top.returncode, top.stderr) == (0, "")
    assert top.stdout.startswith("usage: otpgate")
    for word in ("config", "update", "renew-secret", "provisioning-uri", "verify",
                 "unset-secret", "doctor", "setup", "user", "--json", "--socket",
                 "--timeout", "Exit status"):  # fmt: skip
        assert word in top.stdout, word
    expectations = {
        ("config",): ["--json", "--socket"],
        ("update",): ["KEY=VALUE", *KNOWN_KEYS.split(", ")],
        ("renew-secret",): ["USER", "--otp-digits", "--interval", "--qr", "png:FILE", "5..120"],
        ("provisioning-uri",): ["USER", "--qr", "svg:FILE"],
        ("verify",): ["TOKEN", "stdin"],
        ("unset-secret",): ["USER"],
        ("user",): ["show", "list"],
        ("user", "show"): ["USER", "--json"],
        ("user", "list"): ["--json"],
        ("doctor",): ["--sshd", "--pam-service"],
        ("setup",): ["ssh"],
        ("setup", "ssh"): ["--flow", "--undo", "--dry-run"],
    }
    results = run_many([[*command, "--help"] for command in expectations])
    for (command, words), result in zip(expectations.items(), results, strict=True):
        assert (result.returncode, result.stderr) == (0, ""), command
        assert result.stdout.startswith(f"usage: otpgate {' '.join(command)}"), result.stdout
        for word in words:
            assert word in result.stdout, (command, word)


def test_version() -> None:
    result = run("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"otpgate {__version__}\n", "")


def test_console_script(daemon: Daemon) -> None:
    script = Path(sys.executable).parent / "otpgate"
    result = subprocess.run(
        [str(script), "--socket", daemon.admin_socket, "config", "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout) == DEFAULT_CONFIG


# -- restart -------------------------------------------------------------------------------


def test_state_survives_a_restart(
    daemon: Daemon, user: LocalUser, make_user: Callable[..., LocalUser]
) -> None:
    set_config(daemon, "enabled=true", "window=1", "services.ssh=true", "issuer=Persisted",
               "lockout_threshold=2", "lockout_seconds=600", "interval=60")  # fmt: skip
    settings = config(daemon)
    uri = renew(daemon, user.name, "--interval", "30")
    secret = secret_of(uri)
    now = time.time()
    used = oathtool(secret, now)
    assert ok(daemon, "verify", user.name, used) == "true\n"
    locked = make_user()
    locked_secret = secret_of(renew(daemon, locked.name))
    for _ in range(2):
        cli(daemon, "verify", locked.name, wrong_code(locked_secret))
    assert user_json(daemon, locked.name)["locked_seconds"] > 0

    daemon.restart()

    assert config(daemon) == settings
    assert ok(daemon, "provisioning-uri", user.name) == uri + "\n"
    assert [u["username"] for u in json.loads(ok(daemon, "user", "list", "--json"))] == sorted(
        [user.name, locked.name]
    )
    # The spent step stays spent; the next one is fresh.
    assert verify_json(daemon, user.name, used)[1]["result"] == "replayed"
    assert ok(daemon, "verify", user.name, oathtool(secret, now + 30)) == "true\n"
    # A lockout outlives the restart.
    assert user_json(daemon, locked.name)["locked_seconds"] > 0
    assert verify_json(daemon, locked.name, oathtool(locked_secret))[1]["result"] == "locked"


def test_unset_secret_of_a_deleted_account(daemon: Daemon, user: LocalUser) -> None:
    renew(daemon, user.name)
    delete_user(user.name)
    result = cli(daemon, "unset-secret", user.name)
    assert (result.returncode, result.stdout) == (0, f"2FA secret of {user.name} removed\n")
    assert json.loads(ok(daemon, "user", "list", "--json")) == []
    again = cli(daemon, "unset-secret", user.name)
    assert again.returncode == 2 and again.stderr.startswith("NotFound:")


# -- issue: output, arguments and messages that must agree ---------------------------------


def test_closed_stdout_is_no_error_and_the_renewal_stands(daemon: Daemon, user: LocalUser) -> None:
    # `otpgate renew-secret USER --qr ansi | head -1`, made deterministic: the reader
    # is gone before the CLI writes a byte.
    before = renew(daemon, user.name)
    env = {**os.environ, "OTPGATE_SOCKET": daemon.admin_socket}
    for args, status in ((["renew-secret", "--now", user.name, "--qr", "ansi"], 0),
                         (["verify", user.name, "000000"], 1)):  # fmt: skip
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = subprocess.run(
                [*CLI, *args], stdout=write_end, stderr=subprocess.PIPE, text=True,
                env=env, timeout=60,
            )  # fmt: skip
        finally:
            os.close(write_end)
        # No traceback, no "Exception ignored": the command's own status stands.
        assert (result.returncode, result.stderr) == (status, ""), (args, result.stderr)
    after = ok(daemon, "provisioning-uri", user.name).strip()
    assert secret_of(after) != secret_of(before)  # the secret was renewed all the same


def test_verify_usage_is_one_user_and_token() -> None:
    result = run("verify", "--help")
    assert result.returncode == 0
    usage = result.stdout.split("\n\n")[0]
    assert usage.endswith("[USER] TOKEN"), usage
    assert "[[USER] TOKEN ...]" not in result.stdout


def test_update_booleans_and_issuer_are_documented_as_parsed() -> None:
    # The aliases yes/no, on/off, 1/0 are accepted (test above) and `issuer=` resets the
    # issuer: the error, --help and the man page say so.
    page = (REPO / "packaging" / "man" / "otpgate.1").read_text().replace("\\-", "-")
    help_text = " ".join(run("update", "--help").stdout.split())
    for text in (page, help_text):
        flat = " ".join(text.split())
        assert "yes, no, on, off, 1" in flat, flat
        assert "issuer=" in flat
    assert "otpgated's default" in " ".join(page.split())


@pytest.mark.parametrize("value", ["0", "-1", "0.05", "nan", "inf", "3601"])
def test_timeout_must_be_positive_and_bounded(daemon: Daemon, value: str) -> None:
    started = time.monotonic()
    result = cli(daemon, "--timeout", value, "config")
    assert_error(
        result,
        f"InvalidArgument: --timeout: must be from 0.1 to 3600 seconds (got {float(value):g})",
    )
    assert time.monotonic() - started < 10
    assert ok(daemon, "--timeout", "3600", "config").startswith("enabled")


def test_empty_user_is_refused_everywhere(daemon: Daemon) -> None:
    mean_you = "InvalidArgument: USER: must not be empty (leave it out to mean yourself)"
    commands = [
        (["user", "show", ""], mean_you),
        (["renew-secret", "", "--qr", "none"], mean_you),
        (["provisioning-uri", ""], mean_you),
        (["verify", "", "123456"], mean_you),
        (["unset-secret", ""], "InvalidArgument: USER: must not be empty"),
    ]
    results = run_many([args for args, _ in commands], daemon.admin_socket)
    for (_, message), result in zip(commands, results, strict=True):
        assert_error(result, message)
    assert json.loads(ok(daemon, "user", "list", "--json")) == []  # root was not enrolled


def test_user_show_says_not_enrolled_and_explains_a_lock(daemon: Daemon, user: LocalUser) -> None:
    lines = ok(daemon, "user", "show", user.name).splitlines()
    assert f"{'twofactor_interval':<25}  none (not enrolled)" in lines
    assert f"{'twofactor_otp_digits':<25}  none (not enrolled)" in lines
    set_config(daemon, "lockout_threshold=2")
    secret = secret_of(renew(daemon, user.name))
    for _ in range(2):
        cli(daemon, "verify", user.name, wrong_code(secret))
    shown = {
        line[:25].rstrip(): line[27:] for line in ok(daemon, "user", "show", user.name).splitlines()
    }
    # The store counts afresh once a lock begins: a bare 0 would read as "no wrong codes".
    assert shown["failed_attempts"] == "0 (counted afresh since the lock)"
    assert re.fullmatch(r"\d+ \(locked after too many wrong codes\)", shown["locked_seconds"])
    assert (shown["twofactor_interval"], shown["twofactor_otp_digits"]) == ("30", "6")
    data = user_json(daemon, user.name)  # JSON keeps its numbers
    assert data["failed_attempts"] == 0 and data["locked_seconds"] > 0


def test_help_describes_every_command_and_option() -> None:
    described = {
        ("user", "show"): "One account's NSS facts and 2FA state",
        ("user", "list"): "Every enrolled account",
        ("setup",): "Wire otpgate into a service",
        ("user",): "Show accounts",
    }
    results = run_many([[*command, "--help"] for command in described])
    for (command, text), result in zip(described.items(), results, strict=True):
        assert result.returncode == 0, command
        assert text in " ".join(result.stdout.split()), (command, result.stdout)
    wire = run("setup", "ssh", "--help").stdout
    options = re.findall(r"^  (--[a-z-]+)(?: [A-Z_]+)?\s*(.*(?:\n {20,}.*)*)", wire, re.MULTILINE)
    helps = {name: " ".join(text.split()) for name, text in options}
    for name in ("--sshd-config", "--pam-dir", "--backup-dir", "--sshd-config-dir"):
        assert helps[name] and not helps[name].startswith("(default"), (name, helps[name])


def test_readme_cli_table_lists_every_command() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## The CLI\n", 1)[1].split("\n## ", 1)[0]
    tables = re.findall(r"(?:^\|.*\|\n)+", section, re.MULTILINE)
    assert len(tables) == 1, tables  # one table: no blank line breaking it in two
    rows = [row for row in tables[0].splitlines()[2:]]
    named = {re.match(r"\| `otpgate ([a-z-]+(?: (?:show|list|ssh))?)", row)[1] for row in rows}  # type: ignore[index]
    assert named == {"config", "update", "renew-secret", "provisioning-uri", "verify",
                     "confirm", "unset-secret", "unlock", "recovery-codes", "import", "audit",
                     "rotate-key", "pki",
                     "user show",
                     "user list", "doctor", "setup ssh"}  # fmt: skip


def test_renewal_waits_for_confirm_and_the_old_code_works_meanwhile(
    daemon: Daemon, user: LocalUser
) -> None:
    # window=1: a code made just before a step boundary still counts when the daemon
    # reads it in the next step (the default window 0 made this test fail now and then).
    set_config(daemon, "window=1")
    old = secret_of(renew(daemon, user.name))
    pending = cli(daemon, "renew-secret", user.name, "--qr", "none")
    assert pending.returncode == 0
    assert "pending: confirm within 15 minutes" in pending.stderr
    assert "the current secret keeps working until then" in pending.stderr
    new = secret_of(pending.stdout.strip())
    assert new != old
    assert secret_of(ok(daemon, "provisioning-uri", user.name).strip()) == old
    shown = user_json(daemon, user.name)
    assert 0 < shown["pending_expires_in"] <= 900
    wrong = cli(daemon, "confirm", user.name, oathtool(old))
    assert wrong.returncode == 2
    assert wrong.stderr == "InvalidArgument: token: is not a current code of the pending secret\n"
    assert ok(daemon, "verify", user.name, oathtool(old)) == "true\n"  # no gap
    code = oathtool(new)
    done = cli(daemon, "confirm", user.name, code)
    assert done.returncode == 0
    assert (
        done.stdout
        == f"new 2FA secret of {user.name} confirmed (any earlier one no longer works)\n"
    )
    assert f"no recovery codes now: otpgate recovery-codes {user.name}" in done.stderr
    assert secret_of(ok(daemon, "provisioning-uri", user.name).strip()) == new
    assert cli(daemon, "verify", user.name, code).stdout == "false\n"  # spent by confirm
    again = cli(daemon, "confirm", user.name, code)
    assert again.returncode == 2 and again.stderr.startswith("FailedPrecondition: ")
    assert "no pending 2FA secret" in again.stderr
