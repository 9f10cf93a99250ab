"""HostGate on the network listener: what edge daemons ask the central tier.

Only certificates of the `host` role reach it (server.roles). Root on an edge host
is assumed hostile, so what a host may do is bounded by what the people who log
in through it type there: it may ask whether a code is right (each wrong one
counts toward the lockout), and it may make a way in (a pending secret, recovery
codes) only with a grant, which only a right code (or recovery code) of the
account's current secret gives, checked here, a moment before, for that account
and that host certificate. A host never reads a secret in use; it never replaces
one at once (a pending secret leaves the current one working until it is
confirmed with a code from the new one). A grant is over the secret it was
proven against, up to the confirmation: an administrator's renewal or removal in
between voids it and the pending secret made with it (Bases).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import secrets
import threading
import time
from collections.abc import Callable

import grpc

from otpgate.core.accounts import StampedCache
from otpgate.core.crypto import Sealed
from otpgate.core.gate import Decision, Gate, Verdict
from otpgate.core.gate_files import MAX_ASK_NAMES, gate_lists
from otpgate.core.ports import PasswordChecker
from otpgate.core.records import Account
from otpgate.core.service import PENDING_SECONDS, TwoFactorService
from otpgate.core.throttle import Spacing
from otpgate.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SecretChanged,
    TooManyAttempts,
)
from otpgate.server.messages import user_to_pb, verification_to_pb
from otpgate.server.network import Guard
from otpgate.server.pam import bad_service, decide, pam_decision, safe_rhost
from otpgate.server.rpc import rpc
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc

GRANT_SECONDS = 300
CONFIRM_SPACING_SECONDS = 1.0
ASK_SPACING_SECONDS = 1.0
# How old the read of the enrolled accounts that AskList answers from may be.
ENROLLED_READ_SECONDS = 5.0
# Grants outstanding at once: a hostile host proving codes in a loop must not grow
# the table without bound (the oldest go first).
MAX_GRANTS = 10_000


@dataclasses.dataclass(frozen=True)
class _Grant:
    host: str  # the certificate name it was given to
    username: str
    sealed: Sealed | None  # the secret it was proven against: replaced only if unchanged
    expires: float


class Grants:
    """Single-use proofs that a host's user typed a right code a moment ago."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._grants: dict[bytes, _Grant] = {}
        self._lock = threading.Lock()

    def give(self, host: str, username: str, sealed: Sealed | None) -> str:
        token = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            for key in [k for k, g in self._grants.items() if g.expires <= now]:
                del self._grants[key]
            while len(self._grants) >= MAX_GRANTS:
                del self._grants[next(iter(self._grants))]
            self._grants[_digest(token)] = _Grant(host, username, sealed, now + GRANT_SECONDS)
        return token

    def take(self, token: str, host: str, username: str) -> _Grant:
        """The grant, spent; PermissionDenied unless it is this host's for this account."""
        with self._lock:
            grant = self._grants.get(_digest(token))
            if (
                grant is None
                or grant.expires <= self._clock()
                or not hmac.compare_digest(grant.host, host)
                or grant.username != username
            ):
                raise PermissionDenied(
                    "no valid grant for this account from this host: prove a current code "
                    "first (ProveCode); a grant is good once, for 5 minutes"
                )
            del self._grants[_digest(token)]
            return grant


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


class Bases:
    """For each pending secret made here with a grant: the secret the grant was
    proven against, which its confirmation may replace only if still in use."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._bases: dict[str, tuple[Sealed, float]] = {}
        self._lock = threading.Lock()

    def remember(self, username: str, sealed: Sealed) -> None:
        now = self._clock()
        with self._lock:
            for key in [k for k, (_, expires) in self._bases.items() if expires <= now]:
                del self._bases[key]
            self._bases.pop(username, None)
            while len(self._bases) >= MAX_GRANTS:
                del self._bases[next(iter(self._bases))]
            self._bases[username] = (sealed, now + PENDING_SECONDS)

    def recall(self, username: str) -> Sealed | None:
        """The secret proven for the account's pending secret, or None (not made
        here, or too long ago to be remembered)."""
        with self._lock:
            entry = self._bases.get(username)
        return entry[0] if entry is not None and entry[1] > self._clock() else None

    def forget(self, username: str) -> None:
        with self._lock:
            self._bases.pop(username, None)


def _changed(username: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{username}'s secret changed since the code was proven: prove a code of the "
        "current secret and renew again"
    )


class HostGateServicer(pb_grpc.HostGateServicer):
    def __init__(
        self,
        service: TwoFactorService,
        passwords: PasswordChecker,
        guard: Guard,
        grants: Grants | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._service = service
        self._gate = Gate(service, passwords)
        self._guard = guard
        self._grants = grants or Grants()
        self._bases = Bases()
        self._confirmations = Spacing(CONFIRM_SPACING_SECONDS, time.monotonic)
        self._ask_lists = Spacing(ASK_SPACING_SECONDS, time.monotonic)
        # One recent read of the enrolled accounts for every AskList, read again
        # after any change through this daemon (an edge asks right after an
        # enrollment's first login). A change another thread counts at the same
        # moment may go unseen: then the copy is at most ENROLLED_READ_SECONDS old.
        self._enrolled: StampedCache[None, list[Account]] = StampedCache(
            ttl=ENROLLED_READ_SECONDS,
            max_entries=1,
            clock=time.monotonic,
            stamp=lambda: service.generation,
        )
        self._clock = clock  # the service's: the store's times are in its seconds

    def _host(self, context: grpc.ServicerContext) -> str:
        identity = self._guard.identify(context)
        assert identity is not None  # the guard let the call in
        return identity.name

    def audit_origin(self, request: object, context: grpc.ServicerContext) -> tuple[str, str]:
        identity = self._guard.identify(context)
        caller = identity.caller if identity else "cert=?"
        if isinstance(request, pb.PamRequest):
            service = request.service if not bad_service(request.service) else "?"
            rhost = safe_rhost(request.rhost)
            return f"pam:{service}", f"{caller} rhost={rhost}" if rhost else caller
        return "host", caller

    @rpc
    def Check(self, request: pb.PamRequest, context: grpc.ServicerContext) -> pb.PamDecision:
        if bad_service(request.service):
            return pam_decision(Decision(Verdict.DENY))
        # rhost is the edge's word: a hostile edge that claims an exempt network
        # spares its own logins a code, which its root can let in anyway; it gains
        # nothing elsewhere (no grant without a right code).
        reply = decide(lambda: self._gate.check(request.username, request.service, request.rhost))
        if reply.verdict == pb.VERDICT_OTP_REQUIRED:
            reply.otp_digits = self._digits(request.username)
        return reply

    def _digits(self, username: str) -> int:
        try:
            record = self._service.enrollment(username).record
        except (NotFound, InvalidArgument):
            record = None  # an unknown name looks like an enrolled one (core.gate)
        return record.otp_digits if record else 6

    @rpc
    def Verify(self, request: pb.PamRequest, context: grpc.ServicerContext) -> pb.PamDecision:
        if bad_service(request.service):
            return pam_decision(Decision(Verdict.DENY))
        return decide(
            lambda: self._gate.verify(
                request.username, request.service, request.authtok, request.rhost
            )
        )

    @rpc
    def AskList(self, request: pb.AskListRequest, context: grpc.ServicerContext) -> pb.AskListReply:
        # What Check answers for each name, in bulk (core.gate_files): a host learns
        # nothing it could not ask Check one name at a time.
        if len(request.usernames) > MAX_ASK_NAMES:
            raise InvalidArgument("usernames", f"at most {MAX_ASK_NAMES} names per call")
        # Each call looks at thousands of names: a host (edges ask every 30 s) gets
        # one every ASK_SPACING_SECONDS, and shares one recent read of the secrets.
        wait = self._ask_lists.take(self._host(context))
        if wait:
            raise TooManyAttempts(
                f"AskList was called moments ago: try again in {wait:.1f} s", wait
            )
        enrolled = self._enrolled.get(None, self._service.enrolled_accounts)
        lists = gate_lists(self._service, list(request.usernames), enrolled=enrolled)
        return pb.AskListReply(
            asked=lists.asked, everywhere=lists.everywhere, exempt_networks=lists.networks
        )

    @rpc
    def GetUser(self, request: pb.GetUserRequest, context: grpc.ServicerContext) -> pb.UserEntry:
        return user_to_pb(self._service.get_user(request.username))

    @rpc
    def ProveCode(
        self, request: pb.ProveCodeRequest, context: grpc.ServicerContext
    ) -> pb.ProveCodeResponse:
        host = self._host(context)
        record = self._service.enrollment(request.username).record
        outcome = self._service.verify(
            request.username, request.token, via="host", malformed_counts=True
        )
        reply = pb.ProveCodeResponse(verification=verification_to_pb(outcome))
        if outcome.valid:
            reply.grant = self._grants.give(
                host, request.username, record.sealed if record else None
            )
            reply.grant_expires_in = GRANT_SECONDS
        return reply

    @rpc
    def RenewSecret(
        self, request: pb.HostRenewSecretRequest, context: grpc.ServicerContext
    ) -> pb.UserEntry:
        grant = self._grants.take(request.grant, self._host(context), request.username)
        proven = self._still_proven(request.username, grant)
        options = request.twofactor_options
        view = self._service.renew_secret(
            request.username,
            otp_digits=options.otp_digits or None,
            interval=options.interval or None,
            pending=True,
        )
        # A pending secret is put beside any secret (renew_secret checks no
        # `expected` then): its confirmation is the compare-and-set.
        self._bases.remember(request.username, proven)
        return user_to_pb(view)

    def _still_proven(self, username: str, grant: _Grant) -> Sealed:
        """The secret the grant was proven against, if the account still has it."""
        record = self._service.enrollment(username).record
        if record is None or grant.sealed is None or record.sealed != grant.sealed:
            raise _changed(username)
        return record.sealed

    @rpc
    def ConfirmSecret(
        self, request: pb.ConfirmSecretRequest, context: grpc.ServicerContext
    ) -> pb.UserEntry:
        # The code of the pending secret shows its owner holds it; that it may
        # replace the secret in use is what the grant it was made with showed, for
        # that secret only (compare-and-set, as user.sock's confirmation over the
        # session's secret). A wrong code counts toward no lockout (the pending
        # secret is not in use), so checks are spaced: one a second per account, at
        # most 900 of the million codes in a pending secret's 15 minutes.
        username = request.username
        wait = self._confirmations.take(username)
        if wait:
            raise TooManyAttempts(
                f"{username}: a code was checked moments ago: try again in {math.ceil(wait)} s",
                wait,
            )
        expected = self._bases.recall(username) or self._older_than_pending(username)
        try:
            view = self._service.confirm_secret(username, request.token, expected=expected)
        except SecretChanged:
            self._bases.forget(username)
            raise _changed(username) from None
        self._bases.forget(username)
        return user_to_pb(view)

    def _older_than_pending(self, username: str) -> Sealed | None:
        """For a pending secret not made here (an administrator's, another
        central's, or made before a restart): the secret in use, only if it was
        set before the pending secret was made. One set at or after it (an
        administrator's renewal) is not the pending secret's to replace."""
        before = int(self._clock())
        view = self._service.get_user(username)
        record = view.record
        if record is None or not view.pending_expires_in:
            return None if record is None else record.sealed  # confirm_secret refuses
        # At most the second the pending secret was made (it waits PENDING_SECONDS
        # from then): a same-second tie counts as "at or after".
        made = before + view.pending_expires_in - PENDING_SECONDS
        if record.created_at >= made:
            raise _changed(username)
        return record.sealed

    @rpc
    def MakeRecoveryCodes(
        self, request: pb.HostGrantRequest, context: grpc.ServicerContext
    ) -> pb.RecoveryCodes:
        grant = self._grants.take(request.grant, self._host(context), request.username)
        self._still_proven(request.username, grant)
        return pb.RecoveryCodes(codes=self._service.make_recovery_codes(request.username))
