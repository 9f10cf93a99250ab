"""TwoFactorAdmin on admin.sock (every caller there is FULL_ADMIN) and on the
network listener (the certificate's role bounds the methods: server.roles)."""

from __future__ import annotations

import dataclasses

import grpc

from otpgate.core.service import ImportEntry, TwoFactorService
from otpgate.errors import InvalidArgument
from otpgate.server.messages import (
    access_to_pb,
    changes_from_pb,
    config_to_pb,
    user_to_pb,
    verification_to_pb,
)
from otpgate.server.network import Guard
from otpgate.server.pam import bad_service
from otpgate.server.rpc import rpc
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc


class AdminServicer(pb_grpc.TwoFactorAdminServicer):
    def __init__(self, service: TwoFactorService, *, guard: Guard | None = None) -> None:
        self._service = service
        self._guard = guard  # set on the network listener

    def audit_origin(self, request: object, context: grpc.ServicerContext) -> tuple[str, str]:
        if self._guard is None:
            # Root or a member of the admin group: which one, gRPC does not tell.
            return "admin", ""
        identity = self._guard.identify(context)
        if identity is None:
            return "remote", "cert=?"
        return f"remote:{identity.role}", identity.caller

    def _config(self) -> pb.TwoFactorConfig:
        settings = self._service.get_config()
        return config_to_pb(settings, self._service.effective_issuer(settings))

    @rpc
    def GetConfig(
        self, request: pb.GetConfigRequest, context: grpc.ServicerContext
    ) -> pb.TwoFactorConfig:
        return self._config()

    @rpc
    def UpdateConfig(
        self, request: pb.UpdateConfigRequest, context: grpc.ServicerContext
    ) -> pb.TwoFactorConfig:
        settings = self._service.update_config(changes_from_pb(request))
        return config_to_pb(settings, self._service.effective_issuer(settings))

    @rpc
    def RenewSecret(
        self, request: pb.RenewSecretRequest, context: grpc.ServicerContext
    ) -> pb.UserEntry:
        options = request.twofactor_options
        view = self._service.renew_secret(
            request.username,
            otp_digits=options.otp_digits or None,
            interval=options.interval or None,
            pending=request.pending,
        )
        return user_to_pb(view)

    @rpc
    def GetProvisioningUri(
        self, request: pb.GetProvisioningUriRequest, context: grpc.ServicerContext
    ) -> pb.GetProvisioningUriResponse:
        return pb.GetProvisioningUriResponse(
            provisioning_uri=self._service.provisioning_uri(request.username)
        )

    @rpc
    def VerifyToken(
        self, request: pb.VerifyTokenRequest, context: grpc.ServicerContext
    ) -> pb.VerifyTokenResponse:
        outcome = self._service.verify(request.username, request.token, via="admin")
        return verification_to_pb(outcome)

    @rpc
    def UnsetSecret(
        self, request: pb.UnsetSecretRequest, context: grpc.ServicerContext
    ) -> pb.UserEntry:
        return user_to_pb(self._service.unset_secret(request.username))

    @rpc
    def GetUser(self, request: pb.GetUserRequest, context: grpc.ServicerContext) -> pb.UserEntry:
        return user_to_pb(self._service.get_user(request.username))

    @rpc
    def ListUsers(
        self, request: pb.ListUsersRequest, context: grpc.ServicerContext
    ) -> pb.ListUsersResponse:
        return pb.ListUsersResponse(users=[user_to_pb(v) for v in self._service.list_users()])

    @rpc
    def ImportSecrets(
        self, request: pb.ImportSecretsRequest, context: grpc.ServicerContext
    ) -> pb.ImportSecretsResponse:
        entries = [
            ImportEntry(
                username=a.username,
                secret=a.secret,
                otp_digits=a.otp_digits,
                interval=a.interval,
                last_step=a.last_step,
                recovery_codes=tuple(a.recovery_codes),
            )
            for a in request.accounts
        ]
        names = self._service.import_secrets(entries, dry_run=request.dry_run)
        return pb.ImportSecretsResponse(usernames=names)

    @rpc
    def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        before = None
        if request.page_token:
            if not request.page_token.isdigit() or len(request.page_token) > 19:
                raise InvalidArgument("page_token", "is not one this server gave out")
            before = int(request.page_token)
        size = request.page_size or 100
        events = self._service.audit_events(
            username=request.username or None,
            since=request.since if request.HasField("since") else None,
            until=request.until if request.HasField("until") else None,
            before_id=before,
            limit=size,
        )
        reply = pb.ListAuditEventsResponse(
            events=[pb.AuditEvent(**dataclasses.asdict(e)) for e in events]
        )
        if len(events) == size:
            reply.next_page_token = str(events[-1].id)
        return reply

    @rpc
    def ExplainAccess(
        self, request: pb.ExplainAccessRequest, context: grpc.ServicerContext
    ) -> pb.ExplainAccessResponse:
        service = request.service or "sshd"
        if bad_service(service):
            raise InvalidArgument("service", "must be 1 to 64 printable ASCII characters")
        rhost = request.rhost
        if len(rhost) > 256 or not (rhost.isascii() and rhost.isprintable()):
            raise InvalidArgument("rhost", "must be at most 256 printable ASCII characters")
        access, groups = self._service.explain_access(
            request.username, rhost=rhost, pam_service=service
        )
        settings = self._service.get_config()
        return access_to_pb(
            access,
            exempt_groups=[g for g in settings.exempt_groups if g in groups],
            required_groups=[g for g in settings.required_groups if g in groups],
        )

    @rpc
    def RotateKey(
        self, request: pb.RotateKeyRequest, context: grpc.ServicerContext
    ) -> pb.RotateKeyResponse:
        done = self._service.rotate_key()
        return pb.RotateKeyResponse(
            resealed=done.resealed,
            key_id=done.key_id,
            old_key_ids=done.old_key_ids,
            old_key_loaded=done.old_key_loaded,
        )

    @rpc
    def Unlock(self, request: pb.UnlockRequest, context: grpc.ServicerContext) -> pb.UserEntry:
        return user_to_pb(self._service.unlock(request.username))

    @rpc
    def MakeRecoveryCodes(
        self, request: pb.MakeRecoveryCodesRequest, context: grpc.ServicerContext
    ) -> pb.RecoveryCodes:
        return pb.RecoveryCodes(codes=self._service.make_recovery_codes(request.username))

    @rpc
    def ConfirmSecret(
        self, request: pb.ConfirmSecretRequest, context: grpc.ServicerContext
    ) -> pb.UserEntry:
        return user_to_pb(self._service.confirm_secret(request.username, request.token))
