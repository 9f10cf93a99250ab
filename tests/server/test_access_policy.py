"""The access policy over raw gRPC: PamGate decides with PAM_RHOST (the hook's
rhost), ExplainAccess explains, who may call it, and the grace is audited."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from otpgate.server import roles
from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser
from tests.fleet_harness import Central

EXPLAIN = "/otpgate.v1.TwoFactorAdmin/ExplainAccess"


def update(daemon: Daemon, **fields: object) -> pb.TwoFactorConfig:
    request = pb.UpdateConfigRequest(enabled=True, services_ssh=True)
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(request, name).CopyFrom(pb.StringList(values=value))
        else:
            setattr(request, name, value)
    reply: pb.TwoFactorConfig = daemon.admin().UpdateConfig(request, timeout=5)
    return reply


def check(daemon: Daemon, user: str, rhost: str, service: str = "sshd") -> pb.PamDecision:
    request = pb.PamRequest(username=user, service=service, rhost=rhost)
    reply: pb.PamDecision = daemon.pam().Check(request, timeout=5)
    return reply


def test_the_hooks_rhost_decides_an_exempt_network(daemon: Daemon, user: LocalUser) -> None:
    daemon.admin().RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    config = update(daemon, exempt_networks=["127.0.0.2/32", "2001:db8::/32"])
    assert list(config.exempt_networks) == ["127.0.0.2/32", "2001:db8::/32"]
    for name in (user.name, "nosuchotpgateuser"):
        assert check(daemon, name, "127.0.0.2").verdict == pb.VERDICT_NOT_REQUIRED
        assert check(daemon, name, "::ffff:127.0.0.2").verdict == pb.VERDICT_NOT_REQUIRED
        for rhost in ("127.0.0.1", "", "localhost", "127.0.0.2.example"):
            assert check(daemon, name, rhost).verdict == pb.VERDICT_OTP_REQUIRED, (name, rhost)
    verify = pb.PamRequest(username=user.name, service="sshd", rhost="2001:db8::5", authtok="1")
    assert daemon.pam().Verify(verify, timeout=5).verdict == pb.VERDICT_NOT_REQUIRED
    verify.rhost = "2001:db9::5"
    assert daemon.pam().Verify(verify, timeout=5).verdict == pb.VERDICT_DENY
    # Only where 2FA applies: another service is covered too, an sshd copy only with ssh.
    assert check(daemon, user.name, "127.0.0.1", "sudo").verdict == pb.VERDICT_OTP_REQUIRED
    update(daemon, services_ssh=False)
    assert check(daemon, user.name, "127.0.0.1").verdict == pb.VERDICT_NOT_REQUIRED


def test_explain_access(daemon: Daemon, user: LocalUser) -> None:
    admin = daemon.admin()
    update(daemon, exempt_networks=["10.0.0.0/8"])
    reply = admin.ExplainAccess(pb.ExplainAccessRequest(username=user.name, rhost="10.9.8.7"))
    assert (reply.asked, reply.reason, reply.matched) == (
        False,
        pb.ACCESS_REASON_EXEMPT_NETWORK,
        "10.0.0.0/8",
    )
    reply = admin.ExplainAccess(pb.ExplainAccessRequest(username=user.name), timeout=5)
    assert (reply.asked, reply.reason) == (False, pb.ACCESS_REASON_NOT_ENROLLED_OPTIONAL)
    reply = admin.ExplainAccess(
        pb.ExplainAccessRequest(username=user.name, service="sshd-edge"), timeout=5
    )
    assert reply.reason == pb.ACCESS_REASON_NOT_ENROLLED_OPTIONAL
    update(daemon, services_ssh=False)
    reply = admin.ExplainAccess(pb.ExplainAccessRequest(username=user.name), timeout=5)
    assert reply.reason == pb.ACCESS_REASON_NOT_COVERED
    reply = admin.ExplainAccess(
        pb.ExplainAccessRequest(username=user.name, service="login"), timeout=5
    )
    assert reply.reason == pb.ACCESS_REASON_NOT_ENROLLED_OPTIONAL  # covered: not sshd
    refusals = [
        (pb.ExplainAccessRequest(username="nosuchotpgateuser"), grpc.StatusCode.NOT_FOUND, ""),
        (pb.ExplainAccessRequest(username="-x"), grpc.StatusCode.INVALID_ARGUMENT, "username:"),
        (pb.ExplainAccessRequest(username=user.name, rhost="a\nb"),
         grpc.StatusCode.INVALID_ARGUMENT, "rhost:"),
        (pb.ExplainAccessRequest(username=user.name, rhost="1" * 257),
         grpc.StatusCode.INVALID_ARGUMENT, "rhost:"),
        (pb.ExplainAccessRequest(username=user.name, service="x" * 65),
         grpc.StatusCode.INVALID_ARGUMENT, "service:"),
    ]  # fmt: skip
    for request, code, details in refusals:
        with pytest.raises(grpc.RpcError) as caught:
            admin.ExplainAccess(request, timeout=5)
        assert caught.value.code() == code, request  # type: ignore[attr-defined]
        assert caught.value.details().startswith(details)  # type: ignore[attr-defined]


def test_explain_access_is_a_read_for_every_admin_role() -> None:
    for role in ("admin", "helpdesk", "auditor"):
        assert roles.allowed(role, EXPLAIN), role
    assert not roles.allowed("host", EXPLAIN)


def test_the_enrollment_grace_is_audited_with_the_rhost(daemon: Daemon, user: LocalUser) -> None:
    update(
        daemon,
        enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED,
        enrollment_deadline="2999-12-31",
    )
    reply = check(daemon, user.name, "192.0.2.9")
    assert reply.verdict == pb.VERDICT_NOT_REQUIRED
    assert "otpgate renew-secret" in reply.message and "2999-12-31" in reply.message
    events = (
        daemon.admin()
        .ListAuditEvents(pb.ListAuditEventsRequest(username=user.name), timeout=5)
        .events
    )
    grace = [e for e in events if e.event == "enrollment_grace"]
    assert [(e.detail, e.path, e.caller) for e in grace] == [
        ("until=2999-12-31", "pam:sshd", "rhost=192.0.2.9")
    ]
    line = f"enrollment_grace user={user.name} service=sshd until=2999-12-31"
    deadline = time.monotonic() + 10  # the log is written in batches
    while line not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert line in daemon.log()
    update(daemon, enrollment_deadline="2000-01-01")
    reply = check(daemon, user.name, "192.0.2.9")
    assert reply.verdict == pb.VERDICT_NOT_ENROLLED and "otpgate renew-secret" in reply.message


def test_an_edge_passes_the_rhost_and_the_grace_hint_upstream(
    make_central: Callable[..., Central],
    make_edge: Callable[..., Daemon],
    password_pam_service: str,
    user: LocalUser,
) -> None:
    central = make_central()
    edge = make_edge(central.address, extra=f'password_pam_service = "{password_pam_service}"')
    update(central.daemon, exempt_networks=["192.0.2.0/24"])
    central.daemon.admin().RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    pam = edge.pam()

    def ask(method: str, rhost: str, authtok: str = "") -> pb.PamDecision:
        request = pb.PamRequest(username=user.name, service="sshd", rhost=rhost, authtok=authtok)
        reply: pb.PamDecision = getattr(pam, method)(request, timeout=10)
        return reply

    assert ask("Check", "192.0.2.5").verdict == pb.VERDICT_NOT_REQUIRED
    assert ask("Check", "198.51.100.5").verdict == pb.VERDICT_OTP_REQUIRED
    assert ask("Verify", "192.0.2.5", "000000").verdict == pb.VERDICT_NOT_REQUIRED
    # Single prompt: the password alone from the exempt network (checked on the edge).
    assert ask("VerifySinglePrompt", "192.0.2.5", user.password).verdict == pb.VERDICT_ALLOW
    refused = ask("VerifySinglePrompt", "198.51.100.5", user.password)
    assert refused.verdict == pb.VERDICT_DENY
    # The grace's hint reaches the hook through the edge, in every mode.
    central.daemon.admin().UnsetSecret(pb.UnsetSecretRequest(username=user.name), timeout=5)
    update(
        central.daemon,
        enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED,
        enrollment_deadline="2999-12-31",
    )
    for method, authtok, verdict in [
        ("Check", "", pb.VERDICT_NOT_REQUIRED),
        ("Verify", "123456", pb.VERDICT_NOT_REQUIRED),
        ("VerifySinglePrompt", user.password, pb.VERDICT_ALLOW),
    ]:
        reply = ask(method, "198.51.100.5", authtok)
        assert reply.verdict == verdict and "otpgate renew-secret" in reply.message, method
