"""TOTP policy: RFC 6238 vectors, windows, token format."""

from __future__ import annotations

import base64
import subprocess

import pyotp
import pytest

from otpgate.core import totp
from otpgate.errors import InvalidArgument

RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()

# RFC 6238 Appendix B, SHA-1 column (8 digits, 30-second steps).
RFC_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("now", "code"), RFC_VECTORS)
def test_rfc6238_vectors_match_their_own_step(now: int, code: str) -> None:
    step = totp.matching_step(RFC_SECRET, code, now=now, interval=30, digits=8, window=0)
    assert step == now // 30


@pytest.mark.parametrize(("now", "code"), RFC_VECTORS)
def test_rfc6238_vectors_refused_one_step_off_without_window(now: int, code: str) -> None:
    assert (
        totp.matching_step(RFC_SECRET, code, now=now + 30, interval=30, digits=8, window=0) is None
    )
    assert totp.matching_step(RFC_SECRET, code, now=now + 30, interval=30, digits=8, window=1) == (
        now // 30
    )


def test_six_digit_codes_are_the_last_six_rfc_digits() -> None:
    assert totp.matching_step(RFC_SECRET, "287082", now=59, interval=30, digits=6, window=0) == 1


def test_window_bounds_are_exact() -> None:
    secret = totp.new_secret()
    now = 1_700_000_000
    for offset, window, expected in [(2, 1, False), (2, 2, True), (-2, 2, True), (-3, 2, False)]:
        at = now + offset * 30
        code = subprocess.run(
            ["oathtool", "--totp", "-b", secret, "-N", f"@{at}"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        step = totp.matching_step(secret, code, now=now, interval=30, digits=6, window=window)
        assert (step == at // 30) is expected, (offset, window)


@pytest.mark.parametrize("interval", [5, 60, 120])
@pytest.mark.parametrize("digits", [6, 7, 8])
def test_interoperates_with_oathtool(interval: int, digits: int) -> None:
    secret = totp.new_secret()
    now = 1_800_000_123
    code = subprocess.run(
        ["oathtool", "--totp", "-b", secret, "-d", str(digits), "-s", f"{interval}s",
         "-N", f"@{now}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert len(code) == digits
    step = totp.matching_step(secret, code, now=now, interval=interval, digits=digits, window=0)
    assert step == now // interval


def test_code_of_other_length_never_matches() -> None:
    # The 8-digit RFC code's last 6 digits are the 6-digit code, but not for an 8-digit secret.
    assert totp.matching_step(RFC_SECRET, "287082", now=59, interval=30, digits=8, window=0) is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        "12345",
        "123456789",
        "12345a",
        "\uff11\uff12\uff13\uff14\uff15\uff16",
        " 123456",
        "12 345",
    ],
)
def test_token_format_refused(token: str) -> None:
    with pytest.raises(InvalidArgument, match="token"):
        totp.check_token_format(token)


def test_new_secret_is_160_bits_of_base32() -> None:
    secret = totp.new_secret()
    assert len(base64.b32decode(secret)) == 20
    assert secret != totp.new_secret()


def test_provisioning_uri_key_uri_format() -> None:
    uri = totp.provisioning_uri(
        RFC_SECRET, account="alice@host", issuer="Acme", digits=6, interval=30
    )
    assert uri == f"otpauth://totp/Acme:alice%40host?secret={RFC_SECRET}&issuer=Acme"
    uri = totp.provisioning_uri(RFC_SECRET, account="a@h", issuer="My Co", digits=8, interval=60)
    assert uri.startswith("otpauth://totp/My%20Co:a%40h?")
    assert "issuer=My%20Co" in uri and "digits=8" in uri and "period=60" in uri


def test_hotp_rfc4226_vectors() -> None:
    # RFC 4226 Appendix D: secret "12345678901234567890", counters 0..9, 6 digits.
    expected = ["755224", "287082", "359152", "969429", "338314",
                "254676", "287922", "162583", "399871", "520489"]  # fmt: skip
    assert [totp.hotp(b"12345678901234567890", c, 6) for c in range(10)] == expected


def test_hotp_agrees_with_pyotp() -> None:
    for digits in (6, 7, 8):
        secret = totp.new_secret()
        reference = pyotp.HOTP(secret, digits=digits)
        key = base64.b32decode(secret)
        for counter in (0, 1, 59, 2**31, 2**40 + 7):
            assert totp.hotp(key, counter, digits) == reference.at(counter)


def test_secret_without_padding_or_in_lower_case_decodes() -> None:
    secret = base64.b32encode(b"0123456789abcdef").decode().rstrip("=")  # 26 chars, no padding
    code = pyotp.TOTP(secret).at(1_700_000_000)
    for form in (secret, secret.lower()):
        step = totp.matching_step(form, code, now=1_700_000_000, interval=30, digits=6, window=0)
        assert step == 1_700_000_000 // 30
