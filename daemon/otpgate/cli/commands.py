"""One function per command: the client and the parsed arguments in, what to show out.

Nothing here prints (render.py does) or knows the transport (client.py does); a
command's result also carries its exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from otpgate.cli import qr
from otpgate.cli.client import Client, RpcFailed, Verification, admin_group, current_user
from otpgate.core import imports
from otpgate.core.settings import (
    DIGITS_BOUNDS,
    INTERVAL_BOUNDS,
    ISSUER_MAX_LEN,
    check_int,
    check_issuer,
)
from otpgate.errors import InvalidArgument, OtpgateError, PermissionDenied
from otpgate.ssh import doctor as ssh_doctor
from otpgate.ssh import setup as ssh_setup
from otpgate.v1 import otpgate_pb2 as pb

EXIT_OK, EXIT_FALSE, EXIT_ERROR = 0, 1, 2
_UINT32_MAX = 2**32 - 1


# -- results ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    @property
    def status(self) -> int:
        return EXIT_OK


@dataclasses.dataclass(frozen=True)
class ConfigShown(Result):
    config: pb.TwoFactorConfig


@dataclasses.dataclass(frozen=True)
class ConfigUpdated(Result):
    config: pb.TwoFactorConfig


@dataclasses.dataclass(frozen=True)
class UriShown(Result):
    uri: str
    qr: str  # the --qr format; a file is already written (qr_file)
    qr_file: str | None
    user: pb.UserEntry | None = None  # renew-secret: the account as it is now


@dataclasses.dataclass(frozen=True)
class Verified(Result):
    verification: Verification

    @property
    def status(self) -> int:
        return EXIT_OK if self.verification.valid else EXIT_FALSE


@dataclasses.dataclass(frozen=True)
class SecretUnset(Result):
    user: pb.UserEntry


@dataclasses.dataclass(frozen=True)
class UserShown(Result):
    user: pb.UserEntry
    # What the access policy decides for a login of this account (admins only): from
    # --from's address, or from one no exempt network holds.
    access: pb.ExplainAccessResponse | None = None


@dataclasses.dataclass(frozen=True)
class Imported(Result):
    path: str
    usernames: list[str]
    accounts: list[str]  # one line per account: what is taken over
    skipped: list[str]
    notes: list[str]
    dry_run: bool


@dataclasses.dataclass(frozen=True)
class AuditShown(Result):
    events: list[pb.AuditEvent]
    more: bool  # --limit cut the list short (or it ends exactly there)


@dataclasses.dataclass(frozen=True)
class KeyRotated(Result):
    reply: pb.RotateKeyResponse

    @property
    def status(self) -> int:
        return EXIT_FALSE if self.reply.old_key_ids else EXIT_OK


@dataclasses.dataclass(frozen=True)
class Unlocked(Result):
    user: pb.UserEntry


@dataclasses.dataclass(frozen=True)
class Confirmed(Result):
    user: pb.UserEntry


@dataclasses.dataclass(frozen=True)
class RecoveryCodesMade(Result):
    username: str
    codes: list[str]


@dataclasses.dataclass(frozen=True)
class UsersListed(Result):
    users: list[pb.UserEntry]


@dataclasses.dataclass(frozen=True)
class Problem:
    area: str  # sshd, pam or daemon
    message: str


@dataclasses.dataclass(frozen=True)
class DoctorReport(Result):
    flow: str | None
    problems: list[Problem]

    @property
    def status(self) -> int:
        return EXIT_FALSE if self.problems else EXIT_OK


@dataclasses.dataclass(frozen=True)
class SshWired(Result):
    report: ssh_setup.Report


# -- arguments --------------------------------------------------------------------------


def user_argument(value: str | None) -> str:
    """USER as given, or you when it is left out; an empty one is refused (it would
    otherwise quietly mean you, or whatever the daemon makes of it)."""
    if value is None:
        return current_user()
    if not value:
        raise InvalidArgument("USER", "must not be empty (leave it out to mean yourself)")
    return value


def _option(name: str, value: int | None, bounds: tuple[int, int]) -> int:
    if value is None:
        return 0  # the daemon's default
    if value <= 0:
        raise InvalidArgument(name, f"must be a positive integer (got {value})")
    return check_int(name, value, bounds)


_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True}
_BOOLEANS |= {"false": False, "no": False, "off": False, "0": False}


def _parse_bool(key: str, text: str) -> bool:
    if text.lower() not in _BOOLEANS:
        raise InvalidArgument(
            key, f"must be true or false, or one of yes, no, on, off, 1, 0 (got {text!r})"
        )
    return _BOOLEANS[text.lower()]


def _parse_uint(key: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > _UINT32_MAX:
        raise InvalidArgument(key, f"must be a non-negative integer (got {text!r})")
    return int(text)


_POLICIES = {"optional": pb.ENROLLMENT_POLICY_OPTIONAL, "required": pb.ENROLLMENT_POLICY_REQUIRED}


def _parse_policy(key: str, text: str) -> int:
    if text.lower() not in _POLICIES:
        raise InvalidArgument(key, f"must be one of {', '.join(_POLICIES)} (got {text!r})")
    return _POLICIES[text.lower()]


def _parse_issuer(key: str, text: str) -> str:
    # Checked here as otpgated checks it, so that the message can say what `issuer=`
    # (empty) does: it goes back to the daemon's default.
    try:
        return check_issuer(key, text, allow_empty=True)
    except InvalidArgument:
        raise InvalidArgument(
            key,
            f"must be 1 to {ISSUER_MAX_LEN} printable characters without ':', or empty "
            "(issuer=) for otpgated's default, its own issuer option or else the host name",
        ) from None


def _parse_list(key: str, text: str) -> pb.StringList:
    # Comma-separated; otpgated checks each entry (and says which, naming the key).
    if text == "":
        return pb.StringList()  # KEY= clears the list
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise InvalidArgument(
            key, f"an empty entry in {text!r}: separate entries with one comma, or KEY= to clear"
        )
    return pb.StringList(values=items)


def _parse_text(key: str, text: str) -> str:
    return text  # checked by otpgated (enrollment_deadline: YYYY-MM-DD, or empty)


# CLI key -> (UpdateConfigRequest field, parser).
UPDATE_KEYS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "enabled": ("enabled", _parse_bool),
    "window": ("window", _parse_uint),
    "services.ssh": ("services_ssh", _parse_bool),
    "otp_digits": ("otp_digits", _parse_uint),
    "interval": ("interval", _parse_uint),
    "issuer": ("issuer", _parse_issuer),
    "enrollment_policy": ("enrollment_policy", _parse_policy),
    "lockout_threshold": ("lockout_threshold", _parse_uint),
    "lockout_seconds": ("lockout_seconds", _parse_uint),
    "exempt_networks": ("exempt_networks", _parse_list),
    "exempt_groups": ("exempt_groups", _parse_list),
    "required_groups": ("required_groups", _parse_list),
    "enrollment_deadline": ("enrollment_deadline", _parse_text),
}


def update_request(assignments: Sequence[str]) -> pb.UpdateConfigRequest:
    request = pb.UpdateConfigRequest()
    seen: set[str] = set()
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(item, "expected KEY=VALUE")
        if key not in UPDATE_KEYS:
            raise InvalidArgument(key, f"unknown setting; known: {', '.join(UPDATE_KEYS)}")
        if key in seen:
            raise InvalidArgument(key, "given twice")
        seen.add(key)
        field, parse = UPDATE_KEYS[key]
        parsed = parse(key, value)
        if isinstance(parsed, pb.StringList):
            getattr(request, field).CopyFrom(parsed)  # set, even when empty (a clear)
        else:
            setattr(request, field, parsed)
    return request


def _qr_format(args: argparse.Namespace) -> str:
    """--qr, checked before anything changes ("" is refused, not the default): renew-secret
    must not replace a secret whose QR code it then cannot save."""
    if args.qr is not None:
        return qr.check_format(args.qr)
    return "utf8" if sys.stdout.isatty() and not args.json else "none"


def _write_qr_file(uri: str, spec: str) -> str | None:
    # Written before anything is printed: a reader that goes away early (`| head -1`)
    # must not cost the picture of a secret that has already been replaced.
    if spec.startswith(("png:", "svg:")):
        return qr.emit(uri, spec, sys.stderr)
    return None


# -- the commands -----------------------------------------------------------------------


def config(client: Client, args: argparse.Namespace) -> ConfigShown:
    return ConfigShown(client.get_config())


def update(client: Client, args: argparse.Namespace) -> ConfigUpdated:
    return ConfigUpdated(client.update_config(update_request(args.assignments)))


def renew_secret(client: Client, args: argparse.Namespace) -> UriShown:
    spec = _qr_format(args)
    user = user_argument(args.user)
    entry = client.renew_secret(
        user,
        otp_digits=_option("--otp-digits", args.otp_digits, DIGITS_BOUNDS),
        interval=_option("--interval", args.interval, INTERVAL_BOUNDS),
        pending=not args.now,
    )
    uri = entry.twofactor_config.provisioning_uri
    return UriShown(uri, spec, _write_qr_file(uri, spec), entry)


def provisioning_uri(client: Client, args: argparse.Namespace) -> UriShown:
    spec = _qr_format(args)
    uri = client.provisioning_uri(user_argument(args.user))
    return UriShown(uri, spec, _write_qr_file(uri, spec))


def verify(client: Client, args: argparse.Namespace) -> Verified:
    user = user_argument(args.user)
    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    return Verified(client.verify(user, token))


def unset_secret(client: Client, args: argparse.Namespace) -> SecretUnset:
    if not args.user:
        raise InvalidArgument("USER", "must not be empty")
    return SecretUnset(client.unset_secret(args.user))


def confirm(client: Client, args: argparse.Namespace) -> Confirmed:
    user = user_argument(args.user)
    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    return Confirmed(client.confirm_secret(user, token))


_IMPORT_LIMIT = 1 << 20  # a users.oath of thousands of lines; google-authenticator's is 64 KiB


def _read_import_file(path: str) -> bytes:
    """FILE's bytes: a regular file (no symlink followed at its end), not too large."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument("FILE", f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument("FILE", f"{path} is not a regular file")
        if info.st_size > _IMPORT_LIMIT:
            raise InvalidArgument("FILE", f"{path} is larger than {_IMPORT_LIMIT} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(_IMPORT_LIMIT + 1)
    finally:
        os.close(fd)


def _imported_pb(username: str, token: imports.ImportedSecret) -> pb.ImportedAccount:
    return pb.ImportedAccount(
        username=username,
        secret=token.secret,
        otp_digits=token.otp_digits,
        interval=token.interval,
        last_step=token.last_step,
        recovery_codes=list(token.recovery_codes),
    )


def import_google_authenticator(client: Client, args: argparse.Namespace) -> Imported:
    if not args.user:
        raise InvalidArgument("--user", "must not be empty")
    parsed = imports.parse_google_authenticator(_read_import_file(args.file))
    token = parsed.to_import()  # refuses HOTP
    settings = client.get_config()
    notes = []
    window = parsed.window
    if window > settings.window:
        notes.append(
            f"google-authenticator accepted codes up to {window} steps off; otpgate's window "
            f"is {settings.window}: `otpgate update window={min(window, 10)}` to keep that"
        )
    if parsed.time_skew:
        notes.append(
            f"google-authenticator had learnt a clock skew of {parsed.time_skew} steps for "
            "this phone; otpgate has none: fix the phone's clock if its codes are refused"
        )
    if parsed.rate_limit is not None:
        notes.append(
            f"RATE_LIMIT ({parsed.rate_limit.attempts} in {parsed.rate_limit.seconds} s) is not "
            f"imported: otpgate's lockout applies (lockout_threshold={settings.lockout_threshold})"
        )
    if not parsed.disallow_reuse:
        notes.append("the file did not record used codes (no DISALLOW_REUSE): none are spent yet")
    for name in parsed.unknown_options:
        notes.append(f"option {name} is not known and was ignored")
    line = (
        f"{args.user}: TOTP, {token.otp_digits} digits, {token.interval} s, "
        f"{len(token.recovery_codes)} scratch codes as recovery codes"
        + (f", codes up to step {token.last_step} spent" if token.last_step >= 0 else "")
    )
    names = client.import_secrets([_imported_pb(args.user, token)], dry_run=args.dry_run)
    return Imported(args.file, names, [line], [], notes, args.dry_run)


def import_oath_users(client: Client, args: argparse.Namespace) -> Imported:
    tz = None
    if args.timezone:
        import zoneinfo

        try:
            tz = zoneinfo.ZoneInfo(args.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise InvalidArgument("--timezone", f"no such time zone: {args.timezone}") from None
    parsed = imports.parse_users_oath(_read_import_file(args.file))
    accounts, lines = [], []
    for token in parsed.tokens:
        value = token.to_import(tz=tz)
        accounts.append(_imported_pb(token.user, value))
        spent = f", codes up to step {value.last_step} spent" if value.last_step >= 0 else ""
        lines.append(
            f"{token.user}: {token.token_type} (line {token.line}), {value.otp_digits} digits, "
            f"{value.interval} s{spent}"
        )
    skipped = [
        f"line {s.line} ({s.user}, {s.token_type}): skipped: {s.reason}" for s in parsed.skipped
    ]
    if not accounts:
        raise InvalidArgument("FILE", f"{args.file} has no token otpgate can import")
    names = client.import_secrets(accounts, dry_run=args.dry_run)
    return Imported(args.file, names, lines, skipped, [], args.dry_run)


def _moment(flag: str, text: str | None, *, day_end: bool = False) -> int | None:
    """--since/--until: an ISO 8601 date or time (local time unless it says), or
    seconds since the epoch. A bare date as --until (day_end) means the end of that
    day, so that --since D --until D is day D."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            flag, f"{text!r} is not a date (2026-12-01, 2026-12-01T10:30) or epoch seconds"
        ) from None
    if day_end and len(text) == 10:
        moment += dt.timedelta(days=1)
    return int(moment.timestamp())


def audit(client: Client, args: argparse.Namespace) -> AuditShown:
    if args.limit is not None and not 1 <= args.limit <= 100_000:
        raise InvalidArgument("--limit", f"must be from 1 to 100000 (got {args.limit})")
    limit = args.limit or 100
    request = pb.ListAuditEventsRequest(username=args.user or "")
    since = _moment("--since", args.since)
    until = _moment("--until", args.until, day_end=True)
    if since is not None:
        request.since = since
    if until is not None:
        request.until = until
    events: list[pb.AuditEvent] = []
    while len(events) < limit:
        request.page_size = min(1000, limit - len(events))
        page = client.audit_events(request)
        events.extend(page.events)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    return AuditShown(events[:limit], more=len(events) >= limit)


def rotate_key(client: Client, args: argparse.Namespace) -> KeyRotated:
    return KeyRotated(client.rotate_key())


def unlock(client: Client, args: argparse.Namespace) -> Unlocked:
    if not args.user:
        raise InvalidArgument("USER", "must not be empty")
    return Unlocked(client.unlock(args.user))


def recovery_codes(client: Client, args: argparse.Namespace) -> RecoveryCodesMade:
    user = user_argument(args.user)
    return RecoveryCodesMade(user, client.recovery_codes(user))


def user_show(client: Client, args: argparse.Namespace) -> UserShown:
    user = user_argument(args.user)
    rhost = args.from_address
    if rhost is not None and not rhost:
        raise InvalidArgument(
            "--from", "must not be empty (leave it out for an address no exempt network holds)"
        )
    entry = client.get_user(user)
    try:
        access = client.explain_access(user, rhost or "")
    except (PermissionDenied, RpcFailed) as exc:
        # Only an admin (or a role that may read the settings) is told; without
        # --from the rest of the account is still shown to anyone who may see it.
        refused = isinstance(exc, PermissionDenied) or exc.kind in (
            "PermissionDenied",
            "Unimplemented",  # an otpgated from before the access policy
        )
        if rhost is not None or not refused:
            raise
        access = None
    return UserShown(entry, access)


def user_list(client: Client, args: argparse.Namespace) -> UsersListed:
    return UsersListed(client.list_users())


def doctor(client: Client, args: argparse.Namespace) -> DoctorReport:
    # The daemon first: an ordinary user is refused before sshd -T (which needs root
    # to read the host keys) would report that as an sshd problem.
    daemon, reached = _doctor_daemon(client, args.socket)
    problems: list[str] = []
    config: dict[str, list[str]] | None = None
    try:
        config = ssh_doctor.parse_sshd_t(
            ssh_doctor.sshd_effective_config(args.sshd, args.sshd_config)
        )
    except (OSError, subprocess.SubprocessError) as exc:
        problems.append(f"sshd: cannot read the effective configuration: {exc}")
    service = args.pam_service or os.path.basename(args.sshd)
    stack: list[ssh_doctor.PamLine] = []
    try:
        stack = ssh_doctor.read_pam_auth(service, args.pam_dir)
    except OSError as exc:
        problems.append(f"pam: cannot read service {service}: {exc.strerror}")
    flow = ssh_doctor.detect_flow(stack)
    if config is not None:
        problems += ssh_doctor.check_sshd(config, flow)
    if stack:
        problems += ssh_doctor.check_pam(service, stack, ssh_doctor.root_owned_chain)
    if stack and reached:
        # Only with a daemon that answered: without one, its own problem says why the
        # hook gets no answer and the gate files are gone.
        problems += ssh_doctor.check_hook_sockets(stack, _pam_socket(args.socket), args.socket)
        problems += ssh_doctor.check_gate(stack, now=time.time())
    problems += daemon
    return DoctorReport(flow, [Problem(*_split_problem(p)) for p in problems])


def _split_problem(text: str) -> tuple[str, str]:
    area, _, message = text.partition(": ")
    return (area, message) if message else ("", text)


def _pam_socket(admin_socket: str) -> str:
    # The daemon's sockets share its runtime directory.
    return os.path.join(os.path.dirname(os.path.abspath(admin_socket)), "pam.sock")


def _doctor_daemon(client: Client, admin_socket: str) -> tuple[list[str], bool]:
    """The daemon's problems, and whether it answered."""
    try:
        settings = client.get_config()
        users = client.list_users()
    except PermissionDenied:
        raise
    except OtpgateError as exc:
        settings, users, unreachable = None, [], f"daemon: not reachable: {exc}"
    else:
        unreachable = ""
    pam_socket = _pam_socket(admin_socket)
    problems = []
    try:
        info = os.stat(pam_socket)
        if stat.S_IMODE(info.st_mode) & 0o077 or info.st_uid != 0:
            problems.append(f"daemon: {pam_socket} is reachable by others than root")
    except OSError:
        problems.append(f"daemon: no PAM socket at {pam_socket}: every login would be refused")
    if settings is None:
        return [*problems, unreachable], False
    ssh_on = settings.enabled and settings.services.ssh
    admins, any_enrolled = _admins_enrolled(users, admin_socket)
    if ssh_on and not any_enrolled:
        problems.append(
            "daemon: 2FA is on for SSH but no administrator is enrolled "
            f"({', '.join(admins)}): enroll one with `otpgate renew-secret USER`, "
            "then `otpgate confirm USER CODE`"
        )
    problems += ssh_doctor.check_policy(
        ssh_on=ssh_on,
        required=settings.enrollment_policy == pb.ENROLLMENT_POLICY_REQUIRED,
        exempt_networks=settings.exempt_networks,
        exempt_groups=settings.exempt_groups,
        required_groups=settings.required_groups,
        deadline=settings.enrollment_deadline,
        enrolled=(u.username for u in users),
        admins=admins,
        directory=ssh_doctor.Directory.from_nss(),
    )
    return problems, True


def _admins_enrolled(users: list[pb.UserEntry], admin_socket: str) -> tuple[list[str], bool]:
    # The admin group as otpgated applied it; unknown (""): root and the usual groups.
    group = admin_group(admin_socket) or ""
    return ssh_doctor.unenrolled_admins((u.username for u in users), group)


def lockout_risk(client: Client, admin_socket: str) -> str | None:
    """Why enabling SSH wiring now could lock every administrator out, if it could."""
    try:
        settings = client.get_config()
        users = client.list_users()
    except PermissionDenied:
        raise
    except OtpgateError as exc:
        return f"otpgated is not reachable: {exc}; with fail=secure every login would be refused"
    if not (settings.enabled and settings.services.ssh):
        return None
    admins, any_enrolled = _admins_enrolled(users, admin_socket)
    if any_enrolled:
        return None
    if settings.enrollment_policy != pb.ENROLLMENT_POLICY_REQUIRED:
        # Optional, but each admin in a required group: refused all the same.
        directory = ssh_doctor.Directory.from_nss()
        required: set[str] = set()
        for group in settings.required_groups:
            required |= directory.members(group) or set()
        if not admins or not set(admins) <= required:
            return None
        return (
            f"no administrator ({', '.join(admins)}) is enrolled and each is in a required "
            f"group ({', '.join(settings.required_groups)}): every admin would be locked out "
            "(otpgate renew-secret USER)"
        )
    return (
        f"2FA is required for SSH and no administrator ({', '.join(admins)}) is enrolled: "
        "every admin would be locked out (otpgate renew-secret USER)"
    )


def setup_ssh(client: Client, args: argparse.Namespace) -> SshWired:
    paths = ssh_setup.Paths(
        pam_dir=args.pam_dir,
        sshd_config=args.sshd_config,
        sshd_config_dir=args.sshd_config_dir
        or os.path.join(os.path.dirname(args.sshd_config), "sshd_config.d"),
        sshd=args.sshd,
        backup_dir=args.backup_dir,
    )
    reload = ssh_setup.reload_sshd if args.reload else (lambda: "sshd not reloaded (--no-reload)")
    try:
        if args.undo:
            # No daemon needed: this is the way back when logins fail.
            return SshWired(ssh_setup.undo(paths, dry_run=args.dry_run, reload=reload))
        if args.flow is None:
            raise InvalidArgument("--flow", f"required: one of {', '.join(ssh_setup.FLOWS)}")
        report = ssh_setup.setup(
            args.flow,
            paths,
            hook=args.hook or ssh_setup.default_hook(),
            hook_options=args.hook_options,
            prompt=args.prompt,
            lockout_risk=lockout_risk(client, args.socket),
            force=args.force,
            dry_run=args.dry_run,
            reload=reload,
        )
    except PermissionError as exc:  # setup has put back whatever it had changed
        raise PermissionDenied(
            f"setup ssh: {exc.filename or 'a file'}: {exc.strerror}: run it as root"
        ) from None
    except OSError as exc:
        raise ssh_setup.SetupError(
            f"{exc.filename or 'a file'}: {exc.strerror or exc}; the files are as they were"
        ) from None
    except subprocess.SubprocessError as exc:  # systemctl reload failed, or hung
        raise ssh_setup.SetupError(
            f"reloading sshd failed: {exc}; the files are as they were"
        ) from None
    return SshWired(report)
