"""The files of two peer tools, read for `otpgate import` (pure: text in, values out).

- google-authenticator-libpam's ``~/.google_authenticator``: parse_google_authenticator
  gives a GoogleAuthenticatorFile, whose to_import() is what otpgate keeps.
- pam_oath's usersfile (``users.oath``): parse_users_oath gives a UsersOathFile, the
  TOTP tokens otpgate can take (each with its to_import()) and, for every other token
  line, why it was skipped.

Nothing here opens a file: the caller reads it (and checks who owns it). A malformed
file raises InvalidArgument naming the line (``line 3: ...``) and the problem, never
the secret, a code or a PIN. A file the peer tool itself would refuse, or use
differently from what it says, is malformed; so is one otpgate could not verify with
(a step outside INTERVAL_BOUNDS, digits outside DIGITS_BOUNDS, a secret under
MIN_SECRET_BYTES).

google-authenticator (as written by google-authenticator(1) and rewritten by
pam_google_authenticator.so, Debian's libpam-google-authenticator 20191231):

- ASCII, at most 64 KiB (the PAM module refuses larger files). Line 1 is the secret in
  base32, decoded as the module does: spaces, tabs and '-' ignored, either case, the
  look-alikes 0, 1, 8 read as O, L, B, no '=' padding, the bits of a partial last byte
  dropped. The tool writes 26 characters (128 bits).
- Option lines start with a double quote and a space: ``" NAME value``. The tool
  writes them below line 1 (``RATE_LIMIT``, ``WINDOW_SIZE``, ``STEP_SIZE``,
  ``DISALLOW_REUSE``, then ``TOTP_AUTH`` or ``HOTP_COUNTER 1``) and the module inserts
  new ones right after line 1 (``RESETTING_TIME_SKEW``, ``TIME_SKEW``); they may come in
  any order. HOTP_COUNTER (the next counter the module accepts, from 1) makes the file
  HOTP whatever else it says; otherwise TOTP_AUTH makes it TOTP. DISALLOW_REUSE lists
  the spent time steps (the step of each accepted code, time skew included), RATE_LIMIT
  ``N M`` then the times (epoch seconds) of the recent attempts. The module's bounds:
  WINDOW_SIZE 1..100, STEP_SIZE 1..60, RATE_LIMIT 1..100 attempts in 1..3600 seconds.
- Unknown options are ignored by the module (it only ever looks its own up), so here
  too: their names are listed in ``unknown_options`` for the caller to mention.
  RESETTING_TIME_SKEW (the module's scratch state while it learns a skew) is known and
  ignored.
- Every other line is a scratch code: 8 digits, the first not 0 (10000000..99999999).
  The module stops looking at the first line that is not one; here it is an error.
- WINDOW_SIZE is the number of codes accepted: steps -((W-1)//2) .. W//2 around now
  (3: one before and one after; 17: eight each side; 4: one before, two after).
  ga_window turns it into otpgate's symmetric window. Codes are always 6 digits.

pam_oath's usersfile (oath-toolkit's liboath usersfile.c, Debian's libpam-oath 2.6.7):

- One token a line: ``TYPE USER PIN SECRET [COUNTER [LASTOTP [TIME]]]``, fields
  separated by spaces and tabs. A line whose first field starts with '#' is a comment;
  blank lines are ignored. pam_oath rewrites a user's line after a login with tabs and
  all seven fields.
- TYPE: ``HOTP``, ``HOTP/E`` or ``HOTP/E/D`` (counter-based) and ``HOTP/T30``,
  ``HOTP/T60`` with an optional ``/D`` (time-based, 30 or 60 s steps); D is the number
  of digits, 6 by default. liboath knows no other step; ``HOTP/T<seconds>`` with any
  step in INTERVAL_BOUNDS (as in mod_authn_otp's users file) is accepted here too. A
  TYPE that is none of these is an error here (liboath silently ignores such a line,
  which is how its comments work: it would hide a typo).
- PIN: ``-`` none, ``+`` checked by another PAM module, anything else a password the
  user types before the code.
- SECRET in hex (either case, an even number of digits). liboath reads at most 32
  bytes; longer secrets are accepted here (the HMAC takes any length).
- COUNTER: for HOTP the counter; for TOTP liboath adds the window position of each
  accepted code to it, so it means nothing. LASTOTP: the last accepted code. TIME: when
  it was accepted, as ``%Y-%m-%dT%H:%M:%SL``: the *local* time of the host that wrote
  it, no zone given. So OathToken.to_import needs that time zone (None: this host's,
  which is what pam_oath's mktime read it as); it then finds the step of LASTOTP near
  TIME, which is the spent step (pam_oath refuses any code at or before it, as otpgate
  refuses codes at or below SecretRecord.last_step).
- Decisions: HOTP tokens are skipped (otpgate verifies only TOTP). So are tokens with
  a PIN, unless accept_pins (otpgate keeps no PIN: the account's password is the first
  factor), a secret under MIN_SECRET_BYTES, and a second token of the same user (pam_oath
  tries each; otpgate keeps one secret per account: the first line wins). A line with
  more than seven fields is an error (pam_oath drops the extra fields; mod_authn_otp's
  files have other columns there).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import re

from otpgate.core import totp
from otpgate.core.settings import DIGITS_BOUNDS, INTERVAL_BOUNDS
from otpgate.errors import InvalidArgument

# 80 bits: the 16-character secrets of older google-authenticator releases (it writes
# 128 now). Shorter ones (pam_oath's README example is the one byte "00") are refused.
MIN_SECRET_BYTES = 10

GA_MAX_FILE_BYTES = 64 * 1024  # pam_google_authenticator's own limit
GA_DIGITS = 6
GA_DEFAULT_WINDOW_SIZE = 3
GA_DEFAULT_STEP_SIZE = 30
GA_WINDOW_SIZE_BOUNDS = (1, 100)
GA_STEP_SIZE_BOUNDS = (1, 60)
GA_RATE_ATTEMPTS_BOUNDS = (1, 100)
GA_RATE_SECONDS_BOUNDS = (1, 3600)

# How far from TIME (in steps, each side) the step of LASTOTP is looked for: pam_oath's
# `window=` (5 by default, 20 in its README) is not in the file.
OATH_SEARCH_WINDOW = 20
OATH_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SL"
OATH_MAX_FIELDS = 7


@dataclasses.dataclass(frozen=True)
class ImportedSecret:
    """What otpgate keeps of an imported token: the fields of a SecretRecord."""

    secret: bytes = dataclasses.field(repr=False)
    otp_digits: int
    interval: int
    last_step: int = -1  # as SecretRecord.last_step: codes at or below it are spent
    # google-authenticator's unused scratch codes (8 digits each); none from pam_oath.
    recovery_codes: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    @property
    def secret_base32(self) -> str:
        """The secret as otpgate stores it (base32, upper case, no padding)."""
        return _base32(self.secret)


class OtpMode(enum.Enum):
    TOTP = "totp"  # time-based (RFC 6238)
    HOTP = "hotp"  # counter-based (RFC 4226)


@dataclasses.dataclass(frozen=True)
class RateLimit:
    attempts: int
    seconds: int
    timestamps: tuple[int, ...] = ()  # recent attempts, epoch seconds, as written


@dataclasses.dataclass(frozen=True)
class GoogleAuthenticatorFile:
    """A ``~/.google_authenticator`` file, as the PAM module reads it."""

    secret: bytes = dataclasses.field(repr=False)
    mode: OtpMode
    hotp_counter: int | None = None  # HOTP: the next counter accepted
    window_size: int = GA_DEFAULT_WINDOW_SIZE  # codes accepted, see ga_window
    step_size: int = GA_DEFAULT_STEP_SIZE
    disallow_reuse: bool = False
    spent_steps: tuple[int, ...] = ()  # as written (DISALLOW_REUSE)
    rate_limit: RateLimit | None = None
    time_skew: int = 0  # steps the module learnt the user's device is off by
    scratch_codes: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    unknown_options: tuple[str, ...] = ()  # names, in file order; ignored

    otp_digits = GA_DIGITS

    @property
    def secret_base32(self) -> str:
        return _base32(self.secret)

    @property
    def window(self) -> int:
        """otpgate's window that accepts every code WINDOW_SIZE does (TOTP)."""
        return ga_window(self.window_size)

    @property
    def last_step(self) -> int:
        """The highest spent step, -1 if none is recorded (DISALLOW_REUSE off, or no
        login since it was set)."""
        return max(self.spent_steps, default=-1)

    def to_import(self) -> ImportedSecret:
        """The secret, step, spent step and scratch codes otpgate keeps; InvalidArgument
        for an HOTP file. otpgate has no time skew, window or rate limit per account:
        the caller compares time_skew, window and rate_limit with the settings."""
        if self.mode is not OtpMode.TOTP:
            raise InvalidArgument(
                "mode",
                "the file is set up for counter-based codes (HOTP_COUNTER); otpgate "
                "verifies only time-based ones (TOTP): enroll the user anew",
            )
        return ImportedSecret(
            secret=self.secret,
            otp_digits=self.otp_digits,
            interval=self.step_size,
            last_step=self.last_step,
            recovery_codes=self.scratch_codes,
        )


def ga_window_steps(window_size: int) -> tuple[int, int]:
    """The first and last step offset pam_google_authenticator accepts (TOTP)."""
    _check_window_size(window_size)
    return -((window_size - 1) // 2), window_size // 2


def ga_window(window_size: int) -> int:
    """The smallest symmetric window (otpgate's ``window``) covering WINDOW_SIZE:
    3 -> 1, 17 -> 8; an even size reaches one step further ahead than behind, so
    4 -> 2 (which also accepts the one extra step behind)."""
    return ga_window_steps(window_size)[1]


def _check_window_size(window_size: int) -> None:
    low, high = GA_WINDOW_SIZE_BOUNDS
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise InvalidArgument("window_size", f"must be an integer from {low} to {high}")
    if not low <= window_size <= high:
        raise InvalidArgument("window_size", f"must be from {low} to {high} (got {window_size})")


_GA_KNOWN = frozenset(
    {
        "TOTP_AUTH",
        "HOTP_COUNTER",
        "WINDOW_SIZE",
        "STEP_SIZE",
        "DISALLOW_REUSE",
        "RATE_LIMIT",
        "TIME_SKEW",
        "RESETTING_TIME_SKEW",
    }
)
_UNSIGNED = re.compile(r"[0-9]+")
_SIGNED = re.compile(r"[+-]?[0-9]+")
_SCRATCH = re.compile(r"[1-9][0-9]{7}")


def parse_google_authenticator(data: str | bytes) -> GoogleAuthenticatorFile:
    """Read a ``~/.google_authenticator`` file; InvalidArgument names the line."""
    size = len(data) if isinstance(data, bytes) else len(data.encode())
    if size == 0:
        raise InvalidArgument("file", "is empty; its first line must be the base32 secret")
    if size > GA_MAX_FILE_BYTES:
        raise InvalidArgument(
            "file", f"is {size} bytes; pam_google_authenticator reads at most {GA_MAX_FILE_BYTES}"
        )
    lines = _lines(data, encoding="ascii")
    secret = _ga_secret(lines[0])
    options: dict[str, tuple[int, str]] = {}
    unknown: list[str] = []
    scratch: list[str] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue  # the module skips empty lines (not lines of spaces: see below)
        if line.startswith('"'):
            name, value = _ga_option(line)
            if name not in _GA_KNOWN:
                unknown.append(name)
            elif name in options:
                raise InvalidArgument(
                    f"line {number}", f"{name} again (first on line {options[name][0]})"
                )
            else:
                options[name] = (number, value)
            continue
        if not _SCRATCH.fullmatch(line):
            raise InvalidArgument(
                f"line {number}",
                'neither an option (" NAME ...) nor a scratch code: scratch codes are '
                f"8 digits, the first not 0 (the line has {len(line)} characters)",
            )
        scratch.append(line)
    return _ga_file(secret, options, tuple(unknown), tuple(scratch))


def _ga_secret(line: str) -> bytes:
    if line.startswith('"'):
        raise InvalidArgument("line 1", "is an option; the first line must be the base32 secret")
    buffer = bits = 0
    out = bytearray()
    for column, char in enumerate(line, start=1):
        if char in " \t-":
            continue
        char = {"0": "O", "1": "L", "8": "B"}.get(char, char).upper()
        if "A" <= char <= "Z":
            value = ord(char) - ord("A")
        elif "2" <= char <= "7":
            value = ord(char) - ord("2") + 26
        else:
            raise InvalidArgument(
                "line 1", f"the secret is not base32: column {column} is not A-Z or 2-7"
            )
        buffer = (buffer << 5 | value) & 0xFFFF
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append(buffer >> bits & 0xFF)
    if not out:
        raise InvalidArgument("line 1", "no secret: the first line must be the base32 secret")
    _check_secret_length("line 1", len(out))
    return bytes(out)


def _ga_option(line: str) -> tuple[str, str]:
    # As the module's lookup: '" ', the name up to a space or tab, then the value.
    if not line.startswith('" '):
        words = line[1:].split()
        return (words[0] if words else ""), ""
    rest = line[2:]
    name = re.split(r"[ \t]", rest, maxsplit=1)[0]
    return name, rest[len(name) :].strip(" \t")


def _ga_file(
    secret: bytes,
    options: dict[str, tuple[int, str]],
    unknown: tuple[str, ...],
    scratch: tuple[str, ...],
) -> GoogleAuthenticatorFile:
    def value(name: str) -> tuple[str, str] | None:
        if name not in options:
            return None
        number, text = options[name]
        return f"line {number}", text

    if (found := value("TOTP_AUTH")) and found[1]:
        raise InvalidArgument(found[0], "TOTP_AUTH takes no value")
    counter: int | None = None
    if found := value("HOTP_COUNTER"):
        counter = _ga_int(
            *found,
            (1, None),
            "HOTP_COUNTER must be a whole number of at least 1 (the next counter to accept)",
        )
    if counter is not None:
        mode = OtpMode.HOTP
    elif "TOTP_AUTH" in options:
        mode = OtpMode.TOTP
    else:
        raise InvalidArgument(
            "file",
            "has neither TOTP_AUTH nor HOTP_COUNTER: pam_google_authenticator would take "
            "only its scratch codes",
        )
    window_size = GA_DEFAULT_WINDOW_SIZE
    if found := value("WINDOW_SIZE"):
        low, high = GA_WINDOW_SIZE_BOUNDS
        window_size = _ga_int(
            *found,
            GA_WINDOW_SIZE_BOUNDS,
            f"WINDOW_SIZE must be a whole number of codes from {low} to {high}",
        )
    step_size = GA_DEFAULT_STEP_SIZE
    if found := value("STEP_SIZE"):
        low, high = GA_STEP_SIZE_BOUNDS
        step_size = _ga_int(
            *found,
            GA_STEP_SIZE_BOUNDS,
            f"STEP_SIZE must be a whole number of seconds from {low} to {high}",
        )
        low, high = INTERVAL_BOUNDS
        if not low <= step_size <= high:
            raise InvalidArgument(
                found[0],
                f"STEP_SIZE {step_size}: otpgate's interval must be from {low} to {high} seconds",
            )
    spent: tuple[int, ...] = ()
    if found := value("DISALLOW_REUSE"):
        where, text = found
        spent = tuple(
            _ga_int(where, word, (0, None), "DISALLOW_REUSE must list time steps (whole numbers)")
            for word in text.split()
        )
    rate: RateLimit | None = None
    if found := value("RATE_LIMIT"):
        rate = _ga_rate_limit(*found)
    skew = 0
    if found := value("TIME_SKEW"):
        where, text = found
        if not _SIGNED.fullmatch(text):
            raise InvalidArgument(where, "TIME_SKEW must be a whole number of steps")
        skew = int(text)
    return GoogleAuthenticatorFile(
        secret=secret,
        mode=mode,
        hotp_counter=counter,
        window_size=window_size,
        step_size=step_size,
        disallow_reuse="DISALLOW_REUSE" in options,
        spent_steps=spent,
        rate_limit=rate,
        time_skew=skew,
        scratch_codes=scratch,
        unknown_options=unknown,
    )


def _ga_int(where: str, text: str, bounds: tuple[int, int | None], message: str) -> int:
    low, high = bounds
    if not _UNSIGNED.fullmatch(text) or int(text) < low or (high is not None and int(text) > high):
        raise InvalidArgument(where, message)
    return int(text)


def _ga_rate_limit(where: str, text: str) -> RateLimit:
    words = text.split()
    if len(words) < 2:
        raise InvalidArgument(where, "RATE_LIMIT needs attempts and seconds (RATE_LIMIT 3 30)")
    low, high = GA_RATE_ATTEMPTS_BOUNDS
    attempts = _ga_int(
        where,
        words[0],
        GA_RATE_ATTEMPTS_BOUNDS,
        f"RATE_LIMIT's attempts must be a whole number from {low} to {high}",
    )
    low, high = GA_RATE_SECONDS_BOUNDS
    seconds = _ga_int(
        where,
        words[1],
        GA_RATE_SECONDS_BOUNDS,
        f"RATE_LIMIT's seconds must be a whole number from {low} to {high}",
    )
    stamps = tuple(
        _ga_int(where, word, (0, None), "RATE_LIMIT's attempt times must be whole numbers")
        for word in words[2:]
    )
    return RateLimit(attempts, seconds, stamps)


class Pin(enum.Enum):
    NONE = "-"
    EXTERNAL = "+"  # checked by another PAM module
    SET = "set"  # a password typed before the code (its value is not kept)


@dataclasses.dataclass(frozen=True)
class OathToken:
    """A TOTP token line of a pam_oath usersfile that otpgate can import."""

    line: int
    user: str
    token_type: str  # as written, e.g. HOTP/T30/6
    interval: int
    otp_digits: int
    secret: bytes = dataclasses.field(repr=False)
    pin: Pin = Pin.NONE
    counter: int = 0  # as written; meaningless for TOTP (see the module docstring)
    last_otp: str | None = dataclasses.field(default=None, repr=False)
    # When LASTOTP was accepted: the writer's local wall-clock time, no zone (naive).
    last_login: dt.datetime | None = None

    @property
    def secret_base32(self) -> str:
        return _base32(self.secret)

    def last_login_at(self, tz: dt.tzinfo | None) -> int | None:
        """TIME in epoch seconds, read in `tz` (None: this host's local time zone)."""
        if self.last_login is None:
            return None
        moment = self.last_login if tz is None else self.last_login.replace(tzinfo=tz)
        return int(moment.timestamp())

    def last_step(self, *, tz: dt.tzinfo | None, window: int = OATH_SEARCH_WINDOW) -> int:
        """The spent step: the highest step within `window` of TIME whose code is
        LASTOTP; TIME's own step if none is (a hand-edited line); -1 without both."""
        if window < 0:
            raise InvalidArgument("window", f"must be at least 0 (got {window})")
        at = self.last_login_at(tz)
        if at is None or self.last_otp is None:
            return -1
        around = totp.time_step(at, self.interval)
        matches = [
            step
            for step in range(max(around - window, 0), around + window + 1)
            if totp.hotp(self.secret, step, self.otp_digits) == self.last_otp
        ]
        return max(matches, default=around)

    def to_import(
        self, *, tz: dt.tzinfo | None, window: int = OATH_SEARCH_WINDOW
    ) -> ImportedSecret:
        return ImportedSecret(
            secret=self.secret,
            otp_digits=self.otp_digits,
            interval=self.interval,
            last_step=self.last_step(tz=tz, window=window),
        )


@dataclasses.dataclass(frozen=True)
class SkippedLine:
    """A well-formed token line otpgate does not import, and why."""

    line: int
    user: str
    token_type: str
    reason: str


@dataclasses.dataclass(frozen=True)
class UsersOathFile:
    tokens: tuple[OathToken, ...]  # in file order, at most one per user
    skipped: tuple[SkippedLine, ...]


_OATH_TYPE = re.compile(
    r"HOTP(?:/E(?:/(?P<e_digits>[0-9]+))?|/T(?P<period>[0-9]+)(?:/(?P<t_digits>[0-9]+))?)?"
)
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")


def parse_users_oath(data: str | bytes, *, accept_pins: bool = False) -> UsersOathFile:
    """Read a pam_oath usersfile; InvalidArgument names the first malformed line.

    With `accept_pins`, tokens with a PIN are imported (without it) rather than skipped.
    """
    tokens: list[OathToken] = []
    skipped: list[SkippedLine] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(_lines(data, encoding="utf-8"), start=1):
        fields = [f for f in re.split(r"[ \t\r]+", line) if f]
        if not fields or fields[0].startswith("#"):
            continue
        token = _oath_line(number, fields, accept_pins)
        if isinstance(token, SkippedLine):
            skipped.append(token)
        elif token.user in first_line:
            why = (
                f"{token.user} already has a token on line {first_line[token.user]}; "
                "otpgate keeps one secret per account"
            )
            skipped.append(SkippedLine(number, token.user, token.token_type, why))
        else:
            first_line[token.user] = number
            tokens.append(token)
    return UsersOathFile(tuple(tokens), tuple(skipped))


def _oath_line(number: int, fields: list[str], accept_pins: bool) -> OathToken | SkippedLine:
    where = f"line {number}"
    token_type = fields[0]
    period, digits = _oath_type(where, token_type)
    if len(fields) < 4:
        raise InvalidArgument(
            where,
            f"{len(fields)} field{'s' if len(fields) > 1 else ''}; a token line is "
            "TYPE USER PIN SECRET [COUNTER [LASTOTP [TIME]]]",
        )
    if len(fields) > OATH_MAX_FIELDS:
        raise InvalidArgument(
            where,
            f"{len(fields)} fields; pam_oath's usersfile has at most {OATH_MAX_FIELDS} "
            "(TYPE USER PIN SECRET COUNTER LASTOTP TIME)",
        )
    user, pin_text, secret_text = fields[1:4]
    if secret_text == "-":
        raise InvalidArgument(where, "no SECRET ('-')")
    if not _HEX.fullmatch(secret_text):
        raise InvalidArgument(
            where, "SECRET must be hex: an even number of digits 0-9 and letters a-f"
        )
    secret = bytes.fromhex(secret_text)
    counter = 0
    if len(fields) > 4:
        if not _UNSIGNED.fullmatch(fields[4]):
            raise InvalidArgument(where, "COUNTER must be a whole number")
        counter = int(fields[4])
    last_login: dt.datetime | None = None
    if len(fields) > 6:
        try:
            last_login = dt.datetime.strptime(fields[6], OATH_TIME_FORMAT)
        except ValueError:
            raise InvalidArgument(
                where, "TIME must be local time as YYYY-MM-DDTHH:MM:SSL (pam_oath's format)"
            ) from None
    pin = {"-": Pin.NONE, "+": Pin.EXTERNAL}.get(pin_text, Pin.SET)
    why: str | None = None
    if period is None:
        why = "HOTP (counter-based) token; otpgate verifies only time-based codes (TOTP)"
    elif pin is Pin.SET and not accept_pins:
        why = "has a PIN, which otpgate does not keep (the account's password is the first factor)"
    elif len(secret) < MIN_SECRET_BYTES:
        why = (
            f"its secret is {len(secret)} bytes; otpgate imports secrets of at least "
            f"{MIN_SECRET_BYTES} bytes (80 bits)"
        )
    if why is not None or period is None:
        return SkippedLine(number, user, token_type, why or "")
    return OathToken(
        line=number,
        user=user,
        token_type=token_type,
        interval=period,
        otp_digits=digits,
        secret=secret,
        pin=pin,
        counter=counter,
        last_otp=fields[5] if len(fields) > 5 else None,
        last_login=last_login,
    )


def _oath_type(where: str, text: str) -> tuple[int | None, int]:
    """(step in seconds or None for HOTP, digits) of a TYPE field."""
    match = _OATH_TYPE.fullmatch(text)
    if match is None:
        raise InvalidArgument(
            where,
            f"unknown token type {text[:20]!r}; pam_oath knows HOTP, HOTP/E, HOTP/E/D, "
            "HOTP/T30, HOTP/T60, HOTP/T30/D and HOTP/T60/D (D: digits)",
        )
    digits_text = match["e_digits"] or match["t_digits"]
    digits = int(digits_text) if digits_text else 6
    low, high = DIGITS_BOUNDS
    if not low <= digits <= high:
        raise InvalidArgument(where, f"{text}: digits must be from {low} to {high} (got {digits})")
    if match["period"] is None:
        return None, digits
    period = int(match["period"])
    low, high = INTERVAL_BOUNDS
    if not low <= period <= high:
        raise InvalidArgument(
            where, f"{text}: the time step must be from {low} to {high} seconds (got {period})"
        )
    return period, digits


def _lines(data: str | bytes, *, encoding: str) -> list[str]:
    """The lines of `data` without their "\\n" or "\\r\\n"; an undecodable line (or
    one with a NUL) raises InvalidArgument naming it."""
    if isinstance(data, bytes):
        raw = data.split(b"\n")
        texts: list[str | None] = []
        for item in raw:
            try:
                texts.append(item.decode(encoding))
            except UnicodeDecodeError:
                texts.append(None)
    else:
        texts = list(data.split("\n"))
    if len(texts) > 1 and texts[-1] == "":
        texts.pop()  # the newline that ends the last line
    lines: list[str] = []
    for number, text in enumerate(texts, start=1):
        if text is None or (encoding == "ascii" and not text.isascii()):
            raise InvalidArgument(f"line {number}", f"is not {encoding.upper()} text")
        if "\0" in text:
            raise InvalidArgument(f"line {number}", "contains a NUL byte")
        lines.append(text.removesuffix("\r"))
    return lines


def _check_secret_length(where: str, length: int) -> None:
    if length < MIN_SECRET_BYTES:
        raise InvalidArgument(
            where,
            f"the secret is {length} bytes; otpgate imports secrets of at least "
            f"{MIN_SECRET_BYTES} bytes (80 bits)",
        )


def _base32(secret: bytes) -> str:
    return base64.b32encode(secret).decode().rstrip("=")
