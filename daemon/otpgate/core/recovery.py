"""Recovery codes: one-time codes for when the phone is gone (pure).

A code is 12 characters of the lowercase base32 alphabet, shown in groups of
four (`k7qm-2xhw-ra4d`): 60 random bits. Typed back, case, spaces and dashes do
not matter. Online, a guesser meets the lockout (at most `lockout_threshold`
codes per run, each lock twice as long as the last): against ten valid codes of
60 bits that is hopeless. Offline, from a stolen database, a plain hash of 60
bits can be searched by brute force (a GPU does ~1e10 SHA-256 a second: a year
or two for one code, less for ten), and a slow hash (scrypt, argon2) would tax
every login while only adding a constant. So the stored value is
HMAC-SHA-256 under a key kept sealed by the master key (the database holds it
only sealed, like a TOTP secret): without the master key no guess can be
checked at all, and whoever holds the master key reads the TOTP secrets anyway.
The account's name and uid are in the MAC, so a hash copied to another row
is worth nothing there.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

COUNT = 10
LENGTH = 12
GROUP = 4
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
KEY_BINDING = b"otpgate/v1 recovery key"
_ALLOWED = frozenset(ALPHABET)


def generate(count: int = COUNT) -> list[str]:
    """`count` new codes, grouped for reading."""
    return [
        _grouped("".join(secrets.choice(ALPHABET) for _ in range(LENGTH))) for _ in range(count)
    ]


def _grouped(code: str) -> str:
    return "-".join(code[i : i + GROUP] for i in range(0, len(code), GROUP))


def normalise(token: str) -> str | None:
    """The code `token` spells (case, spaces and dashes dropped), or None when it
    is not shaped like one. TOTP codes (digits, 6 to 8) never are."""
    plain = token.replace("-", "").replace(" ", "").lower()
    if len(plain) != LENGTH or not set(plain) <= _ALLOWED:
        return None
    return plain


def mac(key: bytes, username: str, uid: int, code: str) -> bytes:
    """What is stored for `code` (already normalised) of this account."""
    message = f"otpgate/v1 recovery code\0{username}\0{uid}\0{code}".encode()
    return hmac.new(key, message, hashlib.sha256).digest()
