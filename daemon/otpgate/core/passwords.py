"""Password checks through PAM (python-pam), against the product's own PAM service.

pam_unix must read the shadow file to check another user's password, so the
daemon that calls this runs as root (or with CAP_DAC_READ_SEARCH): see README,
"Security model". The service file should use `pam_unix.so nodelay`: PAM's
failure delay would otherwise hold a server thread for about two seconds.

Keep that service free of modules that fork (pam_exec): a fork inside a process
running gRPC threads is unreliable (grpc skips its fork handlers, and the tests
saw pam_exec's child fail at random).
"""

from __future__ import annotations

import pam

from otpgate.core.records import PasswordResult

# Linux-PAM return codes that mean "right password, but it or the account expired".
_PAM_NEW_AUTHTOK_REQD = 12
_PAM_ACCT_EXPIRED = 13
_PAM_AUTHTOK_EXPIRED = 27
_MAX_PASSWORD_BYTES = 4096


class PamPasswordChecker:
    """core.ports.PasswordChecker through PAM."""

    def __init__(self, pam_service: str) -> None:
        self.pam_service = pam_service

    def __call__(self, username: str, password: str) -> PasswordResult:
        if "\0" in username or "\0" in password or len(password.encode()) > _MAX_PASSWORD_BYTES:
            return PasswordResult.BAD
        # One authenticator per call: python-pam's handles are not thread-safe.
        handle = pam.PamAuthenticator()
        ok = handle.authenticate(username, password, service=self.pam_service, resetcreds=False)
        if ok:
            return PasswordResult.OK
        if handle.code in (_PAM_NEW_AUTHTOK_REQD, _PAM_ACCT_EXPIRED, _PAM_AUTHTOK_EXPIRED):
            return PasswordResult.EXPIRED
        return PasswordResult.BAD
