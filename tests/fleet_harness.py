"""A central otpgated with its network listener, edge daemons, certificates.

Real TLS on 127.0.0.1 with certificates made by otpgate.pki in a temporary
directory; each daemon is a real otpgated process (tests.conftest.Daemon).
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from otpgate import pki
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc
from tests.conftest import Daemon


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Pki:
    """A CA directory (pki init) and the client certificates issued from it."""

    directory: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        pki.init(directory, server_name="localhost", ip_addresses=["127.0.0.1"])
        return cls(directory)

    @property
    def ca(self) -> Path:
        return self.directory / pki.CA_CERT

    def issue(self, name: str, role: str = "admin", **kwargs: object) -> tuple[Path, Path]:
        """NAME.crt and NAME.key (made once; a second call returns the same files)."""
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        if not cert.exists():
            pki.issue_client(self.directory, name, role=role, **kwargs)  # type: ignore[arg-type]
        return cert, key

    def expired(self, name: str, role: str = "admin") -> tuple[Path, Path]:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
        return self.issue(name, role, days=1, not_before=past)

    def credentials(self, name: str, role: str = "admin") -> grpc.ChannelCredentials:
        cert, key = self.issue(name, role)
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
        )


@dataclass
class Central:
    daemon: Daemon
    port: int
    pki: Pki
    config: Path
    roles: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, name: str, role: str = "admin") -> grpc.Channel:
        return grpc.secure_channel(self.address, self.pki.credentials(name, role))

    def admin_as(self, name: str, role: str = "admin") -> pb_grpc.TwoFactorAdminStub:
        return pb_grpc.TwoFactorAdminStub(self.channel(name, role))

    def host_as(self, name: str) -> pb_grpc.HostGateStub:
        return pb_grpc.HostGateStub(self.channel(name, "host"))


def central_toml(
    pki_: Pki, port: int, roles: dict[str, str], extra: str = "", *, key: str = "server"
) -> str:
    table = "".join(f'"{name}" = "{role}"\n' for name, role in roles.items())
    return (
        f'listen = "127.0.0.1:{port}"\n'
        f'tls_cert = "{pki_.directory}/{key}.crt"\n'
        f'tls_key = "{pki_.directory}/{key}.key"\n'
        f'tls_client_ca = "{pki_.ca}"\n'
        f"{extra}\n[roles]\n{table}"
    )


def edge_toml(pki_: Pki, name: str, upstreams: list[str], extra: str = "") -> str:
    cert, key = pki_.issue(name, "host")
    listed = ", ".join(f'"{u}"' for u in upstreams)
    return (
        f"upstreams = [{listed}]\n"
        f'tls_cert = "{cert}"\ntls_key = "{key}"\nupstream_ca = "{pki_.ca}"\n{extra}\n'
    )


@pytest.fixture(scope="session")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki") / "ca")


@pytest.fixture
def make_central(
    make_daemon: Callable[..., Daemon],
    fleet_pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Central]]:
    def make(
        roles: dict[str, str] | None = None,
        *args: str,
        extra: str = "",
        root: Path | None = None,
        port: int | None = None,
    ) -> Central:
        root = root or tmp_path_factory.mktemp("central")
        roles = {"admin1": "admin", "edge1": "host"} if roles is None else roles
        port = port or free_port()
        config = root / "otpgated.toml"
        config.write_text(central_toml(fleet_pki, port, roles, extra))
        daemon = make_daemon("--config", str(config), *args, root=root)
        return Central(daemon, port, fleet_pki, config, roles)

    yield make


@pytest.fixture
def make_edge(
    make_daemon: Callable[..., Daemon],
    fleet_pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., Daemon]:
    def make(*upstreams: str, name: str = "edge1", extra: str = "") -> Daemon:
        root = tmp_path_factory.mktemp("edge")
        config = root / "otpgated.toml"
        config.write_text(edge_toml(fleet_pki, name, list(upstreams), extra))
        daemon: Daemon = make_daemon("--config", str(config), root=root)
        return daemon

    return make
