"""otpgate: manage otpgate's 2FA settings and secrets (mirrors TrueNAS `auth two_factor`).

This module is the command line only: arguments, errors, exit status. The commands
are in commands.py, the transports in client.py, the output in render.py.

Exit status: 0 success (verify: the code was accepted); 1 verify: the code was
not accepted, doctor: problems found; 2 any error (bad usage, daemon unreachable,
request refused); 130 interrupted. A reader that stops reading (`| head -1`) does
not change it: the command has done its work by then.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from otpgate import __version__
from otpgate.cli import commands, qr, remote, render
from otpgate.cli import pki as pki_cli
from otpgate.cli.client import RpcFailed, connect
from otpgate.cli.commands import EXIT_ERROR, Result
from otpgate.cli.prompts import Secrets, StdinSecrets, TerminalSecrets
from otpgate.errors import InvalidArgument, OtpgateError
from otpgate.ssh import setup as ssh_setup

DEFAULT_SOCKET = "/run/otpgate/admin.sock"
DEFAULT_TIMEOUT = 10.0
TIMEOUT_BOUNDS = (0.1, 3600.0)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as the shells report it

Handler = Callable[..., Result]


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
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"daemon socket (default $OTPGATE_SOCKET or {DEFAULT_SOCKET}); given, it also "
        "wins over the profile's server",
    )
    common.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="a central otpgated's network listener, over mutual TLS, instead of a socket: "
        "the admin commands as your certificate's role allows (doctor and setup ssh stay "
        "local). Default: `server` in $XDG_CONFIG_HOME/otpgate/remote.toml (else "
        "~/.config/otpgate/remote.toml) unless --socket or $OTPGATE_SOCKET is given; that "
        "profile may also set tls_ca, tls_cert, tls_key and tls_server_name, paths relative "
        "to it; flags win",
    )
    common.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="with --server: the CA (PEM) otpgated's certificate must chain to",
    )
    common.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="with --server: your client certificate (PEM), e.g. from `otpgate pki issue`",
    )
    common.add_argument(
        "--tls-key",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="with --server: its private key (PEM, unencrypted; refused when others may "
        "read it: chmod 600)",
    )
    common.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="with --server: the name to check in otpgated's certificate instead of HOST "
        "(when HOST is an address the certificate does not name)",
    )
    common.add_argument(
        "--password-stdin",
        action="store_true",
        default=argparse.SUPPRESS,
        help="as an ordinary user: read the password, then the code when one is needed, "
        "as lines on stdin instead of asking on the terminal",
    )
    low, high = TIMEOUT_BOUNDS
    common.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help=f"seconds to wait for each answer of the daemon, {low:g} to {high:g} "
        f"(default {DEFAULT_TIMEOUT:g})",
    )

    parser = _Parser(
        prog="otpgate",
        parents=[common],
        description="Manage otpgate: two-factor (TOTP) settings and secrets for SSH logins.",
        epilog="Exit status: 0 success; 1 verify: code not accepted, doctor: problems found; "
        "2 error.",
    )
    parser.add_argument("--version", action="version", version=f"otpgate {__version__}")
    commands_ = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    def command(
        parent: argparse._SubParsersAction[Any],
        name: str,
        handler: Handler | None,
        help: str,
        description: str | None = None,
        *,
        full_name: str | None = None,
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name, parents=[common], help=help, description=description or help
        )
        if handler is not None:
            # The name goes into messages: "user list needs admin rights...".
            sub.set_defaults(handler=handler, command_name=full_name or name)
        return sub

    command(commands_, "config", commands.config, "show the global 2FA settings")
    update = command(
        commands_,
        "update",
        commands.update,
        "change global 2FA settings",
        "Change global 2FA settings, all or nothing. Booleans are true or false (yes, no, "
        "on, off, 1 and 0 also work); issuer= (empty) goes back to otpgated's default "
        "issuer.",
    )
    update.add_argument(
        "assignments",
        nargs="+",
        metavar="KEY=VALUE",
        help="settings to change: " + ", ".join(commands.UPDATE_KEYS),
    )
    qr_help = f"QR code of the URI: {qr.FORMATS} (default utf8 on a terminal, else none)"
    renew = command(
        commands_,
        "renew-secret",
        commands.renew_secret,
        "create a new 2FA secret for USER (default: you), to confirm with a code",
        "Create a new 2FA secret for USER (default: you) and show its URI and QR code. It "
        "waits (15 minutes) for `otpgate confirm [USER] CODE` with a code from it; until "
        "then the current secret, if any, keeps working. --now replaces it at once.",
    )
    renew.add_argument("user", nargs="?", metavar="USER")
    renew.add_argument(
        "--now", action="store_true", help="replace the secret at once, without confirmation"
    )
    renew.add_argument("--otp-digits", type=int, metavar="N", help="digits per code, 6..8")
    renew.add_argument("--interval", type=int, metavar="S", help="seconds per code, 5..120")
    renew.add_argument("--qr", metavar="FORMAT", help=qr_help)
    uri = command(
        commands_, "provisioning-uri", commands.provisioning_uri, "show USER's provisioning URI"
    )
    uri.add_argument("user", nargs="?", metavar="USER")
    uri.add_argument("--qr", metavar="FORMAT", help=qr_help)
    verify = command(
        commands_,
        "verify",
        commands.verify,
        "check a code for USER (default: you); prints true or false",
        "Check a code for USER (default: you); prints true or false. A right code is spent: "
        "it is never accepted twice. As an ordinary user the code is your login's second "
        "factor (you are asked for your password only).",
    )
    verify.add_argument("user", nargs="?", metavar="USER", help="the account (default: you)")
    verify.add_argument("token", metavar="TOKEN", help="the code; '-' reads it from stdin")
    confirm = command(
        commands_,
        "confirm",
        commands.confirm,
        "confirm USER's new secret (renew-secret) with a code from it",
        "Make USER's pending secret (from renew-secret) the one in use, given a current code "
        "from it; that code is spent and the old secret stops working.",
    )
    confirm.add_argument("user", nargs="?", metavar="USER", help="the account (default: you)")
    confirm.add_argument("token", metavar="CODE", help="a code from the new secret; '-': stdin")
    unset = command(commands_, "unset-secret", commands.unset_secret, "remove USER's 2FA secret")
    unset.add_argument("user", metavar="USER")
    unlock = command(
        commands_,
        "unlock",
        commands.unlock,
        "clear USER's lockout (the secret stays)",
        "Clear USER's lockout and count of wrong codes; the secret, its spent codes and its "
        "recovery codes stay as they are.",
    )
    unlock.add_argument("user", metavar="USER")
    codes = command(
        commands_,
        "recovery-codes",
        commands.recovery_codes,
        "make a new set of recovery codes for USER (default: you); shown once",
        "Make 10 new one-time recovery codes for USER (default: you), replacing any earlier "
        "set, and show them once: only keyed hashes are kept. Each works once wherever a "
        "code is asked (the SSH prompt too) and counts toward the lockout like any code. "
        "As an ordinary user you are asked for your password and a code first.",
    )
    codes.add_argument("user", nargs="?", metavar="USER")
    check = command(
        commands_,
        "doctor",
        commands.doctor,
        "report unsafe or broken SSH wiring (exit 1 when it finds any)",
        "Report unsafe or broken SSH wiring, one line each: sshd's effective configuration "
        "(sshd -T), sshd's PAM stack, otpgated's sockets and enrolled administrators. "
        "Exit 1 when it finds any.",
    )
    check.add_argument("--sshd", default="/usr/sbin/sshd", help="sshd binary (default %(default)s)")
    check.add_argument("--sshd-config", help="sshd configuration file (default: sshd's own)")
    check.add_argument("--pam-service", help="PAM service of sshd (default: the binary's name)")
    check.add_argument(
        "--pam-dir", default="/etc/pam.d", help="PAM directory (default %(default)s)"
    )
    # The common options also between the command and its subcommand (`user --json list`).
    setup = command(
        commands_,
        "setup",
        None,
        "wire otpgate into a service",
        "Wire otpgate into a service's login; `setup ssh --help` tells how.",
    )
    setup_commands = setup.add_subparsers(dest="setup_command", metavar="SERVICE", required=True)
    wire = command(
        setup_commands,
        "ssh",
        commands.setup_ssh,
        "wire sshd to otpgate (backups, sshd -t, rollback on failure)",
        "Write the PAM and sshd drop-in wiring for one flow, check it with sshd -t "
        "and doctor's checks, reload sshd; any failure restores the previous files.",
        full_name="setup ssh",
    )
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
        "--dry-run",
        action="store_true",
        help="change nothing; show what would be written, as a diff against today's files",
    )
    wire.add_argument("--force", action="store_true", help="proceed despite a lockout risk")
    wire.add_argument("--hook", help="hook path (default: the installed one)")
    wire.add_argument("--hook-options", default="", help="options for the hook, e.g. 'fail=safe'")
    wire.add_argument("--no-reload", dest="reload", action="store_false", help="do not reload sshd")
    wire.add_argument("--sshd", default="/usr/sbin/sshd", help="sshd binary (default %(default)s)")
    wire.add_argument(
        "--sshd-config",
        default="/etc/ssh/sshd_config",
        help="sshd's main configuration file; it must Include the drop-in directory "
        "(default %(default)s)",
    )
    wire.add_argument(
        "--sshd-config-dir",
        help="where the sshd drop-in otpgate.conf goes (default: sshd_config.d beside "
        "--sshd-config)",
    )
    wire.add_argument(
        "--pam-dir",
        default="/etc/pam.d",
        help="directory of sshd's PAM service file, where otpgate's snippet goes too "
        "(default %(default)s)",
    )
    wire.add_argument(
        "--backup-dir",
        default="/var/lib/otpgate/setup-backup",
        help="where the files as they were before setup are kept for --undo (default %(default)s)",
    )
    trail = command(
        commands_,
        "audit",
        commands.audit,
        "the audit trail, newest first",
        "The audit trail, newest first: enrollments, confirmations, renewals, removals, "
        "unlocks, lockouts, recovery codes made and used, verifications, logins and settings "
        "changed, each with its time, host, path (admin, user, pam:SERVICE) and caller where "
        "known. Never a code, secret or password.",
    )
    trail.add_argument("--user", metavar="USER", help="one account's events only")
    trail.add_argument(
        "--since", metavar="WHEN", help="from this time on: 2026-12-01, 2026-12-01T10:30, epoch s"
    )
    trail.add_argument("--until", metavar="WHEN", help="before this time")
    trail.add_argument("--limit", type=int, metavar="N", help="at most N events (default 100)")
    command(
        commands_,
        "rotate-key",
        commands.rotate_key,
        "re-seal every secret under otpgated's key, while it serves",
        "Re-seal every secret under the key otpgated was started with, after it was "
        "restarted with the previous key as old_key_file (--old-key-file, or the systemd "
        "credential otpgate.key.old). Safe to interrupt and run again; exit 0 when nothing "
        "needs the old key any more, 1 when something still does.",
    )
    take_over = command(
        commands_,
        "import",
        None,
        "take over tokens from google-authenticator or pam_oath",
        "Take over the tokens of another PAM module so that the same phones keep working: "
        "`import google-authenticator --user USER FILE` or `import oath-users FILE`. All or "
        "nothing; --dry-run reports and changes nothing. The plaintext file is never removed "
        "by otpgate: remove it yourself afterwards.",
    )
    import_commands = take_over.add_subparsers(
        dest="import_command", metavar="FORMAT", required=True
    )
    ga = command(
        import_commands,
        "google-authenticator",
        commands.import_google_authenticator,
        "a ~/.google_authenticator file, for one account",
        "Import one account's google-authenticator-libpam file: its secret, step size, spent "
        "codes (DISALLOW_REUSE) and scratch codes (which become recovery codes). HOTP files "
        "are refused. WINDOW_SIZE, RATE_LIMIT and a learnt time skew are compared with "
        "otpgate's settings and reported, not imported.",
        full_name="import google-authenticator",
    )
    ga.add_argument("--user", required=True, metavar="USER", help="the account the file is for")
    ga.add_argument("file", metavar="FILE", help="e.g. /home/USER/.google_authenticator")
    ga.add_argument("--dry-run", action="store_true", help="report what would be imported")
    oath = command(
        import_commands,
        "oath-users",
        commands.import_oath_users,
        "a pam_oath users.oath file, every account in it",
        "Import every time-based (HOTP/T...) token of a pam_oath usersfile, with its last "
        "used code; counter-based (HOTP) tokens and tokens with a PIN are skipped and "
        "reported.",
        full_name="import oath-users",
    )
    oath.add_argument("file", metavar="FILE", help="e.g. /etc/users.oath")
    oath.add_argument("--dry-run", action="store_true", help="report what would be imported")
    oath.add_argument(
        "--timezone",
        metavar="ZONE",
        help="time zone pam_oath wrote its times in (default: this host's, as pam_oath does)",
    )
    user = command(
        commands_,
        "user",
        None,
        "show enrolled accounts",
        "Show accounts: one account's 2FA state, or every enrolled one.",
    )
    user_commands = user.add_subparsers(dest="user_command", metavar="COMMAND", required=True)
    show = command(
        user_commands,
        "show",
        commands.user_show,
        "one account's 2FA state (default: yours)",
        "One account's NSS facts and 2FA state (default: yours): its secret's digits and "
        "interval, wrong codes in a row, and how long a lock has left. For an admin, also "
        "whether an SSH login would be asked for a code, and why (the access policy: "
        "exempt_networks, exempt_groups, required_groups, enrollment_policy and "
        "enrollment_deadline).",
        full_name="user show",
    )
    show.add_argument("user", nargs="?", metavar="USER")
    show.add_argument(
        "--from",
        dest="from_address",
        metavar="ADDR",
        help="explain a login from this source address (PAM_RHOST: an IP address or a "
        "host name); default: an address that no exempt network holds",
    )
    command(
        user_commands,
        "list",
        commands.user_list,
        "every enrolled account",
        "Every enrolled account, by username: digits, interval, wrong codes, lock.",
        full_name="user list",
    )
    pki_cli.add_parser(commands_, command)  # files only: run without a daemon (main)
    return parser


def _timeout(value: float) -> float:
    low, high = TIMEOUT_BOUNDS
    if not low <= value <= high:  # also NaN
        raise InvalidArgument(
            "--timeout", f"must be from {low:g} to {high:g} seconds (got {value:g})"
        )
    return value


# -- running a command -----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    socket_given = bool(getattr(args, "socket", None))  # before the default (cli.remote)
    args.socket = (
        getattr(args, "socket", None) or os.environ.get("OTPGATE_SOCKET") or DEFAULT_SOCKET
    )
    secrets: Secrets = (
        StdinSecrets() if getattr(args, "password_stdin", False) else TerminalSecrets()
    )
    try:
        if hasattr(args, "offline_handler"):  # otpgate pki: needs no daemon, so no connect
            return _present(args.offline_handler(args), as_json=args.json)
        timeout = _timeout(getattr(args, "timeout", DEFAULT_TIMEOUT))
        target = remote.choose(
            args, os.environ, socket_given=socket_given, command=args.command_name
        )
        client = connect(
            args.socket, timeout, command=args.command_name, secrets=secrets, remote=target
        )
        try:
            result: Result = args.handler(client, args)
        finally:
            client.close()
        return _present(result, as_json=args.json)
    except RpcFailed as exc:
        print(f"{exc.kind}: {exc}", file=sys.stderr)
    except OtpgateError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line a prompt left open
        return EXIT_INTERRUPTED
    return EXIT_ERROR


def _present(result: Result, *, as_json: bool) -> int:
    try:
        render.render(result, as_json=as_json, out=sys.stdout, err=sys.stderr)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head -1`): nothing more to show, and the command has
        # done its work (a secret renewed stays renewed), so its status stands. Python
        # would flush stdout again at exit and complain: point it at /dev/null first,
        # as Python's documentation on SIGPIPE recommends.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return result.status


if __name__ == "__main__":
    sys.exit(main())
