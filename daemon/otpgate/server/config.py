"""otpgated's configuration: a TOML file, then command-line flags over it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from typing import Any

from otpgate.core.settings import check_issuer
from otpgate.errors import ConfigError, InvalidArgument

DEFAULT_CONFIG_FILE = "/etc/otpgate/otpgated.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclasses.dataclass
class DaemonConfig:
    # SQLite database and other state.
    state_dir: str = "/var/lib/otpgate"
    # A shared PostgreSQL database instead of the SQLite file (libpq URL form,
    # without the password), e.g. "postgresql://otpgate@db.example/otpgate?sslmode=verify-full".
    database_url: str = ""
    # The database password: a systemd credential of this name wins when present...
    database_password_credential: str = "otpgate.dbpassword"
    # ...otherwise this file (0600, owned by root); never on a command line.
    database_password_file: str = ""
    # Seconds a call waits for the database (connection, statement, lock) before
    # it fails as unavailable; keep it below the hook's timeout= (3 s by default).
    database_timeout: float = 2.0
    # admin.sock, user.sock and pam.sock.
    runtime_dir: str = "/run/otpgate"
    # Encryption key: a systemd credential of this name wins when present...
    key_credential: str = "otpgate.key"
    # ...otherwise this file (created on first start when create_key is true).
    key_file: str = "/etc/otpgate/otpgate.key"
    # During a key rotation, the key being replaced: a credential of this name, or
    # this file. It only opens; everything new is sealed with the key above.
    old_key_credential: str = "otpgate.key.old"
    old_key_file: str = ""
    create_key: bool = True
    # Default issuer shown in authenticator apps; empty: the host name.
    issuer: str = ""
    # Members of this group may use admin.sock.
    admin_group: str = "otpgate-admin"
    # PAM service used to check passwords (single-prompt SSH mode, LoginEx).
    password_pam_service: str = "otpgate"
    log_level: str = "info"
    # Threads serving each socket.
    workers: int = 16
    # Seconds SIGTERM waits for in-flight calls.
    shutdown_grace: float = 10.0
    # user.sock (any local user): connections held open at once, in all and per uid
    # (root is not limited per uid), and seconds a silent one is kept.
    user_connections: int = 1024
    user_connections_per_uid: int = 16
    # ...calls one uid may have running at once (root is not limited).
    user_calls_per_uid: int = 4
    user_idle_seconds: float = 300.0
    # Audit events older than this many days are removed (hourly); 0 keeps them all.
    audit_retention_days: int = 400

    # -- the network listener (off unless listen is set): mutual TLS only ---------
    # "HOST:PORT" ("[::1]:PORT" for IPv6) to serve the admin API (by role) and the
    # edge hosts' HostGate on.
    listen: str = ""
    # This daemon's certificate and key (PEM): the listener's, and an edge's client
    # certificate toward its upstreams.
    tls_cert: str = ""
    tls_key: str = ""
    # The CA that client certificates must chain to.
    tls_client_ca: str = ""
    # Revoked client certificates: a CRL file of that CA, and/or serials (hex).
    tls_crl: str = ""
    tls_deny_serials: list[str] = dataclasses.field(default_factory=list)
    # Certificate common name -> role (admin, helpdesk, auditor, host); a name not
    # here gets nothing. The [roles] table of otpgated.toml.
    roles: dict[str, str] = dataclasses.field(default_factory=dict)

    # -- edge mode (on when upstreams is set): no key, no database here -----------
    # The central daemons' listeners, "HOST:PORT", tried in order.
    upstreams: list[str] = dataclasses.field(default_factory=list)
    # The CA the upstreams' server certificates must chain to.
    upstream_ca: str = ""
    # Seconds one upstream gets to answer before the next is asked.
    upstream_timeout: float = 1.0

    @property
    def edge(self) -> bool:
        return bool(self.upstreams)

    @property
    def database(self) -> str:
        return os.path.join(self.state_dir, "otpgate.sqlite3")

    @property
    def database_where(self) -> str:
        """The database for the log: the SQLite file, or the URL (no password in it)."""
        return self.database_url or self.database

    def socket(self, name: str) -> str:
        return os.path.join(self.runtime_dir, f"{name}.sock")


_FIELDS = {f.name: f for f in dataclasses.fields(DaemonConfig)}


def parser(prog: str = "otpgated") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="The otpgate daemon: holds encrypted TOTP secrets and the 2FA settings, "
        "and serves the admin, user and PAM APIs on Unix sockets.",
        epilog="Maintenance: `otpgated upgrade-schema [OPTIONS]` brings the database to "
        "this version's schema; `otpgated migrate SOURCE TARGET` copies a database "
        "(SQLite <-> PostgreSQL) into an empty one. See otpgated(8).",
    )
    p.add_argument(
        "--config", help=f"TOML configuration file (default {DEFAULT_CONFIG_FILE} if it exists)"
    )
    p.add_argument("--state-dir", help="directory of the database")
    p.add_argument(
        "--database-url", help="a shared PostgreSQL database (libpq URL) instead of SQLite"
    )
    p.add_argument("--database-password-file", help="file holding the database password")
    p.add_argument("--database-timeout", type=float, help="seconds a call waits for the database")
    p.add_argument("--runtime-dir", help="directory of the sockets")
    p.add_argument(
        "--key-file", help="encryption key file (0600, owned by root or the daemon user)"
    )
    p.add_argument("--key-credential", help="name of the systemd credential holding the key")
    p.add_argument(
        "--old-key-file", help="during a key rotation: the key being replaced (opens only)"
    )
    p.add_argument(
        "--no-create-key",
        dest="create_key",
        action="store_false",
        default=None,
        help="never create a key; fail when none exists",
    )
    p.add_argument("--issuer", help="default issuer shown in authenticator apps")
    p.add_argument("--admin-group", help="group allowed to use admin.sock")
    p.add_argument("--password-pam-service", help="PAM service for password checks")
    p.add_argument("--listen", help="HOST:PORT of the mutual-TLS network listener")
    p.add_argument(
        "--upstream",
        dest="upstreams",
        action="append",
        help="edge mode: a central otpgated's HOST:PORT (repeat for more)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS)
    p.add_argument("--workers", type=int)
    return p


def load(argv: list[str] | None = None, *, prog: str = "otpgated") -> DaemonConfig:
    args = parser(prog).parse_args(argv)
    values: dict[str, Any] = {}
    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        values.update(_read_toml(path))
    for name in _FIELDS:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    return _build(values, source=path or "command line")


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for key in data:
        if key not in _FIELDS:
            raise ConfigError(f"{path}: unknown option {key!r}; known: {', '.join(_FIELDS)}")
    return data


def _build(values: dict[str, Any], *, source: str) -> DaemonConfig:
    config = DaemonConfig()
    for name, value in values.items():
        expected = type(getattr(config, name))
        if expected in (list, dict):
            setattr(config, name, _collection(name, value, expected, source))
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[
                expected
            ]
            raise ConfigError(f"{source}: {name} must be {kind}")
        setattr(config, name, value)
    for name in ("state_dir", "runtime_dir", "key_file"):
        if not os.path.isabs(getattr(config, name)):
            raise ConfigError(f"{source}: {name} must be an absolute path")
    if config.database_password_file and not os.path.isabs(config.database_password_file):
        raise ConfigError(f"{source}: database_password_file must be an absolute path")
    if config.database_password_file and not config.database_url:
        raise ConfigError(f"{source}: database_password_file needs database_url")
    if config.database_url and not config.database_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{source}: database_url must be a postgresql:// URL")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"{source}: log_level must be one of {', '.join(LOG_LEVELS)}")
    if not 1 <= config.workers <= 256:
        raise ConfigError(f"{source}: workers must be from 1 to 256")
    if not 16 <= config.user_connections <= 100_000:
        raise ConfigError(f"{source}: user_connections must be from 16 to 100000")
    if not 1 <= config.user_connections_per_uid <= 1024:
        raise ConfigError(f"{source}: user_connections_per_uid must be from 1 to 1024")
    if not 1 <= config.user_calls_per_uid <= 256:
        raise ConfigError(f"{source}: user_calls_per_uid must be from 1 to 256")
    if not 1.0 <= config.user_idle_seconds <= 86400.0:
        raise ConfigError(f"{source}: user_idle_seconds must be from 1 to 86400")
    if config.old_key_file and not os.path.isabs(config.old_key_file):
        raise ConfigError(f"{source}: old_key_file must be an absolute path")
    for name in ("key_credential", "database_password_credential", "old_key_credential"):
        if "/" in getattr(config, name) or not getattr(config, name):
            raise ConfigError(f"{source}: {name} must be a plain name")
    if not 0 <= config.audit_retention_days <= 36500:
        raise ConfigError(f"{source}: audit_retention_days must be from 0 to 36500")
    if not 0.1 <= config.database_timeout <= 30.0:
        raise ConfigError(f"{source}: database_timeout must be from 0.1 to 30 seconds")
    _check_network(config, source)
    if config.issuer:
        try:
            check_issuer("issuer", config.issuer, allow_empty=False)
        except InvalidArgument as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return config


def _collection(name: str, value: Any, expected: type, source: str) -> Any:
    if expected is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {name} must be a list of strings")
        return list(value)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f'{source}: {name} must be a table of strings ([{name}] name = "...")')
    return dict(value)


def _check_address(source: str, name: str, address: str) -> None:
    host, sep, port = address.rpartition(":")
    ok = bool(sep and host) and port.isdigit() and 0 < int(port) < 65536
    if host.startswith("["):
        ok = ok and host.endswith("]") and len(host) > 2
    if not ok:
        raise ConfigError(f"{source}: {name} {address!r} must be HOST:PORT ([::1]:PORT for IPv6)")


def _check_network(config: DaemonConfig, source: str) -> None:
    from otpgate import pki
    from otpgate.server.roles import ROLES  # the table lives with the listener

    for name in ("tls_cert", "tls_key", "tls_client_ca", "tls_crl", "upstream_ca"):
        path = getattr(config, name)
        if path and not os.path.isabs(path):
            raise ConfigError(f"{source}: {name} must be an absolute path")
    for serial in config.tls_deny_serials:
        cleaned = serial.replace(":", "")
        if not cleaned or any(c not in "0123456789abcdefABCDEF" for c in cleaned):
            raise ConfigError(f"{source}: tls_deny_serials: {serial!r} is not a hex serial")
    config.tls_deny_serials = [s.replace(":", "").lower() for s in config.tls_deny_serials]
    for cert_name, role in config.roles.items():
        if role not in ROLES:
            raise ConfigError(
                f"{source}: roles: {cert_name!r} = {role!r}: the role must be one of "
                f"{', '.join(ROLES)}"
            )
        if not pki.is_client_name(cert_name):
            raise ConfigError(
                f"{source}: roles: {cert_name!r} is not a certificate name otpgate accepts "
                "(1 to 64 letters, digits, . _ @ -, not starting with . or -)"
            )
    if config.listen:
        _check_address(source, "listen", config.listen)
        missing = [n for n in ("tls_cert", "tls_key", "tls_client_ca") if not getattr(config, n)]
        if missing:
            raise ConfigError(
                f"{source}: listen needs {', '.join(missing)} (no plaintext TCP, ever)"
            )
    if not 0.1 <= config.upstream_timeout <= 10.0:
        raise ConfigError(f"{source}: upstream_timeout must be from 0.1 to 10 seconds")
    if config.upstreams:
        for address in config.upstreams:
            _check_address(source, "upstreams:", address)
        missing = [n for n in ("tls_cert", "tls_key", "upstream_ca") if not getattr(config, n)]
        if missing:
            raise ConfigError(f"{source}: edge mode (upstreams) needs {', '.join(missing)}")
        if config.listen:
            raise ConfigError(
                f"{source}: an edge (upstreams) serves no listener: set listen or upstreams"
            )
        if config.database_url:
            raise ConfigError(
                f"{source}: an edge (upstreams) holds no database: remove database_url"
            )
