"""The CLI's layers without a daemon: the transports' promises, the commands over any
Client, and the JSON shapes made from the protobuf messages."""

from __future__ import annotations

import argparse
import grp
import io
import json
import os
import socket
import time
from pathlib import Path

import pytest

from otpgate.cli import commands, render
from otpgate.cli.client import (
    LOGIN_CODE_TRIES,
    AdminClient,
    Client,
    SelfServiceClient,
    Verification,
    admin_group,
    connect,
)
from otpgate.cli.prompts import StdinSecrets
from otpgate.core.login import OTP_RETRIES
from otpgate.errors import ClientError, InvalidArgument, PermissionDenied
from otpgate.v1 import otpgate_pb2 as pb


class NoAnswers:
    """Secrets that fail the test if anything is asked."""

    def ask(self, prompt: str) -> str:
        raise AssertionError(f"asked {prompt!r}")

    def tell(self, message: str) -> None:
        raise AssertionError(f"told {message!r}")


class FakeClient:
    """A transport of the test's own: what the commands need is the Protocol only."""

    location = "fake"

    def __init__(self) -> None:
        self.user = pb.UserEntry(
            id=100001001, uid=1001, username="alice", groups=[1001, 27],
            twofactor_config=pb.TwoFactorUserConfig(secret_configured=False),
        )  # fmt: skip
        self.calls: list[str] = []

    def get_config(self) -> pb.TwoFactorConfig:
        return pb.TwoFactorConfig(window=1, enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED)

    def update_config(self, changes: pb.UpdateConfigRequest) -> pb.TwoFactorConfig:
        raise NotImplementedError

    def renew_secret(self, user: str, *, otp_digits: int, interval: int) -> pb.UserEntry:
        raise NotImplementedError

    def provisioning_uri(self, user: str) -> str:
        raise NotImplementedError

    def verify(self, user: str, token: str) -> Verification:
        self.calls.append(f"verify {user} {token}")
        return Verification(False, "replayed", 0)

    def unset_secret(self, user: str) -> pb.UserEntry:
        raise NotImplementedError

    def get_user(self, user: str) -> pb.UserEntry:
        self.calls.append(f"get_user {user}")
        return self.user

    def list_users(self) -> list[pb.UserEntry]:
        return [self.user]

    def explain_access(self, user: str, rhost: str) -> pb.ExplainAccessResponse:
        self.calls.append(f"explain_access {user} {rhost}")
        return pb.ExplainAccessResponse(
            asked=True, reason=pb.ACCESS_REASON_ENROLLED, explanation="would be asked: yes"
        )

    def close(self) -> None:
        pass


def _shown(result: commands.Result, *, as_json: bool = False) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    render.render(result, as_json=as_json, out=out, err=err)
    return out.getvalue(), err.getvalue()


def test_the_cli_knows_how_many_login_codes_otpgated_allows() -> None:
    assert LOGIN_CODE_TRIES == OTP_RETRIES


@pytest.mark.parametrize(
    ("call", "command"),
    [
        (lambda c: c.get_config(), "config"),
        (lambda c: c.update_config(pb.UpdateConfigRequest()), "update"),
        (lambda c: c.unset_secret("x"), "unset-secret"),
        (lambda c: c.list_users(), "user list"),
    ],
)
def test_user_socket_refuses_admin_calls_before_connecting(
    tmp_path: Path, call: object, command: str
) -> None:
    client = SelfServiceClient(
        str(tmp_path / "user.sock"), 5, command=command, secrets=NoAnswers()
    )  # no socket there: nothing is opened, nothing asked
    with pytest.raises(PermissionDenied, match=f"^{command} needs admin rights: run it as root"):
        call(client)  # type: ignore[operator]


def test_connect_picks_the_transport(tmp_path: Path) -> None:
    admin = tmp_path / "admin.sock"
    assert isinstance(connect(str(admin), 5, command="x", secrets=StdinSecrets()), AdminClient)
    user = connect(str(tmp_path / "user.sock"), 5, command="x", secrets=StdinSecrets())
    assert isinstance(user, SelfServiceClient)


def test_admin_group_is_the_sockets_group(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        group = next(g for g in grp.getgrall() if g.gr_gid != 0)
        os.chown(path, -1, group.gr_gid)
        assert admin_group(str(path)) == group.gr_name
    assert admin_group(str(tmp_path / "missing.sock")) is None  # no socket, no config file


def test_commands_run_over_any_client() -> None:
    fake = FakeClient()
    client: Client = fake  # the Protocol is all the commands know
    args = argparse.Namespace(user="alice", token="123456", json=False, from_address=None)
    verdict = commands.verify(client, args)
    assert (verdict.status, _shown(verdict)) == (
        1,
        ("false\n", "reason: replayed (already used; wait for the next code)\n"),
    )
    shown = commands.user_show(client, args)
    out, _ = _shown(shown)
    assert "twofactor_interval         none (not enrolled)\n" in out
    assert "access                     would be asked: yes\n" in out
    assert fake.calls == ["verify alice 123456", "get_user alice", "explain_access alice "]
    with pytest.raises(InvalidArgument, match="USER: must not be empty"):
        commands.user_show(client, argparse.Namespace(user="", from_address=None))


def test_json_shapes_come_from_the_messages() -> None:
    fake = FakeClient()
    data = json.loads(_shown(commands.UserShown(fake.user), as_json=True)[0])
    # Declaration order, 64-bit ids as numbers, an unset optional field as null.
    assert list(data) == [f.name for f in pb.UserEntry.DESCRIPTOR.fields]
    assert data["id"] == 100001001 and data["groups"] == [1001, 27]
    assert data["twofactor_config"] == {
        "provisioning_uri": None, "secret_configured": False, "interval": 0, "otp_digits": 0,
    }  # fmt: skip
    config = json.loads(_shown(commands.ConfigShown(fake.get_config()), as_json=True)[0])
    assert list(config) == [f.name for f in pb.TwoFactorConfig.DESCRIPTOR.fields]
    assert (config["enrollment_policy"], config["services"]) == ("required", {"ssh": False})
    verdict = commands.Verified(Verification(False, "locked", None))
    assert json.loads(_shown(verdict, as_json=True)[0]) == {
        "valid": False, "result": "locked", "locked_seconds": None,
    }  # fmt: skip
    assert _shown(verdict) == ("false\n", "account locked after too many wrong codes\n")


class Password:
    def ask(self, prompt: str) -> str:
        return "not-a-real-password"

    def tell(self, message: str) -> None:
        pass


def _full_listener(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A Unix socket whose listen queue is full: further connect()s get EAGAIN, as
    during another user's connect() flood on user.sock."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(0)
    fillers = []
    while True:
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            return listener, fillers
        fillers.append(s)


def test_self_service_waits_for_a_busy_socket_within_its_timeout(tmp_path: Path) -> None:
    path = tmp_path / "user.sock"
    listener, fillers = _full_listener(path)
    client = SelfServiceClient(str(path), 1.5, command="user show", secrets=Password())
    started = time.monotonic()
    with pytest.raises(ClientError, match="did not answer in time"):
        client.get_user(client.username)
    assert time.monotonic() - started >= 1.4  # it waited instead of failing at once
    for s in (listener, *fillers):
        s.close()


def test_self_service_fails_at_once_when_nobody_listens(tmp_path: Path) -> None:
    path = tmp_path / "user.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file left by a stopped daemon
    client = SelfServiceClient(str(path), 30, command="user show", secrets=NoAnswers())
    started = time.monotonic()
    with pytest.raises(ClientError, match="nobody listens there"):
        client.get_user(client.username)
    assert time.monotonic() - started < 5
