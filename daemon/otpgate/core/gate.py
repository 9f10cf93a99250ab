"""Decisions for the PAM hook: does a login need a code, and is this one right?

Unknown accounts get the answers an enrolled account gets (a prompt, then "invalid
code"), after the same work, so the hook cannot be used to learn which names exist.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac

from otpgate.core import totp
from otpgate.core.ports import PasswordChecker
from otpgate.core.records import PasswordResult
from otpgate.core.service import TwoFactorService, VerifyResult
from otpgate.core.settings import EnrollmentPolicy, Settings
from otpgate.errors import InvalidArgument, NotFound

# pam_exec can only prompt "Password: ": this line, shown just before, says what to type.
CODE_PROMPT = "Verification code from your authenticator app (type it at the next prompt):"
ENROLL_HINT = (
    "This account needs a one-time code but has none set up: run `otpgate renew-secret` "
    "from a session you can still open, or ask an administrator."
)


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    NOT_REQUIRED = "not_required"
    OTP_REQUIRED = "otp_required"
    LOCKED = "locked"
    NOT_ENROLLED = "not_enrolled"


@dataclasses.dataclass(frozen=True)
class Decision:
    verdict: Verdict
    message: str = ""
    retry_after_seconds: int = 0


def _locked(seconds: int) -> Decision:
    minutes = max(1, (seconds + 59) // 60)
    return Decision(
        Verdict.LOCKED,
        f"Too many wrong codes: this account is locked for {minutes} minute(s).",
        seconds,
    )


def covers(settings: Settings, pam_service: str) -> bool:
    """Whether 2FA applies to logins through `pam_service` now."""
    if not settings.enabled:
        return False
    # sshd uses its program name as PAM service: "sshd", or a renamed copy "sshd-...".
    if pam_service == "sshd" or pam_service.startswith("sshd-"):
        return settings.services_ssh
    return True


class Gate:
    def __init__(self, service: TwoFactorService, passwords: PasswordChecker) -> None:
        self._service = service
        self._passwords = passwords

    def check(self, username: str, pam_service: str) -> Decision:
        settings = self._service.get_config()
        if not covers(settings, pam_service):
            return Decision(Verdict.NOT_REQUIRED)
        try:
            state = self._service.enrollment(username)
        except (NotFound, InvalidArgument):
            return Decision(Verdict.OTP_REQUIRED, CODE_PROMPT)
        if state.record is None:
            if settings.enrollment_policy is EnrollmentPolicy.OPTIONAL:
                return Decision(Verdict.NOT_REQUIRED)
            return Decision(Verdict.NOT_ENROLLED, ENROLL_HINT)
        if state.locked_seconds:
            return _locked(state.locked_seconds)
        return Decision(Verdict.OTP_REQUIRED, CODE_PROMPT)

    def verify(self, username: str, pam_service: str, token: str) -> Decision:
        settings = self._service.get_config()
        if not covers(settings, pam_service):
            return Decision(Verdict.NOT_REQUIRED)
        try:
            outcome = self._service.verify(
                username,
                token,
                via=f"pam:{pam_service}",
                malformed_counts=True,
                settings=settings,
            )
        except (NotFound, InvalidArgument):
            _burn_time(token)
            return Decision(Verdict.DENY, "Invalid code.")
        match outcome.result:
            case VerifyResult.VALID if outcome.recovery_codes_left is not None:
                left = outcome.recovery_codes_left
                return Decision(
                    Verdict.ALLOW,
                    f"Recovery code accepted: {left} left. "
                    "Make a new set soon: otpgate recovery-codes",
                )
            case VerifyResult.VALID:
                return Decision(Verdict.ALLOW)
            case VerifyResult.LOCKED:
                return _locked(outcome.locked_seconds)
            case VerifyResult.REPLAYED:
                return Decision(Verdict.DENY, "This code was already used: wait for the next one.")
            case VerifyResult.NOT_ENROLLED:
                if settings.enrollment_policy is EnrollmentPolicy.OPTIONAL:
                    return Decision(Verdict.NOT_REQUIRED)
                return Decision(Verdict.NOT_ENROLLED, ENROLL_HINT)
            case _:
                return Decision(Verdict.DENY, "Invalid code.")

    def verify_single_prompt(self, username: str, pam_service: str, authtok: str) -> Decision:
        """Password immediately followed by the code, as one string.

        Whatever fails (password, code, or both), the answer is the same, so a
        guesser never learns which half was right.
        """
        settings = self._service.get_config()
        try:
            record = self._service.enrollment(username).record
        except (NotFound, InvalidArgument):
            record = None
        needs_code = covers(settings, pam_service) and record is not None
        if not needs_code:
            password_ok = self._passwords(username, authtok) is PasswordResult.OK
            if not password_ok:
                return Decision(Verdict.DENY, "Wrong password or code.")
            if covers(settings, pam_service) and (
                settings.enrollment_policy is EnrollmentPolicy.REQUIRED
            ):
                return Decision(Verdict.NOT_ENROLLED, ENROLL_HINT)
            return Decision(Verdict.ALLOW)
        assert record is not None
        digits = record.otp_digits
        password, code = authtok[:-digits], authtok[-digits:]
        password_ok = self._passwords(username, password) is PasswordResult.OK
        if not password_ok:
            # Spend no guess on the code: a wrong password must not lock the account.
            return Decision(Verdict.DENY, "Wrong password or code.")
        decision = self.verify(username, pam_service, code)
        if decision.verdict is Verdict.DENY:
            return Decision(Verdict.DENY, "Wrong password or code.")
        return decision


def _burn_time(token: str) -> None:
    # About the cost of checking a code for a real account (one window of HMACs).
    dummy = totp.new_secret()
    digits = len(token) if 6 <= len(token) <= 8 else 6
    totp.matching_step(dummy, "0" * digits, now=0.0, interval=30, digits=digits, window=1)
    hmac.compare_digest(token.encode(errors="replace"), b"0" * digits)
