"""Decisions for the PAM hook: does a login need a code, and is this one right?

Unknown accounts get the answers an enrolled account gets (a prompt, then "invalid
code"), after the same work, so the hook cannot be used to learn which names exist;
only the access policy's exempt networks spare them, as they spare every account.

The access policy (core.policy: exempt networks and groups, required groups, the
enrollment deadline) is applied here, to every mode. What the hook does with each
verdict: NOT_REQUIRED lets the login in without a code (check; verify with
first-factor=required), and its message, when there is one, is shown: that is how
an account in its enrollment grace gets in with the hint. NOT_ENROLLED keeps it out
with the hint.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import logging

from otpgate.core import policy, totp
from otpgate.core.policy import covers
from otpgate.core.ports import PasswordChecker
from otpgate.core.records import Account, PasswordResult
from otpgate.core.service import TwoFactorService, VerifyResult
from otpgate.core.settings import Settings
from otpgate.errors import InvalidArgument, NotFound

__all__ = ["CODE_PROMPT", "ENROLL_HINT", "Decision", "Gate", "Verdict", "covers", "grace_hint"]

log = logging.getLogger("otpgated")

# pam_exec can only prompt "Password: ": this line, shown just before, says what to type.
CODE_PROMPT = "Verification code from your authenticator app (type it at the next prompt):"
ENROLL_HINT = (
    "This account needs a one-time code but has none set up: run `otpgate renew-secret` "
    "from a session you can still open, or ask an administrator."
)


def grace_hint(deadline: str) -> str:
    """What an account in its enrollment grace is shown at each login."""
    return (
        f"This account has no one-time code set up, and needs one after {deadline} (UTC): "
        "run `otpgate renew-secret` now, or ask an administrator. Until then the password "
        "(or key) alone still lets you in."
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


_WRONG = Decision(Verdict.DENY, "Wrong password or code.")


class Gate:
    def __init__(self, service: TwoFactorService, passwords: PasswordChecker) -> None:
        self._service = service
        self._passwords = passwords

    # -- the access policy ----------------------------------------------------------

    def _rule(self, settings: Settings, account: Account | None, rhost: str) -> policy.Match:
        if not policy.has_rules(settings):
            return policy.Match()
        return policy.match(
            settings,
            known=account is not None,
            groups=lambda: self._service.group_names(account) if account else frozenset(),
            rhost=rhost,
        )

    def _conclude(
        self, settings: Settings, rule: policy.Match, *, known: bool, enrolled: bool
    ) -> policy.Access:
        return policy.conclude(
            settings, rule, covered=True, known=known, enrolled=enrolled, now=self._service.now()
        )

    def _without_code(
        self, access: policy.Access, settings: Settings, username: str, pam_service: str
    ) -> Decision | None:
        """The decision when no code will be checked (exempt, not enrolled...); None
        when a code is asked."""
        if access.refused:
            return Decision(Verdict.NOT_ENROLLED, ENROLL_HINT)
        if access.asked:
            return None
        if access.exempt:
            log.info(
                "access_exempt user=%s service=%s reason=%s matched=%s",
                username, pam_service, access.reason.value, access.matched,
            )  # fmt: skip
        if access.reason is policy.Reason.ENROLLMENT_GRACE:
            deadline = settings.enrollment_deadline
            log.info(
                "enrollment_grace user=%s service=%s until=%s", username, pam_service, deadline
            )
            self._service.record("enrollment_grace", username, f"until={deadline}")
            return Decision(Verdict.NOT_REQUIRED, grace_hint(deadline))
        return Decision(Verdict.NOT_REQUIRED)

    # -- the hook's modes -----------------------------------------------------------

    def check(self, username: str, pam_service: str, rhost: str = "") -> Decision:
        settings = self._service.get_config()
        if not covers(settings, pam_service):
            return Decision(Verdict.NOT_REQUIRED)
        try:
            state = self._service.enrollment(username)
        except (NotFound, InvalidArgument):
            state = None
        rule = self._rule(settings, state.account if state else None, rhost)
        access = self._conclude(
            settings,
            rule,
            known=state is not None,
            enrolled=state is not None and state.record is not None,
        )
        decision = self._without_code(access, settings, username, pam_service)
        if decision is not None:
            return decision
        if state is not None and state.locked_seconds:
            return _locked(state.locked_seconds)
        return Decision(Verdict.OTP_REQUIRED, CODE_PROMPT)

    def verify(self, username: str, pam_service: str, token: str, rhost: str = "") -> Decision:
        settings = self._service.get_config()
        if not covers(settings, pam_service):
            return Decision(Verdict.NOT_REQUIRED)
        rule = policy.Match()
        if policy.has_rules(settings):
            rule = self._rule(settings, self._service.lookup(username), rhost)
        if rule.reason in (policy.Reason.EXEMPT_GROUP, policy.Reason.EXEMPT_NETWORK):
            # No code is asked of this login: none is looked at (nor spent, nor counted).
            access = self._conclude(settings, rule, known=True, enrolled=False)
            return self._without_code(access, settings, username, pam_service) or _WRONG
        return self._code(settings, rule, username, pam_service, token)

    def _code(
        self, settings: Settings, rule: policy.Match, username: str, pam_service: str, token: str
    ) -> Decision:
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
                access = self._conclude(settings, rule, known=True, enrolled=False)
                return self._without_code(access, settings, username, pam_service) or _WRONG
            case _:
                return Decision(Verdict.DENY, "Invalid code.")

    def verify_single_prompt(
        self, username: str, pam_service: str, authtok: str, rhost: str = ""
    ) -> Decision:
        """Password immediately followed by the code, as one string.

        Whatever fails (password, code, or both), the answer is the same, so a
        guesser never learns which half was right.
        """
        settings = self._service.get_config()
        try:
            state = self._service.enrollment(username)
        except (NotFound, InvalidArgument):
            state = None
        record = state.record if state else None
        covered = covers(settings, pam_service)
        rule = self._rule(settings, state.account if state else None, rhost) if covered else None
        access = policy.conclude(
            settings,
            rule or policy.Match(),
            covered=covered,
            known=state is not None,
            enrolled=record is not None,
            now=self._service.now(),
        )
        if not access.asked or access.refused or record is None:
            # No code in the string: the password alone, then the policy's word.
            password_ok = self._passwords(username, authtok) is PasswordResult.OK
            if not password_ok:
                return _WRONG
            decision = self._without_code(access, settings, username, pam_service)
            if decision is None:  # asked, and no secret: an unknown name
                return _WRONG
            if decision.verdict is Verdict.NOT_REQUIRED:  # the hook wants ALLOW here
                return Decision(Verdict.ALLOW, decision.message)
            return decision
        digits = record.otp_digits
        password, code = authtok[:-digits], authtok[-digits:]
        password_ok = self._passwords(username, password) is PasswordResult.OK
        if not password_ok:
            # Spend no guess on the code: a wrong password must not lock the account.
            return _WRONG
        assert rule is not None  # covered: the code is asked
        decision = self._code(settings, rule, username, pam_service, code)
        if decision.verdict is Verdict.DENY:
            return _WRONG
        return decision


def _burn_time(token: str) -> None:
    # About the cost of checking a code for a real account (one window of HMACs).
    dummy = totp.new_secret()
    digits = len(token) if 6 <= len(token) <= 8 else 6
    totp.matching_step(dummy, "0" * digits, now=0.0, interval=30, digits=digits, window=1)
    hmac.compare_digest(token.encode(errors="replace"), b"0" * digits)
