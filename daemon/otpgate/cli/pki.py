"""`otpgate pki`: the certificates of otpgated's mutual-TLS listener (otpgate.pki)
from the command line. Files only: these commands never talk to otpgated, so
main() runs them without connecting (`offline_handler`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO

from cryptography import x509

from otpgate import pki
from otpgate.cli import render
from otpgate.cli.commands import Result
from otpgate.errors import InvalidArgument

DEFAULT_DIR = "/etc/otpgate/pki"


class CommandFactory(Protocol):
    """main.build_parser's `command`: a subcommand with the common options."""

    def __call__(
        self,
        parent: argparse._SubParsersAction[Any],
        name: str,
        handler: Callable[..., Result] | None,
        help: str,
        description: str | None = None,
        *,
        full_name: str | None = None,
    ) -> argparse.ArgumentParser: ...


# -- results -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Initialized(Result):
    paths: pki.Paths
    ca: x509.Certificate
    server: x509.Certificate


@dataclasses.dataclass(frozen=True)
class ServerRenewed(Result):
    issued: pki.Issued


@dataclasses.dataclass(frozen=True)
class ClientIssued(Result):
    issued: pki.Issued
    ca_cert: Path


@dataclasses.dataclass(frozen=True)
class Revoked(Result):
    revocation: pki.Revocation


# -- arguments ---------------------------------------------------------------------------


def add_parser(commands_: argparse._SubParsersAction[Any], command: CommandFactory) -> None:
    """Register `otpgate pki` and its subcommands."""
    group = command(
        commands_,
        "pki",
        None,
        "certificates for otpgated's mutual-TLS listener (no daemon needed)",
        "Make and manage the certificates of otpgated's network listener: a private CA, "
        "otpgated's server certificate, one client certificate per person or host, and a "
        "CRL of revoked ones. A client certificate's common name (NAME) is looked up in "
        "otpgated.toml's [roles] table. Lifetimes: CA 3 years, server and client 90 days; "
        "re-issue before they end (`pki server`; `pki issue` under a new name, then revoke "
        "the old one). These commands only write files and never contact otpgated.",
    )
    subcommands = group.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)

    def sub(
        name: str, handler: Callable[[argparse.Namespace], Result], help: str, description: str
    ) -> argparse.ArgumentParser:
        parser = command(subcommands, name, None, help, description)
        parser.set_defaults(offline_handler=handler, command_name=f"pki {name}")
        return parser

    days = f"1 to {pki.MAX_DAYS}"
    init_ = sub(
        "init",
        init,
        "make a CA and otpgated's server certificate in DIR",
        "Make a new CA (ca.crt, ca.key) and a server certificate signed by it (server.crt, "
        "server.key) in DIR, made 0700 if missing. Keys are ECDSA P-256, written "
        "unencrypted with mode 0600 (otpgated reads its key unattended). Refuses a DIR that "
        "already holds any of the four files: a CA or key is never replaced.",
    )
    init_.add_argument("directory", metavar="DIR", help=f"the CA's directory, e.g. {DEFAULT_DIR}")
    _server_options(init_)
    init_.add_argument(
        "--ca-days",
        type=int,
        default=pki.CA_DAYS,
        metavar="N",
        help=f"the CA's lifetime in days, {days} (default %(default)s: 3 years)",
    )
    init_.add_argument(
        "--days",
        type=int,
        default=pki.SERVER_DAYS,
        metavar="N",
        help=f"the server certificate's lifetime in days, {days} (default %(default)s)",
    )

    server = sub(
        "server",
        server_,
        "renew otpgated's server certificate (new key, same CA)",
        "Replace server.crt and server.key in DIR with a new key and certificate signed by "
        "DIR's CA, each in one rename; then `systemctl reload otpgated`. Do it before the "
        "old one expires (90 days by default). Clients keep trusting ca.crt: nothing to "
        "change on their side.",
    )
    server.add_argument("directory", metavar="DIR", help="the CA's directory")
    _server_options(server)
    server.add_argument(
        "--days",
        type=int,
        default=pki.SERVER_DAYS,
        metavar="N",
        help=f"lifetime in days, {days} (default %(default)s)",
    )

    issue_ = sub(
        "issue",
        issue,
        "issue a client certificate for a person or host with a role",
        "Issue a client certificate and key for NAME (a person or an edge host), signed by "
        "the CA: NAME.crt (0644) and NAME.key (0600), never replacing existing files. NAME "
        f"(1 to {pki.MAX_NAME} letters, digits, . _ @ -) becomes the certificate's common "
        "name; otpgated grants the role of its line in [roles], which this prints. To "
        "renew, issue under a new name (or remove the old files first) before the old one "
        "expires, then revoke the old one.",
    )
    issue_.add_argument("name", metavar="NAME", help="who or what the certificate is for")
    issue_.add_argument(
        "--role", required=True, metavar="ROLE", help="one of " + ", ".join(pki.ROLES)
    )
    issue_.add_argument(
        "--dir",
        dest="directory",
        default=DEFAULT_DIR,
        metavar="DIR",
        help="the CA's directory (default %(default)s)",
    )
    issue_.add_argument(
        "--out", metavar="DIR", help="where NAME.crt and NAME.key go (default: the CA's directory)"
    )
    issue_.add_argument(
        "--days",
        type=int,
        default=pki.CLIENT_DAYS,
        metavar="N",
        help=f"lifetime in days, {days} (default %(default)s); never beyond the CA's",
    )

    revoke_ = sub(
        "revoke",
        revoke,
        "revoke a certificate: add it to DIR/crl.pem",
        "Add a certificate's serial to DIR/revoked.txt and re-sign DIR/crl.pem, which lists "
        "every revoked serial and is valid for 30 days. otpgated refuses a revoked client "
        'once its otpgated.toml has tls_crl = "DIR/crl.pem" and it was reloaded (SIGHUP: '
        "`systemctl reload otpgated`). Revoking again only re-signs the CRL.",
    )
    revoke_.add_argument("directory", metavar="DIR", help="the CA's directory")
    revoke_.add_argument(
        "serial",
        nargs="?",
        metavar="SERIAL_HEX",
        help="the serial in hex, as `pki issue` printed it (colons and 0x allowed)",
    )
    revoke_.add_argument(
        "--cert", metavar="FILE", help="read the serial from this certificate (of DIR's CA)"
    )


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name",
        required=True,
        metavar="HOST",
        help="otpgated's host name (or IP address), as clients connect to it",
    )
    parser.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name of the server (repeatable; *.example.org allowed)",
    )
    parser.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="an IP address clients may connect to (repeatable)",
    )


# Library arguments as the user typed them, so that an error names the option.
_SERVER_FLAGS = {
    "server_name": "--name",
    "dns_names": "--dns",
    "ip_addresses": "--ip",
    "ca_days": "--ca-days",
    "server_days": "--days",
    "days": "--days",
}
_CLIENT_FLAGS = {"name": "NAME", "role": "--role", "days": "--days", "out_dir": "--out"}
_REVOKE_FLAGS = {"serial": "SERIAL_HEX", "cert_file": "--cert"}


@contextlib.contextmanager
def _flags(names: Mapping[str, str]) -> Iterator[None]:
    try:
        yield
    except InvalidArgument as exc:
        if exc.field not in names:
            raise
        message = str(exc).removeprefix(f"{exc.field}: ")
        raise InvalidArgument(names[exc.field], message) from None


# -- the commands ------------------------------------------------------------------------


def init(args: argparse.Namespace) -> Initialized:
    with _flags(_SERVER_FLAGS):
        paths = pki.init(
            args.directory,
            server_name=args.name,
            dns_names=args.dns,
            ip_addresses=args.ip,
            ca_days=args.ca_days,
            server_days=args.days,
        )
    return Initialized(
        paths, pki.read_certificate(paths.ca_cert), pki.read_certificate(paths.server_cert)
    )


def server_(args: argparse.Namespace) -> ServerRenewed:
    with _flags(_SERVER_FLAGS):
        issued = pki.issue_server(
            args.directory,
            server_name=args.name,
            dns_names=args.dns,
            ip_addresses=args.ip,
            days=args.days,
        )
    return ServerRenewed(issued)


def issue(args: argparse.Namespace) -> ClientIssued:
    with _flags(_CLIENT_FLAGS):
        issued = pki.issue_client(
            args.directory, args.name, role=args.role, out_dir=args.out, days=args.days
        )
    return ClientIssued(issued, pki.Paths.of(args.directory).ca_cert)


def revoke(args: argparse.Namespace) -> Revoked:
    if (args.serial is None) == (args.cert is None):
        raise InvalidArgument("SERIAL_HEX", "give the serial or --cert FILE (one of them)")
    with _flags(_REVOKE_FLAGS):
        serial = None if args.serial is None else parse_serial(args.serial)
        revocation = pki.revoke(args.directory, serial=serial, cert_file=args.cert)
    return Revoked(revocation)


def parse_serial(text: str) -> int:
    """A serial as people copy it: hex, with or without 0x, colons or spaces
    (`openssl x509 -serial` prints 11:3C:DF...)."""
    digits = "".join(text.split()).replace(":", "").lower().removeprefix("0x")
    try:
        if not digits or not all(c in "0123456789abcdef" for c in digits):
            raise ValueError(text)
        return int(digits, 16)
    except ValueError:
        raise InvalidArgument("serial", f"not a hexadecimal serial: {text!r}") from None


# -- output ------------------------------------------------------------------------------


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json(data: Mapping[str, Any], out: TextIO) -> None:
    print(json.dumps(data, indent=2), file=out)


def _limited(issued: pki.Issued, err: TextIO) -> None:
    if issued.limited_by_ca:
        print(
            f"note: it ends with the CA, on {_when(issued.not_after)}: no certificate outlives "
            "the CA that signed it",
            file=err,
        )


@render.render.register
def _(result: Initialized, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    paths, ca, server = result.paths, result.ca, result.server
    if as_json:
        _json(
            {
                "directory": str(paths.directory),
                "ca_cert": str(paths.ca_cert),
                "ca_key": str(paths.ca_key),
                "server_cert": str(paths.server_cert),
                "server_key": str(paths.server_key),
                "ca_serial": f"{ca.serial_number:x}",
                "ca_expires": _when(ca.not_valid_after_utc),
                "server_serial": f"{server.serial_number:x}",
                "server_expires": _when(server.not_valid_after_utc),
            },
            out,
        )
        return
    print(f"wrote {paths.ca_cert} (CA, expires {_when(ca.not_valid_after_utc)})", file=out)
    print(f"wrote {paths.ca_key} (mode 0600: it signs every certificate)", file=out)
    print(
        f"wrote {paths.server_cert} (serial {server.serial_number:x}, expires "
        f"{_when(server.not_valid_after_utc)})",
        file=out,
    )
    print(f"wrote {paths.server_key} (mode 0600)", file=out)
    print("in otpgated.toml, beside listen:", file=out)
    print(f'tls_cert = "{paths.server_cert}"', file=out)
    print(f'tls_key = "{paths.server_key}"', file=out)
    print(f'tls_client_ca = "{paths.ca_cert}"', file=out)
    print(
        f"then, for each client: otpgate pki issue --dir {paths.directory} --role ROLE NAME",
        file=out,
    )


@render.render.register
def _(result: ServerRenewed, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    issued = result.issued
    if as_json:
        _json(_issued_dict(issued), out)
        return
    print(f"wrote {issued.cert}", file=out)
    print(f"wrote {issued.key} (mode 0600)", file=out)
    print(f"serial   {issued.serial:x}", file=out)
    print(f"expires  {_when(issued.not_after)}", file=out)
    print("then: systemctl reload otpgated (SIGHUP), for otpgated to use it", file=out)
    _limited(issued, err)


@render.render.register
def _(result: ClientIssued, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    issued = result.issued
    if as_json:
        _json({**_issued_dict(issued), "roles_line": issued.roles_line}, out)
        return
    print(f"wrote {issued.cert}", file=out)
    print(f"wrote {issued.key} (mode 0600: for {issued.name} only)", file=out)
    print(f"serial   {issued.serial:x}", file=out)
    print(f"expires  {_when(issued.not_after)}", file=out)
    if issued.role == "host":
        # An edge presents this certificate to its upstreams and checks theirs with
        # the same CA: the three files go to that host.
        print(
            f"copy them and {result.ca_cert} to that host; in its otpgated.toml: "
            "tls_cert, tls_key and upstream_ca",
            file=out,
        )
    print(
        "add under [roles] in the listener's otpgated.toml, then reload it "
        "(systemctl reload otpgated):",
        file=out,
    )
    print(issued.roles_line, file=out)
    _limited(issued, err)


@render.render.register
def _(result: Revoked, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    revocation = result.revocation
    if as_json:
        _json(
            {
                "serial": f"{revocation.serial:x}",
                "already_revoked": revocation.already_revoked,
                "crl": str(revocation.crl),
                "revoked_file": str(revocation.revoked_file),
                "revoked": [f"{s:x}" for s in revocation.serials],
                "next_update": _when(revocation.next_update),
            },
            out,
        )
        return
    again = " (already revoked: the CRL is re-signed)" if revocation.already_revoked else ""
    print(f"revoked {revocation.serial:x}{again}", file=out)
    count = len(revocation.serials)
    print(
        f"wrote {revocation.crl} ({count} serial{'s' if count != 1 else ''}, valid until "
        f"{_when(revocation.next_update)})",
        file=out,
    )
    print(
        f'set tls_crl = "{revocation.crl}" in otpgated.toml and send otpgated SIGHUP '
        "(systemctl reload otpgated)",
        file=out,
    )


def _issued_dict(issued: pki.Issued) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": issued.name,
        "cert": str(issued.cert),
        "key": str(issued.key),
        "serial": f"{issued.serial:x}",
        "not_before": _when(issued.not_before),
        "expires": _when(issued.not_after),
        "limited_by_ca": issued.limited_by_ca,
    }
    if issued.role is not None:
        data["role"] = issued.role
    return data
