"""otpgated: open the store and key, serve each socket with its fixed method table."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import resource
import signal
import socket
import stat
import sys
import threading
import time
from concurrent import futures

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core reads it once, at import
import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from otpgate import __version__
from otpgate.core.accounts import CachedAccountLookup, CachedGroupNames, lookup_account
from otpgate.core.gate_files import GateLists, gate_lists
from otpgate.core.login import Logins
from otpgate.core.passwords import PamPasswordChecker
from otpgate.core.paths import GATE_DIR_NAME, prepare_dir
from otpgate.core.ports import SelfService, Store
from otpgate.core.service import TwoFactorService
from otpgate.errors import OtpgateError
from otpgate.server import config as daemon_config
from otpgate.server import logs, maintenance, sdnotify
from otpgate.server.admin import AdminServicer
from otpgate.server.edge import (
    EdgeGateLists,
    EdgePamServicer,
    SeenNames,
    Upstreams,
    UpstreamSelfService,
)
from otpgate.server.gate_writer import GateWriter, write_lists
from otpgate.server.handlers import method_table
from otpgate.server.host_gate import HostGateServicer
from otpgate.server.keys import check_key_location, load_keyring
from otpgate.server.monitor import DatabaseMonitor, set_health
from otpgate.server.network import NetworkListener, TlsSettings, load_tls, read_limited
from otpgate.server.pam import PamServicer
from otpgate.server.relay import Budgets, CallerRegistry, UserSocketRelay
from otpgate.server.user import UserServicer
from otpgate.server.user_server import UserServer
from otpgate.store import backends
from otpgate.v1 import otpgate_pb2

log = logging.getLogger("otpgated")

# Requests are small; a cap keeps a caller from making the daemon buffer megabytes.
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
]
_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
_REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
# Descriptors kept for pam.sock and admin.sock whatever user.sock's callers hold
# (each relayed connection costs three: the caller's, ours, the gRPC server's).
_RESERVED_FDS = 512
_WANTED_FDS = 65536


def _service(name: str) -> ServiceDescriptor:
    return otpgate_pb2.DESCRIPTOR.services_by_name[name]


class Socket:
    """One grpc.server on one Unix socket, with its own health and method table."""

    def __init__(
        self,
        path: str,
        workers: int,
        mode: int,
        gid: int | None,
        *,
        max_calls: int | None = None,
    ) -> None:
        self.path, self.mode, self.gid = path, mode, gid
        self.server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix=os.path.basename(path)
            ),
            options=_SERVER_OPTIONS,
            # Calls beyond this many in flight are RESOURCE_EXHAUSTED at once. Only for
            # user.sock: on pam.sock a refused call would be a refused login (sshd's
            # MaxStartups already bounds those callers).
            maximum_concurrent_rpcs=max_calls,
        )
        self.health = health.HealthServicer()
        self.server.add_generic_rpc_handlers((method_table(_HEALTH, self.health),))
        self.names: list[str] = [_HEALTH.full_name]

    def add(self, service: ServiceDescriptor, servicer: object) -> None:
        self.server.add_generic_rpc_handlers((method_table(service, servicer),))
        self.names.append(service.full_name)

    def start(self, reflect: bool) -> None:
        if reflect:
            servicer = reflection.ReflectionServicer([*self.names, reflection.SERVICE_NAME])
            self.server.add_generic_rpc_handlers((method_table(_REFLECTION, servicer),))
        _remove_stale_socket(self.path)
        self.server.add_insecure_port("unix:" + self.path)
        self.server.start()
        # Bound under umask 077 (0600 or tighter): only now widen to the final mode.
        if self.gid is not None:
            os.chown(self.path, -1, self.gid)
        os.chmod(self.path, self.mode)
        self.set_serving(True)
        log.info("listening socket=%s mode=%04o", self.path, self.mode)

    def set_serving(self, serving: bool) -> None:
        set_health(self.health, self.names, serving)

    def stop(self, grace: float) -> threading.Event:
        self.health.enter_graceful_shutdown()
        return self.server.stop(grace)


def _descriptor_limit() -> int:
    """Raise the soft limit on open files toward the hard one; the limit in force.

    Under the shipped unit LimitNOFILE sets it and setrlimit is filtered out (EPERM).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _WANTED_FDS if hard == resource.RLIM_INFINITY else min(hard, _WANTED_FDS)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return _WANTED_FDS if soft == resource.RLIM_INFINITY else soft


def _user_budgets(config: daemon_config.DaemonConfig) -> Budgets:
    limit = _descriptor_limit()
    fit = max(16, (limit - _RESERVED_FDS) // 3)
    total = config.user_connections
    if total > fit:
        log.warning(
            "user_connections lowered from %d to %d: the open-files limit is %d "
            "(raise LimitNOFILE)",
            total,
            fit,
            limit,
        )
        total = fit
    return Budgets(
        max_connections=total,
        max_per_uid=min(config.user_connections_per_uid, total),
        idle_seconds=config.user_idle_seconds,
    )


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OtpgateError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over from a crash
        return
    finally:
        probe.close()
    raise OtpgateError(f"another otpgated is already serving {path}")


def _prepare_dir(path: str, mode: int) -> None:
    # Every component from / down is checked before anything is created (StrictModes,
    # core/paths.py). A private directory (mode without group or other bits: the
    # state) must have exactly its mode, so a 0755 one is refused; the sockets'
    # 0755 directory need only be writable by nobody else.
    prepare_dir(path, mode, exact=not mode & 0o077, subject=f"directory {path}")


# The least time between two rewrites of the gate files: a burst of enrollments (an
# import, a script) makes one list, not one per account.
GATE_SPACING = 1.0
EDGE_GATE_SPACING = 2.0


def _gate_dir(config: daemon_config.DaemonConfig) -> str:
    # Root's alone: who is enrolled is nobody else's business (core.gate_files).
    path = os.path.join(config.runtime_dir, GATE_DIR_NAME)
    _prepare_dir(path, 0o700)
    return path


def open_daemon_store(config: daemon_config.DaemonConfig, *, upgrade: bool = False) -> Store:
    """The store the daemon's configuration names (also `otpgated upgrade-schema`'s)."""
    return backends.open_store(
        config.database_url or config.database,
        password_file=_database_password_file(config),
        timeout=config.database_timeout,
        upgrade=upgrade,
        host=os.uname().nodename,
    )


def _database_password_file(config: daemon_config.DaemonConfig) -> str | None:
    # As with the key: a systemd credential (LoadCredential=otpgate.dbpassword:...)
    # wins, so a unit can hand the password over without a file of ours.
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        path = os.path.join(credentials, config.database_password_credential)
        if os.path.exists(path):
            return path
    return config.database_password_file or None


def _purge_audit(service: TwoFactorService, days: int) -> None:
    try:
        removed = service.purge_audit(days)
    except OtpgateError as exc:  # tried again in an hour; serving goes on
        log.warning("audit_purge_failed error=%s: %s", type(exc).__name__, exc)
        return
    if removed:
        log.info("audit_purged events=%d older_than_days=%d", removed, days)


def _admin_gid(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise OtpgateError(
            f"admin group {name!r} does not exist: create it (groupadd --system {name}) "
            "or set admin_group"
        ) from None


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_SIGNALS = _STOP_SIGNALS | {signal.SIGHUP}


class _Signals:
    """What the main thread waits for: a stop, or a reload (SIGHUP).

    The signals stay blocked in every thread (main() blocks them before any thread
    starts) and are taken here with sigtimedwait. A handler that woke the main thread
    through an Event could deadlock: a signal arriving while the main thread is
    inside Event.wait() runs the handler on that thread, whose set() then waits for
    the lock wait() holds.
    """

    def __init__(self) -> None:
        self.stopping = False
        self.reload = False

    def wait(self, seconds: float) -> None:
        info = signal.sigtimedwait(_SIGNALS, max(0.0, seconds))
        while info is not None:
            if info.si_signo == signal.SIGHUP:
                self.reload = True
            else:
                self.stopping = True
            info = signal.sigtimedwait(_SIGNALS, 0)


def _tls_settings(config: daemon_config.DaemonConfig) -> TlsSettings:
    return load_tls(
        cert=config.tls_cert,
        key=config.tls_key,
        client_ca=config.tls_client_ca,
        crl=config.tls_crl,
        deny_serials=config.tls_deny_serials,
        role_of=config.roles,
    )


def _reload_failed(exc: Exception) -> None:
    # Our own errors say what is wrong; another (a key cryptography cannot read) is
    # named by its type only, as rpc.py does, since its text may quote the file.
    what = str(exc) if isinstance(exc, OtpgateError) else "unreadable files"
    log.error(
        "reload_failed error=%s: %s (the previous certificates stay)", type(exc).__name__, what
    )


def _reload_listener(listener: NetworkListener, argv: list[str]) -> None:
    # The configuration file again, for [roles], the deny list and the file names;
    # whatever else changed waits for a restart. A broken file changes nothing.
    try:
        config = daemon_config.load(argv)
        listener.reload(_tls_settings(config))
    except Exception as exc:  # a failed reload must never stop the daemon
        _reload_failed(exc)


def _start_listener(
    config: daemon_config.DaemonConfig,
    service: TwoFactorService,
    passwords: PamPasswordChecker,
) -> NetworkListener:
    listener = NetworkListener(
        config.listen, _tls_settings(config), workers=config.workers, options=_SERVER_OPTIONS
    )
    listener.add(_service("TwoFactorAdmin"), AdminServicer(service, guard=listener.guard))
    listener.add(_service("HostGate"), HostGateServicer(service, passwords, listener.guard))
    listener.start()
    return listener


def _user_server(
    config: daemon_config.DaemonConfig,
    private_dir: str,
    callers: CallerRegistry,
    service: SelfService,
    passwords: PamPasswordChecker,
) -> UserServer:
    """The user gRPC server behind the relay, on its root-only socket."""
    user = UserServer(
        os.path.join(private_dir, "user.sock"),
        workers=config.workers,
        calls_per_uid=config.user_calls_per_uid,
        callers=callers,
        options=_SERVER_OPTIONS,
    )
    _remove_stale_socket(user.path)
    user.add(
        _service("UserSelfService"), UserServicer(service, Logins(service, passwords), callers)
    )
    return user


def _start_relay(
    config: daemon_config.DaemonConfig, user: UserServer, callers: CallerRegistry, budgets: Budgets
) -> UserSocketRelay:
    relay = UserSocketRelay(config.socket("user"), user.path, callers, budgets)
    _remove_stale_socket(relay.public_path)
    relay.bind()
    os.chmod(relay.public_path, 0o666)  # noqa: S103 - any local user: see server.relay
    relay.start()
    log.info(
        "listening socket=%s mode=0666 relay_to=%s max_connections=%d per_uid=%d",
        relay.public_path,
        user.path,
        budgets.max_connections,
        budgets.max_per_uid,
    )
    return relay


def _reload_upstreams(upstreams: Upstreams, argv: list[str]) -> None:
    # The edge's certificate, key and upstream CA again (renewed certificates); the
    # list of upstreams and everything else wait for a restart.
    try:
        config = daemon_config.load(argv)
        upstreams.reload(
            ca_pem=read_limited(config.upstream_ca, "upstream_ca"),
            cert_pem=read_limited(config.tls_cert, "tls_cert"),
            key_pem=read_limited(config.tls_key, "tls_key"),
        )
    except Exception as exc:  # a failed reload must never stop the daemon
        _reload_failed(exc)
        return
    log.info("reloaded tls upstreams=%s", ",".join(upstreams.addresses))


def run_edge(config: daemon_config.DaemonConfig, argv: list[str] | None = None) -> int:
    """Edge mode (server.edge): pam.sock and user.sock, answered by the upstreams.

    No key, no database, no admin.sock: this host holds nothing worth stealing, and
    administrators reach the central tier (otpgate --server).
    """
    os.umask(0o077)
    _prepare_dir(config.runtime_dir, 0o755)
    private_dir = os.path.join(config.runtime_dir, "private")
    _prepare_dir(private_dir, 0o700)
    gate_dir = _gate_dir(config)
    budgets = _user_budgets(config)
    upstreams = Upstreams(
        config.upstreams,
        ca_pem=read_limited(config.upstream_ca, "upstream_ca"),
        cert_pem=read_limited(config.tls_cert, "tls_cert"),
        key_pem=read_limited(config.tls_key, "tls_key"),
        timeout=config.upstream_timeout,
    )
    relay: UserSocketRelay | None = None
    # A name seen for the first time is asked about soon, but at most every few
    # seconds, whatever names a client tries. (A lambda: ask_centrals needs `seen`,
    # which needs `gate`.)
    gate = GateWriter(gate_dir, lambda: ask_centrals(), min_spacing=EDGE_GATE_SPACING)
    seen = SeenNames(on_new=gate.changed)
    ask_centrals = EdgeGateLists(upstreams, seen)
    try:
        passwords = PamPasswordChecker(config.password_pam_service)
        callers = CallerRegistry()
        user = _user_server(config, private_dir, callers, UpstreamSelfService(upstreams), passwords)
        pam = Socket(config.socket("pam"), config.workers, 0o600, None)
        pam.add(_service("PamGate"), EdgePamServicer(upstreams, passwords, seen))
        signals = _Signals()
        user.start()
        relay = _start_relay(config, user, callers, budgets)
        pam.start(reflect=False)
        # Until the centrals answer AskList, the files list nobody: every login asks
        # `check`, and pam_listfile finds a file to read.
        write_lists(gate_dir, GateLists())
        gate.start()
        log.info(
            "started version=%s mode=edge upstreams=%s", __version__, ",".join(config.upstreams)
        )
        sdnotify.notify("READY=1")
        interval = sdnotify.watchdog_interval()
        watchdog = (
            sdnotify.Watchdog(interval, lambda: relay.alive() and user.alive())
            if interval
            else None
        )
        if watchdog:
            watchdog.start()
        while not signals.stopping:
            if signals.reload:
                signals.reload = False
                _reload_upstreams(upstreams, argv or [])
            signals.wait(3600)
        sdnotify.notify("STOPPING=1")
        if watchdog:
            watchdog.stop()
        relay.stop_accepting()
        for event in [s.stop(config.shutdown_grace) for s in (user, pam)]:
            event.wait()
        log.info("stopped")
        return 0
    finally:
        gate.stop()
        if relay is not None:
            relay.stop()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(private_dir, "user.sock"))
        upstreams.close()


def run(config: daemon_config.DaemonConfig, argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; main() has blocked those before any thread started."""
    if config.edge:
        return run_edge(config, argv)
    os.umask(0o077)
    check_key_location(config)
    _prepare_dir(config.state_dir, 0o700)
    _prepare_dir(config.runtime_dir, 0o755)
    # The user gRPC server's own socket: only root may connect there, so every
    # caller of it came through the relay, which knows who they are.
    private_dir = os.path.join(config.runtime_dir, "private")
    _prepare_dir(private_dir, 0o700)
    gate_dir = _gate_dir(config)
    gid = _admin_gid(config.admin_group)
    budgets = _user_budgets(config)
    store = open_daemon_store(config)
    relay: UserSocketRelay | None = None
    listener: NetworkListener | None = None
    gate: GateWriter | None = None
    try:
        keyring = load_keyring(config, store)
        gate = GateWriter(gate_dir, lambda: gate_lists(service), min_spacing=GATE_SPACING)
        service = TwoFactorService(
            store,
            keyring,
            default_issuer=config.issuer or os.uname().nodename,
            accounts=CachedAccountLookup(),
            accounts_for_enrollment=lookup_account,
            groups=CachedGroupNames(),
            on_change=gate.changed,
        )
        admin = Socket(config.socket("admin"), config.workers, 0o660, gid)
        admin.add(_service("TwoFactorAdmin"), AdminServicer(service))
        passwords = PamPasswordChecker(config.password_pam_service)
        callers = CallerRegistry()
        user = _user_server(config, private_dir, callers, service, passwords)
        pam = Socket(config.socket("pam"), config.workers, 0o600, None)
        pam.add(_service("PamGate"), PamServicer(service, passwords))

        signals = _Signals()
        admin.start(reflect=True)
        user.start()
        relay = _start_relay(config, user, callers, budgets)
        pam.start(reflect=False)
        gate.start()  # only now: a daemon that may not start leaves the files alone
        if config.listen:
            listener = _start_listener(config, service, passwords)
        log.info(
            "started version=%s database=%s key_id=%s",
            __version__,
            config.database_where,
            keyring.primary_id,
        )

        def tell_health(serving: bool) -> None:
            for server in (admin, user, pam):
                server.set_serving(serving)
            if listener is not None:
                listener.set_serving(serving)

        monitor = DatabaseMonitor(store, tell_health)
        monitor.start()
        sdnotify.notify("READY=1")
        interval = sdnotify.watchdog_interval()
        # Not "the database answers": see server.monitor. A probe is bounded by the
        # store's timeout (SQLite's by its 5 s lock wait), one runs every second.
        probe_bound = 2.0 + max(config.database_timeout, 5.0)
        local_store = not config.database_url

        def healthy() -> bool:
            store_ok = monitor.fresh(probe_bound) and (monitor.serving or not local_store)
            return store_ok and relay.alive() and user.alive()

        watchdog = sdnotify.Watchdog(interval, healthy) if interval else None
        if watchdog:
            watchdog.start()
        next_purge = 0.0
        while not signals.stopping:
            if signals.reload:
                signals.reload = False
                if listener is not None:
                    _reload_listener(listener, argv or [])
                else:
                    log.info("reload: nothing to reload (no listener)")
            if time.monotonic() >= next_purge:
                _purge_audit(service, config.audit_retention_days)
                next_purge = time.monotonic() + 3600
            signals.wait(max(0.0, next_purge - time.monotonic()))
        sdnotify.notify("STOPPING=1")
        if watchdog:
            watchdog.stop()
        monitor.stop()
        log.info("stopping: draining in-flight calls for up to %.0fs", config.shutdown_grace)
        relay.stop_accepting()
        done = [s.stop(config.shutdown_grace) for s in (admin, user, pam)]
        if listener is not None:
            done.append(listener.stop(config.shutdown_grace))
        for event in done:
            event.wait()
        log.info("stopped")
        return 0
    finally:
        if gate is not None:
            gate.stop()
        if relay is not None:
            relay.stop()
            # The user gRPC server's own socket (gRPC leaves a Unix socket behind).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(private_dir, "user.sock"))
        store.close()


def _start_logging() -> None:
    # Every thread (the log writer, the gRPC workers) inherits a mask without the stop
    # signals, so they reach only the main thread, never a worker waiting inside PAM
    # (pam_exec's child, a password check) where an interrupted system call would
    # fail a login. They stay blocked: the main thread takes them (run's _Signals).
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    logs.configure()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in maintenance.COMMANDS:
        return maintenance.run(args)
    _start_logging()
    try:
        config = daemon_config.load(args)
        logging.getLogger().setLevel(config.log_level.upper())
        return run(config, args)
    except OtpgateError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    finally:
        logs.flush()  # pending lines before any traceback Python prints next


if __name__ == "__main__":
    sys.exit(main())
