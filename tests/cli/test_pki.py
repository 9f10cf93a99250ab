"""`otpgate pki` (otpgate.pki and its CLI): real files under tmp_path, the certificates
read back and checked with `cryptography`, and real TLS handshakes on 127.0.0.1 with
Python's ssl module (OpenSSL), which shares no code with otpgate.pki but the library."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otpgate import pki
from otpgate.cli.main import main
from otpgate.errors import ConfigError, FailedPrecondition, InvalidArgument

SERVER = "otpgate.test"


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> pki.Paths:
    return pki.init(
        tmp_path / "pki",
        server_name=SERVER,
        dns_names=["otpgate-1.example.org"],
        ip_addresses=["127.0.0.1", "::1"],
    )


@pytest.fixture
def other_ca(tmp_path: Path) -> pki.Paths:
    return pki.init(tmp_path / "other", server_name=SERVER, ip_addresses=["127.0.0.1"])


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def key(path: Path) -> ec.EllipticCurvePrivateKey:
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert isinstance(loaded.curve, ec.SECP256R1)
    return loaded


def left(certificate: x509.Certificate) -> dt.timedelta:
    """How long `certificate` has left from now (taken after it was made)."""
    return certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def tree(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `directory` with its mode and bytes: to show nothing changed."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): (mode(p), p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def ext(certificate: x509.Certificate, kind: type[Any]) -> x509.Extension[Any]:
    return certificate.extensions.get_extension_for_class(kind)


def cn(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def crl(paths: pki.Paths) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(paths.crl.read_bytes())


def ca_public_key(paths: pki.Paths) -> ec.EllipticCurvePublicKey:
    public = cert(paths.ca_cert).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public


def test_the_roles_are_the_listeners() -> None:
    from otpgate.server.roles import ROLES

    assert pki.ROLES == ROLES


# -- init --------------------------------------------------------------------------------


def test_init_writes_the_ca_and_server_files_with_their_modes(ca: pki.Paths) -> None:
    assert mode(ca.directory) == 0o700
    assert sorted(os.listdir(ca.directory)) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    assert (mode(ca.ca_cert), mode(ca.ca_key)) == (0o644, 0o600)
    assert (mode(ca.server_cert), mode(ca.server_key)) == (0o644, 0o600)
    # PKCS#8, unencrypted (the daemon reads it unattended), and the key of its certificate.
    for key_path, cert_path in ((ca.ca_key, ca.ca_cert), (ca.server_key, ca.server_cert)):
        assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
        assert key(key_path).public_key() == cert(cert_path).public_key()

    root = cert(ca.ca_cert)
    assert cn(root.subject) == cn(root.issuer) == "otpgate CA"
    root.verify_directly_issued_by(root)
    constraints = ext(root, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ext(root, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert ext(root, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(root.public_key())
    )
    lifetime = left(root)
    assert dt.timedelta(days=1094) < lifetime <= dt.timedelta(days=1095)
    assert root.serial_number.bit_length() > 100  # random, not 1, 2, 3...


def test_the_server_certificate_has_its_names_and_chains_to_the_ca(ca: pki.Paths) -> None:
    server, root = cert(ca.server_cert), cert(ca.ca_cert)
    server.verify_directly_issued_by(root)
    assert cn(server.subject) == SERVER
    sans = ext(server, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [SERVER, "otpgate-1.example.org"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert list(ext(server, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    constraints = ext(server, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    assert ext(server, x509.AuthorityKeyIdentifier).value.key_identifier == (
        ext(root, x509.SubjectKeyIdentifier).value.digest
    )
    lifetime = left(server)
    assert dt.timedelta(days=89) < lifetime <= dt.timedelta(days=90)
    assert server.serial_number != root.serial_number


def test_a_server_name_that_is_an_address_is_an_ip_san(tmp_path: Path) -> None:
    paths = pki.init(tmp_path / "pki", server_name="10.0.0.5", ip_addresses=["10.0.0.5"])
    sans = ext(cert(paths.server_cert), x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == []
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


@pytest.mark.parametrize("existing", ["ca.key", "server.key", "ca.crt"])
def test_init_refuses_a_directory_with_a_ca_or_key_and_changes_nothing(
    ca: pki.Paths, existing: str
) -> None:
    for name in {"ca.key", "server.key", "ca.crt"} - {existing}:
        (ca.directory / name).unlink()
    before = tree(ca.directory)
    with pytest.raises(FailedPrecondition, match=f"already holds .*{existing}.*never replaces"):
        pki.init(ca.directory, server_name=SERVER)
    assert tree(ca.directory) == before


def test_init_in_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    directory = tmp_path / "existing"
    directory.mkdir(mode=0o750)
    os.chmod(directory, 0o750)  # noqa: S103 - someone else's choice, that init must keep
    pki.init(directory, server_name=SERVER)
    assert mode(directory) == 0o750
    assert mode(directory / "ca.key") == 0o600


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"ip_addresses": ["127.0.0.1", "10.0.0.300"]}, "ip_addresses",
         "not an IP address: '10.0.0.300'"),
        ({"ip_addresses": ["otpgate.test"]}, "ip_addresses", "not an IP address: 'otpgate.test'"),
        ({"dns_names": ["bad_name.example"]}, "dns_names", "not a DNS name"),
        ({"dns_names": ["-x.example"]}, "dns_names", "not a DNS name"),
        ({"server_name": "ötpgate.test"}, "server_name", "not a DNS name"),
        ({"server_name": ""}, "server_name", "must be 1 to 64 characters (got 0)"),
        ({"server_name": "a" * 65}, "server_name", "must be 1 to 64 characters (got 65)"),
        ({"server_days": 0}, "server_days", "must be from 1 to 3650 days (got 0)"),
        ({"server_days": 3651}, "server_days", "must be from 1 to 3650 days (got 3651)"),
        ({"ca_days": 0}, "ca_days", "must be from 1 to 3650 days (got 0)"),
    ],
)  # fmt: skip
def test_init_refuses_bad_arguments_and_writes_nothing(
    tmp_path: Path, kwargs: dict[str, Any], field: str, message: str
) -> None:
    arguments: dict[str, Any] = {"server_name": SERVER, **kwargs}
    with pytest.raises(InvalidArgument) as caught:
        pki.init(tmp_path / "pki", **arguments)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ") and message in str(caught.value)
    assert not (tmp_path / "pki").exists()


def test_a_failed_init_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link
    calls: list[str] = []

    def failing_link(source: Any, target: Any) -> None:
        calls.append(str(target))
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_link(source, target)

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(OSError, match="No space"):
        pki.init(tmp_path / "pki", server_name=SERVER)
    assert not (tmp_path / "pki").exists()
    assert calls[-1].endswith("server.crt")  # the CA key would have come last


# -- issue_server (renewal) --------------------------------------------------------------


def test_issue_server_replaces_the_server_certificate_and_keeps_the_ca(ca: pki.Paths) -> None:
    ca_files = {p: p.read_bytes() for p in (ca.ca_cert, ca.ca_key)}
    old_cert, old_key = cert(ca.server_cert), key(ca.server_key)
    issued = pki.issue_server(
        ca.directory, server_name="otpgate-2.test", ip_addresses=["192.0.2.7"], days=30
    )
    new = cert(ca.server_cert)
    assert issued.serial == new.serial_number != old_cert.serial_number
    assert key(ca.server_key).public_key() == new.public_key() != old_key.public_key()
    assert (issued.cert, issued.key) == (ca.server_cert, ca.server_key)
    assert (issued.role, issued.roles_line, issued.limited_by_ca) == (None, None, False)
    assert {p: p.read_bytes() for p in ca_files} == ca_files
    assert (mode(ca.server_cert), mode(ca.server_key)) == (0o644, 0o600)
    new.verify_directly_issued_by(cert(ca.ca_cert))
    assert cn(new.subject) == "otpgate-2.test"
    sans = ext(new, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["otpgate-2.test"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    assert dt.timedelta(days=29) < left(new) <= dt.timedelta(days=30)
    assert sorted(os.listdir(ca.directory)) == ["ca.crt", "ca.key", "server.crt", "server.key"]


def test_issue_server_needs_a_ca_and_valid_arguments(tmp_path: Path, ca: pki.Paths) -> None:
    with pytest.raises(FailedPrecondition, match="no CA in .*empty.*otpgate pki init"):
        pki.issue_server(tmp_path / "empty", server_name=SERVER)
    before = tree(ca.directory)
    with pytest.raises(InvalidArgument, match="^ip_addresses: not an IP address: 'x'$"):
        pki.issue_server(ca.directory, server_name=SERVER, ip_addresses=["x"])
    with pytest.raises(InvalidArgument, match="^days: must be from 1 to 3650"):
        pki.issue_server(ca.directory, server_name=SERVER, days=4000)
    assert tree(ca.directory) == before


def test_a_ca_key_that_does_not_match_its_certificate_is_refused(
    ca: pki.Paths, other_ca: pki.Paths
) -> None:
    os.replace(other_ca.ca_key, ca.ca_key)
    with pytest.raises(ConfigError, match="ca.key is not the key of .*ca.crt"):
        pki.issue_client(ca.directory, "alice", role="admin")


# -- issue_client ------------------------------------------------------------------------


def test_issue_client_writes_a_client_certificate_for_the_role(ca: pki.Paths) -> None:
    issued = pki.issue_client(ca.directory, "helpdesk-laptop-1", role="helpdesk")
    assert issued.cert == ca.directory / "helpdesk-laptop-1.crt"
    assert issued.key == ca.directory / "helpdesk-laptop-1.key"
    assert (mode(issued.cert), mode(issued.key)) == (0o644, 0o600)
    assert issued.roles_line == '"helpdesk-laptop-1" = "helpdesk"'
    client = cert(issued.cert)
    assert key(issued.key).public_key() == client.public_key()
    client.verify_directly_issued_by(cert(ca.ca_cert))
    assert issued.serial == client.serial_number
    assert issued.not_after == client.not_valid_after_utc
    assert cn(client.subject) == "helpdesk-laptop-1"
    assert client.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "helpdesk"
    )
    assert list(ext(client, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not ext(client, x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        ext(client, x509.SubjectAlternativeName)
    assert dt.timedelta(days=89) < left(client) <= dt.timedelta(days=90)


def test_issue_client_never_replaces_existing_files(ca: pki.Paths) -> None:
    pki.issue_client(ca.directory, "alice", role="admin")
    before = tree(ca.directory)
    with pytest.raises(FailedPrecondition, match=r"alice\.crt and .*alice\.key already there"):
        pki.issue_client(ca.directory, "alice", role="auditor")
    (ca.directory / "alice.crt").unlink()  # a key alone is not replaced either
    with pytest.raises(FailedPrecondition, match=r"alice\.key already there"):
        pki.issue_client(ca.directory, "alice", role="auditor")
    assert tree(ca.directory) == {k: v for k, v in before.items() if k != "alice.crt"}
    # A client named like the CA's files cannot replace them.
    with pytest.raises(FailedPrecondition, match=r"ca\.crt .*already there"):
        pki.issue_client(ca.directory, "ca", role="admin")


def test_issue_client_into_another_directory(tmp_path: Path, ca: pki.Paths) -> None:
    out = tmp_path / "handout" / "bob"
    issued = pki.issue_client(ca.directory, "bob@example.org", role="auditor", out_dir=out)
    assert sorted(os.listdir(out)) == ["bob@example.org.crt", "bob@example.org.key"]
    assert mode(out) == 0o700 and mode(issued.key) == 0o600
    assert sorted(os.listdir(ca.directory)) == ["ca.crt", "ca.key", "server.crt", "server.key"]


@pytest.mark.parametrize(
    ("name", "role", "days", "field", "message"),
    [
        ("alice", "root", 90, "role", "must be one of admin, helpdesk, auditor, host (got 'root')"),
        ("alice", "", 90, "role", "must be one of admin, helpdesk, auditor, host"),
        ("", "admin", 90, "name", "must not be empty"),
        ("a" * 65, "admin", 90, "name", "must be at most 64 characters (got 65)"),
        ("alice smith", "admin", 90, "name", "may hold only letters"),
        ("../alice", "admin", 90, "name", "may hold only letters"),
        ("a/b", "admin", 90, "name", "may hold only letters"),
        (".hidden", "admin", 90, "name", "must not start with . or -"),
        ('a"b', "admin", 90, "name", "may hold only letters"),
        ("alice", "admin", 0, "days", "must be from 1 to 3650 days (got 0)"),
        ("alice", "admin", 3651, "days", "must be from 1 to 3650 days (got 3651)"),
    ],
)  # fmt: skip
def test_issue_client_refuses_bad_arguments_and_writes_nothing(
    tmp_path: Path, ca: pki.Paths, name: str, role: str, days: int, field: str, message: str
) -> None:
    before = tree(tmp_path)
    with pytest.raises(InvalidArgument) as caught:
        pki.issue_client(ca.directory, name, role=role, days=days)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert message in str(caught.value)
    assert tree(tmp_path) == before


def test_not_before_in_the_past_makes_an_expired_certificate(ca: pki.Paths) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    issued = pki.issue_client(ca.directory, "old", role="host", days=1, not_before=start)
    client = cert(issued.cert)
    assert client.not_valid_after_utc < dt.datetime.now(dt.UTC)
    assert client.not_valid_before_utc == start.replace(microsecond=0)
    with pytest.raises(InvalidArgument, match="^not_before: must be timezone-aware"):
        pki.issue_client(ca.directory, "naive", role="host", not_before=dt.datetime(2026, 1, 1))


def test_no_certificate_outlives_its_ca(tmp_path: Path) -> None:
    paths = pki.init(tmp_path / "pki", server_name=SERVER, ca_days=10, server_days=90)
    root = cert(paths.ca_cert)
    assert cert(paths.server_cert).not_valid_after_utc == root.not_valid_after_utc
    issued = pki.issue_client(paths.directory, "alice", role="admin", days=90)
    assert issued.limited_by_ca
    assert issued.not_after == root.not_valid_after_utc


# -- revoke and the CRL ------------------------------------------------------------------


def test_revoke_by_serial_and_by_certificate(ca: pki.Paths) -> None:
    alice = pki.issue_client(ca.directory, "alice", role="admin")
    bob = pki.issue_client(ca.directory, "bob", role="helpdesk")

    first = pki.revoke(ca.directory, alice.serial)
    assert first.crl == ca.crl and first.serial == alice.serial and not first.already_revoked
    assert ca.revoked.read_text() == f"{alice.serial:x}\n"
    listed = crl(ca)
    assert listed.is_signature_valid(ca_public_key(ca))
    assert listed.issuer == cert(ca.ca_cert).subject
    assert [r.serial_number for r in listed] == [alice.serial]
    assert dt.timedelta(days=29) < listed.next_update_utc - listed.last_update_utc  # type: ignore[operator]
    assert mode(ca.crl) == mode(ca.revoked) == 0o644

    second = pki.revoke(ca.directory, cert_file=bob.cert)
    assert second.serial == bob.serial and second.serials == (alice.serial, bob.serial)
    assert ca.revoked.read_text() == f"{alice.serial:x}\n{bob.serial:x}\n"
    assert {r.serial_number for r in crl(ca)} == {alice.serial, bob.serial}
    assert pki.load_crl_serials(ca.crl, ca.ca_cert) == {alice.serial, bob.serial}


def test_revoking_twice_changes_nothing_but_the_crl_dates(ca: pki.Paths) -> None:
    alice = pki.issue_client(ca.directory, "alice", role="admin")
    pki.revoke(ca.directory, alice.serial)
    revoked_file, earlier = ca.revoked.read_bytes(), crl(ca)
    again = pki.revoke(ca.directory, cert_file=alice.cert)
    assert again.already_revoked and again.serials == (alice.serial,)
    assert ca.revoked.read_bytes() == revoked_file
    later = crl(ca)
    assert [r.serial_number for r in later] == [alice.serial]
    # The revocation keeps its date; the CRL's number goes up for relying parties.
    date = earlier.get_revoked_certificate_by_serial_number(alice.serial)
    assert date is not None
    assert later.get_revoked_certificate_by_serial_number(alice.serial).revocation_date_utc == (  # type: ignore[union-attr]
        date.revocation_date_utc
    )
    number = ext(later, x509.CRLNumber).value.crl_number  # type: ignore[arg-type]
    assert number == ext(earlier, x509.CRLNumber).value.crl_number + 1  # type: ignore[arg-type]


def test_revoke_refuses_a_foreign_certificate_and_bad_serials(
    ca: pki.Paths, other_ca: pki.Paths
) -> None:
    stranger = pki.issue_client(other_ca.directory, "stranger", role="admin")
    before = tree(ca.directory)
    with pytest.raises(InvalidArgument, match="^cert_file: .*stranger.crt was not issued by"):
        pki.revoke(ca.directory, cert_file=stranger.cert)
    with pytest.raises(InvalidArgument, match="^cert_file: .*: not a certificate"):
        pki.revoke(ca.directory, cert_file=ca.ca_key)
    with pytest.raises(InvalidArgument, match="^cert_file: .*missing.crt: No such file"):
        pki.revoke(ca.directory, cert_file=ca.directory / "missing.crt")
    with pytest.raises(InvalidArgument, match="^serial: a CA cannot|is the CA's own"):
        pki.revoke(ca.directory, cert(ca.ca_cert).serial_number)
    with pytest.raises(InvalidArgument, match="^serial: must be positive"):
        pki.revoke(ca.directory, 0)
    with pytest.raises(InvalidArgument, match="^serial: give a serial or a certificate"):
        pki.revoke(ca.directory)
    assert tree(ca.directory) == before


def test_load_crl_serials_checks_the_signature(ca: pki.Paths, other_ca: pki.Paths) -> None:
    alice = pki.issue_client(ca.directory, "alice", role="admin")
    pki.revoke(ca.directory, alice.serial)
    assert pki.load_crl_serials(ca.crl, ca.ca_cert) == frozenset({alice.serial})
    der = ca.directory / "crl.der"
    der.write_bytes(crl(ca).public_bytes(serialization.Encoding.DER))
    assert pki.load_crl_serials(der, ca.ca_cert) == frozenset({alice.serial})

    # A bundle (an old and a new CA while they overlap): any of them may have signed it.
    bundle = ca.directory / "bundle.pem"
    bundle.write_bytes(other_ca.ca_cert.read_bytes() + ca.ca_cert.read_bytes())
    assert pki.load_crl_serials(ca.crl, bundle) == frozenset({alice.serial})
    ca_der = ca.directory / "ca.der"
    ca_der.write_bytes(cert(ca.ca_cert).public_bytes(serialization.Encoding.DER))
    assert pki.load_crl_serials(ca.crl, ca_der) == frozenset({alice.serial})

    # The same subject ("otpgate CA") but another key: refused.
    pki.revoke(other_ca.directory, alice.serial)
    with pytest.raises(ConfigError, match="crl.pem: the CRL is not signed by the CA of"):
        pki.load_crl_serials(other_ca.crl, ca.ca_cert)
    # Signed by this CA's key but under another issuer name: refused as well.
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else")]))
        .last_update(dt.datetime.now(dt.UTC))
        .next_update(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        .sign(key(ca.ca_key), hashes.SHA256())
    )
    (ca.directory / "forged.pem").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="not signed by the CA"):
        pki.load_crl_serials(ca.directory / "forged.pem", ca.ca_cert)
    with pytest.raises(ConfigError, match="ca.key: not a CRL"):
        pki.load_crl_serials(ca.ca_key, ca.ca_cert)
    with pytest.raises(ConfigError, match="nothing.pem: No such file"):
        pki.load_crl_serials(ca.directory / "nothing.pem", ca.ca_cert)
    with pytest.raises(ConfigError, match="server.key: not a certificate"):
        pki.load_crl_serials(ca.crl, ca.server_key)


def test_a_damaged_revoked_file_is_reported(ca: pki.Paths) -> None:
    ca.revoked.write_text("abc\nnot hex\n")
    with pytest.raises(ConfigError, match="revoked.txt, line 2: not a hex serial: 'not hex'"):
        pki.revoke(ca.directory, 0x1234)


# -- real TLS handshakes -----------------------------------------------------------------


@dataclasses.dataclass
class Handshake:
    server_saw: str | None = None  # the client certificate's common name
    server_error: BaseException | None = None
    client_got: bytes = b""
    client_error: BaseException | None = None


def handshake(
    paths: pki.Paths,
    cert_file: Path,
    key_file: Path,
    *,
    server_hostname: str = SERVER,
    crl_file: Path | None = None,
) -> Handshake:
    """One TLS connection on 127.0.0.1: a server with DIR's server.crt that requires a
    client certificate of DIR's CA, and a client with `cert_file` that trusts ca.crt."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(paths.server_cert, paths.server_key)
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(cafile=paths.ca_cert)
    if crl_file is not None:
        server_context.load_verify_locations(cafile=crl_file)
        server_context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    client_context = ssl.create_default_context(cafile=str(paths.ca_cert))
    client_context.load_cert_chain(cert_file, key_file)
    result = Handshake()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                connection.settimeout(10)
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    peer = tls.getpeercert()
                    assert peer is not None
                    subject = dict(pair[0] for pair in peer["subject"])  # type: ignore[misc]
                    result.server_saw = str(subject["commonName"])
                    tls.sendall(b"hello " + result.server_saw.encode())
            except (ssl.SSLError, OSError) as exc:
                result.server_error = exc

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname()[:2], timeout=10) as raw,
                client_context.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                result.client_got = tls.recv(100)
        except (ssl.SSLError, OSError) as exc:
            result.client_error = exc
        thread.join(15)
        assert not thread.is_alive()
    return result


def test_tls_handshake_with_an_issued_client_certificate(ca: pki.Paths) -> None:
    issued = pki.issue_client(ca.directory, "helpdesk-laptop-1", role="helpdesk")
    for hostname in (SERVER, "otpgate-1.example.org", "127.0.0.1"):
        result = handshake(ca, issued.cert, issued.key, server_hostname=hostname)
        assert result.server_error is None and result.client_error is None, result
        assert result.server_saw == "helpdesk-laptop-1"
        assert result.client_got == b"hello helpdesk-laptop-1"


def test_tls_client_refuses_a_server_name_not_in_the_certificate(ca: pki.Paths) -> None:
    issued = pki.issue_client(ca.directory, "alice", role="admin")
    result = handshake(ca, issued.cert, issued.key, server_hostname="elsewhere.test")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert "elsewhere.test" in str(result.client_error)


def test_tls_handshake_fails_with_a_certificate_of_another_ca(
    ca: pki.Paths, other_ca: pki.Paths
) -> None:
    stranger = pki.issue_client(other_ca.directory, "helpdesk-laptop-1", role="helpdesk")
    result = handshake(ca, stranger.cert, stranger.key)
    assert isinstance(result.server_error, ssl.SSLError)
    assert "certificate verify failed" in str(result.server_error)
    assert result.server_saw is None and result.client_got == b""


def test_tls_handshake_fails_with_an_expired_certificate(ca: pki.Paths) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    old = pki.issue_client(ca.directory, "old", role="host", days=1, not_before=start)
    result = handshake(ca, old.cert, old.key)
    assert isinstance(result.server_error, ssl.SSLError)
    assert "certificate has expired" in str(result.server_error)
    assert result.client_got == b""


def test_openssl_honours_the_crl(ca: pki.Paths) -> None:
    alice = pki.issue_client(ca.directory, "alice", role="admin")
    bob = pki.issue_client(ca.directory, "bob", role="admin")
    pki.revoke(ca.directory, cert_file=alice.cert)
    refused = handshake(ca, alice.cert, alice.key, crl_file=ca.crl)
    assert isinstance(refused.server_error, ssl.SSLError)
    assert "certificate revoked" in str(refused.server_error)
    accepted = handshake(ca, bob.cert, bob.key, crl_file=ca.crl)
    assert accepted.server_saw == "bob" and accepted.server_error is None


# -- the command line --------------------------------------------------------------------

CliRun = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CliRun:
    # A socket that is not there: `otpgate pki` must not need one.
    monkeypatch.setenv("OTPGATE_SOCKET", "/nonexistent/otpgate/admin.sock")

    def run(*args: str) -> tuple[int, str, str]:
        try:
            status = main(list(args))
        except SystemExit as exc:  # argparse's usage errors and --help
            status = int(exc.code or 0)
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_cli_init_issue_server_revoke(tmp_path: Path, cli: CliRun) -> None:
    directory = tmp_path / "pki"
    status, out, err = cli(
        "pki", "init", str(directory), "--name", SERVER, "--dns", "otpgate-1.example.org",
        "--ip", "127.0.0.1", "--ca-days", "365", "--days", "30",
    )  # fmt: skip
    assert (status, err) == (0, "")
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        assert f"wrote {directory / name}" in out
    assert f"serial {cert(directory / 'server.crt').serial_number:x}" in out
    for line in (f'tls_cert = "{directory / "server.crt"}"',
                 f'tls_key = "{directory / "server.key"}"',
                 f'tls_client_ca = "{directory / "ca.crt"}"'):  # fmt: skip
        assert f"\n{line}\n" in out
    assert dt.timedelta(days=364) < left(cert(directory / "ca.crt"))
    assert left(cert(directory / "server.crt")) <= dt.timedelta(days=30)

    status, out, err = cli("pki", "issue", "--dir", str(directory), "--role", "helpdesk",
                           "helpdesk-laptop-1")  # fmt: skip
    assert (status, err) == (0, "")
    client = cert(directory / "helpdesk-laptop-1.crt")
    assert f"wrote {directory / 'helpdesk-laptop-1.crt'}\n" in out
    assert f"wrote {directory / 'helpdesk-laptop-1.key'} (mode 0600" in out
    assert f"serial   {client.serial_number:x}\n" in out
    expiry = client.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"expires  {expiry}\n" in out
    assert "add under [roles] in the listener's otpgated.toml" in out
    assert out.endswith('\n"helpdesk-laptop-1" = "helpdesk"\n')

    old_serial = cert(directory / "server.crt").serial_number
    status, out, err = cli("pki", "server", str(directory), "--name", SERVER, "--days", "60")
    assert (status, err) == (0, "")
    renewed = cert(directory / "server.crt")
    assert renewed.serial_number != old_serial
    assert f"serial   {renewed.serial_number:x}\n" in out
    assert "systemctl reload otpgated" in out

    serial = f"{client.serial_number:x}"
    status, out, err = cli("pki", "revoke", str(directory), serial.upper())
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"revoked {serial}",
        f"wrote {directory / 'crl.pem'} (1 serial, valid until "
        f"{crl(pki.Paths.of(directory)).next_update_utc:%Y-%m-%dT%H:%M:%SZ})",
        f'set tls_crl = "{directory / "crl.pem"}" in otpgated.toml and send otpgated SIGHUP '
        "(systemctl reload otpgated)",
    ]
    status, out, err = cli(
        "pki", "revoke", str(directory), "--cert", str(directory / "helpdesk-laptop-1.crt")
    )
    assert status == 0 and f"revoked {serial} (already revoked" in out
    assert "(1 serial," in out
    assert pki.load_crl_serials(directory / "crl.pem", directory / "ca.crt") == {
        client.serial_number
    }


def test_cli_tells_where_an_edge_host_puts_its_files(tmp_path: Path, cli: CliRun) -> None:
    pki.init(tmp_path / "pki", server_name=SERVER)
    status, out, _ = cli("pki", "issue", "--dir", str(tmp_path / "pki"), "--role", "host",
                         "edge-1")  # fmt: skip
    assert status == 0
    assert f"copy them and {tmp_path / 'pki' / 'ca.crt'} to that host" in out
    assert "tls_cert, tls_key and upstream_ca" in out
    status, out, _ = cli("pki", "issue", "--dir", str(tmp_path / "pki"), "--role", "admin",
                         "alice")  # fmt: skip
    assert status == 0 and "upstream_ca" not in out


def test_cli_json(tmp_path: Path, cli: CliRun) -> None:
    directory = tmp_path / "pki"
    status, out, _ = cli("--json", "pki", "init", str(directory), "--name", SERVER)
    assert status == 0
    made = json.loads(out)
    assert made["ca_key"] == str(directory / "ca.key")
    assert made["server_serial"] == f"{cert(directory / 'server.crt').serial_number:x}"

    status, out, _ = cli("pki", "issue", "--json", "--dir", str(directory), "--role", "host",
                         "--out", str(tmp_path / "out"), "--days", "7", "edge-1")  # fmt: skip
    assert status == 0
    issued = json.loads(out)
    assert issued["cert"] == str(tmp_path / "out" / "edge-1.crt")
    assert issued["key"] == str(tmp_path / "out" / "edge-1.key")
    assert issued["role"] == "host" and issued["roles_line"] == '"edge-1" = "host"'
    assert int(issued["serial"], 16) == cert(tmp_path / "out" / "edge-1.crt").serial_number

    status, out, _ = cli("pki", "revoke", "--json", str(directory), issued["serial"])
    assert status == 0
    revoked = json.loads(out)
    assert revoked["revoked"] == [issued["serial"]] and revoked["already_revoked"] is False
    assert revoked["crl"] == str(directory / "crl.pem")

    status, out, _ = cli("pki", "server", "--json", str(directory), "--name", SERVER)
    assert status == 0
    assert json.loads(out)["serial"] == f"{cert(directory / 'server.crt').serial_number:x}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["init", "{dir}/new", "--name", SERVER, "--ip", "1.2.3"],
         "InvalidArgument: --ip: not an IP address: '1.2.3'"),
        (["init", "{dir}/new", "--name", SERVER, "--ca-days", "0"],
         "InvalidArgument: --ca-days: must be from 1 to 3650 days (got 0)"),
        (["init", "{dir}/pki", "--name", SERVER], "FailedPrecondition: {dir}/pki already holds "
         "ca.crt, ca.key, server.crt, server.key: otpgate pki init never replaces a CA or a key "
         "(renew the server certificate with `otpgate pki server`, or choose another directory "
         "for a new CA)"),
        (["issue", "--dir", "{dir}/pki", "--role", "boss", "alice"],
         "InvalidArgument: --role: must be one of admin, helpdesk, auditor, host (got 'boss')"),
        (["issue", "--dir", "{dir}/pki", "--role", "admin", "a b"],
         "InvalidArgument: NAME: may hold only letters, digits and . _ @ - and must not start "
         "with . or - (got 'a b'): it becomes a file name and a key of [roles]"),
        (["issue", "--dir", "{dir}/pki", "--role", "admin", "--days", "3651", "alice"],
         "InvalidArgument: --days: must be from 1 to 3650 days (got 3651)"),
        (["issue", "--dir", "{dir}/none", "--role", "admin", "alice"],
         "FailedPrecondition: no CA in {dir}/none (ca.crt and ca.key): make one with "
         "`otpgate pki init`"),
        (["server", "{dir}/pki", "--name", "bad_name"],
         "InvalidArgument: --name: not a DNS name (ASCII labels of letters, digits and -): "
         "'bad_name'"),
        (["revoke", "{dir}/pki", "xyz"], "InvalidArgument: SERIAL_HEX: not a hexadecimal "
         "serial: 'xyz'"),
        (["revoke", "{dir}/pki"],
         "InvalidArgument: SERIAL_HEX: give the serial or --cert FILE (one of them)"),
        (["revoke", "{dir}/pki", "--cert", "{dir}/pki/ca.key"],
         "InvalidArgument: --cert: {dir}/pki/ca.key: not a certificate (PEM or DER)"),
        (["issue", "--dir", "{dir}/pki", "alice"],
         "UsageError: otpgate pki issue: the following arguments are required: --role "
         "(see --help)"),
        (["frobnicate"], "UsageError: otpgate pki: argument COMMAND: invalid choice: "
         "'frobnicate' (choose from init, server, issue, revoke) (see --help)"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line_with_exit_2(
    tmp_path: Path, cli: CliRun, args: list[str], message: str
) -> None:
    pki.init(tmp_path / "pki", server_name=SERVER)
    before = tree(tmp_path)
    status, out, err = cli("pki", *(a.format(dir=tmp_path) for a in args))
    expected = message.format(dir=tmp_path)
    if "choose from" in expected and "'init'" in err:  # Python < 3.12.8 quotes the choices
        expected = expected.replace("init, server, issue, revoke",
                                    "'init', 'server', 'issue', 'revoke'")  # fmt: skip
    assert (status, out, err) == (2, "", expected + "\n")
    assert tree(tmp_path) == before


def test_cli_help_tells_the_defaults_and_renewal(cli: CliRun) -> None:
    status, out, _ = cli("pki", "--help")
    assert status == 0
    flat = " ".join(out.split())
    assert "CA 3 years, server and client 90 days" in flat
    for sub in ("init", "server", "issue", "revoke"):
        assert sub in flat
    status, out, _ = cli("pki", "issue", "--help")
    flat = " ".join(out.split())
    assert "--dir DIR the CA's directory (default /etc/otpgate/pki)" in flat
    assert "one of admin, helpdesk, auditor, host" in flat


def test_the_console_script_runs_pki_without_a_daemon(tmp_path: Path) -> None:
    env = {**os.environ, "OTPGATE_SOCKET": str(tmp_path / "no.sock")}
    command = [sys.executable, "-m", "otpgate.cli.main", "pki"]
    made = subprocess.run(
        [*command, "init", str(tmp_path / "pki"), "--name", SERVER],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert (made.returncode, made.stderr) == (0, "")
    issued = subprocess.run(
        [*command, "issue", "--dir", str(tmp_path / "pki"), "--role", "auditor", "carol"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert (issued.returncode, issued.stderr) == (0, "")
    assert issued.stdout.endswith('"carol" = "auditor"\n')
