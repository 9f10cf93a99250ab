"""otpgate: manage otpgate's 2FA settings and secrets (mirrors TrueNAS `auth two_factor`).

Exit status: 0 success (verify: the code was accepted); 1 verify: the code was
not accepted, doctor: problems found; 2 any error (bad usage, daemon unreachable,
request refused).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import grpc

from otpgate import __version__
from otpgate.cli import qr
from otpgate.errors import ClientError, InvalidArgument, OtpgateError
from otpgate.ssh import doctor
from otpgate.ssh import setup as ssh_setup
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc

DEFAULT_SOCKET = "/run/otpgate/admin.sock"
EXIT_OK, EXIT_FALSE, EXIT_ERROR = 0, 1, 2
_UINT32_MAX = 2**32 - 1

_POLICIES = {"optional": pb.ENROLLMENT_POLICY_OPTIONAL, "required": pb.ENROLLMENT_POLICY_REQUIRED}
_POLICY_NAMES = {number: name for name, number in _POLICIES.items()}
_RESULTS = {
    pb.VERIFY_RESULT_VALID: "valid",
    pb.VERIFY_RESULT_INVALID: "invalid",
    pb.VERIFY_RESULT_REPLAYED: "replayed",
    pb.VERIFY_RESULT_NOT_ENROLLED: "not_enrolled",
    pb.VERIFY_RESULT_LOCKED: "locked",
}


# -- talking to the daemon -------------------------------------------------------------


class Client:
    """Talks to admin.sock; an ordinary user who cannot open it goes through
    user.sock instead, logging in first (password, then a code when enrolled)."""

    def __init__(self, socket_path: str, timeout: float, *, password_stdin: bool = False) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.password_stdin = password_stdin
        self.self_service = False
        self._stub: Any = None
        self._metadata: list[tuple[str, str]] = []

    def _connect(self) -> Any:
        if self._stub is not None:
            return self._stub
        user_socket = os.path.join(os.path.dirname(self.socket_path), "user.sock")
        use_user_socket = os.path.basename(self.socket_path) == "user.sock"
        if not use_user_socket:
            try:
                _check_socket(self.socket_path)
            except SocketPermissionError:
                if not os.path.exists(user_socket):
                    raise
                use_user_socket = True
        if use_user_socket:
            if os.path.basename(self.socket_path) != "user.sock":
                self.socket_path = user_socket
            _check_socket(self.socket_path)
            channel = grpc.insecure_channel("unix:" + self.socket_path)
            self._stub = pb_grpc.UserSelfServiceStub(channel)
            self.self_service = True
        else:
            channel = grpc.insecure_channel("unix:" + self.socket_path)
            self._stub = pb_grpc.TwoFactorAdminStub(channel)
        return self._stub

    def call(self, method: str, request: Any) -> Any:
        stub = self._connect()
        if not hasattr(stub, method):
            raise ClientError(
                f"{method} needs admin rights: run as root or a member of the admin group"
            )
        if self.self_service and not self._metadata:
            self._login()
        try:
            return getattr(stub, method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self.socket_path) from None

    def _login(self) -> None:
        stub = self._stub
        options = pb.AuthCommonOptions(user_info=False)
        reply = self._rpc(
            stub.LoginEx,
            pb.LoginExRequest(
                mechanism=pb.PASSWORD_PLAIN,
                username=_current_user(),
                password=self._secret(f"Password for {_current_user()}: "),
                login_options=options,
            ),
        )
        while reply.response_type == pb.OTP_REQUIRED:
            reply = self._rpc(
                stub.LoginExContinue,
                pb.LoginExContinueRequest(
                    mechanism=pb.OTP_TOKEN,
                    attempt_token=reply.attempt_token,
                    otp_token=self._secret("One-time code: "),
                    login_options=options,
                ),
            )
        if reply.response_type == pb.EXPIRED:
            raise ClientError("your password or account has expired: change it first (passwd)")
        if reply.response_type != pb.SUCCESS:
            raise ClientError("login failed: wrong password or code")
        self._metadata = [("authorization", f"Bearer {reply.session_token}")]

    def _rpc(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self.socket_path) from None

    def _secret(self, prompt: str) -> str:
        # Never from the command line, where other users could read it in ps.
        if self.password_stdin:
            line = sys.stdin.readline()
            if not line:
                raise ClientError("--password-stdin: stdin ended before the password or code")
            return line.rstrip("\n")
        try:
            return getpass.getpass(prompt)
        except (EOFError, OSError):
            raise ClientError("no terminal to ask for the password: use --password-stdin") from None


class RpcFailed(OtpgateError):
    """The daemon refused or failed a request; `kind` names the gRPC status."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class SocketPermissionError(ClientError):
    """The caller may not open this socket (an ordinary user on admin.sock)."""


def _check_socket(path: str) -> None:
    hint = "is otpgated running? (--socket or OTPGATE_SOCKET name another socket)"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ClientError(f"no otpgated socket at {path}: {hint}") from None
    except PermissionError:
        raise ClientError(f"cannot reach {path}: permission denied") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ClientError(f"{path} is not a socket: {hint}")
    if not os.access(path, os.R_OK | os.W_OK):
        raise SocketPermissionError(
            f"permission denied on {path}: admin commands need root or the admin group"
        )


def _rpc_error(exc: grpc.RpcError, socket_path: str) -> OtpgateError:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else "") or "no details"
    if code == grpc.StatusCode.UNAVAILABLE:
        return ClientError(f"cannot reach otpgated at {socket_path}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(f"otpgated at {socket_path} did not answer in time")
    kind = "".join(part.capitalize() for part in code.name.split("_"))
    return RpcFailed(kind, details)


# -- output ----------------------------------------------------------------------------


def config_dict(config: pb.TwoFactorConfig) -> dict[str, Any]:
    return {
        "enabled": config.enabled,
        "window": config.window,
        "services": {"ssh": config.services.ssh},
        "otp_digits": config.otp_digits,
        "interval": config.interval,
        "issuer": config.issuer,
        "effective_issuer": config.effective_issuer,
        "enrollment_policy": _POLICY_NAMES.get(config.enrollment_policy, "unspecified"),
        "lockout_threshold": config.lockout_threshold,
        "lockout_seconds": config.lockout_seconds,
    }


def user_dict(user: pb.UserEntry) -> dict[str, Any]:
    twofactor = user.twofactor_config
    return {
        "id": user.id,
        "uid": user.uid,
        "username": user.username,
        "full_name": user.full_name,
        "home": user.home,
        "shell": user.shell,
        "gid": user.gid,
        "groups": list(user.groups),
        "local": user.local,
        "twofactor_auth_configured": user.twofactor_auth_configured,
        "twofactor_config": {
            "provisioning_uri": (
                twofactor.provisioning_uri if twofactor.HasField("provisioning_uri") else None
            ),
            "secret_configured": twofactor.secret_configured,
            "interval": twofactor.interval,
            "otp_digits": twofactor.otp_digits,
        },
        "failed_attempts": user.failed_attempts,
        "locked_seconds": user.locked_seconds,
    }


def _print_pairs(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(key) for key, _ in pairs)
    for key, value in pairs:
        if isinstance(value, bool):
            value = str(value).lower()
        print(f"{key:<{width}}  {value}")


def _print_user(user: pb.UserEntry) -> None:
    data = user_dict(user)
    twofactor = data.pop("twofactor_config")
    data["groups"] = ",".join(str(g) for g in data["groups"])
    data["twofactor_interval"] = twofactor["interval"]
    data["twofactor_otp_digits"] = twofactor["otp_digits"]
    _print_pairs(list(data.items()))


# -- commands --------------------------------------------------------------------------


def _current_user() -> str:
    # The real uid, not $USER: the environment is the caller's to forge.
    return pwd.getpwuid(os.getuid()).pw_name


def cmd_config(client: Client, args: argparse.Namespace) -> int:
    config = client.call("GetConfig", pb.GetConfigRequest())
    data = config_dict(config)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        ssh = data.pop("services")["ssh"]
        effective = data.pop("effective_issuer")
        data["issuer"] = data["issuer"] or f"{effective} (daemon default)"
        pairs = list(data.items())
        pairs.insert(2, ("services.ssh", ssh))
        _print_pairs(pairs)
    return EXIT_OK


def _parse_bool(key: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise InvalidArgument(key, f"must be true or false (got {text!r})")


def _parse_uint(key: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > _UINT32_MAX:
        raise InvalidArgument(key, f"must be a non-negative integer (got {text!r})")
    return int(text)


def _parse_policy(key: str, text: str) -> int:
    if text.lower() not in _POLICIES:
        raise InvalidArgument(key, f"must be one of {', '.join(_POLICIES)} (got {text!r})")
    return _POLICIES[text.lower()]


def _parse_str(key: str, text: str) -> str:
    return text


# CLI key -> (UpdateConfigRequest field, parser).
UPDATE_KEYS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "enabled": ("enabled", _parse_bool),
    "window": ("window", _parse_uint),
    "services.ssh": ("services_ssh", _parse_bool),
    "otp_digits": ("otp_digits", _parse_uint),
    "interval": ("interval", _parse_uint),
    "issuer": ("issuer", _parse_str),
    "enrollment_policy": ("enrollment_policy", _parse_policy),
    "lockout_threshold": ("lockout_threshold", _parse_uint),
    "lockout_seconds": ("lockout_seconds", _parse_uint),
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
        setattr(request, field, parse(key, value))
    return request


def cmd_update(client: Client, args: argparse.Namespace) -> int:
    config = client.call("UpdateConfig", update_request(args.assignments))
    if args.json:
        print(json.dumps(config_dict(config), indent=2))
    else:
        print("updated")
    return EXIT_OK


def _positive(name: str, value: int | None) -> int:
    if value is None:
        return 0  # the daemon's default
    if value <= 0:
        raise InvalidArgument(name, f"must be a positive integer (got {value})")
    return value


def _default_qr(args: argparse.Namespace) -> str:
    return "utf8" if sys.stdout.isatty() and not args.json else "none"


def _show_uri(uri: str, args: argparse.Namespace) -> None:
    spec = args.qr if args.qr is not None else _default_qr(args)
    if args.json:
        if spec.startswith(("png:", "svg:")):
            qr.emit(uri, spec, sys.stderr)
        return
    print(uri)
    written = qr.emit(uri, spec, sys.stdout)
    if written:
        print(f"QR code written to {written} (mode 0600: it holds the secret)", file=sys.stderr)


def cmd_renew_secret(client: Client, args: argparse.Namespace) -> int:
    qr.check_format(args.qr if args.qr is not None else "none")  # "" is refused
    request = pb.RenewSecretRequest(
        username=args.user or _current_user(),
        twofactor_options=pb.TwoFactorOptions(
            otp_digits=_positive("--otp-digits", args.otp_digits),
            interval=_positive("--interval", args.interval),
        ),
    )
    user = client.call("RenewSecret", request)
    uri = user.twofactor_config.provisioning_uri
    if args.json:
        print(json.dumps(user_dict(user), indent=2))
    _show_uri(uri, args)
    return EXIT_OK


def cmd_provisioning_uri(client: Client, args: argparse.Namespace) -> int:
    qr.check_format(args.qr if args.qr is not None else "none")  # "" is refused
    response = client.call(
        "GetProvisioningUri", pb.GetProvisioningUriRequest(username=args.user or _current_user())
    )
    if args.json:
        print(json.dumps({"provisioning_uri": response.provisioning_uri}, indent=2))
    _show_uri(response.provisioning_uri, args)
    return EXIT_OK


def cmd_verify(client: Client, args: argparse.Namespace) -> int:
    if len(args.words) == 1:
        user, token = _current_user(), args.words[0]
    elif len(args.words) == 2:
        user, token = args.words
    else:
        raise InvalidArgument("verify", "expected [USER] TOKEN")
    if token == "-":
        token = sys.stdin.readline().strip()
    response = client.call("VerifyToken", pb.VerifyTokenRequest(username=user, token=token))
    result = _RESULTS.get(response.result, "unspecified")
    if args.json:
        print(
            json.dumps(
                {
                    "valid": response.valid,
                    "result": result,
                    "locked_seconds": response.locked_seconds,
                }
            )
        )
    else:
        print("true" if response.valid else "false")
        if result == "locked":
            print(f"account locked for {response.locked_seconds} s", file=sys.stderr)
        elif result in ("replayed", "not_enrolled"):
            print(f"reason: {result.replace('_', ' ')}", file=sys.stderr)
    return EXIT_OK if response.valid else EXIT_FALSE


def cmd_unset_secret(client: Client, args: argparse.Namespace) -> int:
    user = client.call("UnsetSecret", pb.UnsetSecretRequest(username=args.user))
    if args.json:
        print(json.dumps(user_dict(user), indent=2))
    else:
        print(f"2FA secret of {user.username} removed")
    return EXIT_OK


def cmd_user_show(client: Client, args: argparse.Namespace) -> int:
    user = client.call("GetUser", pb.GetUserRequest(username=args.user or _current_user()))
    if args.json:
        print(json.dumps(user_dict(user), indent=2))
    else:
        _print_user(user)
    return EXIT_OK


def cmd_user_list(client: Client, args: argparse.Namespace) -> int:
    users = client.call("ListUsers", pb.ListUsersRequest()).users
    if args.json:
        print(json.dumps([user_dict(u) for u in users], indent=2))
        return EXIT_OK
    rows = [("USERNAME", "UID", "DIGITS", "INTERVAL", "FAILED", "LOCKED_S")]
    rows += [
        (
            u.username,
            str(u.uid),
            str(u.twofactor_config.otp_digits),
            str(u.twofactor_config.interval),
            str(u.failed_attempts),
            str(u.locked_seconds),
        )
        for u in users
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return EXIT_OK


def cmd_doctor(client: Client, args: argparse.Namespace) -> int:
    problems: list[str] = []
    config: dict[str, list[str]] | None = None
    try:
        config = doctor.parse_sshd_t(doctor.sshd_effective_config(args.sshd, args.sshd_config))
    except (OSError, subprocess.SubprocessError) as exc:
        problems.append(f"sshd: cannot read the effective configuration: {exc}")
    service = args.pam_service or os.path.basename(args.sshd)
    stack: list[doctor.PamLine] = []
    try:
        stack = doctor.read_pam_auth(service, args.pam_dir)
    except OSError as exc:
        problems.append(f"pam: cannot read service {service}: {exc.strerror}")
    flow = doctor.detect_flow(stack)
    if config is not None:
        problems += doctor.check_sshd(config, flow)
    if stack:
        problems += doctor.check_pam(service, stack, doctor.root_owned_chain)
    problems += _doctor_daemon(client)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: no problems found (flow: {flow})")
    return EXIT_FALSE if problems else EXIT_OK


def _doctor_daemon(client: Client) -> list[str]:
    pam_socket = os.path.join(os.path.dirname(client.socket_path), "pam.sock")
    problems = []
    try:
        info = os.stat(pam_socket)
        if stat.S_IMODE(info.st_mode) & 0o077 or info.st_uid != 0:
            problems.append(f"daemon: {pam_socket} is reachable by others than root")
    except OSError:
        problems.append(f"daemon: no PAM socket at {pam_socket}: every login would be refused")
    try:
        config = client.call("GetConfig", pb.GetConfigRequest())
        users = client.call("ListUsers", pb.ListUsersRequest()).users
    except OtpgateError as exc:
        return [*problems, f"daemon: not reachable: {exc}"]
    if config.enabled and config.services.ssh:
        admins, any_enrolled = doctor.unenrolled_admins(
            (u.username for u in users), "otpgate-admin"
        )
        if not any_enrolled:
            problems.append(
                "daemon: 2FA is on for SSH but no administrator is enrolled "
                f"({', '.join(admins)}): enroll one with `otpgate renew-secret USER`"
            )
    return problems


def _lockout_risk(client: Client) -> str | None:
    """Why enabling SSH wiring now could lock every administrator out, if it could."""
    try:
        config = client.call("GetConfig", pb.GetConfigRequest())
        users = client.call("ListUsers", pb.ListUsersRequest()).users
    except OtpgateError as exc:
        return f"otpgated is not reachable ({exc}): with fail=secure every login would be refused"
    if not (config.enabled and config.services.ssh):
        return None
    if config.enrollment_policy != pb.ENROLLMENT_POLICY_REQUIRED:
        return None
    admins, any_enrolled = doctor.unenrolled_admins((u.username for u in users), "otpgate-admin")
    if any_enrolled:
        return None
    return (
        f"2FA is required for SSH and no administrator ({', '.join(admins)}) is enrolled: "
        "every admin would be locked out (otpgate renew-secret USER)"
    )


def cmd_setup_ssh(client: Client, args: argparse.Namespace) -> int:
    paths = ssh_setup.Paths(
        pam_dir=args.pam_dir,
        sshd_config=args.sshd_config,
        sshd_config_dir=args.sshd_config_dir
        or os.path.join(os.path.dirname(args.sshd_config), "sshd_config.d"),
        sshd=args.sshd,
        backup_dir=args.backup_dir,
    )
    reload = ssh_setup.reload_sshd if args.reload else (lambda: "sshd not reloaded (--no-reload)")
    if args.undo:
        report = ssh_setup.undo(paths, dry_run=args.dry_run, reload=reload)
    else:
        if args.flow is None:
            raise InvalidArgument("--flow", f"required: one of {', '.join(ssh_setup.FLOWS)}")
        report = ssh_setup.setup(
            args.flow,
            paths,
            hook=args.hook or ssh_setup.default_hook(),
            hook_options=args.hook_options,
            prompt=args.prompt,
            lockout_risk=_lockout_risk(client),
            force=args.force,
            dry_run=args.dry_run,
            reload=reload,
        )
    for line in report:
        print(line)
    return EXIT_OK


# -- argument parsing ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error, with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"UsageError: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # SUPPRESS: the options work before or after the command without resetting each other.
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    common.add_argument(
        "--socket",
        default=argparse.SUPPRESS,
        help=f"daemon socket (default $OTPGATE_SOCKET or {DEFAULT_SOCKET})",
    )
    common.add_argument(
        "--password-stdin",
        action="store_true",
        default=argparse.SUPPRESS,
        help="as an ordinary user: read the password, then the code when one is needed, "
        "as lines on stdin instead of asking on the terminal",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds to wait for the daemon (default 10)",
    )

    parser = _Parser(
        prog="otpgate",
        parents=[common],
        description="Manage otpgate: two-factor (TOTP) settings and secrets for SSH logins.",
        epilog="Exit status: 0 success; 1 verify: code not accepted, doctor: problems found; "
        "2 error.",
    )
    parser.add_argument("--version", action="version", version=f"otpgate {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    def command(
        name: str, handler: Callable[[Client, argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    command("config", cmd_config, "show the global 2FA settings")
    update = command("update", cmd_update, "change global 2FA settings")
    update.add_argument(
        "assignments",
        nargs="+",
        metavar="KEY=VALUE",
        help="settings to change: " + ", ".join(UPDATE_KEYS),
    )
    qr_help = f"QR code of the URI: {qr.FORMATS} (default utf8 on a terminal, else none)"
    renew = command(
        "renew-secret",
        cmd_renew_secret,
        "create a new 2FA secret for USER (default: you); the old one stops working",
    )
    renew.add_argument("user", nargs="?", metavar="USER")
    renew.add_argument("--otp-digits", type=int, metavar="N", help="digits per code, 6..8")
    renew.add_argument("--interval", type=int, metavar="S", help="seconds per code, 5..120")
    renew.add_argument("--qr", metavar="FORMAT", help=qr_help)
    uri = command("provisioning-uri", cmd_provisioning_uri, "show USER's provisioning URI")
    uri.add_argument("user", nargs="?", metavar="USER")
    uri.add_argument("--qr", metavar="FORMAT", help=qr_help)
    verify = command(
        "verify", cmd_verify, "check a code for USER (default: you); prints true or false"
    )
    verify.add_argument(
        "words", nargs="+", metavar="[USER] TOKEN", help="TOKEN '-' reads the code from stdin"
    )
    unset = command("unset-secret", cmd_unset_secret, "remove USER's 2FA secret")
    unset.add_argument("user", metavar="USER")
    check = command(
        "doctor", cmd_doctor, "report unsafe or broken SSH wiring (exit 1 when it finds any)"
    )
    check.add_argument("--sshd", default="/usr/sbin/sshd", help="sshd binary (default %(default)s)")
    check.add_argument("--sshd-config", help="sshd configuration file (default: sshd's own)")
    check.add_argument("--pam-service", help="PAM service of sshd (default: the binary's name)")
    check.add_argument(
        "--pam-dir", default="/etc/pam.d", help="PAM directory (default %(default)s)"
    )
    # The common options also between the command and its subcommand (`user --json list`).
    setup = commands.add_parser("setup", parents=[common], help="wire otpgate into a service")
    setup_commands = setup.add_subparsers(dest="setup_command", metavar="SERVICE", required=True)
    wire = setup_commands.add_parser(
        "ssh",
        parents=[common],
        help="wire sshd to otpgate (backups, sshd -t, rollback on failure)",
        description="Write the PAM and sshd drop-in wiring for one flow, check it with sshd -t "
        "and doctor's checks, reload sshd; any failure restores the previous files.",
    )
    wire.set_defaults(handler=cmd_setup_ssh)
    wire.add_argument(
        "--flow", choices=ssh_setup.FLOWS, help="password, publickey or single-prompt"
    )
    wire.add_argument(
        "--prompt",
        choices=ssh_setup.PROMPTS,
        default="when-needed",
        help="when-needed: ask the code only of accounts that need one (one hook call more "
        "per login); always: ask every account, for the 'required' enrollment policy "
        "(default %(default)s)",
    )
    wire.add_argument("--undo", action="store_true", help="restore the files as before setup")
    wire.add_argument(
        "--dry-run", action="store_true", help="show what would change; change nothing"
    )
    wire.add_argument("--force", action="store_true", help="proceed despite a lockout risk")
    wire.add_argument("--hook", help="hook path (default: the installed one)")
    wire.add_argument("--hook-options", default="", help="options for the hook, e.g. 'fail=safe'")
    wire.add_argument("--no-reload", dest="reload", action="store_false", help="do not reload sshd")
    wire.add_argument("--sshd", default="/usr/sbin/sshd", help="sshd binary (default %(default)s)")
    wire.add_argument("--sshd-config", default="/etc/ssh/sshd_config", help="(default %(default)s)")
    wire.add_argument("--sshd-config-dir", help="drop-in directory (default: beside sshd_config)")
    wire.add_argument("--pam-dir", default="/etc/pam.d", help="(default %(default)s)")
    wire.add_argument(
        "--backup-dir", default="/var/lib/otpgate/setup-backup", help="(default %(default)s)"
    )
    user = commands.add_parser("user", parents=[common], help="show enrolled accounts")
    user_commands = user.add_subparsers(dest="user_command", metavar="COMMAND", required=True)
    show = user_commands.add_parser(
        "show", parents=[common], help="one account's 2FA state (default: yours)"
    )
    show.set_defaults(handler=cmd_user_show)
    show.add_argument("user", nargs="?", metavar="USER")
    listing = user_commands.add_parser("list", parents=[common], help="every enrolled account")
    listing.set_defaults(handler=cmd_user_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    socket_path = (
        getattr(args, "socket", None) or os.environ.get("OTPGATE_SOCKET") or DEFAULT_SOCKET
    )
    client = Client(
        socket_path,
        getattr(args, "timeout", 10.0),
        password_stdin=getattr(args, "password_stdin", False),
    )
    try:
        code: int = args.handler(client, args)
        return code
    except RpcFailed as exc:
        print(f"{exc.kind}: {exc}", file=sys.stderr)
    except OtpgateError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
