"""`otpgate` end to end against a running otpgated."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pyotp
import pytest

from tests.conftest import Daemon, LocalUser, delete_user


def cli(daemon: Daemon, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otpgate.cli.main", *args],
        input=stdin, capture_output=True, text=True, timeout=60,
        env={**os.environ, "OTPGATE_SOCKET": daemon.admin_socket},
    )  # fmt: skip


def config(daemon: Daemon) -> dict[str, object]:
    result = cli(daemon, "config", "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def renew(daemon: Daemon, user: str, *extra: str) -> str:
    result = cli(daemon, "renew-secret", user, "--qr", "none", *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_config_human_and_json(daemon: Daemon) -> None:
    human = cli(daemon, "config")
    assert human.returncode == 0
    assert human.stdout.splitlines()[0].split() == ["enabled", "false"]
    assert "services.ssh       false" in human.stdout
    data = config(daemon)
    assert data == {
        "enabled": False, "window": 0, "services": {"ssh": False}, "otp_digits": 6,
        "interval": 30, "issuer": "", "effective_issuer": "otpgate-test",
        "enrollment_policy": "optional", "lockout_threshold": 5, "lockout_seconds": 300,
    }  # fmt: skip
    before = cli(daemon, "--json", "config")
    assert json.loads(before.stdout) == data


def test_update_then_config(daemon: Daemon) -> None:
    result = cli(daemon, "update", "enabled=true", "window=1", "services.ssh=yes")
    assert (result.returncode, result.stdout) == (0, "updated\n")
    data = config(daemon)
    assert (data["enabled"], data["window"], data["services"]) == (True, 1, {"ssh": True})
    result = cli(daemon, "update", "enrollment_policy=required", "issuer=Acme Corp", "--json")
    assert json.loads(result.stdout)["enrollment_policy"] == "required"
    assert config(daemon)["issuer"] == "Acme Corp"


BOUNDS = [
    ("window", "0", "10", ["11"]),
    ("otp_digits", "6", "8", ["5", "9"]),
    ("interval", "5", "120", ["4", "121"]),
    ("lockout_threshold", "1", "100", ["0", "101"]),
    ("lockout_seconds", "1", "86400", ["0", "86401"]),
]


@pytest.mark.parametrize(("key", "low", "high", "bad"), BOUNDS)
def test_every_bound_through_the_cli(
    daemon: Daemon, key: str, low: str, high: str, bad: list[str]
) -> None:
    for good in (low, high):
        assert cli(daemon, "update", f"{key}={good}").returncode == 0
        assert config(daemon)[key] == int(good)
    before = config(daemon)
    for value in bad:
        result = cli(daemon, "update", f"{key}={value}")
        assert result.returncode == 2
        assert (
            result.stderr == f"InvalidArgument: {key}: must be from {low} to {high} (got {value})\n"
        )
        assert config(daemon) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["enrollment_policy=sometimes"], "enrollment_policy: must be one of optional, required"),
        (["issuer=a:b"], "issuer: must be 1 to 64 printable characters without ':'"),
        (["colour=blue"], "colour: unknown setting"),
        (["window"], "window: expected KEY=VALUE"),
        (["window=1", "window=2"], "window: given twice"),
        (["window=-1"], "window: must be a non-negative integer"),
        (["enabled=perhaps"], "enabled: must be true or false"),
        (["enabled=true", "window=11"], "window: must be from 0 to 10"),
    ],
)
def test_refused_updates_change_nothing(daemon: Daemon, args: list[str], needle: str) -> None:
    before = config(daemon)
    result = cli(daemon, "update", *args)
    assert result.returncode == 2
    assert result.stderr.startswith("InvalidArgument: ") and needle in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert config(daemon) == before


def test_renew_secret_uri_and_json(daemon: Daemon, user: LocalUser) -> None:
    uri = renew(daemon, user.name)
    parsed = urlparse(uri)
    assert (parsed.scheme, parsed.netloc) == ("otpauth", "totp")
    assert unquote(parsed.path).startswith(f"/otpgate-test:{user.name}@")
    query = parse_qs(parsed.query)
    assert set(query) == {"secret", "issuer"} and query["issuer"] == ["otpgate-test"]
    assert len(query["secret"][0]) == 32
    uri8 = renew(daemon, user.name, "--otp-digits", "8", "--interval", "60")
    query8 = parse_qs(urlparse(uri8).query)
    assert (query8["digits"], query8["period"]) == (["8"], ["60"])
    result = cli(daemon, "renew-secret", user.name, "--json", "--qr", "none")
    entry = json.loads(result.stdout)
    assert entry["username"] == user.name and entry["uid"] == user.uid and entry["local"]
    assert entry["home"] == f"/home/{user.name}" and entry["shell"] == "/bin/bash"
    assert entry["twofactor_config"]["secret_configured"] is True
    assert entry["twofactor_config"]["provisioning_uri"].startswith("otpauth://totp/")
    assert (
        cli(daemon, "provisioning-uri", user.name).stdout.strip()
        == (entry["twofactor_config"]["provisioning_uri"])
    )


def test_qr_codes_decode_back_to_the_uri(daemon: Daemon, user: LocalUser, tmp_path: Path) -> None:
    png, svg = tmp_path / "code.png", tmp_path / "code.svg"
    uri = renew(daemon, user.name)
    result = cli(daemon, "provisioning-uri", user.name, "--qr", f"png:{png}")
    assert result.returncode == 0 and result.stdout.strip() == uri
    decoded = subprocess.run(["zbarimg", "--raw", "-q", str(png)], capture_output=True, text=True)
    assert decoded.stdout.strip() == uri
    assert stat.S_IMODE(png.stat().st_mode) == 0o600
    assert cli(daemon, "provisioning-uri", user.name, "--qr", f"svg:{svg}").returncode == 0
    assert ET.parse(svg).getroot().tag.endswith("svg")  # noqa: S314 - our own file
    assert stat.S_IMODE(svg.stat().st_mode) == 0o600
    assert "\u2588" in cli(daemon, "provisioning-uri", user.name, "--qr", "utf8").stdout
    assert "\x1b[" in cli(daemon, "provisioning-uri", user.name, "--qr", "ansi").stdout
    bad = cli(daemon, "provisioning-uri", user.name, "--qr", "gif:x")
    assert bad.returncode == 2 and bad.stderr.startswith("InvalidArgument: --qr:")


def _oathtool(secret: str, *extra: str) -> str:
    return subprocess.run(
        ["oathtool", "--totp", "-b", secret, *extra], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_verify_once_then_replay(daemon: Daemon, user: LocalUser) -> None:
    assert cli(daemon, "update", "window=1").returncode == 0  # 30 s step boundaries
    secret = pyotp.parse_uri(renew(daemon, user.name)).secret
    code = _oathtool(secret)
    first = cli(daemon, "verify", user.name, code)
    assert (first.returncode, first.stdout) == (0, "true\n")
    again = cli(daemon, "verify", user.name, code, "--json")
    assert again.returncode == 1
    assert json.loads(again.stdout) == {"valid": False, "result": "replayed", "locked_seconds": 0}


def test_verify_from_stdin_and_eight_digits(daemon: Daemon, user: LocalUser) -> None:
    assert cli(daemon, "update", "window=1").returncode == 0
    secret = pyotp.parse_uri(renew(daemon, user.name, "--otp-digits", "8")).secret
    result = cli(daemon, "verify", user.name, "-", stdin=_oathtool(secret, "-d", "8") + "\n")
    assert (result.returncode, result.stdout) == (0, "true\n")


@pytest.mark.parametrize("token", ["abc", "12345", "123456789"])
def test_malformed_codes(daemon: Daemon, user: LocalUser, token: str) -> None:
    renew(daemon, user.name)
    result = cli(daemon, "verify", user.name, token)
    assert result.returncode == 2 and result.stderr.startswith("InvalidArgument: token:")


def test_lockout_through_the_cli(daemon: Daemon, user: LocalUser) -> None:
    assert cli(daemon, "update", "lockout_threshold=3").returncode == 0
    secret = pyotp.parse_uri(renew(daemon, user.name)).secret
    code = _oathtool(secret)
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    for _ in range(3):
        assert cli(daemon, "verify", user.name, wrong).returncode == 1
    locked = cli(daemon, "verify", user.name, code, "--json")
    assert locked.returncode == 1 and json.loads(locked.stdout)["result"] == "locked"
    shown = json.loads(cli(daemon, "user", "show", user.name, "--json").stdout)
    assert shown["locked_seconds"] > 0


def test_unset_list_and_not_enrolled(daemon: Daemon, user: LocalUser) -> None:
    renew(daemon, user.name)
    listing = cli(daemon, "user", "list")
    assert listing.stdout.splitlines()[0].split() == [
        "USERNAME", "UID", "DIGITS", "INTERVAL", "FAILED", "LOCKED_S"
    ]  # fmt: skip
    assert listing.stdout.splitlines()[1].split()[:2] == [user.name, str(user.uid)]
    assert [u["username"] for u in json.loads(cli(daemon, "user", "list", "--json").stdout)] == [
        user.name
    ]
    assert cli(daemon, "unset-secret", user.name).stdout == f"2FA secret of {user.name} removed\n"
    shown = json.loads(cli(daemon, "user", "show", user.name, "--json").stdout)
    assert shown["twofactor_auth_configured"] is False
    assert json.loads(cli(daemon, "user", "list", "--json").stdout) == []
    result = json.loads(cli(daemon, "verify", user.name, "123456", "--json").stdout)
    assert result["result"] == "not_enrolled"
    missing = cli(daemon, "provisioning-uri", user.name)
    assert missing.returncode == 2 and missing.stderr.startswith("NotFound:")


def test_recreated_account_is_not_enrolled(daemon: Daemon, user: LocalUser) -> None:
    renew(daemon, user.name)
    delete_user(user.name)
    subprocess.run(["useradd", "-u", str(user.uid + 1000), user.name], check=True)
    try:
        shown = json.loads(cli(daemon, "user", "show", user.name, "--json").stdout)
        assert shown["uid"] == user.uid + 1000 and shown["twofactor_auth_configured"] is False
        result = json.loads(cli(daemon, "verify", user.name, "123456", "--json").stdout)
        assert result["result"] == "not_enrolled"
    finally:
        delete_user(user.name)


def test_unknown_user(daemon: Daemon) -> None:
    result = cli(daemon, "verify", "no-such-otpgate-user", "123456")
    assert result.returncode == 2 and result.stderr.startswith("NotFound:")


def test_connection_errors(daemon: Daemon, tmp_path: Path) -> None:
    result = cli(daemon, "--socket", "/nonexistent/admin.sock", "config")
    assert result.returncode == 2
    assert result.stderr == (
        "ClientError: no otpgated socket at /nonexistent/admin.sock: is otpgated running? "
        "(--socket or OTPGATE_SOCKET name another socket)\n"
    )
    plain = tmp_path / "plain"
    plain.write_text("")
    result = cli(daemon, "config", "--socket", str(plain))
    assert result.returncode == 2 and "is not a socket" in result.stderr


def test_usage_and_help(daemon: Daemon) -> None:
    assert cli(daemon).returncode == 2
    top = cli(daemon, "--help")
    assert top.returncode == 0
    for command in ("config", "update", "renew-secret", "provisioning-uri", "verify",
                    "unset-secret", "user", "doctor", "setup"):  # fmt: skip
        assert command in top.stdout
        assert cli(daemon, command, "--help").returncode == 0
    assert "--otp-digits" in cli(daemon, "renew-secret", "--help").stdout


def test_state_survives_restart(daemon: Daemon, user: LocalUser) -> None:
    assert cli(daemon, "update", "enabled=true", "window=2").returncode == 0
    uri = renew(daemon, user.name)
    daemon.restart()
    assert config(daemon)["window"] == 2
    assert cli(daemon, "provisioning-uri", user.name).stdout.strip() == uri
    code = _oathtool(pyotp.parse_uri(uri).secret)
    assert cli(daemon, "verify", user.name, code).stdout == "true\n"
