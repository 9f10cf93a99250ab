"""Certificates for otpgated's mutual-TLS listener: a private CA, the server's
certificate, one client certificate per person or host, and a CRL.

One directory holds the CA and everything it signs:

    ca.crt  ca.key          the CA (ECDSA P-256, 3 years by default)
    server.crt server.key   otpgated's certificate (90 days by default)
    revoked.txt             the revoked serials, one lowercase hex serial a line
    crl.pem                 a CRL signed by the CA listing them (tls_crl)

A client certificate's common name is what otpgated maps to a role in its
`[roles]` table; the OU carries the role it was issued for, for people reading
the certificate only: the server's table is the authority, so that a role can be
taken away without revoking anything.

Keys are PEM PKCS#8 *without* a passphrase: otpgated reads its key unattended at
start and on SIGHUP, so a passphrase would have to lie next to the key anyway.
They are protected by their mode (0600, set when the file is created, never
after) and by the directory's (0700). No file is ever overwritten in place: a
replaced file is written beside it and renamed over it, and a key or certificate
that exists is never replaced except by `issue_server`, the documented renewal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otpgate.errors import ConfigError, FailedPrecondition, InvalidArgument

ROLES = ("admin", "helpdesk", "auditor", "host")

CA_DAYS = 1095
SERVER_DAYS = 90
CLIENT_DAYS = 90
CRL_DAYS = 30
MAX_DAYS = 3650
MAX_NAME = 64  # ub-common-name (RFC 5280): the longest common name there may be

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
REVOKED, CRL = "revoked.txt", "crl.pem"

# A client's name becomes a file name and a TOML key: nothing that needs quoting in
# either, and no leading dot or dash (a hidden file, an option to the shell tools).
_CLIENT_NAME = re.compile(r"[A-Za-z0-9@_][A-Za-z0-9._@-]*")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# Clocks of the hosts that check a certificate may be behind the one that made it.
_BACKDATE = dt.timedelta(minutes=5)
_MAX_SERIAL = 2**159  # 20 octets of a positive DER INTEGER (RFC 5280, 4.1.2.2)


@dataclasses.dataclass(frozen=True)
class Paths:
    """The files of a CA directory, whether they exist or not."""

    directory: Path

    @classmethod
    def of(cls, directory: str | os.PathLike[str]) -> Paths:
        return cls(Path(os.path.abspath(directory)))

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY

    @property
    def revoked(self) -> Path:
        return self.directory / REVOKED

    @property
    def crl(self) -> Path:
        return self.directory / CRL


@dataclasses.dataclass(frozen=True)
class Issued:
    """A certificate and key written; role is None for the server's."""

    name: str
    cert: Path
    key: Path
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    role: str | None = None
    # The lifetime asked for would have outlived the CA: cut to the CA's expiry.
    limited_by_ca: bool = False

    @property
    def roles_line(self) -> str | None:
        """The line for otpgated.toml's [roles] table (None for the server)."""
        return None if self.role is None else f'"{self.name}" = "{self.role}"'


@dataclasses.dataclass(frozen=True)
class Revocation:
    serial: int
    crl: Path
    revoked_file: Path
    serials: tuple[int, ...]  # every serial the CRL lists, in the order revoked
    already_revoked: bool
    next_update: dt.datetime


# -- the public operations ---------------------------------------------------------------


def init(
    directory: str | os.PathLike[str],
    *,
    server_name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    ca_days: int = CA_DAYS,
    server_days: int = SERVER_DAYS,
    ca_name: str = "otpgate CA",
) -> Paths:
    """A new CA in `directory` (made 0700 when missing) and a server certificate
    signed by it. Refuses a directory that already holds any of the four files."""
    paths = Paths.of(directory)
    _days("ca_days", ca_days)
    _days("server_days", server_days)
    sans = _server_sans(server_name, dns_names, ip_addresses)
    _common_name("ca_name", ca_name)
    present = [p.name for p in _ca_files(paths) if os.path.lexists(p)]
    if present:
        raise FailedPrecondition(
            f"{paths.directory} already holds {', '.join(present)}: otpgate pki init never "
            "replaces a CA or a key (renew the server certificate with `otpgate pki server`, "
            "or choose another directory for a new CA)"
        )
    now = _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=ca_days))
        # path_length=0: the CA signs end-entity certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key, server_cert, _ = _server_certificate(
        ca_cert, ca_key, server_name, sans, server_days, now
    )
    created = _make_directory(paths.directory)
    written: list[Path] = []
    try:
        # The CA key last: an init killed part-way never leaves a CA key without its
        # certificate. On any error what this wrote is removed, so it can run again.
        for path, data, mode in (
            (paths.ca_cert, _cert_pem(ca_cert), 0o644),
            (paths.server_key, _key_pem(server_key), 0o600),
            (paths.server_cert, _cert_pem(server_cert), 0o644),
            (paths.ca_key, _key_pem(ca_key), 0o600),
        ):
            _write_new(path, data, mode)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            _remove_if_empty(paths.directory)
        raise
    return paths


def issue_server(
    directory: str | os.PathLike[str],
    *,
    server_name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int = SERVER_DAYS,
) -> Issued:
    """Renew otpgated's certificate: a new key and server.crt under the existing CA,
    each replacing the old file in one rename (otpgated picks them up on SIGHUP)."""
    paths = Paths.of(directory)
    _days("days", days)
    sans = _server_sans(server_name, dns_names, ip_addresses)
    ca_cert, ca_key = _load_ca(paths)
    now = _now()
    key, cert, limited = _server_certificate(ca_cert, ca_key, server_name, sans, days, now)
    # The key first: a reader between the two renames pairs the new key with the old
    # certificate and fails to start TLS, which it reports; the other order would be
    # no better. otpgated reads both only on start and SIGHUP, after this returns.
    _replace(paths.server_key, _key_pem(key), 0o600)
    _replace(paths.server_cert, _cert_pem(cert), 0o644)
    return Issued(
        name=server_name,
        cert=paths.server_cert,
        key=paths.server_key,
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        limited_by_ca=limited,
    )


def issue_client(
    directory: str | os.PathLike[str],
    name: str,
    *,
    role: str,
    out_dir: str | os.PathLike[str] | None = None,
    days: int = CLIENT_DAYS,
    not_before: dt.datetime | None = None,
) -> Issued:
    """A client certificate and key for `name` (a person or a host) with `role`,
    signed by the CA in `directory`, written as NAME.crt (0644) and NAME.key (0600)
    in `out_dir` (default: `directory`). Never replaces an existing file.

    `not_before` (timezone-aware) starts the certificate then instead of now, for
    example in the past to make one that has already expired."""
    paths = Paths.of(directory)
    client_name(name)
    if role not in ROLES:
        raise InvalidArgument("role", f"must be one of {', '.join(ROLES)} (got {role!r})")
    _days("days", days)
    if not_before is not None and not_before.utcoffset() is None:
        raise InvalidArgument("not_before", "must be timezone-aware (e.g. in UTC)")
    target = Path(os.path.abspath(out_dir)) if out_dir is not None else paths.directory
    cert_path, key_path = target / f"{name}.crt", target / f"{name}.key"
    present = [str(p) for p in (cert_path, key_path) if os.path.lexists(p)]
    if present:
        raise FailedPrecondition(
            f"{' and '.join(present)} already there: never replaced (revoke the old "
            "certificate and remove its files first, or issue under another name)"
        )
    ca_cert, ca_key = _load_ca(paths)
    now = _now()
    if not_before is None:
        start, end = now - _BACKDATE, now + dt.timedelta(days=days)
    else:
        start = not_before.astimezone(dt.UTC)
        end = start + dt.timedelta(days=days)
    end, limited = _within_ca(ca_cert, end, now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    cert = (
        _leaf(ca_cert, key.public_key(), subject, start, end)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    created = _make_directory(target)
    try:
        _write_new(key_path, _key_pem(key), 0o600)
        try:
            _write_new(cert_path, _cert_pem(cert), 0o644)
        except BaseException:
            key_path.unlink(missing_ok=True)
            raise
    except BaseException:
        if created:
            _remove_if_empty(target)
        raise
    return Issued(
        name=name,
        cert=cert_path,
        key=key_path,
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        role=role,
        limited_by_ca=limited,
    )


def revoke(
    directory: str | os.PathLike[str],
    serial: int | None = None,
    cert_file: str | os.PathLike[str] | None = None,
) -> Revocation:
    """Add a serial (given, or read from a certificate this CA issued) to revoked.txt
    and re-sign crl.pem with every revoked serial. Revoking twice changes nothing but
    the CRL's dates and number."""
    paths = Paths.of(directory)
    if (serial is None) == (cert_file is None):
        raise InvalidArgument("serial", "give a serial or a certificate file (one of them)")
    ca_cert, ca_key = _load_ca(paths)
    if cert_file is not None:
        cert = _read_certificate("cert_file", Path(cert_file))
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise InvalidArgument(
                "cert_file", f"{cert_file} was not issued by the CA in {paths.directory}"
            ) from exc
        serial = cert.serial_number
    assert serial is not None
    if not 0 < serial < _MAX_SERIAL:
        raise InvalidArgument("serial", f"must be positive and at most 20 octets (got {serial:x})")
    if serial == ca_cert.serial_number:
        raise InvalidArgument(
            "serial",
            f"{serial:x} is the CA's own certificate: a CA cannot revoke itself (make a new "
            "one with `otpgate pki init` in another directory)",
        )
    serials = _read_revoked(paths.revoked)
    already = serial in serials
    if not already:
        serials.append(serial)
        _replace(paths.revoked, "".join(f"{s:x}\n" for s in serials).encode(), 0o644)
    now = _now()
    previous = _previous_crl(paths, ca_cert)
    dates = (
        {r.serial_number: r.revocation_date_utc for r in previous} if previous is not None else {}
    )
    number = _crl_number(previous) + 1 if previous is not None else 1
    next_update = now + dt.timedelta(days=CRL_DAYS)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    for s in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(s)
            # A serial revoked earlier keeps its date: it says since when it is untrusted.
            .revocation_date(dates.get(s, now))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _replace(paths.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return Revocation(
        serial=serial,
        crl=paths.crl,
        revoked_file=paths.revoked,
        serials=tuple(serials),
        already_revoked=already,
        next_update=next_update,
    )


def load_crl_serials(
    crl_path: str | os.PathLike[str], ca_cert_path: str | os.PathLike[str]
) -> frozenset[int]:
    """The serials a CRL (PEM or DER) revokes, once it is known to be signed by the CA
    of `ca_cert_path` (or by one of them: a PEM bundle, as tls_client_ca may be, while
    an old and a new CA overlap). ConfigError, naming the file, for anything else: a
    CRL anyone could write would let them revoke nobody.

    The CRL's next_update is not enforced here: whether a stale list is refused or
    only reported is the caller's decision (`otpgate pki revoke` re-signs it)."""
    issuers = _read_ca_bundle(Path(ca_cert_path))
    crl = _read_crl(Path(crl_path))
    if not any(crl.issuer == ca.subject and _crl_signed_by(crl, ca) for ca in issuers):
        raise ConfigError(f"{crl_path}: the CRL is not signed by the CA of {ca_cert_path}")
    return frozenset(r.serial_number for r in crl)


class IdentityProblem(Exception):
    """What is wrong with a certificate and its key; `part` is "cert" or "key", so that
    each caller can name its own setting (tls_cert, --tls-key, ...)."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part


_USAGES = {"client": ExtendedKeyUsageOID.CLIENT_AUTH, "server": ExtendedKeyUsageOID.SERVER_AUTH}


def check_identity(
    cert_pem: bytes, key_pem: bytes, *, usage: str, now: dt.datetime | None = None
) -> x509.Certificate:
    """The leaf certificate of `cert_pem`, once its key is `key_pem` (PEM, without a
    passphrase), it is valid now and it is made for `usage` ("client" or "server").

    gRPC itself finds none of this out before a handshake, and then says only that
    the socket closed, which an edge would read as "the central is away": every one
    of these is a broken file, refused at a start or a reload."""
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except (ValueError, IndexError):
        raise IdentityProblem("cert", "holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise IdentityProblem("key", "is encrypted: otpgate needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityProblem("key", "holds no PEM private key otpgate can use") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise IdentityProblem("key", "is not the key of the certificate")
    moment = now or dt.datetime.now(dt.UTC)
    if leaf.not_valid_after_utc < moment:
        raise IdentityProblem(
            "cert",
            f"expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: ask for a new one "
            "(otpgate pki issue; for a server, otpgate pki server)",
        )
    if leaf.not_valid_before_utc > moment:
        raise IdentityProblem(
            "cert",
            f"is valid only from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(is this clock right?)",
        )
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise IdentityProblem("cert", f"names no extended key usage (needs {usage}Auth)") from None
    if _USAGES[usage] not in usages:
        raise IdentityProblem("cert", f"is not made for {usage} authentication ({usage}Auth)")
    return leaf


def is_client_name(name: str) -> bool:
    """Whether `name` is one `issue_client` could have given (and [roles] may name)."""
    return len(name) <= MAX_NAME and _CLIENT_NAME.fullmatch(name) is not None


def read_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """A certificate from a PEM or DER file; ConfigError naming the file if it is not one."""
    return _read_certificate_config(Path(path))


def client_name(name: str) -> str:
    """`name` if it can be a client certificate's name, else InvalidArgument."""
    if not name:
        raise InvalidArgument("name", "must not be empty")
    if len(name) > MAX_NAME:
        raise InvalidArgument("name", f"must be at most {MAX_NAME} characters (got {len(name)})")
    if not _CLIENT_NAME.fullmatch(name):
        raise InvalidArgument(
            "name",
            f"may hold only letters, digits and . _ @ - and must not start with . or - "
            f"(got {name!r}): it becomes a file name and a key of [roles]",
        )
    return name


# -- validation --------------------------------------------------------------------------


def _days(field: str, days: int) -> None:
    if not 1 <= days <= MAX_DAYS:
        raise InvalidArgument(field, f"must be from 1 to {MAX_DAYS} days (got {days})")


def _common_name(field: str, value: str) -> None:
    if not 1 <= len(value) <= MAX_NAME:
        raise InvalidArgument(field, f"must be 1 to {MAX_NAME} characters (got {len(value)})")


def _dns_name(field: str, name: str, *, wildcard: bool) -> str:
    labels = name.split(".")
    if wildcard and labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    if not (
        name.isascii() and len(name) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels)
    ):
        raise InvalidArgument(
            field, f"not a DNS name (ASCII labels of letters, digits and -): {name!r}"
        )
    return name


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument("ip_addresses", f"not an IP address: {text!r}") from None


def _server_sans(
    server_name: str, dns_names: Iterable[str], ip_addresses: Iterable[str]
) -> list[x509.GeneralName]:
    """The server's subjectAltNames: its name first, each name once. A name that is an
    IP address (`--name 10.0.0.5`) goes in as one, where clients look for it."""
    _common_name("server_name", server_name)
    names: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    try:
        ips.append(ipaddress.ip_address(server_name))
    except ValueError:
        names.append(_dns_name("server_name", server_name, wildcard=False))
    names += [_dns_name("dns_names", n, wildcard=True) for n in dns_names]
    ips += [_ip(a) for a in ip_addresses]
    general: list[x509.GeneralName] = [x509.DNSName(n.lower()) for n in names]
    general += [x509.IPAddress(a) for a in ips]
    return list(dict.fromkeys(general))


# -- certificates ------------------------------------------------------------------------


def _now() -> dt.datetime:
    # Whole seconds: what the certificate will hold anyway.
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _key_usage(
    *, key_cert_sign: bool = False, crl_sign: bool = False, digital_signature: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_issuer_key(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _leaf(
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    subject: x509.Name,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    """What a server and a client certificate have in common."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )


def _server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    server_name: str,
    sans: list[x509.GeneralName],
    days: int,
    now: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, bool]:
    end, limited = _within_ca(ca_cert, now + dt.timedelta(days=days), now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)])
    cert = (
        _leaf(ca_cert, key.public_key(), subject, now - _BACKDATE, end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert, limited


def _within_ca(
    ca_cert: x509.Certificate, not_after: dt.datetime, now: dt.datetime
) -> tuple[dt.datetime, bool]:
    """`not_after`, or the CA's expiry if that comes first: a certificate is never
    valid longer than what vouches for it."""
    ca_end = ca_cert.not_valid_after_utc
    if ca_end <= now:
        raise FailedPrecondition(
            f"the CA expired on {ca_end.isoformat()}: make a new one with `otpgate pki init` "
            "in another directory"
        )
    if not_after > ca_end:
        return ca_end, True
    return not_after, False


def _issuer_key(ca_cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = ca_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"the CA's key is {type(key).__name__}, not ECDSA as otpgate makes it")
    return key


def _crl_signed_by(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(_issuer_key(ca_cert))
    except ConfigError:
        return False


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted on purpose (see the module's docstring): the file's mode protects it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# -- reading -----------------------------------------------------------------------------


def _ca_files(paths: Paths) -> tuple[Path, ...]:
    return (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)


def _load_ca(paths: Paths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not paths.ca_key.exists() or not paths.ca_cert.exists():
        raise FailedPrecondition(
            f"no CA in {paths.directory} ({CA_CERT} and {CA_KEY}): make one with `otpgate pki init`"
        )
    cert = _read_certificate_config(paths.ca_cert)
    try:
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{paths.ca_key}: {exc.strerror}") from None
    except TypeError:
        raise ConfigError(
            f"{paths.ca_key}: the key is encrypted; otpgate pki needs it unencrypted"
        ) from None
    except ValueError:
        raise ConfigError(f"{paths.ca_key}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(f"{paths.ca_key} is not the key of {paths.ca_cert}")
    return cert, key


def _read_certificate(field: str, path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(field, f"{path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise InvalidArgument(field, f"{path}: not a certificate (PEM or DER)") from None


def _read_certificate_config(path: Path) -> x509.Certificate:
    try:
        return _read_certificate("certificate", path)
    except InvalidArgument as exc:
        raise ConfigError(str(exc).removeprefix(f"{exc.field}: ")) from None


def _read_ca_bundle(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        return [_read_certificate_config(path)]  # DER holds one certificate
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{path}: not a certificate (PEM or DER)") from None


def _read_crl(path: Path) -> x509.CertificateRevocationList:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise ConfigError(f"{path}: not a CRL (PEM or DER)") from None


def _previous_crl(paths: Paths, ca_cert: x509.Certificate) -> x509.CertificateRevocationList | None:
    """The CRL there is, if this CA signed it: where earlier revocation dates and the
    CRL number come from. One that is damaged or foreign is replaced, not trusted."""
    if not paths.crl.exists():
        return None
    try:
        crl = _read_crl(paths.crl)
    except ConfigError:
        return None
    return crl if crl.issuer == ca_cert.subject and _crl_signed_by(crl, ca_cert) else None


def _read_revoked(path: Path) -> list[int]:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    serials: list[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            serial = int(line.strip(), 16)
        except ValueError:
            raise ConfigError(f"{path}, line {number}: not a hex serial: {line!r}") from None
        if serial not in serials:
            serials.append(serial)
    return serials


# -- writing -----------------------------------------------------------------------------


def _make_directory(directory: Path) -> bool:
    """Make `directory` 0700 if it is missing; True if it was made. One that exists
    keeps its mode: it may be a home directory, not ours to change."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise FailedPrecondition(f"{directory} is not a directory") from None
        return False
    os.chmod(directory, 0o700)  # mkdir's mode went through the umask
    return True


def _remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):  # something else is in it: leave it
        directory.rmdir()


def _temporary(path: Path, data: bytes, mode: int) -> str:
    """`data` in a new file beside `path`, synced, with `mode` from the start: mkstemp
    creates it 0600 (O_EXCL), and fchmod widens a certificate's to 0644 regardless of
    the umask. Its name is returned; the caller moves it into place."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise FailedPrecondition(f"cannot write in {path.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return name


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write `path`, which must not exist: link() fails rather than replace a file
    that appeared since the caller looked."""
    name = _temporary(path, data, mode)
    try:
        os.link(name, path)
    except FileExistsError:
        raise FailedPrecondition(f"{path} already there: never replaced") from None
    finally:
        os.unlink(name)
    _sync_directory(path.parent)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` in one rename: a reader sees the old file or the new, whole."""
    name = _temporary(path, data, mode)
    try:
        os.replace(name, path)
    except BaseException:
        os.unlink(name)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
