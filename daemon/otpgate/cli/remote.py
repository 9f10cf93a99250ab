"""Where the CLI goes remote: a central otpgated's network listener over mutual TLS.

The flags --server HOST:PORT, --tls-ca, --tls-cert, --tls-key, --tls-server-name,
else the keys of the same names (server, tls_ca, tls_cert, tls_key,
tls_server_name) in the profile $XDG_CONFIG_HOME/otpgate/remote.toml (default
~/.config/otpgate/remote.toml), key by key: a flag wins over the profile's value.

Remote or local, in this order:
1. --server: remote (with --socket too: refused, give one).
2. --socket or OTPGATE_SOCKET: local; the profile is not read.
3. `server` in the profile: remote. A help-desk laptop has no otpgated of its
   own, and the profile makes every command go to the central one.
4. Otherwise the local admin.sock (or user.sock) as before.

Remote is always the admin API (TwoFactorAdmin) as the certificate's role; the
self-service login of user.sock is never used remotely. `doctor` and `setup ssh`
look at this host's sshd and otpgated: --server is refused for them and the
profile's server is ignored. (`pki` only writes files and ignores all of this.)

Nothing here speaks gRPC (client.py does): this module reads the profile and the
PEM files, checks them (a certificate and its key must match and be valid now; a
private key that others may read is refused when it is the caller's own file, as
ssh refuses one) and hands client.py bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from otpgate import pki
from otpgate.errors import ClientError, InvalidArgument

PROFILE = Path("otpgate") / "remote.toml"
# Profile key -> the flag (and argparse destination) that overrides it.
FLAGS = {
    "server": "--server",
    "tls_ca": "--tls-ca",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "tls_server_name": "--tls-server-name",
}
_PATHS = ("tls_ca", "tls_cert", "tls_key")
# Commands about this host (its sshd, PAM stack and sockets): never remote.
LOCAL_ONLY = frozenset({"doctor", "setup ssh"})
_PEM_LIMIT = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class _Setting:
    value: str
    origin: str  # for messages: "--tls-key" or "tls_key in /home/h/.config/otpgate/remote.toml"


@dataclasses.dataclass(frozen=True)
class Remote:
    """A central otpgated and what the CLI shows it: PEM bytes, checked."""

    server: str  # HOST:PORT
    ca: bytes
    cert: bytes
    key: bytes
    server_name: str | None  # checked in the server's certificate instead of HOST
    name: str  # the client certificate's common name, for messages
    ca_file: str
    cert_file: str


def profile_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME", "")
    # The XDG base directory spec: a relative value is invalid and is ignored.
    root = Path(base) if os.path.isabs(base) else Path(os.path.expanduser("~")) / ".config"
    return root / PROFILE


def load_profile(path: Path) -> dict[str, _Setting]:
    """The profile's settings (none when it does not exist); paths made absolute
    against the profile's directory."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ClientError(f"cannot read the profile {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(str(path), f"not valid TOML: {exc}") from None
    settings = {}
    for key, value in data.items():
        if key not in FLAGS:
            raise InvalidArgument(str(path), f"unknown key {key!r} (known: {', '.join(FLAGS)})")
        if not isinstance(value, str) or not value:
            raise InvalidArgument(str(path), f"{key} must be a non-empty string")
        if key in _PATHS:
            value = str(path.parent / os.path.expanduser(value))
        settings[key] = _Setting(value, f"{key} in {path}")
    return settings


def choose(
    args: argparse.Namespace, env: Mapping[str, str], *, socket_given: bool, command: str
) -> Remote | None:
    """The remote otpgated this command goes to, or None for the local one.
    `socket_given`: --socket was on the command line."""
    flags = {
        key: _Setting(getattr(args, key), flag)
        for key, flag in FLAGS.items()
        if getattr(args, key, None)
    }
    if command in LOCAL_ONLY:
        if flags:
            flag = next(iter(flags.values())).origin
            raise InvalidArgument(
                flag,
                f"{command} checks this host's sshd and otpgated: run it on the host itself, "
                f"without {flag}",
            )
        return None  # and the profile's server is not for it either
    if "server" in flags and socket_given:
        raise InvalidArgument(
            "--server", "and --socket: give one (a remote otpgated, or a local socket)"
        )
    local_asked = socket_given or bool(env.get("OTPGATE_SOCKET"))
    profile: dict[str, _Setting] = {}
    if "server" in flags or not local_asked:
        profile = load_profile(profile_path(env))
    settings = profile | flags
    if "server" not in settings:
        tls = [flag for key, flag in FLAGS.items() if key in flags]
        if tls:
            why = (
                "--socket or $OTPGATE_SOCKET chose a local otpgated"
                if local_asked
                else "without it the CLI talks to the local otpgated"
            )
            raise InvalidArgument(
                tls[0], f"only with --server HOST:PORT (or server in {profile_path(env)}); {why}"
            )
        return None
    return _remote(settings, profile_path(env))


def _remote(settings: dict[str, _Setting], profile: Path) -> Remote:
    server = settings["server"]
    missing = [FLAGS[key] for key in _PATHS if key not in settings]
    if missing:
        raise InvalidArgument(
            ", ".join(missing),
            f"missing: with {server.origin}, give --tls-ca FILE (the CA otpgated's "
            "certificate chains to), --tls-cert FILE and --tls-key FILE (your certificate "
            f"and its key, e.g. from `otpgate pki issue`), or set tls_ca, tls_cert and "
            f"tls_key in {profile}",
        )
    address = _address(server)
    ca = _read(settings["tls_ca"])
    cert_pem = _read(settings["tls_cert"])
    key_pem = _read(settings["tls_key"], private=True)
    _certificates(settings["tls_ca"], ca)
    cert = _certificates(settings["tls_cert"], cert_pem)[0]
    _check_pair(settings["tls_cert"], cert, settings["tls_key"], key_pem)
    name = settings.get("tls_server_name")
    return Remote(
        server=address,
        ca=ca,
        cert=cert_pem,
        key=key_pem,
        server_name=name.value if name else None,
        name=_common_name(cert),
        ca_file=settings["tls_ca"].value,
        cert_file=settings["tls_cert"].value,
    )


def _address(setting: _Setting) -> str:
    """HOST:PORT, as gRPC takes it ([v6]:PORT for an IPv6 address)."""
    host, sep, port = setting.value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if (
        not sep
        or not host
        or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)
        or (":" in host and not bracketed)
        or any(c.isspace() or c in "/@" for c in host)
    ):
        raise InvalidArgument(
            setting.origin,
            f"expected HOST:PORT, like otpgate.example.org:7443 or [2001:db8::1]:7443 "
            f"(got {setting.value!r})",
        )
    return setting.value


def _read(setting: _Setting, *, private: bool = False) -> bytes:
    path = setting.value
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument(setting.origin, f"{path} is not a regular file")
            data = f.read(_PEM_LIMIT + 1)
    except OSError as exc:
        raise InvalidArgument(setting.origin, f"cannot read {path}: {exc.strerror}") from None
    if len(data) > _PEM_LIMIT:
        raise InvalidArgument(setting.origin, f"{path} is larger than {_PEM_LIMIT} bytes")
    # ssh's rule for a private key: refused when it is yours and others may use it.
    if private and info.st_uid == os.getuid() and info.st_mode & 0o077:
        raise InvalidArgument(
            setting.origin,
            f"{path} may be read by others (mode {stat.S_IMODE(info.st_mode):04o}): "
            f"refused, as ssh refuses such a key; chmod 600 {path}",
        )
    return data


def _certificates(setting: _Setting, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InvalidArgument(setting.origin, f"{setting.value} holds no PEM certificate") from None
    return certs


def _check_pair(
    cert_setting: _Setting, cert: x509.Certificate, key_setting: _Setting, key_pem: bytes
) -> None:
    # otpgated's own check (its edges use it): a broken pair is named here, before
    # gRPC would only report a closed socket.
    try:
        pki.check_identity(cert.public_bytes(serialization.Encoding.PEM), key_pem, usage="client")
    except pki.IdentityProblem as exc:
        setting = key_setting if exc.part == "key" else cert_setting
        message = str(exc).replace("the certificate", cert_setting.value)
        raise InvalidArgument(setting.origin, f"{setting.value} {message}") from None


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode(errors="replace")
