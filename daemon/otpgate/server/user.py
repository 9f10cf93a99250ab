"""UserSelfService on user.sock: any local user, acting on their own account only.

Every call carries its caller as the kernel reported it to the relay in front of
this server (server.relay): without one (a connection that did not come through
the relay) nothing is served. A session belongs to the uid that logged in (root
excepted), and its level is checked against the account at each call: a session
opened by password alone (LEVEL_1) serves only an account without a secret.
"""

from __future__ import annotations

import math
import time

import grpc

from otpgate.core.login import Level, LoginOutcome, Logins, Response, Session
from otpgate.core.ports import SelfService
from otpgate.core.service import UserView
from otpgate.core.throttle import Spacing
from otpgate.errors import (
    InvalidArgument,
    PermissionDenied,
    SecretChanged,
    TooManyAttempts,
    Unauthenticated,
)
from otpgate.server.messages import user_to_pb, verification_to_pb
from otpgate.server.relay import Caller, CallerRegistry
from otpgate.server.rpc import rpc
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc

_RESPONSE_TO_PB = {
    Response.SUCCESS: pb.SUCCESS,
    Response.OTP_REQUIRED: pb.OTP_REQUIRED,
    Response.AUTH_ERR: pb.AUTH_ERR,
    Response.EXPIRED: pb.EXPIRED,
}
_LEVEL_TO_PB = {Level.LEVEL_1: pb.LEVEL_1, Level.LEVEL_2: pb.LEVEL_2}
_BEARER = "bearer "
# Self-service renewals of one account: each is a durable write and a log line, so
# no local user gets to make them as fast as the daemon answers.
RENEW_SPACING_SECONDS = 5.0
# VerifyToken counts an attempt (a database write) and writes a log line: one
# check of one's authenticator a second is plenty.
VERIFY_SPACING_SECONDS = 1.0


def _token(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith(_BEARER):
            return value[len(_BEARER) :].strip()
    return ""


def _wants_user_info(options: pb.AuthCommonOptions) -> bool:
    return options.user_info if options.HasField("user_info") else True


def _user_info(view: UserView, level: Level) -> pb.AuthUserInfo:
    entry = user_to_pb(view)
    return pb.AuthUserInfo(
        pw_name=entry.username,
        pw_gecos=entry.full_name,
        pw_dir=entry.home,
        pw_shell=entry.shell,
        pw_uid=entry.uid,
        pw_gid=entry.gid,
        grouplist=entry.groups,
        local=entry.local,
        two_factor_config=entry.twofactor_config,
        authenticator=_LEVEL_TO_PB[level],
    )


def _response(outcome: LoginOutcome, user_info: bool) -> pb.LoginExResponse:
    reply = pb.LoginExResponse(
        response_type=_RESPONSE_TO_PB[outcome.response],
        username=outcome.username if outcome.response is Response.OTP_REQUIRED else "",
        attempt_token=outcome.attempt_token,
        session_token=outcome.session_token,
        session_expires_in=outcome.session_expires_in,
    )
    if user_info and outcome.user is not None and outcome.level is not None:
        reply.user_info.CopyFrom(_user_info(outcome.user, outcome.level))
    return reply


class UserServicer(pb_grpc.UserSelfServiceServicer):
    def __init__(self, service: SelfService, logins: Logins, callers: CallerRegistry) -> None:
        self._service = service
        self._logins = logins
        self._callers = callers
        self._renewals = Spacing(RENEW_SPACING_SECONDS, time.monotonic)
        self._verifications = Spacing(VERIFY_SPACING_SECONDS, time.monotonic)

    def audit_origin(self, request: object, context: grpc.ServicerContext) -> tuple[str, str]:
        caller = self._callers.from_peer(context.peer())
        return "user", f"uid={caller.uid} pid={caller.pid}" if caller else ""

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        caller = self._callers.from_peer(context.peer())
        if caller is None:
            raise PermissionDenied("this connection did not come through user.sock")
        return caller

    def _session(self, context: grpc.ServicerContext) -> Session:
        caller = self._caller(context)
        session = self._logins.session(_token(context))
        if session is None:
            raise Unauthenticated("log in first (LoginEx): no valid session")
        if not caller.is_root and caller.uid != session.uid:
            # A token that leaked to another local user is worth nothing to them.
            raise Unauthenticated("this session belongs to another uid: log in first (LoginEx)")
        return session

    def _own(self, context: grpc.ServicerContext, username: str) -> str:
        return self._own_view(context, username)[0]

    def _own_view(
        self, context: grpc.ServicerContext, username: str
    ) -> tuple[str, UserView, Session]:
        """The session's account; another name is refused, even a recreated one."""
        session = self._session(context)
        if username and username != session.username:
            raise PermissionDenied(f"a session of {session.username} may act on itself only")
        view = self._service.get_user(session.username)
        if view.account.uid != session.uid:
            raise Unauthenticated("the session's account no longer exists")
        if not session.may_act_on(view.record):
            raise Unauthenticated(
                "this account has a 2FA secret this session did not prove: "
                "log in again with a code (LEVEL_2)"
            )
        return session.username, view, session

    @rpc
    def LoginEx(
        self, request: pb.LoginExRequest, context: grpc.ServicerContext
    ) -> pb.LoginExResponse:
        if request.mechanism != pb.PASSWORD_PLAIN:
            raise InvalidArgument("mechanism", "LoginEx takes PASSWORD_PLAIN")
        caller = self._caller(context)
        outcome = self._logins.login(
            request.username, request.password, caller_uid=caller.uid, caller=caller.describe()
        )
        return _response(outcome, _wants_user_info(request.login_options))

    @rpc
    def LoginExContinue(
        self, request: pb.LoginExContinueRequest, context: grpc.ServicerContext
    ) -> pb.LoginExResponse:
        if request.mechanism != pb.OTP_TOKEN:
            raise InvalidArgument("mechanism", "LoginExContinue takes OTP_TOKEN")
        caller = self._caller(context)
        outcome = self._logins.login_continue(
            request.attempt_token, request.otp_token, caller_uid=caller.uid
        )
        return _response(outcome, _wants_user_info(request.login_options))

    @rpc
    def Logout(self, request: pb.LogoutRequest, context: grpc.ServicerContext) -> pb.LogoutResponse:
        self._session(context)  # any level may end itself
        self._logins.logout(_token(context))
        return pb.LogoutResponse()

    @rpc
    def RenewSecret(
        self, request: pb.RenewSecretRequest, context: grpc.ServicerContext
    ) -> pb.UserEntry:
        username, checked, _ = self._own_view(context, request.username)
        wait = self._renewals.take(username)
        if wait:
            raise TooManyAttempts(
                f"{username} renewed a secret moments ago: try again in {math.ceil(wait)} s",
                wait,
            )
        options = request.twofactor_options
        try:
            # Replace only the secret this session was just allowed to replace: an
            # admin's renewal in between must not be overwritten by a password alone.
            view = self._service.renew_secret(
                username,
                otp_digits=options.otp_digits or None,
                interval=options.interval or None,
                expected=checked.record.sealed if checked.record else None,
                pending=request.pending,
            )
        except SecretChanged:
            raise Unauthenticated(
                "this account's 2FA secret changed meanwhile: log in again with a code"
            ) from None
        if view.record is not None and not request.pending:
            self._logins.note_created_secret(_token(context), view.record.sealed)
        return user_to_pb(view)

    @rpc
    def ConfirmSecret(
        self, request: pb.ConfirmSecretRequest, context: grpc.ServicerContext
    ) -> pb.UserEntry:
        username, checked, _ = self._own_view(context, request.username)
        wait = self._verifications.take(username)
        if wait:
            raise TooManyAttempts(
                f"{username} checked a code moments ago: try again in {math.ceil(wait)} s", wait
            )
        try:
            # As RenewSecret: only over the secret this session was allowed to replace.
            view = self._service.confirm_secret(
                username,
                request.token,
                expected=checked.record.sealed if checked.record else None,
            )
        except SecretChanged:
            raise Unauthenticated(
                "this account's 2FA secret changed meanwhile: log in again with a code"
            ) from None
        if view.record is not None:
            self._logins.note_created_secret(_token(context), view.record.sealed)
        return user_to_pb(view)

    @rpc
    def GetProvisioningUri(
        self, request: pb.GetProvisioningUriRequest, context: grpc.ServicerContext
    ) -> pb.GetProvisioningUriResponse:
        username = self._own(context, request.username)
        return pb.GetProvisioningUriResponse(
            provisioning_uri=self._service.provisioning_uri(username)
        )

    @rpc
    def VerifyToken(
        self, request: pb.VerifyTokenRequest, context: grpc.ServicerContext
    ) -> pb.VerifyTokenResponse:
        username = self._own(context, request.username)
        wait = self._verifications.take(username)
        if wait:
            raise TooManyAttempts(
                f"{username} checked a code moments ago: try again in {math.ceil(wait)} s", wait
            )
        outcome = self._service.verify(username, request.token, via="user")
        return verification_to_pb(outcome)

    @rpc
    def GetUser(self, request: pb.GetUserRequest, context: grpc.ServicerContext) -> pb.UserEntry:
        return user_to_pb(self._service.get_user(self._own(context, request.username)))

    @rpc
    def MakeRecoveryCodes(
        self, request: pb.MakeRecoveryCodesRequest, context: grpc.ServicerContext
    ) -> pb.RecoveryCodes:
        username, _, session = self._own_view(context, request.username)
        if session.level is not Level.LEVEL_2:
            # Codes that stand in for the phone: only for whoever just showed the phone.
            raise Unauthenticated("recovery codes need a session that proved a code (LEVEL_2)")
        return pb.RecoveryCodes(codes=self._service.make_recovery_codes(username))
