"""Conversions between core objects and otpgate.v1 messages."""

from __future__ import annotations

from typing import Any

from otpgate.core.policy import Access, Reason
from otpgate.core.service import UserView, Verification, VerifyResult
from otpgate.core.settings import EnrollmentPolicy, Settings
from otpgate.errors import InvalidArgument
from otpgate.v1 import otpgate_pb2 as pb

POLICY_TO_PB = {
    EnrollmentPolicy.OPTIONAL: pb.ENROLLMENT_POLICY_OPTIONAL,
    EnrollmentPolicy.REQUIRED: pb.ENROLLMENT_POLICY_REQUIRED,
}
POLICY_FROM_PB = {number: policy for policy, number in POLICY_TO_PB.items()}

RESULT_TO_PB = {
    VerifyResult.VALID: pb.VERIFY_RESULT_VALID,
    VerifyResult.INVALID: pb.VERIFY_RESULT_INVALID,
    VerifyResult.REPLAYED: pb.VERIFY_RESULT_REPLAYED,
    VerifyResult.NOT_ENROLLED: pb.VERIFY_RESULT_NOT_ENROLLED,
    VerifyResult.LOCKED: pb.VERIFY_RESULT_LOCKED,
}

REASON_TO_PB = {
    Reason.NOT_COVERED: pb.ACCESS_REASON_NOT_COVERED,
    Reason.ENROLLED: pb.ACCESS_REASON_ENROLLED,
    Reason.REQUIRED_GROUP: pb.ACCESS_REASON_REQUIRED_GROUP,
    Reason.EXEMPT_GROUP: pb.ACCESS_REASON_EXEMPT_GROUP,
    Reason.EXEMPT_NETWORK: pb.ACCESS_REASON_EXEMPT_NETWORK,
    Reason.NOT_ENROLLED_OPTIONAL: pb.ACCESS_REASON_NOT_ENROLLED_OPTIONAL,
    Reason.ENROLLMENT_GRACE: pb.ACCESS_REASON_ENROLLMENT_GRACE,
    Reason.NOT_ENROLLED: pb.ACCESS_REASON_NOT_ENROLLED,
}
# An explained account exists (ExplainAccess answers NOT_FOUND otherwise).
assert set(REASON_TO_PB) == set(Reason) - {Reason.UNKNOWN_ACCOUNT}

# UpdateConfigRequest field -> Settings attribute.
_UPDATE_FIELDS = {
    "enabled": "enabled",
    "window": "window",
    "services_ssh": "services_ssh",
    "otp_digits": "otp_digits",
    "interval": "interval",
    "issuer": "issuer",
    "lockout_threshold": "lockout_threshold",
    "lockout_seconds": "lockout_seconds",
    "enrollment_deadline": "enrollment_deadline",
}
# UpdateConfigRequest StringList fields, each replacing the Settings list of its name.
_UPDATE_LISTS = ("exempt_networks", "exempt_groups", "required_groups")


def config_to_pb(settings: Settings, effective_issuer: str) -> pb.TwoFactorConfig:
    return pb.TwoFactorConfig(
        enabled=settings.enabled,
        window=settings.window,
        services=pb.Services(ssh=settings.services_ssh),
        otp_digits=settings.otp_digits,
        interval=settings.interval,
        issuer=settings.issuer,
        effective_issuer=effective_issuer,
        enrollment_policy=POLICY_TO_PB[settings.enrollment_policy],
        lockout_threshold=settings.lockout_threshold,
        lockout_seconds=settings.lockout_seconds,
        exempt_networks=settings.exempt_networks,
        exempt_groups=settings.exempt_groups,
        required_groups=settings.required_groups,
        enrollment_deadline=settings.enrollment_deadline,
    )


def changes_from_pb(request: pb.UpdateConfigRequest) -> dict[str, Any]:
    changes: dict[str, Any] = {
        attr: getattr(request, field)
        for field, attr in _UPDATE_FIELDS.items()
        if request.HasField(field)  # type: ignore[arg-type]
    }
    if request.HasField("enrollment_policy"):
        policy = POLICY_FROM_PB.get(request.enrollment_policy)
        if policy is None:
            raise InvalidArgument("enrollment_policy", "must be OPTIONAL or REQUIRED")
        changes["enrollment_policy"] = policy
    for field in _UPDATE_LISTS:
        if request.HasField(field):  # type: ignore[arg-type]
            changes[field] = list(getattr(request, field).values)
    return changes


def access_to_pb(
    access: Access, *, exempt_groups: list[str], required_groups: list[str]
) -> pb.ExplainAccessResponse:
    return pb.ExplainAccessResponse(
        asked=access.asked,
        refused=access.refused,
        reason=REASON_TO_PB[access.reason],
        matched=access.matched,
        grace_until=access.grace_until,
        overridden=access.overridden,
        explanation=access.explanation,
        exempt_groups=exempt_groups,
        required_groups=required_groups,
    )


def user_to_pb(view: UserView) -> pb.UserEntry:
    account, record = view.account, view.record
    twofactor = pb.TwoFactorUserConfig(
        secret_configured=record is not None,
        interval=record.interval if record else 0,
        otp_digits=record.otp_digits if record else 0,
    )
    if view.provisioning_uri is not None:
        twofactor.provisioning_uri = view.provisioning_uri
    return pb.UserEntry(
        id=account.api_id,
        uid=account.uid,
        username=account.username,
        full_name=account.full_name,
        home=account.home,
        shell=account.shell,
        gid=account.gid,
        groups=account.groups,
        local=account.local,
        twofactor_auth_configured=record is not None,
        twofactor_config=twofactor,
        failed_attempts=record.failures if record else 0,
        locked_seconds=view.locked_seconds,
        recovery_codes_left=view.recovery_codes_left,
        pending_expires_in=view.pending_expires_in,
    )


def verification_to_pb(outcome: Verification) -> pb.VerifyTokenResponse:
    reply = pb.VerifyTokenResponse(
        valid=outcome.valid,
        result=RESULT_TO_PB[outcome.result],
        locked_seconds=outcome.locked_seconds,
    )
    if outcome.recovery_codes_left is not None:
        reply.recovery_codes_left = outcome.recovery_codes_left
    return reply
