"""TOTP verification policy (RFC 6238), pure: the caller supplies the time.

A code is matched against every step of the window without stopping at the first
hit, and compared in constant time, so the time taken says nothing about which step
(if any) matched.
"""

from __future__ import annotations

import base64
import hmac

import pyotp

from otpgate.core.settings import DIGITS_BOUNDS
from otpgate.errors import InvalidArgument


def check_token_format(token: str) -> str:
    """Raise InvalidArgument unless `token` is 6..8 ASCII digits."""
    low, high = DIGITS_BOUNDS
    if not (low <= len(token) <= high and token.isascii() and token.isdigit()):
        raise InvalidArgument("token", f"must be {low} to {high} ASCII digits")
    return token


def time_step(now: float, interval: int) -> int:
    return int(now) // interval


def matching_step(
    secret: str, token: str, *, now: float, interval: int, digits: int, window: int
) -> int | None:
    """The time step whose code equals `token`, within `window` steps of now, else None."""
    key = _decode_secret(secret)
    current = time_step(now, interval)
    candidate = token.encode() if len(token) == digits else b"\0" * digits
    matched: int | None = None
    for step in range(current - window, current + window + 1):
        if step < 0:
            continue
        expected = hotp(key, step, digits).encode()
        if hmac.compare_digest(expected, candidate) and matched is None:
            matched = step
    return matched if len(token) == digits else None


def hotp(key: bytes, counter: int, digits: int) -> str:
    """RFC 4226 HOTP with HMAC-SHA-1.

    pyotp computes the same, but builds an OTP and an hmac object for every code
    and decodes the secret twice: about 15% of a whole verification. The RFC
    vectors, the pyotp and oathtool cross-checks in the tests hold this to pyotp's.
    """
    mac = hmac.digest(key, counter.to_bytes(8, "big"), "sha1")
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def _decode_secret(secret: str) -> bytes:
    # Missing padding and lower case accepted, as pyotp does; anything else raises
    # binascii.Error (a ValueError): stored secrets all come from new_secret.
    return base64.b32decode(secret + "=" * (-len(secret) % 8), casefold=True)


def new_secret() -> str:
    """A random 160-bit base32 secret (the length RFC 4226 recommends)."""
    return pyotp.random_base32(32)


def provisioning_uri(secret: str, *, account: str, issuer: str, digits: int, interval: int) -> str:
    """An otpauth:// URI in the Key Uri Format (digits/period only when not 6/30)."""
    return pyotp.TOTP(secret, digits=digits, interval=interval).provisioning_uri(
        name=account, issuer_name=issuer
    )
