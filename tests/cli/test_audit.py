"""The audit trail through a real daemon: every kind of event with its path and
caller, newest first, filtered and paged, never a code or a secret, and old
events purged by the retention setting."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable

import grpc
import pyotp
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.cli.test_cli import cli
from tests.conftest import Daemon, LocalUser


def _audit(daemon: Daemon, *args: str) -> list[dict[str, object]]:
    result = cli(daemon, "--json", "audit", *args)
    assert result.returncode == 0, result.stderr
    events: list[dict[str, object]] = json.loads(result.stdout)
    return events


def test_the_trail_says_who_did_what_and_never_a_code(
    daemon: Daemon, user: LocalUser, make_user: Callable[..., LocalUser]
) -> None:
    admin = daemon.admin()
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1), timeout=5)
    pending = admin.RenewSecret(pb.RenewSecretRequest(username=user.name, pending=True), timeout=5)
    totp = pyotp.parse_uri(pending.twofactor_config.provisioning_uri)
    confirming = totp.now()
    admin.ConfirmSecret(pb.ConfirmSecretRequest(username=user.name, token=confirming), timeout=5)
    codes = admin.MakeRecoveryCodes(pb.MakeRecoveryCodesRequest(username=user.name), timeout=5)
    request = pb.PamRequest(username=user.name, service="sshd", rhost="192.0.2.7", authtok="000000")
    daemon.pam().Verify(request, timeout=5)
    request.authtok = codes.codes[0]
    assert daemon.pam().Verify(request, timeout=5).verdict == pb.VERDICT_ALLOW
    admin.Unlock(pb.UnlockRequest(username=user.name), timeout=5)
    other = make_user()
    admin.RenewSecret(pb.RenewSecretRequest(username=other.name), timeout=5)

    events = _audit(daemon)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, reverse=True)  # newest first
    kinds = [e["event"] for e in events if e["username"] == user.name][::-1]
    assert kinds == [
        "secret_pending", "secret_confirmed", "recovery_codes_made", "verify",
        "recovery_code_used", "verify", "unlocked",
    ], kinds  # fmt: skip
    by_kind = {e["event"]: e for e in events if e["username"] == user.name}
    assert by_kind["secret_confirmed"]["path"] == "admin"
    assert by_kind["recovery_code_used"]["path"] == "pam:sshd"
    assert by_kind["recovery_code_used"]["caller"] == "rhost=192.0.2.7"
    assert by_kind["recovery_code_used"]["detail"] == "left=9"
    assert all(e["host"] for e in events)
    settings = [e for e in events if e["event"] == "settings_updated"]
    assert settings and "enabled" in str(settings[0]["detail"])
    text = json.dumps(events)
    for secretish in (confirming, totp.secret, *codes.codes, codes.codes[0].replace("-", "")):
        assert secretish not in text

    # Filters: one account; a time window; the text form.
    mine = _audit(daemon, "--user", other.name)
    assert {e["username"] for e in mine} == {other.name}
    assert _audit(daemon, "--until", "1") == []
    assert len(_audit(daemon, "--since", str(int(time.time()) - 3600))) == len(events)
    shown = cli(daemon, "audit", "--user", user.name, "--limit", "2")
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 2
    assert "unlocked" in shown.stdout.splitlines()[0] and "--limit N" in shown.stderr
    for bad, message in (
        (["--since", "yesterday"], "is not a date"),
        (["--limit", "0"], "--limit: must be from 1"),
        (["--user", "bad/name"], "username"),
        (["--since", "2026-12-02", "--until", "2026-12-01"], "since: must be before until"),
    ):
        result = cli(daemon, "audit", *bad)
        assert result.returncode == 2 and message in result.stderr, (bad, result.stderr)


def test_pages_walk_the_whole_trail_once(daemon: Daemon, user: LocalUser) -> None:
    admin = daemon.admin()
    for window in (1, 2, 3, 4, 5):
        admin.UpdateConfig(pb.UpdateConfigRequest(window=window), timeout=5)
    seen, token = [], ""
    while True:
        page = admin.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=2, page_token=token), timeout=5
        )
        seen.extend(e.id for e in page.events)
        assert len(page.events) <= 2
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert len(seen) == len(set(seen)) >= 5 and seen == sorted(seen, reverse=True)
    with pytest.raises(grpc.RpcError) as caught:
        admin.ListAuditEvents(pb.ListAuditEventsRequest(page_token="x"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_old_events_are_purged_by_the_retention_setting(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon("--database-timeout", "2")
    daemon.admin().UpdateConfig(pb.UpdateConfigRequest(window=2), timeout=5)
    daemon.stop()
    db = sqlite3.connect(daemon.database)
    old = int(time.time()) - 3 * 86400
    db.execute(
        "INSERT INTO audit_events (at, event, username, detail) VALUES (?, 'login', 'x', '')",
        (old,),
    )
    db.commit()
    db.close()
    config = daemon.root / "otpgated.toml"
    config.write_text("audit_retention_days = 2\n")
    daemon.extra_args += ["--config", str(config)]
    daemon.start()
    deadline = time.monotonic() + 10
    while any(e["at"] == old for e in _audit(daemon)):
        assert time.monotonic() < deadline, "the old event was not purged"
        time.sleep(0.2)
    assert [e["event"] for e in _audit(daemon)] == ["settings_updated"]
    assert "audit_purged events=1" in daemon.log()
