"""Importing google-authenticator and pam_oath files (core.imports).

The files come from the real tools: google-authenticator(1) writes them, and the real
PAM modules (driven by pamtester under a PAM service file with a unique name) rewrite
them after logins; every secret read is checked by comparing oathtool's code for what
the file says with pyotp's and otpgate's for what was parsed. Hand-written files cover
what the tools never write, and each malformed one must name its line and problem.
"""

from __future__ import annotations

import base64
import datetime as dt
import glob
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pyotp
import pytest

from otpgate.core import imports, totp
from otpgate.core.imports import OtpMode, Pin, RateLimit
from otpgate.errors import InvalidArgument

GA = shutil.which("google-authenticator")
OATHTOOL = shutil.which("oathtool")
PAMTESTER = shutil.which("pamtester")


def _pam_module(name: str) -> bool:
    return any(glob.glob(f"{d}/security/{name}") for d in ("/lib/*", "/usr/lib/*", "/lib"))


needs_ga = pytest.mark.skipif(
    GA is None,
    reason="google-authenticator is not installed (Debian package libpam-google-authenticator)",
)
needs_oathtool = pytest.mark.skipif(
    OATHTOOL is None, reason="oathtool is not installed (Debian package oathtool)"
)


def _needs_pam(module: str, package: str) -> pytest.MarkDecorator:
    missing = [
        what
        for what, ok in [
            ("root (to write a PAM service file)", os.geteuid() == 0),
            ("pamtester (Debian package pamtester)", PAMTESTER is not None),
            (f"{module} (Debian package {package})", _pam_module(module)),
        ]
        if not ok
    ]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


needs_ga_pam = _needs_pam("pam_google_authenticator.so", "libpam-google-authenticator")
needs_oath_pam = _needs_pam("pam_oath.so", "libpam-oath")


def oathtool(*args: str) -> str:
    assert OATHTOOL is not None
    result = subprocess.run([OATHTOOL, *args], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def google_authenticator(path: Path, *flags: str) -> str:
    """Run the real google-authenticator, non-interactively; the file it wrote."""
    assert GA is not None
    subprocess.run(
        [GA, "-f", "-q", "-Q", "NONE", "-s", str(path), *flags],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return path.read_text()


@pytest.fixture
def pam_service() -> Iterator[Callable[[str], str]]:
    """Writes /etc/pam.d/otpgate-test-import-<random> (removed afterwards)."""
    made: list[Path] = []

    def write(auth_line: str) -> str:
        name = f"otpgate-test-import-{secrets.token_hex(4)}"
        path = Path("/etc/pam.d") / name
        path.write_text(f"auth required {auth_line}\naccount required pam_permit.so\n")
        made.append(path)
        return name

    yield write
    for path in made:
        path.unlink(missing_ok=True)


def login(service: str, user: str, typed: str, env: dict[str, str] | None = None) -> bool:
    result = subprocess.run(
        ["pamtester", service, user, "authenticate"],
        input=typed + "\n", capture_output=True, text=True, timeout=30,
        env=None if env is None else {**os.environ, **env},
    )  # fmt: skip
    return result.returncode == 0


def clear_of_step_edge(step: int, margin: float = 2.5) -> int:
    """Wait, if need be, until the current step has `margin` seconds left; its number."""
    left = step - time.time() % step
    if left < margin:
        time.sleep(left + 0.05)
    return int(time.time()) // step


def ga_code(secret_b32: str, step: int, interval: int = 30) -> str:
    """oathtool's 6-digit TOTP code for time step `step`."""
    return oathtool("--totp", "-b", secret_b32, "-s", f"{interval}s", "-N", f"@{step * interval}")


def assert_same_codes(secret_written: str, parsed: bytes, *, hex_key: bool, digits: int,
                      interval: int) -> None:  # fmt: skip
    """oathtool's code for the secret as written equals pyotp's and otpgate's for the
    secret as parsed, at a few times."""
    b32 = base64.b32encode(parsed).decode()
    for at in (59, 1_111_111_109, 1_800_000_123, int(time.time())):
        args = ["--totp", "-d", str(digits), "-s", f"{interval}s", "-N", f"@{at}"]
        expected = oathtool(*args, *([] if hex_key else ["-b"]), secret_written)
        assert pyotp.TOTP(b32, digits=digits, interval=interval).at(at) == expected
        assert totp.hotp(parsed, at // interval, digits) == expected


def scratch_lines(text: str) -> tuple[str, ...]:
    return tuple(line for line in text.splitlines() if re.fullmatch(r"[0-9]{8}", line))


# -- google-authenticator: files written by google-authenticator(1) ------------------


@needs_ga
@needs_oathtool
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["-t", "-d", "-r", "3", "-R", "30", "-w", "3", "-e", "5"],
            dict(mode=OtpMode.TOTP, hotp_counter=None, window_size=3, step_size=30,
                 disallow_reuse=True, rate_limit=RateLimit(3, 30), scratch=5),
        ),
        (
            ["-t", "-D", "-u", "-S", "60", "-w", "17", "-e", "0"],
            dict(mode=OtpMode.TOTP, hotp_counter=None, window_size=17, step_size=60,
                 disallow_reuse=False, rate_limit=None, scratch=0),
        ),
        (  # -W, "minimal window", writes WINDOW_SIZE 3 for TOTP; -e defaults to 5
            ["-t", "-d", "-u", "-W", "-S", "5"],
            dict(mode=OtpMode.TOTP, hotp_counter=None, window_size=3, step_size=5,
                 disallow_reuse=True, rate_limit=None, scratch=5),
        ),
        (
            ["-c", "-r", "10", "-R", "600", "-w", "5", "-e", "10"],
            dict(mode=OtpMode.HOTP, hotp_counter=1, window_size=5, step_size=30,
                 disallow_reuse=False, rate_limit=RateLimit(10, 600), scratch=10),
        ),
    ],
    ids=["totp-disallow-ratelimit", "totp-60s-window17", "totp-minimal-window", "hotp"],
)  # fmt: skip
def test_ga_file_written_by_the_tool(
    tmp_path: Path, flags: list[str], expected: dict[str, object]
) -> None:
    text = google_authenticator(tmp_path / "ga", *flags)
    parsed = imports.parse_google_authenticator(text.encode())
    written_secret = text.splitlines()[0]
    assert parsed.secret_base32 == written_secret  # the tool writes canonical base32
    assert len(parsed.secret) == 16  # SECRET_BITS 128
    assert parsed.mode is expected["mode"]
    assert parsed.hotp_counter == expected["hotp_counter"]
    assert parsed.window_size == expected["window_size"]
    assert parsed.step_size == expected["step_size"]
    assert parsed.disallow_reuse is expected["disallow_reuse"]
    assert parsed.rate_limit == expected["rate_limit"]
    assert parsed.spent_steps == () and parsed.last_step == -1
    assert parsed.time_skew == 0 and parsed.unknown_options == ()
    assert len(parsed.scratch_codes) == expected["scratch"]
    assert parsed.scratch_codes == scratch_lines(text)
    assert all(10_000_000 <= int(code) <= 99_999_999 for code in parsed.scratch_codes)
    if parsed.mode is OtpMode.HOTP:
        expected_code = oathtool("-b", written_secret, "-c", "7")
        assert pyotp.HOTP(parsed.secret_base32).at(7) == expected_code
        assert totp.hotp(parsed.secret, 7, 6) == expected_code
        with pytest.raises(InvalidArgument, match="HOTP"):
            parsed.to_import()
        return
    assert_same_codes(written_secret, parsed.secret, hex_key=False, digits=6,
                      interval=parsed.step_size)  # fmt: skip
    imported = parsed.to_import()
    assert (imported.secret, imported.otp_digits, imported.interval) == (
        parsed.secret, 6, parsed.step_size,
    )  # fmt: skip
    assert imported.secret_base32 == written_secret
    assert imported.last_step == -1
    assert imported.recovery_codes == parsed.scratch_codes


@needs_ga
def test_ga_step_size_the_tool_writes_but_otpgate_cannot_verify(tmp_path: Path) -> None:
    # google-authenticator takes -S 1..60; otpgate's interval is 5..120.
    text = google_authenticator(tmp_path / "ga", "-t", "-d", "-u", "-w", "3", "-S", "4")
    number = text.splitlines().index('" STEP_SIZE 4') + 1
    with pytest.raises(InvalidArgument, match=rf"^line {number}: STEP_SIZE 4: .*5 to 120"):
        imports.parse_google_authenticator(text)


# -- google-authenticator: state written by pam_google_authenticator.so ---------------


@needs_ga
@needs_oathtool
@needs_ga_pam
def test_ga_state_written_by_the_pam_module(
    tmp_path: Path, pam_service: Callable[[str], str]
) -> None:
    path = tmp_path / "ga"
    text = google_authenticator(path, "-t", "-d", "-r", "10", "-R", "30", "-w", "3", "-e", "3")
    secret = text.splitlines()[0]
    scratch = scratch_lines(text)
    service = pam_service(f"pam_google_authenticator.so secret={path}")
    step = clear_of_step_edge(30)
    t0 = int(time.time())
    assert login(service, "root", ga_code(secret, step))
    assert login(service, "root", ga_code(secret, step - 1))
    assert not login(service, "root", ga_code(secret, step))  # DISALLOW_REUSE
    assert login(service, "root", scratch[1])
    # A code 5 steps ahead is refused, but the module starts learning a time skew.
    assert not login(service, "root", ga_code(secret, step + 5))
    t1 = int(time.time())
    rewritten = path.read_text()
    assert re.search(r'^" RESETTING_TIME_SKEW \d+\+5$', rewritten, re.M), rewritten

    parsed = imports.parse_google_authenticator(rewritten)
    assert sorted(parsed.spent_steps) == [step - 1, step]
    assert parsed.last_step == step
    assert parsed.scratch_codes == (scratch[0], scratch[2])
    assert parsed.unknown_options == ()  # RESETTING_TIME_SKEW is one of the module's own
    assert parsed.rate_limit is not None
    assert (parsed.rate_limit.attempts, parsed.rate_limit.seconds) == (10, 30)
    assert len(parsed.rate_limit.timestamps) == 5  # every attempt counts
    assert all(t0 <= stamp <= t1 for stamp in parsed.rate_limit.timestamps)
    imported = parsed.to_import()
    assert imported.last_step == step
    assert imported.recovery_codes == (scratch[0], scratch[2])


@needs_ga
@needs_oathtool
@needs_ga_pam
def test_ga_hotp_counter_written_by_the_pam_module(
    tmp_path: Path, pam_service: Callable[[str], str]
) -> None:
    path = tmp_path / "ga"
    secret = google_authenticator(path, "-c", "-u", "-w", "5", "-e", "0").splitlines()[0]
    service = pam_service(f"pam_google_authenticator.so secret={path}")
    assert login(service, "root", oathtool("-b", secret, "-c", "3"))
    parsed = imports.parse_google_authenticator(path.read_bytes())
    assert parsed.mode is OtpMode.HOTP
    assert parsed.hotp_counter == 4  # the next counter it accepts


@needs_ga
@needs_oathtool
@needs_ga_pam
@pytest.mark.parametrize("window_size", [1, 3, 4, 17])
def test_ga_window_size_as_the_pam_module_counts_it(
    tmp_path: Path, pam_service: Callable[[str], str], window_size: int
) -> None:
    path = tmp_path / "ga"
    text = google_authenticator(path, "-t", "-D", "-u", "-w", str(window_size), "-e", "0")
    parsed = imports.parse_google_authenticator(text)
    assert parsed.window_size == window_size
    first, last = imports.ga_window_steps(window_size)
    service = pam_service(f"pam_google_authenticator.so secret={path} noskewadj")
    step = clear_of_step_edge(30)
    probes = [first - 1, first, last, last + 1]
    accepted = [
        o for o in probes if login(service, "root", ga_code(parsed.secret_base32, step + o))
    ]
    assert accepted == [first, last]
    assert first >= -parsed.window and last <= parsed.window  # otpgate's window covers it


@needs_ga
@needs_oathtool
@needs_ga_pam
def test_ga_secret_spelled_loosely_reads_as_the_pam_module_reads_it(
    tmp_path: Path, pam_service: Callable[[str], str]
) -> None:
    """Lower case, spaces, dashes, the look-alikes 0 1 8 for O L B, CRLF line ends."""
    for _ in range(1000):
        canonical = base64.b32encode(os.urandom(20)).decode()
        if {"O", "L", "B"} <= set(canonical):
            break
    loose = canonical.replace("O", "0").replace("L", "1").replace("B", "8").lower()
    loose = " ".join(loose[i : i + 4] for i in range(0, 32, 4)).replace(" ", "-", 3)
    path = tmp_path / "ga"
    path.write_bytes(f'{loose}\r\n" TOTP_AUTH\r\n" WINDOW_SIZE 3\r\n12345678\r\n'.encode())
    path.chmod(0o400)
    parsed = imports.parse_google_authenticator(path.read_bytes())
    assert parsed.secret_base32 == canonical
    assert parsed.scratch_codes == ("12345678",)
    service = pam_service(f"pam_google_authenticator.so secret={path}")
    step = clear_of_step_edge(30)
    assert login(service, "root", ga_code(canonical, step))
    assert login(service, "root", "12345678")


@needs_ga
@needs_oathtool
@needs_ga_pam
def test_ga_unknown_options_are_ignored_as_the_pam_module_ignores_them(
    tmp_path: Path, pam_service: Callable[[str], str]
) -> None:
    path = tmp_path / "ga"
    lines = google_authenticator(path, "-t", "-d", "-u", "-w", "3", "-e", "1").splitlines()
    lines[1:1] = ['" FUTURE_OPTION 1 2', '"NOSPACE']
    path.chmod(0o600)
    path.write_text("\n".join(lines) + "\n")
    service = pam_service(f"pam_google_authenticator.so secret={path}")
    step = clear_of_step_edge(30)
    assert login(service, "root", ga_code(lines[0], step))
    parsed = imports.parse_google_authenticator(path.read_text())
    assert parsed.unknown_options == ("FUTURE_OPTION", "NOSPACE")
    assert parsed.spent_steps == (step,)
    assert '" FUTURE_OPTION 1 2' in path.read_text()  # the module kept it


# -- google-authenticator: hand-written -----------------------------------------------

SECRET_B32 = base64.b32encode(b"12345678901234567890").decode()


def test_ga_options_in_any_order_with_the_module_state() -> None:
    text = (
        f"{SECRET_B32}\n"
        '" RESETTING_TIME_SKEW 59872502+5 59872503+5\n'
        '" TIME_SKEW -2\n'
        "\n"
        '" DISALLOW_REUSE 100 102\t101\n'
        "11111111\n"
        '" RATE_LIMIT 3 30 1796175080 1796175081\n'
        '" STEP_SIZE 60\n'
        '" TOTP_AUTH\n'
        '" WINDOW_SIZE 17\n'
        "22222222\n"
    )
    parsed = imports.parse_google_authenticator(text)
    assert parsed.secret == b"12345678901234567890"
    assert parsed.mode is OtpMode.TOTP
    assert parsed.time_skew == -2
    assert parsed.spent_steps == (100, 102, 101) and parsed.last_step == 102
    assert parsed.rate_limit == RateLimit(3, 30, (1796175080, 1796175081))
    assert (parsed.step_size, parsed.window_size, parsed.window) == (60, 17, 8)
    assert parsed.scratch_codes == ("11111111", "22222222")
    assert parsed.to_import().last_step == 102


def test_ga_hotp_counter_wins_over_totp_auth() -> None:
    # The module checks HOTP whenever HOTP_COUNTER is 1 or more, TOTP_AUTH or not.
    parsed = imports.parse_google_authenticator(
        f'{SECRET_B32}\n" TOTP_AUTH\n" HOTP_COUNTER 9\n'
    )  # fmt: skip
    assert (parsed.mode, parsed.hotp_counter) == (OtpMode.HOTP, 9)
    with pytest.raises(InvalidArgument, match="^mode: .*HOTP.*only time-based"):
        parsed.to_import()


@pytest.mark.parametrize(
    ("window_size", "steps", "window"),
    [(1, (0, 0), 0), (2, (0, 1), 1), (3, (-1, 1), 1), (4, (-1, 2), 2), (17, (-8, 8), 8),
     (21, (-10, 10), 10), (100, (-49, 50), 50)],
)  # fmt: skip
def test_ga_window_maps_to_a_symmetric_window(
    window_size: int, steps: tuple[int, int], window: int
) -> None:
    assert imports.ga_window_steps(window_size) == steps
    assert imports.ga_window(window_size) == window


@pytest.mark.parametrize("window_size", [0, 101, -3])
def test_ga_window_refuses_sizes_the_module_refuses(window_size: int) -> None:
    with pytest.raises(InvalidArgument, match="^window_size: must be from 1 to 100"):
        imports.ga_window(window_size)


def _ga(*lines: str, secret: str = SECRET_B32) -> str:
    return "\n".join([secret, *lines]) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "^file: is empty"),
        ("\n" + '" TOTP_AUTH\n', "^line 1: no secret"),
        ('" TOTP_AUTH\n', "^line 1: is an option; the first line must be the base32 secret"),
        (_ga('" TOTP_AUTH', secret="GEZDGNBVGY3TQOJ9"), "^line 1: .* not base32: column 16 "),
        (_ga('" TOTP_AUTH', secret=SECRET_B32 + "===="), "^line 1: the secret is not base32"),
        (_ga('" TOTP_AUTH', secret="GEZDGNBV"), "^line 1: the secret is 5 bytes; .* at least 10"),
        (_ga('" TOTP_AUTH', "1234567"), "^line 3: .*scratch codes are 8 digits"),
        (_ga('" TOTP_AUTH', "12345678", "123456789"), "^line 4: .*8 digits, the first not 0"),
        (_ga('" TOTP_AUTH', "01234567"), "^line 3: .*the first not 0"),
        (_ga('" TOTP_AUTH', "1234567a"), "^line 3: .*scratch code"),
        (_ga('" TOTP_AUTH', "12345678 "), "^line 3: .*scratch code"),
        (_ga('" TOTP_AUTH', "  ", "12345678"), "^line 3: .*scratch code.*has 2 characters"),
        (_ga('" TOTP_AUTH', '" STEP_SIZE 0'), "^line 3: STEP_SIZE must be .* from 1 to 60"),
        (_ga('" TOTP_AUTH', '" STEP_SIZE 61'), "^line 3: STEP_SIZE must be .* from 1 to 60"),
        (_ga('" TOTP_AUTH', '" STEP_SIZE 30s'), "^line 3: STEP_SIZE must be a whole number"),
        (_ga('" TOTP_AUTH', '" STEP_SIZE 4'), "^line 3: STEP_SIZE 4: otpgate's .*5 to 120"),
        (_ga('" TOTP_AUTH', '" WINDOW_SIZE 0'), "^line 3: WINDOW_SIZE .* from 1 to 100"),
        (_ga('" TOTP_AUTH', '" WINDOW_SIZE 101'), "^line 3: WINDOW_SIZE .* from 1 to 100"),
        (_ga('" TOTP_AUTH', '" WINDOW_SIZE'), "^line 3: WINDOW_SIZE"),
        (_ga('" TOTP_AUTH', '" RATE_LIMIT 3'), "^line 3: RATE_LIMIT needs attempts and seconds"),
        (_ga('" TOTP_AUTH', '" RATE_LIMIT 0 30'), "^line 3: RATE_LIMIT's attempts .*1 to 100"),
        (_ga('" TOTP_AUTH', '" RATE_LIMIT 3 3601'), "^line 3: RATE_LIMIT's seconds .*1 to 3600"),
        (_ga('" TOTP_AUTH', '" RATE_LIMIT 3 30 17x'), "^line 3: RATE_LIMIT's attempt times"),
        (_ga('" TOTP_AUTH', '" DISALLOW_REUSE 12 x'), "^line 3: DISALLOW_REUSE must list"),
        (_ga('" HOTP_COUNTER 0'), "^line 2: HOTP_COUNTER must be .* at least 1"),
        (_ga('" HOTP_COUNTER one'), "^line 2: HOTP_COUNTER"),
        (_ga('" TOTP_AUTH', '" TIME_SKEW 2.5'), "^line 3: TIME_SKEW must be a whole number"),
        (_ga('" TOTP_AUTH yes'), "^line 2: TOTP_AUTH takes no value"),
        (_ga('" TOTP_AUTH', '" STEP_SIZE 1', '" STEP_SIZE 6'), "^line 4: STEP_SIZE again .*line 3"),
        (_ga('" WINDOW_SIZE 3', "12345678"), "^file: has neither TOTP_AUTH nor HOTP_COUNTER"),
        (_ga('" TOTP_AUTH', '" WINDOW_SIZE 3 é'), "^line 3: is not ASCII text"),
        (_ga('" TOTP_AUTH', "1234\x005678"), "^line 3: contains a NUL byte"),
        (_ga('" TOTP_AUTH') + "\n" * (64 * 1024), r"^file: is \d+ bytes; .* at most 65536"),
    ],
)  # fmt: skip
def test_ga_malformed_files_name_the_line_and_the_problem(text: str, message: str) -> None:
    for data in (text, text.encode()):
        with pytest.raises(InvalidArgument, match=message) as raised:
            imports.parse_google_authenticator(data)
        assert SECRET_B32 not in str(raised.value)


def test_ga_undecodable_bytes_name_the_line() -> None:
    with pytest.raises(InvalidArgument, match="^line 2: is not ASCII text"):
        imports.parse_google_authenticator(SECRET_B32.encode() + b'\n" TOTP_AUTH \xff\n')


# -- pam_oath: files rewritten by pam_oath.so ----------------------------------------


@needs_oathtool
@needs_oath_pam
@pytest.mark.skipif(
    not Path("/usr/share/zoneinfo/Asia/Kolkata").exists(),
    reason="needs the time zone database (Debian package tzdata)",
)
def test_oath_file_rewritten_by_pam_oath(tmp_path: Path, pam_service: Callable[[str], str]) -> None:
    keys = {name: os.urandom(20).hex() for name in ("root", "daemon", "bin", "sys", "sync", "dup")}
    path = tmp_path / "users.oath"
    path.write_text(
        "# otpgate import test\n"
        "\n"
        f"HOTP/T30 root - {keys['root']}\n"
        f"HOTP/T60/8\tdaemon\t-\t{keys['daemon'].upper()}\n"
        f"  HOTP/T30/7 bin + {keys['bin']}\n"
        f"HOTP sys - {keys['sys']}\n"
        f"HOTP/T30 sync some-pin {keys['sync']}\n"
        f"HOTP/T30 root - {keys['dup']}\n"
        "HOTP/T30 games - 00112233\n"
    )
    path.chmod(0o600)
    service = pam_service(f"pam_oath.so usersfile={path} window=5")
    step = clear_of_step_edge(30)
    t0 = int(time.time())
    root_code = oathtool("--totp", keys["root"], "-N", f"@{(step + 1) * 30}")
    # pam_oath writes TIME in the local time of the process: make it one that shows.
    kolkata = {"TZ": "Asia/Kolkata"}
    assert login(service, "root", root_code, env=kolkata)
    # pam_oath refuses a code at or before the spent step (as otpgate's last_step).
    assert not login(service, "root", oathtool("--totp", keys["root"], "-N", f"@{step * 30}"))
    assert not login(service, "root", root_code)
    assert login(service, "daemon", oathtool("--totp", "-s", "60s", "-d", "8", keys["daemon"]))
    step60 = int(time.time()) // 60
    assert login(service, "sys", oathtool(keys["sys"], "-c", "2"))
    t1 = int(time.time())
    text = path.read_text()
    assert re.search(rf"^HOTP/T30\troot\t-\t{keys['root']}\t\d+\t{root_code}\t\S+L$", text, re.M)

    parsed = imports.parse_users_oath(text)
    assert [(t.line, t.user, t.token_type, t.interval, t.otp_digits, t.pin)
            for t in parsed.tokens] == [
        (3, "root", "HOTP/T30", 30, 6, Pin.NONE),
        (4, "daemon", "HOTP/T60/8", 60, 8, Pin.NONE),
        (5, "bin", "HOTP/T30/7", 30, 7, Pin.EXTERNAL),
    ]  # fmt: skip
    assert [(s.line, s.user, s.token_type) for s in parsed.skipped] == [
        (6, "sys", "HOTP"), (7, "sync", "HOTP/T30"), (8, "root", "HOTP/T30"),
        (9, "games", "HOTP/T30"),
    ]  # fmt: skip
    reasons = [s.reason for s in parsed.skipped]
    assert "HOTP" in reasons[0] and "only time-based" in reasons[0]
    assert "PIN" in reasons[1]
    assert "already has a token on line 3" in reasons[2]
    assert "4 bytes" in reasons[3]
    root, daemon, bin_ = parsed.tokens
    for token in parsed.tokens:
        assert_same_codes(keys[token.user], token.secret, hex_key=True,
                          digits=token.otp_digits, interval=token.interval)  # fmt: skip

    # root logged in at step + 1's code, TIME written in Kolkata's local time.
    assert root.last_otp == root_code
    at = root.last_login_at(ZoneInfo("Asia/Kolkata"))
    assert at is not None and t0 <= at <= t1
    assert root.last_step(tz=ZoneInfo("Asia/Kolkata")) == step + 1
    assert root.to_import(tz=ZoneInfo("Asia/Kolkata")).last_step == step + 1
    assert root.last_step(tz=dt.UTC) != step + 1  # 5 h 30 off: the zone matters
    assert daemon.last_step(tz=None) == step60  # written in this process's zone
    imported = daemon.to_import(tz=None)
    assert (imported.secret, imported.otp_digits, imported.interval, imported.last_step) == (
        bytes.fromhex(keys["daemon"]), 8, 60, step60,
    )  # fmt: skip
    assert imported.recovery_codes == ()
    assert bin_.last_login is None and bin_.to_import(tz=None).last_step == -1

    with_pins = imports.parse_users_oath(text, accept_pins=True)
    assert [t.user for t in with_pins.tokens] == ["root", "daemon", "bin", "sync"]
    assert with_pins.tokens[-1].pin is Pin.SET


@needs_oathtool
@needs_oath_pam
@pytest.mark.parametrize(
    ("token_type", "interval", "digits"),
    [("HOTP/T30", 30, 6), ("HOTP/T30/6", 30, 6), ("HOTP/T30/7", 30, 7), ("HOTP/T30/8", 30, 8),
     ("HOTP/T60", 60, 6), ("HOTP/T60/6", 60, 6), ("HOTP/T60/7", 60, 7), ("HOTP/T60/8", 60, 8)],
)  # fmt: skip
def test_oath_totp_types_read_as_pam_oath_reads_them(
    tmp_path: Path, pam_service: Callable[[str], str], token_type: str, interval: int,
    digits: int,
) -> None:  # fmt: skip
    key = os.urandom(20).hex()
    path = tmp_path / "users.oath"
    path.write_text(f"{token_type} root - {key}\n")
    path.chmod(0o600)
    (token,) = imports.parse_users_oath(path.read_text()).tokens
    assert (token.interval, token.otp_digits) == (interval, digits)
    service = pam_service(f"pam_oath.so usersfile={path} window=0")
    step = clear_of_step_edge(interval)
    code = pyotp.TOTP(token.secret_base32, digits=digits, interval=interval).at(step * interval)
    assert login(service, "root", code)
    assert imports.parse_users_oath(path.read_text()).tokens[0].last_step(tz=None) == step


# -- pam_oath: hand-written ----------------------------------------------------------

KEY = "3132333435363738393031323334353637383930"  # RFC 4226's "12345678901234567890"


@pytest.mark.parametrize(
    ("token_type", "interval", "digits"),
    [("HOTP/T5", 5, 6), ("HOTP/T45/7", 45, 7), ("HOTP/T120/8", 120, 8)],
)
def test_oath_other_time_steps_as_mod_authn_otp_writes_them(
    token_type: str, interval: int, digits: int
) -> None:
    (token,) = imports.parse_users_oath(f"{token_type} alice - {KEY}\n").tokens
    assert (token.interval, token.otp_digits) == (interval, digits)


@pytest.mark.parametrize("token_type", ["HOTP", "HOTP/E", "HOTP/E/6", "HOTP/E/7", "HOTP/E/8"])
def test_oath_hotp_tokens_are_skipped(token_type: str) -> None:
    parsed = imports.parse_users_oath(f"{token_type} alice - {KEY} 17\n")
    assert parsed.tokens == ()
    assert parsed.skipped == (
        imports.SkippedLine(1, "alice", token_type,
                            "HOTP (counter-based) token; otpgate verifies only time-based "
                            "codes (TOTP)"),
    )  # fmt: skip


def test_oath_last_step_found_from_lastotp_near_time() -> None:
    secret = bytes.fromhex(KEY)
    at = 1_800_000_123
    step = at // 30
    local = dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SL")

    def token(last_otp: str, window: int = imports.OATH_SEARCH_WINDOW) -> int:
        (parsed,) = imports.parse_users_oath(f"HOTP/T30 a - {KEY} 0 {last_otp} {local}\n").tokens
        return parsed.last_step(tz=dt.UTC, window=window)

    for offset in (-20, -3, 0, 1, 20):
        assert token(totp.hotp(secret, step + offset, 6)) == step + offset
    assert token(totp.hotp(secret, step + 21, 6)) == step  # beyond the search: TIME's step
    assert token(totp.hotp(secret, step + 3, 6), window=2) == step
    assert token("not-a-code") == step
    (no_time,) = imports.parse_users_oath(f"HOTP/T30 a - {KEY} 0 123456\n").tokens
    assert no_time.last_step(tz=None) == -1
    with pytest.raises(InvalidArgument, match="^window: must be at least 0"):
        no_time.last_step(tz=None, window=-1)


def test_oath_last_step_takes_the_highest_step_whose_code_is_lastotp() -> None:
    # A key (sha1 of "241") whose codes at 20 and 11 steps before `at` are the same.
    key = "9ffd1ae121c4f26fe7f0c45ecdc85fa6ac245bf0"
    at = 1_800_000_123
    step = at // 30
    assert totp.hotp(bytes.fromhex(key), step - 20, 6) == "604178"
    assert totp.hotp(bytes.fromhex(key), step - 11, 6) == "604178"
    local = dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SL")
    (token,) = imports.parse_users_oath(f"HOTP/T30 a - {key} 0 604178 {local}\n").tokens
    assert token.last_step(tz=dt.UTC) == step - 11  # the safer guess: more codes spent


def _oath(line: str) -> str:
    return f"# users\nHOTP/T30 alice - {KEY}\n{line}\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f"TOTP bob - {KEY}", "^line 3: unknown token type 'TOTP'"),
        (f"hotp/t30 bob - {KEY}", "^line 3: unknown token type 'hotp/t30'"),
        (f"HOTP/X30 bob - {KEY}", "^line 3: unknown token type"),
        (f"HOTP/T bob - {KEY}", "^line 3: unknown token type"),
        (f"HOTP/T30/6/1 bob - {KEY}", "^line 3: unknown token type"),
        (f"MOTP bob - {KEY}", "^line 3: unknown token type 'MOTP'"),
        (f"bob HOTP/T30 - {KEY}", "^line 3: unknown token type 'bob'"),
        (f"HOTP/T30/5 bob - {KEY}", "^line 3: HOTP/T30/5: digits must be from 6 to 8 .got 5"),
        (f"HOTP/T30/9 bob - {KEY}", "^line 3: HOTP/T30/9: digits must be from 6 to 8"),
        (f"HOTP/E/10 bob - {KEY}", "^line 3: HOTP/E/10: digits must be from 6 to 8"),
        (f"HOTP/T4 bob - {KEY}", "^line 3: HOTP/T4: the time step must be from 5 to 120 .*got 4"),
        (f"HOTP/T121/6 bob - {KEY}", "^line 3: HOTP/T121/6: the time step must be from 5 to 120"),
        (f"HOTP/T0 bob - {KEY}", "^line 3: HOTP/T0: the time step"),
        ("HOTP/T30 bob - 3132333435363738393g", "^line 3: SECRET must be hex"),
        ("HOTP/T30 bob - 313233343536373839303", "^line 3: SECRET must be hex: an even number"),
        ("HOTP/T30 bob - 0x3132333435363738", "^line 3: SECRET must be hex"),
        ("HOTP/T30 bob - -", "^line 3: no SECRET"),
        ("HOTP/T30 bob -", "^line 3: 3 fields; a token line is TYPE USER PIN SECRET"),
        ("HOTP/T30", "^line 3: 1 field; a token line is"),
        (f"HOTP/T30 bob - {KEY} x", "^line 3: COUNTER must be a whole number"),
        (f"HOTP/T30 bob - {KEY} -1", "^line 3: COUNTER must be a whole number"),
        (f"HOTP/T30 bob - {KEY} 0 123456 2026-12-02 01:31:46L", "^line 3: 8 fields; .*at most 7"),
        (f"HOTP/T30 bob - {KEY} 0 123456 2026-12-02T01:31:46", "^line 3: TIME must be local time"),
        (f"HOTP/T30 bob - {KEY} 0 123456 2026-13-02T01:31:46L", "^line 3: TIME must be"),
        (f"HOTP/T30 bob - {KEY} 0 123456 1796175106", "^line 3: TIME must be"),
    ],
)  # fmt: skip
def test_oath_malformed_lines_name_the_line_and_the_problem(line: str, message: str) -> None:
    for data in (_oath(line), _oath(line).encode()):
        with pytest.raises(InvalidArgument, match=message) as raised:
            imports.parse_users_oath(data)
        assert KEY not in str(raised.value)


def test_oath_undecodable_bytes_name_the_line() -> None:
    with pytest.raises(InvalidArgument, match="^line 2: is not UTF-8 text"):
        imports.parse_users_oath(b"# users\nHOTP/T30 \xff - " + KEY.encode() + b"\n")


def test_oath_pins_are_never_in_a_message_or_a_value() -> None:
    parsed = imports.parse_users_oath(f"HOTP/T30 alice hunter2 {KEY}\n", accept_pins=True)
    assert "hunter2" not in repr(parsed)
    skipped = imports.parse_users_oath(f"HOTP/T30 alice hunter2 {KEY}\n")
    assert "hunter2" not in repr(skipped)
    assert skipped.skipped[0].reason.startswith("has a PIN")


def test_secrets_and_codes_stay_out_of_reprs() -> None:
    ga = imports.parse_google_authenticator(_ga('" TOTP_AUTH', "12345678"))
    oath = imports.parse_users_oath(
        f"HOTP/T30 alice - {KEY} 0 287082 2026-12-02T01:31:46L\n"
    ).tokens[0]  # fmt: skip
    for value in (ga, ga.to_import(), oath, oath.to_import(tz=None)):
        shown = repr(value)
        for secret in (SECRET_B32, KEY, repr(b"12345678901234567890"), "12345678", "287082"):
            assert secret not in shown, (type(value).__name__, secret)
