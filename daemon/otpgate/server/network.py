"""The network listener: the admin API and the edge hosts' HostGate over mutual TLS.

Off unless `listen` is set. TLS with a required client certificate, never plain
TCP; the certificate's common name picks a role from [roles] (server.roles), and
each call is checked against that role's fixed method table before any servicer
runs. A certificate gRPC accepted (it chains to tls_client_ca and is within its
validity) may still be revoked: its serial is compared with tls_deny_serials and
the CRL file at every call. SIGHUP reloads the certificate files, the CRL and the
[roles] table (server.main) without dropping a connection: a new handshake takes
the new server certificate and client CA; a call takes the new roles and
revocations at once, on connections already open too.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2

from otpgate import pki
from otpgate.errors import ConfigError
from otpgate.server import roles
from otpgate.server.handlers import method_table
from otpgate.server.monitor import set_health

log = logging.getLogger("otpgated")

# Distinct certificates worth remembering the parse of (a fleet's hosts and admins).
_PARSED_CACHE = 4096
# Anyone who reaches the port can open connections before any certificate is shown:
# a handshake must come quickly and connections are counted. An edge's connection
# is kept as long as it lives (no maximum age): one it had to open again while
# someone fills the count would find no room. The guard judges every call, so an
# open connection gains nothing once its certificate is revoked or expired.
_LISTENER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.server_handshake_timeout_ms", 5000),
    ("grpc.max_allowed_incoming_connections", 4096),
    ("grpc.max_concurrent_streams", 32),
]


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who is on the other end of a TLS connection, as its certificate says."""

    name: str  # the subject's one common name ("" when it has none or several)
    serial: int
    role: str | None  # None: the name is not in [roles]
    # Why this certificate gets nothing at all, if it does not: revoked, expired
    # while its connection stayed open, its CA no longer trusted, no usable name.
    refusal: str | None = None

    @property
    def caller(self) -> str:
        """For the audit trail and the log: never more than the certificate shows
        (a name is one pki.issue_client could give: no space to pose as the fields
        after it)."""
        return f"cert={self.name or '?'} serial={self.serial:x} role={self.role or '-'}"


@dataclasses.dataclass(frozen=True)
class TlsSettings:
    """Everything SIGHUP reloads, read and checked in one go."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes
    revoked: frozenset[int]
    role_of: Mapping[str, str]


def read_limited(path: str, what: str) -> bytes:
    """A certificate, key or CRL file (at most 1 MiB); ConfigError naming `what`."""
    try:
        with open(path, "rb") as f:
            return f.read(1024 * 1024)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_tls(
    *,
    cert: str,
    key: str,
    client_ca: str,
    crl: str,
    deny_serials: list[str],
    role_of: Mapping[str, str],
) -> TlsSettings:
    """The listener's files, checked so that a broken reload is refused whole."""
    cert_pem = read_limited(cert, "tls_cert")
    key_pem = read_limited(key, "tls_key")
    ca_pem = read_limited(client_ca, "tls_client_ca")
    try:
        pki.check_identity(cert_pem, key_pem, usage="server")
    except pki.IdentityProblem as exc:
        field, path = ("tls_key", key) if exc.part == "key" else ("tls_cert", cert)
        raise ConfigError(f"{field} {path} {exc}") from None
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise ConfigError(f"tls_client_ca {client_ca} is not PEM certificates: {exc}") from None
    revoked = {int(s, 16) for s in deny_serials}
    if crl:
        # A CRL anyone could write would let them revoke nobody: it must be the CA's.
        try:
            revoked |= pki.load_crl_serials(crl, client_ca)
        except ConfigError as exc:
            raise ConfigError(f"tls_crl: {exc}") from None
    if not cas:
        raise ConfigError(f"tls_client_ca {client_ca} holds no certificate")
    return TlsSettings(cert_pem, key_pem, ca_pem, frozenset(revoked), dict(role_of))


class Guard(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Every call: identify the certificate, then allow only its role's methods."""

    def __init__(self, settings: TlsSettings) -> None:
        self._settings = settings
        self._lock = threading.Lock()

    def replace(self, settings: TlsSettings) -> None:
        with self._lock:
            self._settings = settings

    @property
    def settings(self) -> TlsSettings:
        with self._lock:
            return self._settings

    def identify(self, context: grpc.ServicerContext) -> Identity | None:
        pems: Any = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            return None  # cannot happen with a required client certificate
        facts = _facts(pems[0])
        settings = self.settings
        refusal = None
        if facts.serial in settings.revoked:
            refusal = "is revoked"
        elif facts.not_after < time.time():
            refusal = "has expired"
        elif not _signed_by_one_of(pems[0], settings.client_ca_pem):
            refusal = "is from a CA that tls_client_ca no longer holds"
        elif not facts.name:
            refusal = (
                "has no usable name (exactly one common name of letters, digits and . _ @ -, "
                "and the clientAuth usage)"
            )
        return Identity(
            name=facts.name,
            serial=facts.serial,
            role=settings.role_of.get(facts.name) if facts.name else None,
            refusal=refusal,
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        method: str = details.method
        handler = continuation(details)
        if handler is None:
            return _refusal(method)
        # Every method is served as one that takes a stream of requests, so that the
        # caller is judged as soon as the call's headers arrive: a unary handler runs
        # only once its message has come, and a caller who never sends it (revoked,
        # without a role) would hold a worker thread meanwhile.
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._first_message(method, handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._first_message(method, handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        kinds = ("stream_unary", "stream_stream")
        changes = {
            kind: self._guarded(method, getattr(handler, kind))
            for kind in kinds
            if getattr(handler, kind) is not None
        }
        return handler._replace(**changes)

    def _first_message(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def admitted(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            self._admit(method, context)
            request = next(requests, None)
            if request is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call sent no request")
            return behavior(request, context)

        return admitted

    def _guarded(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(behavior)
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            self._admit(method, context)
            return behavior(request, context)

        return guarded

    def _admit(self, method: str, context: grpc.ServicerContext) -> Identity:
        """The caller, if its certificate may call `method` now; else the call ends."""
        identity = self.identify(context)
        if identity is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        assert identity is not None
        if identity.refusal is not None:
            reason = "revoked" if identity.refusal == "is revoked" else "certificate"
            log.warning("remote_refused %s method=%s reason=%s", identity.caller, method, reason)
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"certificate {identity.name!r} (serial {identity.serial:x}) {identity.refusal}",
            )
        # Health too only for a role, and never its Watch: a stream that holds a
        # worker thread for as long as the caller likes is not for the network.
        allowed = (
            identity.role is not None and method == "/grpc.health.v1.Health/Check"
        ) or roles.allowed(identity.role, method)
        if not allowed:
            log.warning("remote_refused %s method=%s reason=role", identity.caller, method)
            if identity.role is None:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"certificate {identity.name!r} has no role in otpgated's [roles]",
                )
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {identity.role} may not call {method.rsplit('/', 1)[-1]}",
            )
        # Admin calls (changes among them) are few and each is worth a line; the
        # hosts' questions are logins, which the gate logs already.
        if method.startswith(f"/{roles.ADMIN_SERVICE}/"):
            log.info("remote_call %s method=%s", identity.caller, method.rsplit("/", 1)[-1])
        return identity


def _refusal(method: str) -> Any:
    # Methods this listener does not serve (PamGate, UserSelfService, reflection)
    # are refused as a role's missing method is, whoever asks, without waiting for
    # a request (see Guard.intercept_service).
    def refuse(requests: Iterator[bytes], context: grpc.ServicerContext) -> None:
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method.rsplit('/', 1)[-1] or method} is not served on the network listener",
        )

    return grpc.stream_unary_rpc_method_handler(refuse)


@dataclasses.dataclass(frozen=True)
class _Facts:
    name: str  # "" unless exactly one common name and a clientAuth usage
    serial: int
    not_after: float


@functools.lru_cache(maxsize=_PARSED_CACHE)
def _facts(pem: bytes) -> _Facts:
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    # Tools disagree on which of several common names is "the" name (the first, the
    # last): a certificate with more than one gets none. So does one made without
    # clientAuth (a server's, or one of a CA that sets no usages at all).
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        for_clients = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usages
    except x509.ExtensionNotFound:
        for_clients = False
    name = str(names[0].value) if len(names) == 1 and for_clients else ""
    if not pki.is_client_name(name):
        name = ""  # spaces, '=' or controls would forge fields of the log and audit lines
    return _Facts(
        name=name,
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc.timestamp(),
    )


@functools.lru_cache(maxsize=_PARSED_CACHE)
def _signed_by_one_of(pem: bytes, ca_pem: bytes) -> bool:
    """Whether a CA of tls_client_ca (as it is now) signed this certificate: gRPC
    checked at the handshake, but a connection outlives a reload that took its CA
    out (after a compromise). Cached: one signature check per certificate and CA set."""
    cert = x509.load_pem_x509_certificate(pem)
    for ca in x509.load_pem_x509_certificates(ca_pem):
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


class NetworkListener:
    """One grpc.server on HOST:PORT with TLS and client certificates."""

    def __init__(
        self,
        address: str,
        settings: TlsSettings,
        *,
        workers: int,
        options: list[tuple[str, Any]],
    ) -> None:
        self.address = address
        self.guard = Guard(settings)
        self._pending: TlsSettings | None = None
        self._lock = threading.Lock()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="network"),
            options=[*options, *_LISTENER_OPTIONS],
            interceptors=[self.guard],
            # Beyond this many calls in flight, RESOURCE_EXHAUSTED at once (an edge
            # denies on it) rather than a queue that outlasts every caller's deadline.
            maximum_concurrent_rpcs=workers * 4,
        )
        self.health = health.HealthServicer()
        service = health_pb2.DESCRIPTOR.services_by_name["Health"]
        self.server.add_generic_rpc_handlers((method_table(service, self.health),))
        self.names: list[str] = [service.full_name]

    def add(self, service: ServiceDescriptor, servicer: object) -> None:
        self.server.add_generic_rpc_handlers((method_table(service, servicer),))
        self.names.append(service.full_name)

    def set_serving(self, serving: bool) -> None:
        set_health(self.health, self.names, serving)

    def _configuration(self, settings: TlsSettings) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(settings.key_pem, settings.cert_pem)], root_certificates=settings.client_ca_pem
        )

    def _fetch(self) -> Any:
        # gRPC asks before each handshake: None keeps the configuration it has.
        with self._lock:
            pending, self._pending = self._pending, None
        return None if pending is None else self._configuration(pending)

    def start(self) -> None:
        credentials = grpc.dynamic_ssl_server_credentials(
            self._configuration(self.guard.settings),
            self._fetch,
            require_client_authentication=True,
        )
        try:
            port = self.server.add_secure_port(self.address, credentials)
        except RuntimeError:  # how grpcio reports a port of 0 ("Failed to bind to address")
            port = 0
        if port == 0:
            raise ConfigError(f"cannot listen on {self.address} (in use, or not an address here)")
        self.server.start()
        self.set_serving(True)
        log.info("listening address=%s tls=mutual roles=%d", self.address, len(self.roles()))

    def roles(self) -> Mapping[str, str]:
        return self.guard.settings.role_of

    def reload(self, settings: TlsSettings) -> None:
        """New files for the next handshakes, new roles and revocations now."""
        with self._lock:
            self._pending = settings
        self.guard.replace(settings)
        log.info(
            "reloaded tls address=%s roles=%d revoked=%d",
            self.address,
            len(settings.role_of),
            len(settings.revoked),
        )

    def stop(self, grace: float) -> threading.Event:
        self.health.enter_graceful_shutdown()
        return self.server.stop(grace)
