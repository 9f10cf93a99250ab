"""A real PostgreSQL server for the store tests, started and removed by the tests.

PostgreSQL refuses to run as root, so the server runs as the `postgres` system
user (made by Debian's package) in a temporary directory of its own (0700):
the data directory and the Unix socket live there, and it listens on nothing
else (listen_addresses=''). Only postgres and root (who passes any directory
mode) reach the socket, so local connections are trusted, except for one role
that must give a password (scram-sha-256), for the password file's tests.

PgServer(tls=True) also listens on 127.0.0.1 (a free port), with a certificate
from a CA the harness makes: any local user can reach TCP, so there only TLS is
let in (hostnossl ... reject), and only for TLS_ROLE with its password.

PgServer(tcp=True) also listens on 127.0.0.1 (a free port) in plain TCP, for
PASSWORD_ROLE only, with its password (scram-sha-256): the benchmarks' loopback
case (bench/pg.py). Without either option nothing listens on TCP.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import ipaddress
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
PASSWORD_ROLE = "otpgate_pw"
PASSWORD = "s3cret with spaces"
TLS_ROLE = "otpgate_tls"
TLS_PASSWORD = "tls s3cret/with:odd@chars"
CA_NAME = "otpgate test CA"
SERVER_NAMES = ("localhost", "127.0.0.1")  # the server certificate's DNS and IP SANs


def find_bindir() -> str | None:
    """Where initdb, pg_ctl and postgres are (the newest installed), or None."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(candidate, "pg_ctl"), os.X_OK) and os.access(
            os.path.join(candidate, "initdb"), os.X_OK
        ):
            return candidate
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl and shutil.which("initdb"):
        return os.path.dirname(os.path.realpath(pg_ctl))
    return None


def skip_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None."""
    if find_bindir() is None:
        return "no PostgreSQL binaries (install Debian's postgresql; scripts/test.sh does)"
    if os.geteuid() != 0:
        return "the PostgreSQL harness runs the server as `postgres` via runuser: needs root"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no `postgres` system user (Debian's postgresql package creates it)"
    return None


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA that exists only for one test run; its key never touches the disk."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        public = key.public_key()
        usage = x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False,
        )  # fmt: skip
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            # A day back: a clock a little behind must not find the CA not yet valid.
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        path.chmod(0o644)
        return path

    def issue_server(self, names: tuple[str, ...]) -> tuple[bytes, bytes]:
        """A server key and certificate (PEM) for `names` (host names or IP addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PgServer:
    """One private server: `start`, `stop` (fast shutdown), `remove`."""

    _ports = itertools.count(0)

    def __init__(self, *, tls: bool = False, tcp: bool = False) -> None:
        bindir = find_bindir()
        assert bindir is not None
        self.bindir = bindir
        self.tls = tls
        self.tcp = tcp
        self.root = Path(tempfile.mkdtemp(prefix="otpgate-pg-"))
        self.data = self.root / "data"
        # Only a name for the socket (.s.PGSQL.<port>): nothing listens on TCP.
        self.port = 45432 + (os.getpid() % 2000) * 10 + next(self._ports)
        if tls or tcp:
            # The same number names the socket and the TCP port, which must be free.
            self.port = _free_port()
        self._databases = itertools.count(1)
        entry = pwd.getpwnam("postgres")
        os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o700)
        self._as_postgres(
            "initdb", "-D", str(self.data), "--auth-local=trust", "--auth-host=reject",
            "--username=postgres", "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        # First match wins: the password role must prove it, everyone else is trusted.
        hba = f"local all {PASSWORD_ROLE} scram-sha-256\nlocal all all trust\n"
        if tcp:
            hba += f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
        if tls:
            self.ca = CertificateAuthority.create(CA_NAME)
            self.ca_file = self.ca.write_cert(self.root / "ca.crt")
            self._write_server_cert(entry)
            hba += (
                f"hostssl all {TLS_ROLE} 127.0.0.1/32 scram-sha-256\n"
                "hostnossl all all 127.0.0.1/32 reject\n"
            )
        (self.data / "pg_hba.conf").write_text(hba)
        os.chown(self.data / "pg_hba.conf", entry.pw_uid, entry.pw_gid)
        self._start_on_a_free_port()
        self.psql(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'", dbname="postgres")
        if tls:
            self.psql(f"CREATE ROLE {TLS_ROLE} LOGIN PASSWORD '{TLS_PASSWORD}'", dbname="postgres")

    def _write_server_cert(self, entry: pwd.struct_passwd) -> None:
        key_pem, cert_pem = self.ca.issue_server(SERVER_NAMES)
        # PostgreSQL refuses a key that group or others may read.
        key_path = self.root / "server.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        (self.root / "server.crt").write_bytes(cert_pem)
        for path in (key_path, self.root / "server.crt"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"ssl = on\nssl_cert_file = '{self.root / 'server.crt'}'\n"
                f"ssl_key_file = '{key_path}'\n"
            )

    def _start_on_a_free_port(self) -> None:
        if not (self.tls or self.tcp):
            self.start()
            return
        # Between the probe and the server's bind another process may take the port.
        for attempt in range(3):
            try:
                self.start()
                return
            except subprocess.CalledProcessError:
                if attempt == 2:
                    raise
                self.port = _free_port()

    def _as_postgres(self, program: str, *args: str) -> None:
        subprocess.run(
            [RUNUSER, "-u", "postgres", "--", os.path.join(self.bindir, program), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.root,
            timeout=60,
        )

    def start(self) -> None:
        listen = "127.0.0.1" if self.tls or self.tcp else "''"
        options = (
            f"-c listen_addresses={listen} -c unix_socket_directories={self.root} -p {self.port} "
            "-c fsync=off -c max_connections=300"
        )
        # Right after a SIGKILL the dead postmaster's shared memory or socket lock can
        # linger for a moment and fail a start: try again before giving up.
        for attempt in range(5):
            try:
                self._as_postgres(
                    "pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data),
                    "-l", str(self.root / "server.log"), "-o", options,
                )  # fmt: skip
                return
            except subprocess.CalledProcessError:
                if attempt == 4:
                    raise
                time.sleep(1.0)

    def stop(self) -> None:
        self._as_postgres("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))

    def remove(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def daemon_url(self, dbname: str) -> str:
        """The postgresql:// URL otpgated takes (--database-url), over the socket."""
        host = urllib.parse.quote(str(self.root), safe="")
        return f"postgresql://postgres@/{dbname}?host={host}&port={self.port}"

    def url(self, dbname: str, user: str = "postgres") -> str:
        return f"host={self.root} port={self.port} user={user} dbname={dbname}"

    def tcp_url(self, dbname: str) -> str:
        """A postgresql:// URL to `dbname` over plain TCP as PASSWORD_ROLE, without
        the password (otpgated takes it from database_password_file)."""
        assert self.tcp, "tcp_url needs PgServer(tcp=True)"
        return f"postgresql://{PASSWORD_ROLE}@127.0.0.1:{self.port}/{dbname}"

    def tls_url(
        self,
        dbname: str,
        *,
        sslmode: str = "verify-full",
        sslrootcert: Path | str | None = None,
        host: str = "127.0.0.1",
        hostaddr: str | None = None,
        password: str | None = TLS_PASSWORD,
    ) -> str:
        """A postgresql:// URL (as otpgated takes) to `dbname` over TCP as TLS_ROLE;
        sslrootcert defaults to this server's CA. With `hostaddr`, libpq connects
        there but checks the certificate against `host`."""
        assert self.tls, "tls_url needs PgServer(tls=True)"
        user = TLS_ROLE
        if password is not None:
            user += ":" + urllib.parse.quote(password, safe="")
        query = {"sslmode": sslmode, "sslrootcert": str(sslrootcert or self.ca_file)}
        if hostaddr is not None:
            query["hostaddr"] = hostaddr
        return f"postgresql://{user}@{host}:{self.port}/{dbname}?{urllib.parse.urlencode(query)}"

    def psql(self, sql: str, *, dbname: str) -> None:
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, owner: str = "postgres") -> str:
        """A new, empty database; its name."""
        name = f"otpgate_{next(self._databases)}"
        self.psql(f"CREATE DATABASE {name} OWNER {owner}", dbname="postgres")
        return name


@contextlib.contextmanager
def private_server(**options: bool) -> Iterator[PgServer]:
    """A server of the caller's own (skipped where none can run), removed after."""
    import pytest

    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PgServer(**options)
    try:
        yield server
    finally:
        server.remove()
