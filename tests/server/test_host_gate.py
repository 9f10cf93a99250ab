"""HostGate attacked as root on a compromised edge host.

The attacker holds the edge's `host` certificate (CN edge1; edge2 is a second
host) and talks to a real central otpgated over mutual TLS. The rule (SECURITY.md,
"Root on an edge host"): it may learn whether a typed code is right (bounded by the
lockout) and see the codes typed on that host, but never read a secret, and a new
secret or recovery codes need a grant: a right code of the account's *current*
secret, proven a moment before, for that account, from that certificate, once.

Every attack asserts the exact refusal and that nothing changed for the victim:
the same secret (GetProvisioningUri over admin.sock before and after), no recovery
codes, no pending secret. Grants' expiry and the bounds of the grants table and
of the proven secrets' (Bases) are unit-tested with a fake clock; the rest runs
against real daemons. Found and fixed here: a grant, or a pending secret made
with one, outliving an administrator's renewal or removal of the secret it was
proven against (host_gate: RenewSecret and ConfirmSecret compare-and-set).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import grpc
import pyotp
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from otpgate.core.crypto import Sealed
from otpgate.core.service import PENDING_SECONDS
from otpgate.errors import PermissionDenied
from otpgate.server import host_gate
from otpgate.server.host_gate import CONFIRM_SPACING_SECONDS, GRANT_SECONDS, MAX_GRANTS, Grants
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc
from tests.conftest import RUNUSER, Daemon, LocalUser
from tests.fleet_harness import Central, Pki, edge_toml

TWO_HOSTS = {"admin1": "admin", "edge1": "host", "edge2": "host"}
DENIED_GRANT = (
    "no valid grant for this account from this host: prove a current code first "
    "(ProveCode); a grant is good once, for 5 minutes"
)
Stub = pb_grpc.HostGateStub


@dataclass
class Victim:
    name: str
    totp: pyotp.TOTP
    uri: str


@dataclass(frozen=True)
class State:
    """What the central holds for an account, as admin.sock shows it."""

    uri: str
    configured: bool
    recovery_codes_left: int
    pending_expires_in: int


def state(central: Central, name: str) -> State:
    admin = central.daemon.admin()
    entry = admin.GetUser(pb.GetUserRequest(username=name), timeout=5)
    uri = ""
    if entry.twofactor_auth_configured:
        uri = admin.GetProvisioningUri(
            pb.GetProvisioningUriRequest(username=name), timeout=5
        ).provisioning_uri
    return State(
        uri, entry.twofactor_auth_configured, entry.recovery_codes_left, entry.pending_expires_in
    )


def untouched(victim: Victim) -> State:
    """The victim as enrolled: its secret, no recovery codes, nothing pending."""
    return State(victim.uri, True, 0, 0)


def setup(central: Central) -> None:
    # 2FA on for sshd; window=1 so that the next step's code is good now and each
    # test can use several right codes without waiting for the clock.
    central.daemon.admin().UpdateConfig(
        pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1), timeout=5
    )


def renew_now(central: Central, name: str) -> Victim:
    """An administrator's `renew-secret --now` over admin.sock."""
    entry = central.daemon.admin().RenewSecret(
        pb.RenewSecretRequest(username=name, pending=False), timeout=5
    )
    uri = entry.twofactor_config.provisioning_uri
    totp = pyotp.parse_uri(uri)
    assert isinstance(totp, pyotp.TOTP)
    return Victim(name, totp, uri)


def enroll(central: Central, name: str) -> Victim:
    victim = renew_now(central, name)
    assert state(central, name) == untouched(victim)
    return victim


class Codes:
    """Right codes of one secret, each of a later time step than the one before
    (a step is spent once): the current step's, then the next one's. With window=1
    both are good for the next 30 s: no test here uses more than two of one."""

    def __init__(self, totp: pyotp.TOTP) -> None:
        self._totp = totp
        self._at = time.time()

    def next(self) -> str:
        code = self._totp.at(self._at)
        self._at += self._totp.interval
        return code


def wrong_code(totp: pyotp.TOTP) -> str:
    """Six digits that are no code of this secret anywhere near now."""
    now = time.time()
    near = {totp.at(now + k * totp.interval) for k in range(-3, 4)}
    while True:
        code = f"{secrets.randbelow(10**6):06d}"
        if code not in near:
            return code


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _outcome(call: Callable[[], pb.UserEntry]) -> pb.UserEntry | str:
    """The reply, or the details of a PERMISSION_DENIED."""
    try:
        return call()
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc
        return exc.details() or ""


def prove(stub: Stub, name: str, code: str) -> str:
    reply = stub.ProveCode(pb.ProveCodeRequest(username=name, token=code), timeout=5)
    assert reply.verification.result == pb.VERIFY_RESULT_VALID, reply
    assert reply.grant and reply.grant_expires_in == GRANT_SECONDS
    return reply.grant


def renew(stub: Stub, name: str, grant: str | None) -> pb.UserEntry:
    request = pb.HostRenewSecretRequest(username=name)
    if grant is not None:
        request.grant = grant
    reply: pb.UserEntry = stub.RenewSecret(request, timeout=5)
    return reply


def recovery(stub: Stub, name: str, grant: str | None) -> pb.RecoveryCodes:
    request = pb.HostGrantRequest(username=name)
    if grant is not None:
        request.grant = grant
    reply: pb.RecoveryCodes = stub.MakeRecoveryCodes(request, timeout=5)
    return reply


GRANT_CALLS: dict[str, Callable[[Stub, str, str | None], object]] = {
    "RenewSecret": renew,
    "MakeRecoveryCodes": recovery,
}


def pam(stub: Stub, method: str, name: str, code: str = "") -> pb.PamDecision:
    request = pb.PamRequest(username=name, service="sshd", rhost="192.0.2.7", authtok=code)
    reply: pb.PamDecision = getattr(stub, method)(request, timeout=5)
    return reply


# -- 1, 2: a change without a valid grant ----------------------------------------------


@pytest.mark.parametrize("method", sorted(GRANT_CALLS))
def test_a_change_needs_this_hosts_unspent_grant_for_this_account(
    make_central: Callable[..., Central],
    user: LocalUser,
    make_user: Callable[..., LocalUser],
    method: str,
) -> None:
    central = make_central(TWO_HOSTS)
    setup(central)
    victim, spare = enroll(central, user.name), enroll(central, make_user().name)
    edge1, edge2 = central.host_as("edge1"), central.host_as("edge2")
    call = GRANT_CALLS[method]
    # Real grants, none of them edge1's for the victim: edge2's for the victim, and
    # edge1's for another account (which edge1 then spends, once, on that account).
    of_edge2 = prove(edge2, victim.name, Codes(victim.totp).next())
    for_spare = prove(edge1, spare.name, Codes(spare.totp).next())
    attempts: list[tuple[str, str | None]] = [
        ("no grant", None),  # proto3 sends these two alike: both, for the reader
        ("an empty grant", ""),
        ("a random grant", secrets.token_urlsafe(32)),
        ("a grant's shape, wrong bytes", of_edge2[:-1] + ("A" if of_edge2[-1] != "A" else "B")),
        ("edge2's grant", of_edge2),
        ("a grant for another account", for_spare),
    ]
    for what, grant in attempts:
        error = refused(partial(call, edge1, victim.name, grant))
        assert (error.code(), error.details()) == (grpc.StatusCode.PERMISSION_DENIED, DENIED_GRANT)
        assert state(central, victim.name) == untouched(victim), what
    # A grant spent once is gone: for its own account too.
    call(edge1, spare.name, for_spare)
    for name in (spare.name, victim.name):
        error = refused(partial(call, edge1, name, for_spare))
        assert (error.code(), error.details()) == (grpc.StatusCode.PERMISSION_DENIED, DENIED_GRANT)
    assert state(central, victim.name) == untouched(victim)
    # The refusals were the binding's, not a dud grant: edge2 can use its own, and
    # edge1's attempts with it did not spend it.
    call(edge2, victim.name, of_edge2)
    after = state(central, victim.name)
    assert after.uri == victim.uri  # a pending secret or codes, never a replacement
    assert (after.pending_expires_in > 0) == (method == "RenewSecret")
    assert (after.recovery_codes_left == 10) == (method == "MakeRecoveryCodes")


def test_grants_expire_and_are_bound_to_host_and_account() -> None:
    now = [1000.0]
    grants = Grants(clock=lambda: now[0])
    sealed = Sealed("k1", b"n" * 12, b"c" * 32)
    token = grants.give("edge1", "alice", sealed)
    for host, name in [("edge2", "alice"), ("edge1", "bob"), ("edge1 ", "alice"), ("", "")]:
        with pytest.raises(PermissionDenied):
            grants.take(token, host, name)
    now[0] += GRANT_SECONDS - 1
    assert grants.take(token, "edge1", "alice").sealed == sealed  # still good, once
    with pytest.raises(PermissionDenied):
        grants.take(token, "edge1", "alice")
    late = grants.give("edge1", "alice", sealed)
    now[0] += GRANT_SECONDS  # the very end of its five minutes is past it
    with pytest.raises(PermissionDenied):
        grants.take(late, "edge1", "alice")


# -- 3: proving codes is a login attempt ----------------------------------------------


def test_wrong_codes_count_toward_the_lockout_and_a_locked_account_gets_no_grant(
    make_central: Callable[..., Central], user: LocalUser
) -> None:
    central = make_central()
    setup(central)
    victim = enroll(central, user.name)
    admin, edge1 = central.daemon.admin(), central.host_as("edge1")
    threshold = admin.GetConfig(pb.GetConfigRequest(), timeout=5).lockout_threshold
    assert threshold >= 3  # the default (5): room for each kind of wrong code below
    # One wrong code at the edge's SSH prompt, the rest through ProveCode (one of
    # them not even digits): all one count, as at any prompt.
    assert pam(edge1, "Verify", victim.name, wrong_code(victim.totp)).verdict == pb.VERDICT_DENY
    failed = admin.GetUser(pb.GetUserRequest(username=victim.name), timeout=5).failed_attempts
    assert failed == 1
    tokens = ["not-a-code"] + [wrong_code(victim.totp) for _ in range(threshold - 2)]
    for count, token in enumerate(tokens, start=2):
        reply = edge1.ProveCode(pb.ProveCodeRequest(username=victim.name, token=token), timeout=5)
        assert (reply.verification.result, reply.grant) == (pb.VERIFY_RESULT_INVALID, "")
        entry = admin.GetUser(pb.GetUserRequest(username=victim.name), timeout=5)
        if count < threshold:
            assert (entry.failed_attempts, entry.locked_seconds) == (count, 0)
    assert entry.locked_seconds > 0  # the threshold-th wrong code locked it
    # Locked: a right code is not even looked at, and gives nothing.
    right = Codes(victim.totp)
    reply = edge1.ProveCode(
        pb.ProveCodeRequest(username=victim.name, token=right.next()), timeout=5
    )
    assert reply.verification.result == pb.VERIFY_RESULT_LOCKED and not reply.verification.valid
    assert (reply.grant, reply.grant_expires_in) == ("", 0)
    assert reply.verification.locked_seconds > 0
    assert pam(edge1, "Verify", victim.name, right.next()).verdict == pb.VERDICT_LOCKED
    for call in GRANT_CALLS.values():
        error = refused(partial(call, edge1, victim.name, reply.grant))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert state(central, victim.name) == untouched(victim)


# -- 4: the one way in: a right code, then a pending secret -------------------------------


def test_a_right_code_gives_one_pending_secret_confirmed_by_its_own_code(
    make_central: Callable[..., Central], user: LocalUser
) -> None:
    central = make_central()
    setup(central)
    victim = enroll(central, user.name)
    edge1, admin = central.host_as("edge1"), central.daemon.admin()
    old = Codes(victim.totp)
    grant = prove(edge1, victim.name, old.next())
    # One grant spent by eight calls at once: one pending secret, seven refusals.
    with ThreadPoolExecutor(8) as pool:
        tries = list(
            pool.map(lambda _: _outcome(lambda: renew(edge1, victim.name, grant)), range(8))
        )
    made = [t for t in tries if isinstance(t, pb.UserEntry)]
    assert len(made) == 1
    assert sorted(t for t in tries if isinstance(t, str)) == [DENIED_GRANT] * 7
    reply = made[0]
    pending_uri = reply.twofactor_config.provisioning_uri
    new = pyotp.parse_uri(pending_uri)
    assert isinstance(new, pyotp.TOTP) and new.secret != victim.totp.secret
    assert reply.pending_expires_in > 0 and reply.twofactor_auth_configured
    # Pending only: the secret in use is the same and still lets its owner in.
    now = state(central, victim.name)
    # pending_expires_in counts down: a second may pass between the two answers.
    assert replace(now, pending_expires_in=0) == State(victim.uri, True, 0, 0)
    assert reply.pending_expires_in - 2 <= now.pending_expires_in <= reply.pending_expires_in
    assert pam(edge1, "Verify", victim.name, old.next()).verdict == pb.VERDICT_ALLOW
    # The grant was good once.
    error = refused(lambda: renew(edge1, victim.name, grant))
    assert (error.code(), error.details()) == (grpc.StatusCode.PERMISSION_DENIED, DENIED_GRANT)
    # Confirmation needs a code of the pending secret; the old one's is not one.
    error = refused(
        lambda: edge1.ConfirmSecret(
            pb.ConfirmSecretRequest(username=victim.name, token=wrong_code(new)), timeout=5
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert state(central, victim.name).uri == victim.uri
    # Checks of a pending secret count toward no lockout: they are spaced instead,
    # and one refused so is not checked (its code is not spent).
    error = refused(
        lambda: edge1.ConfirmSecret(
            pb.ConfirmSecretRequest(username=victim.name, token=new.now()), timeout=5
        )
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    time.sleep(CONFIRM_SPACING_SECONDS)
    confirmed = edge1.ConfirmSecret(
        pb.ConfirmSecretRequest(username=victim.name, token=new.now()), timeout=5
    )
    assert not confirmed.twofactor_config.HasField("provisioning_uri")
    assert confirmed.pending_expires_in == 0
    now_in_use = pyotp.parse_uri(state(central, victim.name).uri)
    assert isinstance(now_in_use, pyotp.TOTP) and now_in_use.secret == new.secret
    after = admin.VerifyToken(
        pb.VerifyTokenRequest(username=victim.name, token=victim.totp.now()), timeout=5
    )
    assert not after.valid  # the old secret is gone


# -- 5: a grant is over the secret it was proven against ---------------------------------


@pytest.mark.parametrize("change", ["renew --now", "unset"])
def test_a_grant_from_before_an_admins_change_is_void(
    make_central: Callable[..., Central], user: LocalUser, change: str
) -> None:
    central = make_central()
    setup(central)
    victim = enroll(central, user.name)
    edge1, admin = central.host_as("edge1"), central.daemon.admin()
    codes = Codes(victim.totp)
    grants = {method: prove(edge1, victim.name, codes.next()) for method in GRANT_CALLS}
    if change == "renew --now":
        # The admin takes the account back (a lost phone, a suspected host).
        admins = enroll(central, victim.name)
        expected = State(admins.uri, True, 0, 0)
    else:
        admin.UnsetSecret(pb.UnsetSecretRequest(username=victim.name), timeout=5)
        expected = State("", False, 0, 0)
    for method, call in GRANT_CALLS.items():
        error = refused(partial(call, edge1, victim.name, grants[method]))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, method
        assert (error.details() or "").startswith(f"{victim.name}'s secret changed since"), method
        assert state(central, victim.name) == expected, method


def test_a_pending_secret_from_before_an_admins_renewal_cannot_replace_it(
    make_central: Callable[..., Central], user: LocalUser
) -> None:
    """The grant was good when used; the admin renewed after the pending secret was
    made: confirming that pending secret would replace the admin's with a secret the
    edge's root chose (it saw its URI)."""
    central = make_central()
    setup(central)
    victim = enroll(central, user.name)
    edge1 = central.host_as("edge1")
    reply = renew(edge1, victim.name, prove(edge1, victim.name, Codes(victim.totp).next()))
    attackers = pyotp.parse_uri(reply.twofactor_config.provisioning_uri)
    assert isinstance(attackers, pyotp.TOTP)
    admins = renew_now(central, victim.name)  # after the pending one was made
    error = refused(
        lambda: edge1.ConfirmSecret(
            pb.ConfirmSecretRequest(username=victim.name, token=attackers.now()), timeout=5
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (error.details() or "").startswith(f"{victim.name}'s secret changed since")
    assert state(central, victim.name).uri == admins.uri
    # Nor through a second central that never saw the pending secret made (an
    # edge picks its upstream): the same database, a fresh daemon.
    central.daemon.restart()
    error = refused(
        lambda: central.host_as("edge1").ConfirmSecret(
            pb.ConfirmSecretRequest(username=victim.name, token=attackers.now()), timeout=5
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert state(central, victim.name).uri == admins.uri


def _next_seconds(passed: int) -> None:
    """Wait (at most `passed` s) until the clock's whole second has moved on by
    `passed`: the store's times are whole seconds."""
    start = int(time.time())
    while int(time.time()) < start + passed:
        time.sleep(0.02)


def test_a_pending_secret_made_after_the_secret_in_use_is_confirmed_through_a_host(
    make_central: Callable[..., Central], user: LocalUser
) -> None:
    """What the check above must not refuse: an administrator's pending secret (the
    owner confirms it on the host they use), and a host's one made before the
    central restarted (it no longer remembers the grant)."""
    central = make_central()
    setup(central)
    victim = enroll(central, user.name)
    edge1, admin = central.host_as("edge1"), central.daemon.admin()
    _next_seconds(2)  # the pending secrets below are younger than the enrollment
    entry = admin.RenewSecret(pb.RenewSecretRequest(username=victim.name, pending=True))
    admins = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    assert isinstance(admins, pyotp.TOTP)
    assert state(central, victim.name).uri == victim.uri
    codes = Codes(admins)
    edge1.ConfirmSecret(pb.ConfirmSecretRequest(username=victim.name, token=codes.next()))
    in_use = state(central, victim.name)
    assert in_use.pending_expires_in == 0 and in_use.uri != victim.uri
    _next_seconds(2)
    reply = renew(edge1, victim.name, prove(edge1, victim.name, codes.next()))
    hosts = pyotp.parse_uri(reply.twofactor_config.provisioning_uri)
    assert isinstance(hosts, pyotp.TOTP)
    central.daemon.restart()
    edge1 = central.host_as("edge1")
    edge1.ConfirmSecret(pb.ConfirmSecretRequest(username=victim.name, token=hosts.now()))
    now_in_use = pyotp.parse_uri(state(central, victim.name).uri)
    assert isinstance(now_in_use, pyotp.TOTP) and now_in_use.secret == hosts.secret


def test_the_proven_secrets_table_is_bounded_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_gate, "MAX_GRANTS", 8)
    now = [0.0]
    bases = host_gate.Bases(clock=lambda: now[0])
    sealed = [Sealed("k1", bytes([i]) * 12, b"c" * 32) for i in range(20)]
    for i, one in enumerate(sealed):
        bases.remember(f"user{i}", one)
        bases.remember(f"user{i}", one)  # once per account
        assert len(bases._bases) <= 8
    assert bases.recall("user0") is None and bases.recall("user19") == sealed[19]
    now[0] += PENDING_SECONDS
    assert bases.recall("user19") is None
    bases.remember("late", sealed[0])
    assert len(bases._bases) == 1


# -- 6: nothing in HostGate returns a secret in use ----------------------------------------


def _fields(message: Descriptor, prefix: str = "") -> Iterator[str]:
    for field in message.fields:
        path = f"{prefix}{field.name}"
        yield path
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            assert field.message_type is not None
            yield from _fields(field.message_type, path + ".")


def test_no_hostgate_reply_has_a_field_for_a_secret_but_the_pending_uri() -> None:
    service = pb.DESCRIPTOR.services_by_name["HostGate"]
    named = {
        (method.name, path)
        for method in service.methods
        for path in _fields(method.output_type)
        if re.search(r"uri|secret|seed|key", path, re.IGNORECASE)
    }
    # The one string: RenewSecret's (a PENDING secret, the host's to show), also in
    # the type GetUser and ConfirmSecret answer, which never fill it in (below).
    # secret_configured is a yes/no.
    user_entry = {"twofactor_config.provisioning_uri", "twofactor_config.secret_configured"}
    assert named == {
        (m, path) for m in ("GetUser", "RenewSecret", "ConfirmSecret") for path in user_entry
    }


def test_hostgate_replies_carry_no_secret_in_use(
    make_central: Callable[..., Central], user: LocalUser
) -> None:
    central = make_central()
    setup(central)
    victim = enroll(central, user.name)
    edge1 = central.host_as("edge1")
    codes = Codes(victim.totp)
    replies: list[object] = [
        edge1.GetUser(pb.GetUserRequest(username=victim.name), timeout=5),
        pam(edge1, "Check", victim.name),
        pam(edge1, "Verify", victim.name, wrong_code(victim.totp)),
        pam(edge1, "Verify", victim.name, codes.next()),
        edge1.ProveCode(pb.ProveCodeRequest(username=victim.name, token=codes.next()), timeout=5),
    ]
    entry = replies[0]
    assert isinstance(entry, pb.UserEntry) and entry.twofactor_auth_configured
    assert not entry.twofactor_config.HasField("provisioning_uri")
    secret = victim.totp.secret
    for reply in replies:
        assert isinstance(reply, pb.UserEntry | pb.PamDecision | pb.ProveCodeResponse)
        shown = reply.SerializeToString() + str(reply).encode()
        assert secret.encode() not in shown and secret.lower().encode() not in shown
        assert b"otpauth" not in shown


# -- 7: a host certificate is no admin --------------------------------------------------


def test_a_host_certificate_may_call_no_admin_method(
    make_central: Callable[..., Central], user: LocalUser
) -> None:
    central = make_central()
    setup(central)
    victim = enroll(central, user.name)
    channel = central.channel("edge1", "host")
    admin = pb_grpc.TwoFactorAdminStub(channel)
    for name, call in [
        ("GetProvisioningUri", lambda: admin.GetProvisioningUri(
            pb.GetProvisioningUriRequest(username=victim.name), timeout=5)),
        ("RenewSecret", lambda: admin.RenewSecret(
            pb.RenewSecretRequest(username=victim.name), timeout=5)),
        ("ListUsers", lambda: admin.ListUsers(pb.ListUsersRequest(), timeout=5)),
    ]:  # fmt: skip
        error = refused(call)
        assert (error.code(), error.details()) == (
            grpc.StatusCode.PERMISSION_DENIED,
            f"role host may not call {name}",
        )
    # Every other admin method too, and what the listener does not serve at all.
    for method in pb.DESCRIPTOR.services_by_name["TwoFactorAdmin"].methods:
        raw = channel.unary_unary(f"/otpgate.v1.TwoFactorAdmin/{method.name}", None, None)
        error = refused(partial(raw, b"", timeout=5))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method.name
    for path in ["/otpgate.v1.PamGate/Verify", "/otpgate.v1.UserSelfService/RenewSecret"]:
        error = refused(partial(channel.unary_unary(path, None, None), b"", timeout=5))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, path
    assert state(central, victim.name) == untouched(victim)


# -- 8: the grants table under a flood ---------------------------------------------------


def test_the_grants_table_is_bounded_and_pruned(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real bound is 10,000; the rule is the same at 64, and quick to fill.
    assert 0 < MAX_GRANTS <= 100_000
    monkeypatch.setattr(host_gate, "MAX_GRANTS", 64)
    now = [0.0]
    grants = Grants(clock=lambda: now[0])
    tokens = []
    for i in range(200):
        tokens.append(grants.give("edge1", f"user{i}", None))
        assert len(grants._grants) <= 64
        now[0] += 0.01
    assert len(grants._grants) == 64
    # The oldest went first; the newest are good.
    with pytest.raises(PermissionDenied):
        grants.take(tokens[0], "edge1", "user0")
    assert grants.take(tokens[-1], "edge1", "user199").username == "user199"
    # Five minutes on, every grant is expired, and the next give drops them all.
    now[0] += GRANT_SECONDS
    grants.give("edge1", "late", None)
    assert len(grants._grants) == 1
    with pytest.raises(PermissionDenied):
        grants.take(tokens[-2], "edge1", "user198")


# -- 9: an ordinary user on the edge ---------------------------------------------------


_EDGE_ATTACK = """
import errno, json, socket, sys
import grpc
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc
PAM, USER, ARGS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
raw = socket.socket(socket.AF_UNIX)
try:
    raw.connect(PAM)
    out["pam_connect"] = "connected"
except OSError as exc:
    out["pam_connect"] = errno.errorcode.get(exc.errno, str(exc.errno))
pam = pb_grpc.PamGateStub(grpc.insecure_channel("unix:" + PAM))
try:
    pam.Verify(pb.PamRequest(username=ARGS["victim"], service="sshd", authtok="123456"),
               timeout=5)
    out["pam_verify"] = "answered"
except grpc.RpcError as exc:
    out["pam_verify"] = exc.code().name
user = pb_grpc.UserSelfServiceStub(grpc.insecure_channel("unix:" + USER))
def code(call, request, metadata=None):
    try:
        call(request, timeout=10, metadata=metadata)
        return ["OK", ""]
    except grpc.RpcError as exc:
        return [exc.code().name, exc.details()]
victim = ARGS["victim"]
out["login_victim"] = code(user.LoginEx, pb.LoginExRequest(
    mechanism=pb.PASSWORD_PLAIN, username=victim, password=ARGS["password"]))
forged = [("authorization", "Bearer " + "A" * 43)]
for name in (victim, ARGS["self"]):
    for meta in (None, forged):
        key = name == victim and "victim" or "self"
        key += meta and "_forged" or ""
        out["renew_" + key] = code(user.RenewSecret, pb.RenewSecretRequest(
            username=name, pending=True), meta)
        out["codes_" + key] = code(user.MakeRecoveryCodes, pb.MakeRecoveryCodesRequest(
            username=name), meta)
        out["uri_" + key] = code(user.GetProvisioningUri, pb.GetProvisioningUriRequest(
            username=name), meta)
print(json.dumps(out))
"""


@pytest.fixture
def public_edge(
    make_central: Callable[..., Central],
    make_daemon: Callable[..., Daemon],
    fleet_pki: Pki,
) -> Iterator[tuple[Central, Daemon]]:
    """A central and an edge (make_edge's configuration) in a directory other
    users can traverse, so that an ordinary user reaches its sockets."""
    central = make_central()
    root = Path(tempfile.mkdtemp(prefix="otpgate-test-edge-"))
    root.chmod(0o755)
    try:
        config = root / "otpgated.toml"
        config.write_text(edge_toml(fleet_pki, "edge1", [central.address]))
        yield central, make_daemon("--config", str(config), root=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_an_ordinary_user_on_the_edge_reaches_no_one_elses_account(
    public_edge: tuple[Central, Daemon],
    make_user: Callable[..., LocalUser],
    cli_python: tuple[str, dict[str, str]],
) -> None:
    central, edge = public_edge
    setup(central)
    victim_user, attacker = make_user(), make_user()
    victim = enroll(central, victim_user.name)
    assert "mode=edge" in edge.log()
    executable, env = cli_python
    result = subprocess.run(
        [RUNUSER, "-u", attacker.name, "--", executable, "-c", textwrap.dedent(_EDGE_ATTACK),
         edge.socket("pam"), edge.socket("user"),
         json.dumps({"victim": victim.name, "password": victim_user.password,
                     "self": attacker.name})],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # pam.sock is root's (0600): not even a connection.
    assert out["pam_connect"] == "EACCES"
    assert out["pam_verify"] == "UNAVAILABLE"
    # user.sock: no login as another account, its right password included.
    status, details = out.pop("login_victim")
    assert status == "PERMISSION_DENIED"
    assert details.startswith(f"uid {attacker.uid} may log in as itself only")
    # Nothing without a session, forged or none, the caller's own account included.
    changes = {k: v for k, v in out.items() if k.split("_")[0] in ("renew", "codes", "uri")}
    assert len(changes) == 12
    assert {k: v[0] for k, v in changes.items()} == dict.fromkeys(changes, "UNAUTHENTICATED")
    assert state(central, victim.name) == untouched(victim)
    assert f"login_refused user={victim.name} caller_uid={attacker.uid}" in edge.log()
    with socket.socket(socket.AF_UNIX) as probe:  # root may: the refusal was the mode's
        probe.connect(edge.socket("pam"))


# -- AskList: the edge's gate files -----------------------------------------------------


def test_ask_list_says_what_check_says_and_no_more(
    make_central: Callable[..., Central],
    user: LocalUser,
    make_user: Callable[..., LocalUser],
) -> None:
    central = make_central(TWO_HOSTS)
    setup(central)
    enrolled, bare = user.name, make_user().name
    enroll(central, enrolled)
    unknown = f"ogtnobody{secrets.token_hex(3)}"
    edge1 = central.host_as("edge1")
    names = [enrolled, bare, unknown, "ALL", "bad name", "root:x"]
    reply = edge1.AskList(pb.AskListRequest(usernames=names), timeout=5)
    # Each name listed exactly when Check asks it for a code: the unknown name
    # too, so AskList cannot tell an enrolled account from a made-up name either.
    for name in (enrolled, bare, unknown):
        check = pam(edge1, "Check", name)
        assert (name in reply.asked) == (check.verdict == pb.VERDICT_OTP_REQUIRED), name
    # Names no account has are asked (as Check asks them), if pam_listfile can
    # hold them as one line; a name with a blank can not be.
    assert set(reply.asked) == {enrolled, unknown, "ALL", "root:x"}
    assert list(reply.everywhere) == [] and list(reply.exempt_networks) == []

    # A host gets one call a second (each looks at thousands of names); another
    # host is not held up by it.
    error = refused(partial(edge1.AskList, pb.AskListRequest(usernames=[enrolled]), timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "AskList was called moments ago" in (error.details() or "")
    edge2 = central.host_as("edge2")
    assert list(edge2.AskList(pb.AskListRequest(usernames=[enrolled]), timeout=5).asked) == [
        enrolled
    ]

    central.daemon.admin().UpdateConfig(
        pb.UpdateConfigRequest(exempt_networks=pb.StringList(values=["192.0.2.0/24"])), timeout=5
    )
    time.sleep(host_gate.ASK_SPACING_SECONDS)
    reply = edge1.AskList(pb.AskListRequest(usernames=[enrolled]), timeout=5)
    assert list(reply.exempt_networks) == ["192.0.2.0/24"] and list(reply.asked) == [enrolled]

    time.sleep(host_gate.ASK_SPACING_SECONDS)
    too_many = pb.AskListRequest(usernames=[f"u{i}" for i in range(4097)])
    error = refused(partial(edge1.AskList, too_many, timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 4096 names" in (error.details() or "")


def test_ask_list_is_for_host_certificates_only(make_central: Callable[..., Central]) -> None:
    central = make_central(TWO_HOSTS)
    as_admin = pb_grpc.HostGateStub(central.channel("admin1", "admin"))
    error = refused(partial(as_admin.AskList, pb.AskListRequest(usernames=["root"]), timeout=5))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "role admin may not call AskList",
    )
