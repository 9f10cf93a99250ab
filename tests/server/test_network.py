"""The network listener, attacked and used for real: otpgated processes on
127.0.0.1 with mutual TLS, certificates made by otpgate.pki (tests.fleet_harness).

Who gets in at all (TLS: a client certificate of the right CA, within its dates, not
revoked; never plain TCP), what each role may call (every method of every service,
walked against server.roles' table, and the issue's expectations by name, so that a
wrong table fails too), a help desk's day over the network with its audit trail,
SIGHUP reloading roles, revocations and the server certificate without a restart,
and configurations the daemon refuses to start with.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pyotp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2

from otpgate import pki
from otpgate.server import roles
from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser
from tests.fleet_harness import Central, Pki, central_toml, free_port

ADMIN = "otpgate.v1.TwoFactorAdmin"
HOST = "otpgate.v1.HostGate"
_SERVICES = pb.DESCRIPTOR.services_by_name
# Served on the listener (server.roles.SERVICES) and not (Unix sockets only).
SERVED: tuple[ServiceDescriptor, ...] = tuple(roles.SERVICES)
NOT_SERVED: tuple[ServiceDescriptor, ...] = (_SERVICES["PamGate"], _SERVICES["UserSelfService"])

# The shared central's certificates: one per role, one whose name is in no [roles].
ROLE_CERTS = {role: f"net-{role}" for role in roles.ROLES}
STRANGER = "net-stranger"
EXPIRED = "net-expired"  # an admin by name, its certificate out of date
DENIED = "net-denied"  # an admin by name, its serial in tls_deny_serials
DESK = "net-desk"  # the help desk of the end-to-end test (its own log lines)


# -- helpers -----------------------------------------------------------------------


def full_name(service: ServiceDescriptor, method: MethodDescriptor) -> str:
    return f"/{service.full_name}/{method.name}"


def every_method(*services: ServiceDescriptor) -> list[tuple[str, type[Message]]]:
    return [(full_name(s, m), GetMessageClass(m.input_type)) for s in services for m in s.methods]


def call(
    channel: grpc.Channel, method: str, request: Message, *, timeout: float = 10
) -> tuple[grpc.StatusCode, str]:
    """Any method by its full name; the status and its details (OK, "" on success)."""
    stub = channel.unary_unary(
        method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=None
    )
    try:
        stub(request, timeout=timeout)
    except grpc.RpcError as exc:
        assert isinstance(exc, grpc.Call)
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def refused(thunk: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        thunk()
    return caught.value


def code_of(exc: grpc.RpcError) -> grpc.StatusCode:
    assert isinstance(exc, grpc.Call)
    return exc.code()


def details_of(exc: grpc.RpcError) -> str:
    assert isinstance(exc, grpc.Call)
    return exc.details() or ""


def serial_of(cert: Path) -> int:
    return pki.read_certificate(cert).serial_number


def credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())


def wait_for_log(daemon: Daemon, pattern: str, *, after: int = 0, timeout: float = 5) -> str:
    """The first log line matching `pattern` written after offset `after` (the daemon
    writes its log in batches)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        found = regex.search(daemon.log()[after:])
        if found:
            return found.group(0)
        if time.monotonic() >= deadline:
            raise AssertionError(f"no log line /{pattern}/ in {timeout}s:\n{daemon.log()[after:]}")
        time.sleep(0.05)


def reload(central: Central, toml: str) -> int:
    """Rewrite the central's TOML, SIGHUP it; the log offset before the signal."""
    assert central.daemon.proc is not None
    central.config.write_text(toml)
    offset = len(central.daemon.log())
    central.daemon.proc.send_signal(signal.SIGHUP)
    return offset


def peer_serial(port: int, ca: Path, cert: Path, key: Path) -> int:
    """The serial of the certificate the listener shows a new TLS handshake (a raw
    connection with Python's ssl module, verifying it against `ca` and localhost)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def settings_seen(central: Central) -> pb.TwoFactorConfig:
    """GetConfig through admin.sock (not the listener)."""
    config: pb.TwoFactorConfig = central.daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=5)
    return config


def settings_events(central: Central) -> list[pb.AuditEvent]:
    reply = central.daemon.admin().ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=1000), timeout=5
    )
    return [e for e in reply.events if e.event == "settings_updated"]


# An attack's change: every field away from its default.
ATTACK = pb.UpdateConfigRequest(enabled=True, window=3, services_ssh=True, lockout_threshold=9)


# -- a central for the whole module (the refusals and the role table) ---------------


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second CA nobody's central trusts."""
    return Pki.create(tmp_path_factory.mktemp("other-pki") / "ca")


@pytest.fixture(scope="module")
def shared(fleet_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Central]:
    """One central for the module's read-mostly tests (make_central is per test)."""
    for role, name in ROLE_CERTS.items():
        fleet_pki.issue(name, role)
    fleet_pki.issue(STRANGER, "admin")
    fleet_pki.issue(DESK, "helpdesk")
    fleet_pki.expired(EXPIRED, "admin")
    denied, _ = fleet_pki.issue(DENIED, "admin")
    table = {name: role for role, name in ROLE_CERTS.items()}
    table |= {EXPIRED: "admin", DENIED: "admin", DESK: "helpdesk"}
    root = tmp_path_factory.mktemp("shared-central")
    port = free_port()
    config = root / "otpgated.toml"
    deny = f'tls_deny_serials = ["{serial_of(denied):x}"]'
    config.write_text(central_toml(fleet_pki, port, table, deny))
    daemon = Daemon(root, ["--config", str(config)])
    try:
        daemon.start()
        yield Central(daemon, port, fleet_pki, config, table)
    finally:
        daemon.stop(signal.SIGKILL)


# -- 1. refusals at the TLS layer or at the first call ------------------------------


def assert_attack_changed_nothing(central: Central, channel: grpc.Channel) -> None:
    before, events = settings_seen(central), len(settings_events(central))
    code, _ = call(channel, f"/{ADMIN}/UpdateConfig", ATTACK, timeout=5)
    assert code != grpc.StatusCode.OK
    assert settings_seen(central) == before
    assert len(settings_events(central)) == events


def served(central: Central, channel: grpc.Channel) -> bool:
    """The control: the same call from a good certificate is answered."""
    return call(channel, f"/{ADMIN}/GetConfig", pb.GetConfigRequest()) == (grpc.StatusCode.OK, "")


def test_no_client_certificate_fails_the_handshake(shared: Central, fleet_pki: Pki) -> None:
    channel = grpc.secure_channel(
        shared.address, grpc.ssl_channel_credentials(root_certificates=fleet_pki.ca.read_bytes())
    )
    code, _ = call(channel, f"/{ADMIN}/GetConfig", pb.GetConfigRequest(), timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert_attack_changed_nothing(shared, channel)
    assert served(shared, shared.channel(ROLE_CERTS["admin"]))


def test_a_certificate_of_another_ca_fails_the_handshake(
    shared: Central, fleet_pki: Pki, other_pki: Pki
) -> None:
    # The same name as the admin in [roles]: the name alone opens nothing.
    cert, key = other_pki.issue(ROLE_CERTS["admin"], "admin")
    # The client trusts the server's CA; its own certificate is the other CA's.
    channel = grpc.secure_channel(shared.address, credentials(fleet_pki.ca, cert, key))
    code, _ = call(channel, f"/{ADMIN}/GetConfig", pb.GetConfigRequest(), timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert_attack_changed_nothing(shared, channel)
    assert served(shared, shared.channel(ROLE_CERTS["admin"]))  # the same name, our CA


def test_an_expired_certificate_fails_the_handshake(
    shared: Central, fleet_pki: Pki, tmp_path: Path
) -> None:
    cert, key = fleet_pki.expired(EXPIRED, "admin")
    assert pki.read_certificate(cert).not_valid_after_utc < dt.datetime.now(dt.UTC)
    channel = grpc.secure_channel(shared.address, credentials(fleet_pki.ca, cert, key))
    code, _ = call(channel, f"/{ADMIN}/GetConfig", pb.GetConfigRequest(), timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert_attack_changed_nothing(shared, channel)
    # The same name and CA within its dates is served: the dates were the refusal.
    fresh = pki.issue_client(fleet_pki.directory, EXPIRED, role="admin", out_dir=tmp_path)
    good = grpc.secure_channel(shared.address, credentials(fleet_pki.ca, fresh.cert, fresh.key))
    assert served(shared, good)


def test_a_denied_serial_is_unauthenticated_at_every_call(shared: Central) -> None:
    channel = shared.channel(DENIED, "admin")
    for method, request in every_method(*SERVED):
        code, details = call(channel, method, request())
        assert (code, method) == (grpc.StatusCode.UNAUTHENTICATED, method), details
        assert "is revoked" in details
    assert_attack_changed_nothing(shared, channel)
    serial = f"{serial_of(shared.pki.issue(DENIED)[0]):x}"
    wait_for_log(
        shared.daemon,
        rf"remote_refused cert={DENIED} serial={serial} role=admin "
        rf"method=/{ADMIN}/UpdateConfig reason=revoked",
    )


def test_plain_tcp_gets_no_answer(shared: Central) -> None:
    channel = grpc.insecure_channel(shared.address)
    code, _ = call(channel, f"/{ADMIN}/GetConfig", pb.GetConfigRequest(), timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert_attack_changed_nothing(shared, channel)
    # Below gRPC: HTTP/2's preface in clear gets nothing back, or at most a TLS alert
    # record (0x15), never HTTP/2 (a server SETTINGS frame: type 0x4 at byte 3).
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        answer = b""
        try:
            while len(answer) < 64:
                chunk = raw.recv(64)
                if not chunk:
                    break
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert answer == b"" or answer[:1] == b"\x15", answer


@pytest.fixture
def crl_central(make_daemon: Callable[..., Daemon], tmp_path: Path) -> tuple[Central, Pki]:
    """A central of its own CA whose tls_crl lists one admin's certificate (revoke
    writes the CA directory's crl.pem: not the session's)."""
    own = Pki.create(tmp_path / "ca")
    own.issue("crl-admin", "admin")
    revoked_cert, _ = own.issue("crl-revoked", "admin")
    revocation = pki.revoke(own.directory, cert_file=revoked_cert)
    assert pki.load_crl_serials(revocation.crl, own.ca) >= {serial_of(revoked_cert)}
    root = tmp_path / "central"
    root.mkdir()
    port = free_port()
    table = {"crl-admin": "admin", "crl-revoked": "admin"}
    config = root / "otpgated.toml"
    config.write_text(central_toml(own, port, table, f'tls_crl = "{revocation.crl}"'))
    daemon = make_daemon("--config", str(config), root=root)
    return Central(daemon, port, own, config, table), own


def test_a_certificate_in_the_crl_is_unauthenticated(crl_central: tuple[Central, Pki]) -> None:
    central, _ = crl_central
    channel = central.channel("crl-revoked")
    code, details = call(channel, f"/{ADMIN}/GetConfig", pb.GetConfigRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "crl-revoked" in details and "is revoked" in details
    assert_attack_changed_nothing(central, channel)
    # The CRL is not a blanket refusal: the CA's other admin is served.
    assert call(central.channel("crl-admin"), f"/{ADMIN}/GetConfig", pb.GetConfigRequest()) == (
        grpc.StatusCode.OK,
        "",
    )


# -- 2. role x method --------------------------------------------------------------


# What the guard answers when it refuses (server.network), never a servicer.
GUARD_WORDS = re.compile(
    r"has no role in otpgated's \[roles\]|^role \S+ may not call \S+$"
    r"|is not served on the network listener$|is revoked"
)


def granted_requests(central: Central, user: LocalUser) -> dict[str, Message]:
    """Requests for the HostGate methods that need a grant (an empty one is refused
    PERMISSION_DENIED by the servicer, which would hide what the guard did): each with
    a grant of its own for `user`, proven with a recovery code by the host certificate."""
    local = central.daemon.admin()
    local.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    codes = local.MakeRecoveryCodes(pb.MakeRecoveryCodesRequest(username=user.name), timeout=5)
    host = central.host_as(ROLE_CERTS["host"])

    def grant(code: str) -> str:
        reply = host.ProveCode(pb.ProveCodeRequest(username=user.name, token=code), timeout=5)
        assert reply.grant, reply
        return str(reply.grant)

    return {
        f"/{HOST}/RenewSecret": pb.HostRenewSecretRequest(
            username=user.name, grant=grant(codes.codes[0])
        ),
        f"/{HOST}/MakeRecoveryCodes": pb.HostGrantRequest(
            username=user.name, grant=grant(codes.codes[1])
        ),
    }


def test_every_role_against_every_method(shared: Central, user: LocalUser) -> None:
    identities: dict[str, str | None] = {name: role for role, name in ROLE_CERTS.items()}
    identities[STRANGER] = None
    methods = every_method(*SERVED, *NOT_SERVED)
    assert len(methods) > 25  # the descriptors were walked, not an empty list
    special = granted_requests(shared, user)
    offset = len(shared.daemon.log())
    wrong, allowed = [], []
    for name, role in identities.items():
        channel = shared.channel(name, role or "admin")
        for method, request in methods:
            code, details = call(channel, method, special.get(method) or request())
            if roles.allowed(role, method):
                allowed.append((name, method))
                ok = code not in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                )
                ok = ok and not GUARD_WORDS.search(details)
            else:
                ok = code == grpc.StatusCode.PERMISSION_DENIED and bool(GUARD_WORDS.search(details))
            if not ok:
                wrong.append(f"{name} ({role}) {method}: {code.name} {details}")
        # Health's Check for every certificate with a role, nothing for one without;
        # its Watch (a stream that holds a worker thread) for nobody.
        health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        if role is None:
            code, _ = call(channel, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest())
            assert code == grpc.StatusCode.PERMISSION_DENIED
        else:
            reply = health(health_pb2.HealthCheckRequest(service=ADMIN), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(watch(health_pb2.HealthCheckRequest(service=ADMIN), timeout=5)))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert wrong == []
    assert len(allowed) == sum(len(m) for m in roles.ROLE_METHODS.values())
    # The guard logged its refusals (the last one made), and none of an allowed call.
    wait_for_log(
        shared.daemon,
        rf"remote_refused cert={STRANGER} serial=\S+ role=- method=/{HOST}/MakeRecoveryCodes "
        "reason=role",
        after=offset,
    )
    log = shared.daemon.log()[offset:]
    for name, method in allowed:
        assert not re.search(rf"remote_refused cert={name} \S+ \S+ method={method} ", log)


def _admin_methods() -> set[str]:
    return {m.name for m in _SERVICES["TwoFactorAdmin"].methods}


def _host_methods() -> set[str]:
    return {m.name for m in _SERVICES["HostGate"].methods}


# The issue's words, written out rather than read from server.roles.
EXPECTED: list[tuple[str, str, bool]] = [
    *(
        ("helpdesk", f"{ADMIN}/{m}", True)
        for m in ("RenewSecret", "Unlock", "MakeRecoveryCodes", "ListUsers", "GetUser")
    ),
    *(
        ("helpdesk", f"{ADMIN}/{m}", False)
        for m in (
            "UpdateConfig",
            "GetProvisioningUri",
            "ImportSecrets",
            "RotateKey",
            "ListAuditEvents",
        )
    ),
    *(("auditor", f"{ADMIN}/{m}", True) for m in ("GetConfig", "ListUsers", "ListAuditEvents")),
    *(
        ("auditor", f"{ADMIN}/{m}", False)
        for m in ("RenewSecret", "UnsetSecret", "VerifyToken", "UpdateConfig")
    ),
    *(("host", f"{HOST}/{m}", True) for m in sorted(_host_methods())),
    *(("host", f"{ADMIN}/{m}", False) for m in sorted(_admin_methods())),
    *(("admin", f"{ADMIN}/{m}", True) for m in sorted(_admin_methods())),
    *(("admin", f"{HOST}/{m}", False) for m in sorted(_host_methods())),
]


def test_the_issue_s_expectations_by_name(shared: Central) -> None:
    assert {"RenewSecret", "Unlock", "RotateKey", "ImportSecrets"} <= _admin_methods()
    assert {"Check", "Verify", "ProveCode"} <= _host_methods()
    classes = {name: cls for name, cls in every_method(*SERVED)}
    wrong = []
    for role, method, expected in EXPECTED:
        channel = shared.channel(ROLE_CERTS[role], role)
        code, details = call(channel, f"/{method}", classes[f"/{method}"]())
        # Let through: whatever the servicer made of an empty request (HostGate's
        # grant methods refuse one PERMISSION_DENIED themselves), not the guard's no.
        guard_said_no = code == grpc.StatusCode.UNAUTHENTICATED or (
            code == grpc.StatusCode.PERMISSION_DENIED and bool(GUARD_WORDS.search(details))
        )
        allowed = not guard_said_no
        if allowed != expected or roles.allowed(role, f"/{method}") != expected:
            wrong.append(f"{role} {method}: expected {expected}, got {code.name} {details}")
        if not expected:
            assert f"role {role} may not call {method.rsplit('/', 1)[1]}" in details
    assert wrong == []


# -- 3. a help desk over the network ------------------------------------------------


def test_helpdesk_end_to_end(shared: Central, user: LocalUser) -> None:
    local = shared.daemon.admin()
    desk = shared.admin_as(DESK, "helpdesk")
    serial = f"{serial_of(shared.pki.issue(DESK)[0]):x}"
    assert not local.GetUser(
        pb.GetUserRequest(username=user.name), timeout=5
    ).twofactor_auth_configured

    entry = desk.RenewSecret(pb.RenewSecretRequest(username=user.name, pending=False), timeout=5)
    seen = local.GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert seen.twofactor_auth_configured and seen.pending_expires_in == 0
    totp = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    assert isinstance(totp, pyotp.TOTP)

    # Lock the account with wrong codes (admin.sock), the help desk unlocks it.
    wrong_code = f"{(int(totp.now()) + 1) % 10**6:06d}"
    for _ in range(settings_seen(shared).lockout_threshold):
        local.VerifyToken(pb.VerifyTokenRequest(username=user.name, token=wrong_code), timeout=5)
    assert local.GetUser(pb.GetUserRequest(username=user.name), timeout=5).locked_seconds > 0
    desk.Unlock(pb.UnlockRequest(username=user.name), timeout=5)
    seen = local.GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert (seen.locked_seconds, seen.failed_attempts) == (0, 0)

    codes = desk.MakeRecoveryCodes(pb.MakeRecoveryCodesRequest(username=user.name), timeout=5)
    assert len(codes.codes) == 10 == len(set(codes.codes))
    assert local.GetUser(pb.GetUserRequest(username=user.name), timeout=5).recovery_codes_left == 10

    before = settings_seen(shared)
    exc = refused(lambda: desk.UpdateConfig(ATTACK, timeout=5))
    assert code_of(exc) == grpc.StatusCode.PERMISSION_DENIED
    assert "role helpdesk may not call UpdateConfig" in details_of(exc)
    assert settings_seen(shared) == before

    events = local.ListAuditEvents(pb.ListAuditEventsRequest(username=user.name), timeout=5).events
    remote = {e.event: e for e in events if e.path == "remote:helpdesk"}
    assert {"secret_renewed", "unlocked", "recovery_codes_made"} <= set(remote), events
    for event in remote.values():
        assert f"cert={DESK}" in event.caller and "role=helpdesk" in event.caller
        assert f"serial={serial}" in event.caller
    caller = f"cert={DESK} serial={serial} role=helpdesk"
    for method in ("RenewSecret", "Unlock", "MakeRecoveryCodes"):
        wait_for_log(shared.daemon, rf"remote_call {caller} method={method}\b")
    wait_for_log(
        shared.daemon, rf"remote_refused {caller} method=/{ADMIN}/UpdateConfig reason=role"
    )


# -- 4. SIGHUP: reload without a restart --------------------------------------------


def test_sighup_adds_a_role(make_central: Callable[..., Central]) -> None:
    central = make_central()
    pid = central.daemon.proc.pid if central.daemon.proc else None
    channel = central.channel("net-late", "auditor")
    code, details = call(channel, f"/{ADMIN}/ListAuditEvents", pb.ListAuditEventsRequest())
    assert code == grpc.StatusCode.PERMISSION_DENIED and "has no role" in details

    table = {**central.roles, "net-late": "auditor"}
    after = reload(central, central_toml(central.pki, central.port, table))
    wait_for_log(central.daemon, r"reloaded tls .*roles=3", after=after)
    # The connection opened before the reload: the new role applies to its next call.
    assert call(channel, f"/{ADMIN}/ListAuditEvents", pb.ListAuditEventsRequest()) == (
        grpc.StatusCode.OK,
        "",
    )
    code, details = call(channel, f"/{ADMIN}/UpdateConfig", ATTACK)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "role auditor" in details
    assert central.daemon.proc is not None and central.daemon.proc.pid == pid
    assert central.daemon.proc.poll() is None


def test_sighup_revokes_an_open_connection(make_central: Callable[..., Central]) -> None:
    central = make_central()
    pid = central.daemon.proc.pid if central.daemon.proc else None
    victim = central.channel("admin1")
    bystander = central.channel("edge1", "host")
    ask = pb.GetUserRequest(username="root")
    assert call(victim, f"/{ADMIN}/GetConfig", pb.GetConfigRequest()) == (grpc.StatusCode.OK, "")
    assert call(bystander, f"/{HOST}/GetUser", ask)[0] == grpc.StatusCode.OK

    serial = serial_of(central.pki.issue("admin1")[0])
    extra = f'tls_deny_serials = ["{serial:x}"]'
    after = reload(central, central_toml(central.pki, central.port, central.roles, extra))
    wait_for_log(central.daemon, r"reloaded tls .*revoked=1", after=after)
    code, details = call(victim, f"/{ADMIN}/GetConfig", pb.GetConfigRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "is revoked" in details
    assert_attack_changed_nothing(central, victim)
    assert call(bystander, f"/{HOST}/GetUser", ask)[0] == grpc.StatusCode.OK
    assert central.daemon.proc is not None and central.daemon.proc.pid == pid


@pytest.mark.parametrize("breakage", ["missing_cert", "key_of_another_certificate"])
def test_a_broken_reload_keeps_the_old_state(
    breakage: str, make_central: Callable[..., Central]
) -> None:
    central = make_central()
    pid = central.daemon.proc.pid if central.daemon.proc else None
    admin = central.channel("admin1")
    assert call(admin, f"/{ADMIN}/GetConfig", pb.GetConfigRequest()) == (grpc.StatusCode.OK, "")

    # A broken file, and with it a role and a revocation that must not come in
    # either: the reload is refused whole.
    serial = serial_of(central.pki.issue("admin1")[0])
    toml = central_toml(
        central.pki,
        central.port,
        {**central.roles, "net-late": "admin"},
        f'tls_deny_serials = ["{serial:x}"]',
    )
    if breakage == "missing_cert":
        field, named = "tls_cert", f"{central.pki.directory}/missing.crt"
        old = f"{central.pki.directory}/server.crt"
    else:
        # A key that parses but is not the server certificate's (gRPC would take the
        # pair and fail every later handshake).
        field, named = "tls_key", str(central.pki.issue("net-other-key")[1])
        old = f"{central.pki.directory}/server.key"
    broken = toml.replace(old, named)
    assert named in broken
    after = reload(central, broken)
    line = wait_for_log(central.daemon, r"reload_failed .*", after=after)
    assert named in line and field in line
    assert "reloaded tls" not in central.daemon.log()[after:]

    assert central.daemon.proc is not None and central.daemon.proc.pid == pid
    assert central.daemon.proc.poll() is None
    # Old connection, new connection (a handshake with the old certificate): served.
    assert call(admin, f"/{ADMIN}/GetConfig", pb.GetConfigRequest()) == (grpc.StatusCode.OK, "")
    fresh = central.channel("admin1")
    assert call(fresh, f"/{ADMIN}/GetConfig", pb.GetConfigRequest()) == (grpc.StatusCode.OK, "")
    code, details = call(central.channel("net-late"), f"/{ADMIN}/GetConfig", pb.GetConfigRequest())
    assert code == grpc.StatusCode.PERMISSION_DENIED and "has no role" in details


def test_sighup_renews_the_server_certificate(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    own = Pki.create(tmp_path / "ca")
    client_cert, client_key = own.issue("renew-admin", "admin")
    root = tmp_path / "central"
    root.mkdir()
    # The first server certificate (pki init's), copied where the config names it.
    for suffix in ("crt", "key"):
        shutil.copy(own.directory / f"server.{suffix}", own.directory / f"first.{suffix}")
    port = free_port()
    table = {"renew-admin": "admin"}
    config = root / "otpgated.toml"
    config.write_text(central_toml(own, port, table, key="first"))
    daemon = make_daemon("--config", str(config), root=root)
    central = Central(daemon, port, own, config, table)
    assert daemon.proc is not None
    pid = daemon.proc.pid

    first = serial_of(own.directory / "first.crt")
    assert peer_serial(port, own.ca, client_cert, client_key) == first
    old = central.channel("renew-admin")
    assert call(old, f"/{ADMIN}/GetConfig", pb.GetConfigRequest()) == (grpc.StatusCode.OK, "")

    issued = pki.issue_server(own.directory, server_name="localhost", ip_addresses=["127.0.0.1"])
    for suffix, source in (("crt", issued.cert), ("key", issued.key)):
        shutil.copy(source, own.directory / f"second.{suffix}")
    assert issued.serial != first
    after = reload(central, central_toml(own, port, table, key="second"))
    wait_for_log(daemon, r"reloaded tls ", after=after)

    assert peer_serial(port, own.ca, client_cert, client_key) == issued.serial
    new = central.channel("renew-admin")
    assert call(new, f"/{ADMIN}/GetConfig", pb.GetConfigRequest()) == (grpc.StatusCode.OK, "")
    # The connection opened before stays served (no connection is dropped).
    assert call(old, f"/{ADMIN}/GetConfig", pb.GetConfigRequest()) == (grpc.StatusCode.OK, "")
    assert daemon.proc is not None and daemon.proc.pid == pid


# -- 5. configurations the daemon refuses to start with -----------------------------


def _without_line(toml: str, key: str) -> str:
    return "".join(line for line in toml.splitlines(keepends=True) if not line.startswith(key))


@pytest.mark.parametrize(
    "case",
    [
        "no_client_ca",
        "unknown_role",
        "nonsense_listen",
        "foreign_crl",
        "key_of_another_certificate",
        "listen_in_use",
    ],
)
def test_a_bad_network_config_refuses_to_start(
    case: str,
    make_daemon: Callable[..., Daemon],
    fleet_pki: Pki,
    other_pki: Pki,
    tmp_path: Path,
) -> None:
    port = free_port()
    toml = central_toml(fleet_pki, port, {"admin1": "admin"})
    busy = socket.socket()
    if case == "no_client_ca":
        toml = _without_line(toml, "tls_client_ca")
        field, words = "tls_client_ca", "listen needs tls_client_ca"
    elif case == "unknown_role":
        toml = central_toml(fleet_pki, port, {"admin1": "superuser"})
        field, words = "roles", "'superuser'"
    elif case == "nonsense_listen":
        toml = toml.replace(f'listen = "127.0.0.1:{port}"', 'listen = "nonsense"')
        field, words = "listen", "'nonsense' must be HOST:PORT"
    elif case == "foreign_crl":
        cert, _ = other_pki.issue("net-foreign-revoked", "admin")
        crl = pki.revoke(other_pki.directory, cert_file=cert).crl
        toml = central_toml(fleet_pki, port, {"admin1": "admin"}, f'tls_crl = "{crl}"')
        field, words = "tls_crl", "not signed"
    elif case == "key_of_another_certificate":
        key = other_pki.directory / "server.key"
        toml = toml.replace(f"{fleet_pki.directory}/server.key", str(key))
        field, words = "tls_key", "is not the key of the certificate"
    else:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        toml = central_toml(fleet_pki, port, {"admin1": "admin"})
        field, words = "listen", f"cannot listen on 127.0.0.1:{port}"
    config = tmp_path / "otpgated.toml"
    config.write_text(toml)
    daemon = make_daemon("--config", str(config), root=tmp_path, start=False)
    with busy:
        result = daemon.run_to_exit()
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    # The line that says why names the field (not just any line: "listening ...").
    errors = [line for line in output.splitlines() if words in line]
    assert errors and all(field in line for line in errors), output
    assert "Traceback" not in output
    assert "started version=" not in output


# -- the review's findings, each played for real ---------------------------------------


def test_a_ca_taken_out_of_tls_client_ca_ends_its_open_connections(
    make_central: Callable[..., Central], other_pki: Pki, tmp_path: Path
) -> None:
    # After a CA's compromise it leaves tls_client_ca: a connection it opened before
    # the reload must not go on making admin calls.
    central = make_central()
    victim = central.channel("admin1")
    assert call(victim, f"/{ADMIN}/GetConfig", pb.GetConfigRequest()) == (grpc.StatusCode.OK, "")
    toml = central_toml(central.pki, central.port, central.roles).replace(
        f'tls_client_ca = "{central.pki.ca}"', f'tls_client_ca = "{other_pki.ca}"'
    )
    after = reload(central, toml)
    wait_for_log(central.daemon, r"reloaded tls", after=after)
    code, details = call(victim, f"/{ADMIN}/GetConfig", pb.GetConfigRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED, details
    assert "no longer holds" in details
    assert_attack_changed_nothing(central, victim)


def _client_certificate(
    pki_: Pki, path: Path, names: list[str], *, client_auth: bool = True
) -> tuple[Path, Path]:
    """A certificate of the session CA that pki.issue_client would never make."""
    ca_key = serialization.load_pem_private_key((pki_.directory / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate(pki_.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if client_auth:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    path.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = path / "odd.crt", path / "odd.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize(
    ("names", "client_auth"),
    [
        (["admin1", "nobody"], True),  # which common name is "the" name? none
        (["nobody", "admin1"], True),
        (["admin1"], False),  # no extended key usage at all
        (["admin1 serial=1 role=host"], True),  # a name posing as log fields
    ],
)
def test_a_certificate_without_one_usable_name_gets_nothing(
    shared: Central, fleet_pki: Pki, tmp_path: Path, names: list[str], client_auth: bool
) -> None:
    cert, key = _client_certificate(fleet_pki, tmp_path, names, client_auth=client_auth)
    offset = len(shared.daemon.log())
    channel = grpc.secure_channel(shared.address, credentials(fleet_pki.ca, cert, key))
    code, details = call(channel, f"/{ADMIN}/GetConfig", pb.GetConfigRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "no usable name" in details, details
    assert_attack_changed_nothing(shared, channel)
    assert "role=host" not in shared.daemon.log()[offset:].replace("role=host method=", "")


def test_a_silent_connection_is_closed_before_long(shared: Central) -> None:
    # Anyone who reaches the port can open connections before showing a certificate:
    # one that never starts its handshake is not kept (5 s), so they cannot pile up.
    with socket.create_connection(("127.0.0.1", shared.port), timeout=15) as silent:
        started = time.monotonic()
        assert silent.recv(1) == b""  # the server closed it
        assert time.monotonic() - started < 12


def test_a_storm_of_sighups_neither_kills_nor_hangs_the_daemon(
    make_central: Callable[..., Central],
) -> None:
    # The handler used to wake the main thread through an Event; a signal landing
    # inside Event.wait() could deadlock it, and then SIGTERM did nothing.
    central = make_central()
    assert central.daemon.proc is not None
    for _ in range(200):
        central.daemon.proc.send_signal(signal.SIGHUP)
    admin = central.channel("admin1")
    assert call(admin, f"/{ADMIN}/GetConfig", pb.GetConfigRequest()) == (grpc.StatusCode.OK, "")
    started = time.monotonic()
    assert central.daemon.stop() == 0
    assert time.monotonic() - started < 15


def test_calls_that_never_send_their_request_hold_no_worker(
    make_central: Callable[..., Central], make_edge: Callable[..., Daemon], user: LocalUser
) -> None:
    # A revoked certificate (or one without a role) opens as many calls as the
    # listener has workers and never sends their messages: it is refused at the
    # headers, and an edge's questions are still answered (else an edge under
    # fail=safe would read the silence as "unavailable" and skip the code).
    central = make_central({"admin1": "admin", "edge1": "host", "edge2": "host"})
    admin = central.daemon.admin()
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True, services_ssh=True), timeout=5)
    admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    serial = serial_of(central.pki.issue("edge2", "host")[0])
    extra = f'tls_deny_serials = ["{serial:x}"]'
    after = reload(central, central_toml(central.pki, central.port, central.roles, extra))
    wait_for_log(central.daemon, r"reloaded tls .*revoked=1", after=after)
    edge = make_edge(central.address)
    stall = central.channel("edge2", "host").stream_unary(
        f"/{HOST}/Check", request_serializer=lambda m: m, response_deserializer=None
    )
    never = threading.Event()

    def silence() -> Iterator[bytes]:
        never.wait()
        yield b""

    stalled = [stall.future(silence()) for _ in range(32)]
    try:
        ask = pb.PamRequest(username=user.name, service="sshd")
        for _ in range(3):
            assert edge.pam().Check(ask, timeout=5).verdict == pb.VERDICT_OTP_REQUIRED
        refused_ = [f for f in stalled if f.done()]
        assert refused_ and all(f.code() == grpc.StatusCode.UNAUTHENTICATED for f in refused_)
    finally:
        never.set()
        for future in stalled:
            future.cancel()
