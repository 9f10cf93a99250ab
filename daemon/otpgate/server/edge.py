"""Edge mode: otpgated on an SSH host that holds no key and no database.

The local hook and users talk to pam.sock and user.sock as on a single host; each
question about a code is forwarded to the central tier (HostGate, over mutual TLS
with this host's `host` certificate). Passwords are this host's and are checked
here. Upstreams are tried in order, starting with the last one that answered, each
within `upstream_timeout`; when none answers in time the hook gets
VERDICT_UNAVAILABLE and its fail mode decides, as for an unreachable daemon. An
upstream that answers with an error is a failure, never "unavailable".

Root on this host is not trusted by the central tier (server.host_gate): it can
ask whether a code is right, and can make a pending secret or recovery codes for
an account only with a grant from a code typed here a moment before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from cryptography import x509
from google.protobuf.message import Message

from otpgate import pki
from otpgate.core.accounts import local_account_names, lookup_account
from otpgate.core.crypto import Sealed
from otpgate.core.gate_files import MAX_ASK_NAMES, GateLists, listable
from otpgate.core.ports import PasswordChecker
from otpgate.core.records import Account, AccountDetails, PasswordResult, SecretRecord
from otpgate.core.service import UserView, Verification, VerifyResult
from otpgate.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StoreError,
    StoreUnavailable,
    TooManyAttempts,
    Unauthenticated,
    UpstreamRefused,
)
from otpgate.server.messages import RESULT_TO_PB
from otpgate.server.pam import bad_service
from otpgate.server.rpc import rpc
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc

log = logging.getLogger("otpgated")

Reply = TypeVar("Reply", bound=Message)

# The hook gives the daemon 3 s (timeout=); every upstream together gets less.
TOTAL_BUDGET_SECONDS = 2.5
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # After a failure gRPC waits before connecting again (up to 120 s by default):
    # a central that is back must serve the next login, not one two minutes later.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
]
# Statuses that mean "this upstream did not decide": try the next one. Only for a
# question that changes nothing: a Verify that ran out of time may have been judged
# (the code counted, or spent) after the edge stopped waiting, and "unavailable"
# would let fail=safe in on a wrong code; such a call denies instead.
_AWAY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_READ_ONLY = {"Check", "GetUser", "AskList"}
_RESULT_FROM_PB = {v: k for k, v in RESULT_TO_PB.items()}


class Upstreams:
    """The central daemons, tried in turn; the last one that answered goes first."""

    def __init__(
        self,
        addresses: list[str],
        *,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        timeout: float,
        budget: float = TOTAL_BUDGET_SECONDS,
        server_name: str = "",
    ) -> None:
        self.addresses = addresses
        self._server_name = server_name
        self._timeout = timeout
        self._budget = budget
        self._first = 0
        self._lock = threading.Lock()
        self._channels: list[grpc.Channel] = []
        self._stubs: list[pb_grpc.HostGateStub] = []
        self._not_after = 0.0
        self.reload(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem)

    def reload(self, *, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
        """New channels with these certificates (SIGHUP); calls under way finish on
        the old ones. ConfigError, changing nothing, for a broken certificate or key."""
        try:
            leaf = pki.check_identity(cert_pem, key_pem, usage="client")
            x509.load_pem_x509_certificates(ca_pem)
        except pki.IdentityProblem as exc:
            raise ConfigError(f"{'tls_key' if exc.part == 'key' else 'tls_cert'} {exc}") from None
        except ValueError:
            raise ConfigError("upstream_ca holds no PEM certificate") from None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        options: list[tuple[str, Any]] = list(_CHANNEL_OPTIONS)
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        channels = [grpc.secure_channel(a, credentials, options=options) for a in self.addresses]
        with self._lock:
            old, self._channels = self._channels, channels
            self._stubs = [pb_grpc.HostGateStub(c) for c in channels]
            self._not_after = leaf.not_valid_after_utc.timestamp()
        if old:
            # Closing a channel cancels its calls: give those under way their budget.
            closer = threading.Timer(self._budget + 1.0, _close_all, (old,))
            closer.daemon = True
            closer.start()

    def call(self, method: str, request: Message, *, retry_unavailable: bool = False) -> Any:
        """The first answer of an upstream; StoreUnavailable when none came in time,
        UpstreamRefused when one answered with an error.

        With `retry_unavailable`, an upstream's VERDICT_UNAVAILABLE (its database did
        not answer) sends the question on to the next one, too.
        """
        deadline = time.monotonic() + self._budget
        with self._lock:
            first, stubs, not_after = self._first, self._stubs, self._not_after
        if time.time() >= not_after:
            # The centrals would refuse the handshake, which gRPC reports as a closed
            # socket: an outage to the hook's fail mode. It is a failure of this host.
            raise UpstreamRefused(
                "UNAUTHENTICATED", "this edge's certificate (tls_cert) has expired: renew it"
            )
        order = [(first + i) % len(stubs) for i in range(len(stubs))]
        away: list[str] = []
        last_unavailable: Any = None
        for index in order:
            left = deadline - time.monotonic()
            if left <= 0.05:
                break
            address = self.addresses[index]
            try:
                reply = getattr(stubs[index], method)(request, timeout=min(self._timeout, left))
            except grpc.RpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.DEADLINE_EXCEEDED and method not in _READ_ONLY:
                    # Denied, but the next call starts elsewhere: with the gate files
                    # most logins never ask Check, which would have moved on.
                    self._move_past(index, f"{address}: {code.name} on {method}")
                    raise UpstreamRefused(
                        code.name,
                        f"upstream {address} did not answer {method} in time; it may have "
                        "judged it, so nobody else is asked",
                    ) from None
                if code in _AWAY:
                    away.append(f"{address}: {code.name}")
                    continue
                details = exc.details() or code.name
                raise UpstreamRefused(
                    code.name, f"upstream {address} refused {method}: {details}", details
                ) from None
            if retry_unavailable and getattr(reply, "verdict", None) == pb.VERDICT_UNAVAILABLE:
                away.append(f"{address}: its database did not answer")
                last_unavailable = reply
                continue
            if index != first:
                with self._lock:
                    self._first = index
                log.warning("upstream_switched to=%s after=%s", address, "; ".join(away))
            return reply
        if last_unavailable is not None:
            return last_unavailable
        raise StoreUnavailable(
            "no upstream answered in time: " + ("; ".join(away) or "out of time")
        )

    def _move_past(self, index: int, why: str) -> None:
        with self._lock:
            if self._first != index or len(self._stubs) == 1:
                return
            self._first = (index + 1) % len(self._stubs)
            following = self.addresses[self._first]
        log.warning("upstream_switched to=%s after=%s", following, why)

    def close(self) -> None:
        with self._lock:
            channels = self._channels
        _close_all(channels)


def _close_all(channels: list[grpc.Channel]) -> None:
    for channel in channels:
        channel.close()


class SeenNames:
    """The names of the latest logins (at most `size`), for the edge's gate files:
    an account NSS does not enumerate is listed once it has logged in."""

    def __init__(self, size: int = MAX_ASK_NAMES, on_new: Callable[[], None] = lambda: None):
        self._size = size
        self._on_new = on_new
        self._names: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            new = name not in self._names
            self._names[name] = None
            self._names.move_to_end(name)
            while len(self._names) > self._size:
                self._names.popitem(last=False)
        if new:
            self._on_new()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._names)


# The centrals refuse requests over 64 KiB (server.main's _SERVER_OPTIONS).
_ASK_BATCH_BYTES = 48 * 1024
_BATCH_PAUSE_SECONDS = 1.1
# A central that does not know AskList (older than this edge) is asked again after this.
_REFUSED_PAUSE_SECONDS = 600.0


class EdgeGateLists:
    """The gate files' lists, from the centrals (HostGate.AskList), for this host's
    own accounts (/etc/passwd: NSS may list a whole directory, slowly) and the
    names of its latest logins: MAX_ASK_NAMES at most, half of them kept for the
    former, so no flood of made-up names crowds them out."""

    def __init__(
        self,
        upstreams: Upstreams,
        seen: SeenNames,
        *,
        local_names: Callable[[], list[str]] = local_account_names,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._upstreams = upstreams
        self._seen = seen
        self._local_names = local_names
        self._clock = clock
        self._paused_until = 0.0

    def _names(self) -> list[str]:
        # Only names the files can hold: the others would cost the central for nothing.
        local = [name for name in self._local_names() if listable(name)]
        names = dict.fromkeys(local[: MAX_ASK_NAMES // 2])
        for name in reversed(self._seen.names()):  # the latest first
            if len(names) >= MAX_ASK_NAMES:
                break
            if listable(name):
                names[name] = None
        return list(names)

    def __call__(self) -> GateLists | None:
        """The lists; None (the files stay as they are) while the centrals refuse."""
        if self._clock() < self._paused_until:
            return None
        asked: list[str] = []
        everywhere: list[str] = []
        networks: tuple[str, ...] = ()
        for number, batch in enumerate(_batches(self._names())):
            if number:
                time.sleep(_BATCH_PAUSE_SECONDS)  # a central takes one a second from a host
            try:
                reply: pb.AskListReply = self._upstreams.call(
                    "AskList", pb.AskListRequest(usernames=batch)
                )
            except UpstreamRefused as exc:
                if exc.code not in ("PERMISSION_DENIED", "UNIMPLEMENTED"):
                    raise
                self._paused_until = self._clock() + _REFUSED_PAUSE_SECONDS
                log.warning(
                    "gate_lists_refused code=%s details=%s: logins that need a code ask "
                    "check first; asked again in %d minutes (are the centrals older than "
                    "this edge?)",
                    exc.code, exc.details, _REFUSED_PAUSE_SECONDS // 60,
                )  # fmt: skip
                return None
            asked += reply.asked
            everywhere += reply.everywhere
            networks = tuple(reply.exempt_networks)
        return GateLists(tuple(asked), tuple(everywhere), networks)


def _batches(names: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for name in names:
        cost = len(name.encode()) + 3  # the field's tag and length
        if batch and size + cost > _ASK_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += cost
    yield batch


class EdgePamServicer(pb_grpc.PamGateServicer):
    """PamGate on an edge's pam.sock: codes checked upstream, passwords here."""

    def __init__(
        self, upstreams: Upstreams, passwords: PasswordChecker, seen: SeenNames | None = None
    ) -> None:
        self._upstreams = upstreams
        self._passwords = passwords
        self._seen = seen or SeenNames()

    def _ask(self, method: str, request: pb.PamRequest) -> pb.PamDecision:
        self._seen.add(request.username)
        forwarded = pb.PamRequest(
            username=request.username,
            service=request.service,
            rhost=request.rhost,
            authtok=request.authtok,
        )
        try:
            reply: pb.PamDecision = self._upstreams.call(method, forwarded, retry_unavailable=True)
        except StoreUnavailable as exc:
            log.warning("upstream_unavailable method=%s: %s", method, exc)
            return pb.PamDecision(verdict=pb.VERDICT_UNAVAILABLE)
        return pb.PamDecision(
            verdict=reply.verdict,
            message=reply.message,
            retry_after_seconds=reply.retry_after_seconds,
        )

    @rpc
    def Check(self, request: pb.PamRequest, context: grpc.ServicerContext) -> pb.PamDecision:
        if bad_service(request.service):
            return pb.PamDecision(verdict=pb.VERDICT_DENY)
        return self._ask("Check", request)

    @rpc
    def Verify(self, request: pb.PamRequest, context: grpc.ServicerContext) -> pb.PamDecision:
        if bad_service(request.service):
            return pb.PamDecision(verdict=pb.VERDICT_DENY)
        return self._ask("Verify", request)

    @rpc
    def VerifySinglePrompt(
        self, request: pb.PamRequest, context: grpc.ServicerContext
    ) -> pb.PamDecision:
        # As core.gate's: the same answer whichever half was wrong, and no code
        # spent (nothing sent upstream) after a wrong password.
        wrong = pb.PamDecision(verdict=pb.VERDICT_DENY, message="Wrong password or code.")
        if bad_service(request.service):
            return pb.PamDecision(verdict=pb.VERDICT_DENY)
        try:
            check: pb.PamDecision = self._upstreams.call(
                "Check",
                pb.PamRequest(
                    username=request.username, service=request.service, rhost=request.rhost
                ),
                retry_unavailable=True,
            )
        except StoreUnavailable as exc:
            log.warning("upstream_unavailable method=Check: %s", exc)
            return pb.PamDecision(verdict=pb.VERDICT_UNAVAILABLE)
        if check.verdict == pb.VERDICT_UNAVAILABLE:
            return check  # no central's database answered: the hook's fail mode decides
        authtok = request.authtok
        if check.verdict == pb.VERDICT_NOT_REQUIRED:
            # The message, if any, is the enrollment grace's hint (core.gate).
            return (
                pb.PamDecision(verdict=pb.VERDICT_ALLOW, message=check.message)
                if self._right(request.username, authtok)
                else wrong
            )
        if check.verdict in (pb.VERDICT_NOT_ENROLLED, pb.VERDICT_LOCKED):
            return check if self._right(request.username, authtok) else wrong
        if check.verdict != pb.VERDICT_OTP_REQUIRED:
            # Nothing else is an answer to Check: never let it skip the password.
            return pb.PamDecision(verdict=pb.VERDICT_DENY)
        digits = check.otp_digits if 6 <= check.otp_digits <= 8 else 6
        password, code = authtok[:-digits], authtok[-digits:]
        if not self._right(request.username, password):
            return wrong
        decision = self._ask("Verify", pb.PamRequest(
            username=request.username, service=request.service, rhost=request.rhost, authtok=code
        ))  # fmt: skip
        if decision.verdict == pb.VERDICT_DENY:
            return wrong
        return decision

    def _right(self, username: str, password: str) -> bool:
        return self._passwords(username, password) is PasswordResult.OK


# -- self-service through the central tier ------------------------------------------

# An edge knows no sealed secret; the views it builds carry this stand-in, which
# only says "enrolled" to the session logic (core.login).
_NO_SEALED = Sealed("upstream", b"", b"")


def user_from_pb(entry: pb.UserEntry) -> UserView:
    account = AccountDetails(
        username=entry.username,
        uid=entry.uid,
        gid=entry.gid,
        full_name=entry.full_name,
        home=entry.home,
        shell=entry.shell,
        groups=tuple(entry.groups),
        local=entry.local,
    )
    record = None
    if entry.twofactor_auth_configured:
        record = SecretRecord(
            entry.username,
            entry.uid,
            _NO_SEALED,
            entry.twofactor_config.otp_digits,
            entry.twofactor_config.interval,
            0,
            failures=entry.failed_attempts,
        )
    uri = entry.twofactor_config.provisioning_uri
    return UserView(
        account=account,
        record=record,
        locked_seconds=entry.locked_seconds,
        provisioning_uri=uri or None,
        recovery_codes_left=entry.recovery_codes_left,
        pending_expires_in=entry.pending_expires_in,
    )


_REFUSALS: dict[str, Callable[[str], Exception]] = {
    "NOT_FOUND": NotFound,
    "FAILED_PRECONDITION": FailedPrecondition,
    "PERMISSION_DENIED": PermissionDenied,
    "UNAUTHENTICATED": Unauthenticated,
    "RESOURCE_EXHAUSTED": lambda message: TooManyAttempts(message, 1.0),
}


class UpstreamSelfService:
    """What user.sock's servicer and logins ask of the service (core.ports.SelfService),
    answered by the central tier: this host's user proves a code there (ProveCode),
    and the grant it gets back makes the one change that follows possible."""

    def __init__(self, upstreams: Upstreams) -> None:
        self._upstreams = upstreams
        self._grants: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def _call(self, method: str, request: Message) -> Any:
        try:
            return self._upstreams.call(method, request)
        except UpstreamRefused as exc:
            make = _REFUSALS.get(exc.code)
            if exc.code == "INVALID_ARGUMENT":
                raise InvalidArgument("request", exc.details) from None
            if make is not None:
                raise make(exc.details) from None
            raise StoreError(str(exc)) from None

    def lookup(self, username: str) -> Account | None:
        return lookup_account(username)

    def get_user(self, username: str) -> UserView:
        return user_from_pb(self._call("GetUser", pb.GetUserRequest(username=username)))

    def record(self, event: str, username: str, detail: str) -> None:
        # No audit trail here: the central one has every code checked and change made.
        pass

    def verify(
        self, username: str, token: str, *, via: str, malformed_counts: bool = False
    ) -> Verification:
        reply: pb.ProveCodeResponse = self._call(
            "ProveCode", pb.ProveCodeRequest(username=username, token=token)
        )
        outcome = reply.verification
        if reply.grant:
            with self._lock:
                self._grants[username] = (reply.grant, time.monotonic() + reply.grant_expires_in)
        return Verification(
            result=_RESULT_FROM_PB.get(outcome.result, VerifyResult.INVALID),
            locked_seconds=outcome.locked_seconds,
            recovery_codes_left=(
                outcome.recovery_codes_left if outcome.HasField("recovery_codes_left") else None
            ),
        )

    def _grant(self, username: str) -> str:
        with self._lock:
            grant, expires = self._grants.pop(username, ("", 0.0))
        if not grant or expires <= time.monotonic():
            raise Unauthenticated(
                "on an edge host a new secret or recovery codes need a code of the current "
                "secret proven moments before (log in again with a code); an account without "
                "a secret is enrolled by an administrator or the help desk "
                "(otpgate --server ... renew-secret USER)"
            )
        return grant

    def renew_secret(
        self,
        username: str,
        *,
        otp_digits: int | None = None,
        interval: int | None = None,
        expected: object = None,
        pending: bool = False,
    ) -> UserView:
        if not pending:
            raise FailedPrecondition(
                "an edge host renews a secret only with confirmation (renew-secret without "
                "--now); an administrator can replace it at once"
            )
        request = pb.HostRenewSecretRequest(
            username=username,
            grant=self._grant(username),
            twofactor_options=pb.TwoFactorOptions(
                otp_digits=otp_digits or 0, interval=interval or 0
            ),
        )
        return user_from_pb(self._call("RenewSecret", request))

    def confirm_secret(self, username: str, token: str, *, expected: object = None) -> UserView:
        request = pb.ConfirmSecretRequest(username=username, token=token)
        return user_from_pb(self._call("ConfirmSecret", request))

    def provisioning_uri(self, username: str) -> str:
        raise PermissionDenied(
            "an edge host never reads a secret in use: renew it (otpgate renew-secret) "
            "to get a new one"
        )

    def make_recovery_codes(self, username: str) -> list[str]:
        request = pb.HostGrantRequest(username=username, grant=self._grant(username))
        reply: pb.RecoveryCodes = self._call("MakeRecoveryCodes", request)
        return list(reply.codes)
