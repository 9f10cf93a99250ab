"""PamGate on pam.sock (root only): the hook's questions, answered in the reply.

A non-OK status always means "the daemon failed" (the hook denies); every
decision, including "bad input", travels as a Verdict. One verdict decides
nothing: UNAVAILABLE, when the shared database did not answer within its bound,
so that the hook's fail mode acts as it does for an unreachable daemon. Every
other failure (StoreError included) stays a failure and denies.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from otpgate.core.gate import Decision, Gate, Verdict
from otpgate.core.ports import PasswordChecker
from otpgate.core.service import TwoFactorService
from otpgate.errors import StoreUnavailable
from otpgate.server.rpc import rpc
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc

_VERDICT_TO_PB = {
    Verdict.ALLOW: pb.VERDICT_ALLOW,
    Verdict.DENY: pb.VERDICT_DENY,
    Verdict.NOT_REQUIRED: pb.VERDICT_NOT_REQUIRED,
    Verdict.OTP_REQUIRED: pb.VERDICT_OTP_REQUIRED,
    Verdict.LOCKED: pb.VERDICT_LOCKED,
    Verdict.NOT_ENROLLED: pb.VERDICT_NOT_ENROLLED,
}
_MAX_SERVICE = 64


def pam_decision(decision: Decision) -> pb.PamDecision:
    return pb.PamDecision(
        verdict=_VERDICT_TO_PB[decision.verdict],
        message=decision.message,
        retry_after_seconds=decision.retry_after_seconds,
    )


def decide(ask: Callable[[], Decision]) -> pb.PamDecision:
    try:
        return pam_decision(ask())
    except StoreUnavailable:
        # The reason is in the daemon's health log (database_unreachable), once.
        return pb.PamDecision(verdict=pb.VERDICT_UNAVAILABLE)


def bad_service(name: str) -> bool:
    return not (0 < len(name) <= _MAX_SERVICE and name.isascii() and name.isprintable())


def safe_rhost(rhost: str) -> str:
    """PAM_RHOST as the audit trail may show it (the client chose it)."""
    return rhost[:64] if rhost.isascii() and rhost.isprintable() else "?"


class PamServicer(pb_grpc.PamGateServicer):
    def __init__(self, service: TwoFactorService, passwords: PasswordChecker) -> None:
        self._gate = Gate(service, passwords)

    def audit_origin(
        self, request: pb.PamRequest, context: grpc.ServicerContext
    ) -> tuple[str, str]:
        service = request.service if not bad_service(request.service) else "?"
        rhost = safe_rhost(request.rhost)
        return f"pam:{service}", f"rhost={rhost}" if rhost else ""

    @rpc
    def Check(self, request: pb.PamRequest, context: grpc.ServicerContext) -> pb.PamDecision:
        if bad_service(request.service):
            return pam_decision(Decision(Verdict.DENY))
        return decide(lambda: self._gate.check(request.username, request.service, request.rhost))

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
    def VerifySinglePrompt(
        self, request: pb.PamRequest, context: grpc.ServicerContext
    ) -> pb.PamDecision:
        if bad_service(request.service):
            return pam_decision(Decision(Verdict.DENY))
        return decide(
            lambda: self._gate.verify_single_prompt(
                request.username, request.service, request.authtok, request.rhost
            )
        )
