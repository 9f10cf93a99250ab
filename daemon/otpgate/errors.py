"""Every error otpgate raises on purpose.

    OtpgateError                 base: the CLI prints ``Type: message`` for it
    ├── InvalidArgument          bad input; names the field and its bounds
    ├── NotFound                 no such account (or no secret where one is needed)
    ├── FailedPrecondition       the request is valid but the state forbids it
    │   └── SecretChanged        the account's secret is no longer the one checked
    ├── Unauthenticated          user.sock call without a valid session
    ├── PermissionDenied         a session acting on another account, or a caller
    │                            logging in as someone else
    ├── TooManyAttempts          a password check refused until its delay has passed
    ├── ConfigError              daemon configuration or key material is unusable
    │   └── KeyMismatch          the key does not open this database
    ├── StoreError               the database is damaged, from a newer version, or
    │   │                        refused a change (a failure of otpgated: deny)
    │   └── StoreUnavailable     the shared database did not answer within its
    │                            bound (gone, slow, restarting), or on an edge no
    │                            upstream did: nothing decided
    ├── UpstreamRefused          on an edge: the central daemon answered an error
    └── ClientError              the CLI could not talk to the daemon

Messages never contain a secret, a code or a password.
"""

from __future__ import annotations


class OtpgateError(Exception):
    """Base of every otpgate error."""


class InvalidArgument(OtpgateError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(OtpgateError):
    pass


class FailedPrecondition(OtpgateError):
    pass


class SecretChanged(FailedPrecondition):
    pass


class Unauthenticated(OtpgateError):
    pass


class PermissionDenied(OtpgateError):
    pass


class TooManyAttempts(OtpgateError):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(OtpgateError):
    pass


class KeyMismatch(ConfigError):
    pass


class StoreError(OtpgateError):
    pass


class StoreUnavailable(StoreError):
    """Only for a database that could not be reached or did not answer in time;
    every other database failure stays a plain StoreError, so that a bug or a
    refused write is never taken for an outage (which the hook's fail mode may
    let through)."""


class UpstreamRefused(OtpgateError):
    """An edge's upstream answered with an error status (its gRPC name in `code`)."""

    def __init__(self, code: str, message: str, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details or message


class ClientError(OtpgateError):
    pass
