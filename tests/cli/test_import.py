"""`otpgate import`: files written by the peers' own tools (google-authenticator,
pam_google_authenticator.so, oathtool) go into a real daemon, and the same phone
keeps working: a code good before is good after, one already spent stays spent,
scratch codes become recovery codes. All or nothing, with a dry run."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.cli.test_cli import cli
from tests.conftest import Daemon, LocalUser
from tests.core.test_imports import (
    clear_of_step_edge,
    ga_code,
    google_authenticator,
    login,
    needs_ga,
    needs_ga_pam,
    needs_oathtool,
    oathtool,
    pam_service,  # noqa: F401 - the fixture
    scratch_lines,
)


def _verify(daemon: Daemon, user: str, code: str) -> pb.VerifyTokenResponse:
    request = pb.VerifyTokenRequest(username=user, token=code)
    reply: pb.VerifyTokenResponse = daemon.admin().VerifyToken(request, timeout=5)
    return reply


@needs_ga
@needs_oathtool
@needs_ga_pam
def test_a_google_authenticator_user_keeps_their_phone(
    daemon: Daemon,
    user: LocalUser,
    tmp_path: Path,
    pam_service: Callable[[str], str],  # noqa: F811
) -> None:
    path = tmp_path / ".google_authenticator"
    text = google_authenticator(path, "-t", "-d", "-r", "3", "-R", "30", "-w", "3", "-e", "4")
    secret = text.splitlines()[0]
    scratch = scratch_lines(text)
    # The user logs in through google-authenticator's own module, spending a code.
    service = pam_service(f"pam_google_authenticator.so secret={path}")
    step = clear_of_step_edge(30, margin=8)
    assert login(service, "root", ga_code(secret, step))

    dry = cli(daemon, "import", "google-authenticator", "--user", user.name, str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"would import {user.name}: TOTP, 6 digits, 30 s, 4 scratch")
    assert "otpgate update window=1" in dry.stderr and "RATE_LIMIT" in dry.stderr
    assert "remove it now" not in dry.stderr
    shown = daemon.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert not shown.twofactor_auth_configured  # a dry run writes nothing

    done = cli(daemon, "import", "google-authenticator", "--user", user.name, str(path))
    assert done.returncode == 0, done.stderr
    assert f"{path} still holds the secrets in plain text: remove it now" in done.stderr
    assert path.exists()  # never removed by otpgate
    # The code spent through google-authenticator stays spent; the next one works.
    # (window=1 first, so that a step ended during the import cannot make it "invalid".)
    daemon.admin().UpdateConfig(pb.UpdateConfigRequest(window=1), timeout=5)
    assert _verify(daemon, user.name, ga_code(secret, step)).result == pb.VERIFY_RESULT_REPLAYED
    assert _verify(daemon, user.name, ga_code(secret, step + 1)).valid
    # A scratch code is now a recovery code: good once.
    first = _verify(daemon, user.name, scratch[0])
    assert first.valid and first.recovery_codes_left == 3
    assert not _verify(daemon, user.name, scratch[0]).valid
    # Importing again would overwrite an enrolled account: refused, all or nothing.
    again = cli(daemon, "import", "google-authenticator", "--user", user.name, str(path))
    assert again.returncode == 2 and again.stderr.startswith("FailedPrecondition: ")
    assert "already enrolled" in again.stderr and user.name in again.stderr


@needs_ga
def test_google_authenticator_files_refused_with_the_reason(
    daemon: Daemon, user: LocalUser, tmp_path: Path
) -> None:
    hotp = tmp_path / "hotp"
    google_authenticator(hotp, "-c", "-u", "-w", "3", "-e", "0")
    refused = cli(daemon, "import", "google-authenticator", "--user", user.name, str(hotp))
    assert refused.returncode == 2 and "HOTP" in refused.stderr
    missing = cli(daemon, "import", "google-authenticator", "--user", "nosuchuserxyz", str(hotp))
    assert missing.returncode == 2
    link = tmp_path / "link"
    link.symlink_to(hotp)
    linked = cli(daemon, "import", "google-authenticator", "--user", user.name, str(link))
    assert linked.returncode == 2 and "InvalidArgument: FILE: cannot open" in linked.stderr
    shown = daemon.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert not shown.twofactor_auth_configured


@needs_oathtool
def test_oath_users_all_or_nothing(
    daemon: Daemon, user: LocalUser, make_user: Callable[..., LocalUser], tmp_path: Path
) -> None:
    other, third = make_user(), make_user()
    keys = {other.name: "3132333435363738393031323334353637383930", third.name: "00" * 20}
    step = clear_of_step_edge(30, margin=5)
    last = time.strftime("%Y-%m-%dT%H:%M:%SL", time.localtime(step * 30))
    spent = oathtool("--totp", "-N", f"@{step * 30}", keys[other.name])
    users_oath = tmp_path / "users.oath"
    users_oath.write_text(
        f"# comment\nHOTP/T30 {other.name} - {keys[other.name]} 0 {spent} {last}\n"
        f"HOTP/T30/8 {third.name} - {keys[third.name]}\n"
        f"HOTP {user.name} - {keys[third.name]}\n"
    )
    dry = cli(daemon, "--json", "import", "oath-users", str(users_oath), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["usernames"] == [other.name, third.name]
    assert any("HOTP" in line and user.name in line for line in report["skipped"])

    # One account already enrolled: nothing is imported.
    daemon.admin().RenewSecret(pb.RenewSecretRequest(username=third.name), timeout=5)
    refused = cli(daemon, "import", "oath-users", str(users_oath))
    assert refused.returncode == 2 and third.name in refused.stderr
    assert (
        not daemon.admin()
        .GetUser(pb.GetUserRequest(username=other.name), timeout=5)
        .twofactor_auth_configured
    )
    daemon.admin().UnsetSecret(pb.UnsetSecretRequest(username=third.name), timeout=5)

    done = cli(daemon, "import", "oath-users", str(users_oath))
    assert done.returncode == 0, done.stderr
    # window=1 first: the spent step is still inside the window if the imports above
    # took the clock past its end, so "replayed" can only come from the imported state.
    daemon.admin().UpdateConfig(pb.UpdateConfigRequest(window=1), timeout=5)
    assert _verify(daemon, other.name, spent).result == pb.VERIFY_RESULT_REPLAYED
    after = oathtool("--totp", "-N", f"@{(step + 1) * 30}", keys[other.name])
    assert _verify(daemon, other.name, after).valid
    eight = oathtool("--totp", "-d", "8", keys[third.name])
    assert _verify(daemon, third.name, eight).valid


def test_import_refuses_bad_files(daemon: Daemon, user: LocalUser, tmp_path: Path) -> None:
    empty = tmp_path / "users.oath"
    empty.write_text("# nothing here\n")
    result = cli(daemon, "import", "oath-users", str(empty))
    assert result.returncode == 2 and "no token otpgate can import" in result.stderr
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate((1 << 20) + 1)
    result = cli(daemon, "import", "oath-users", str(big))
    assert result.returncode == 2 and "larger than" in result.stderr
    result = cli(daemon, "import", "oath-users", str(tmp_path))
    assert result.returncode == 2 and "not a regular file" in result.stderr
    bad_zone = cli(daemon, "import", "oath-users", str(empty), "--timezone", "Mars/Olympus")
    assert bad_zone.returncode == 2 and "no such time zone" in bad_zone.stderr


@pytest.fixture(autouse=True)
def _no_leftover_pam_files() -> None:
    yield  # type: ignore[misc]
    leftovers = subprocess.run(
        ["sh", "-c", "ls /etc/pam.d | grep otpgate-test-import || true"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert leftovers == ""
