"""otpgated: open the store and key, serve each socket with its fixed method table."""

from __future__ import annotations

import grp
import logging
import os
import signal
import socket
import stat
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from otpgate import __version__
from otpgate.core.accounts import CachedAccountLookup, lookup_account
from otpgate.core.login import Logins
from otpgate.core.passwords import PamPasswordChecker
from otpgate.core.service import TwoFactorService
from otpgate.errors import OtpgateError
from otpgate.server import config as daemon_config
from otpgate.server import logs, sdnotify
from otpgate.server.admin import AdminServicer
from otpgate.server.keys import load_keyring
from otpgate.server.pam import PamServicer
from otpgate.server.user import UserServicer
from otpgate.store.sqlite import SQLiteStore
from otpgate.v1 import otpgate_pb2, otpgate_pb2_grpc

log = logging.getLogger("otpgated")

# Requests are small; a cap keeps a caller from making the daemon buffer megabytes.
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
]


class Socket:
    """One grpc.server on one Unix socket, with its own health and method table."""

    def __init__(self, path: str, workers: int, mode: int, gid: int | None) -> None:
        self.path, self.mode, self.gid = path, mode, gid
        self.server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix=os.path.basename(path)
            ),
            options=_SERVER_OPTIONS,
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]

    def add(self, full_name: str) -> None:
        self.names.append(full_name)

    def start(self, reflect: bool) -> None:
        if reflect:
            reflection.enable_server_reflection([*self.names, reflection.SERVICE_NAME], self.server)
        _remove_stale_socket(self.path)
        self.server.add_insecure_port("unix:" + self.path)
        self.server.start()
        # Bound under umask 077 (0600 or tighter): only now widen to the final mode.
        if self.gid is not None:
            os.chown(self.path, -1, self.gid)
        os.chmod(self.path, self.mode)
        for name in ("", *self.names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening socket=%s mode=%04o", self.path, self.mode)

    def stop(self, grace: float) -> threading.Event:
        self.health.enter_graceful_shutdown()
        return self.server.stop(grace)


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
    try:
        os.mkdir(path)
        os.chmod(path, mode)  # mkdir's mode is cut by the umask
    except FileExistsError:
        pass
    info = os.stat(path)
    if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
        raise OtpgateError(
            f"{path} must be owned by root or this user and not writable by group or others"
        )


def _admin_gid(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise OtpgateError(
            f"admin group {name!r} does not exist: create it (groupadd --system {name}) "
            "or set admin_group"
        ) from None


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def run(config: daemon_config.DaemonConfig) -> int:
    """Serve until SIGTERM/SIGINT; main() has blocked those before any thread started."""
    os.umask(0o077)
    _prepare_dir(config.state_dir, 0o700)
    _prepare_dir(config.runtime_dir, 0o755)
    gid = _admin_gid(config.admin_group)
    store = SQLiteStore(config.database)
    try:
        keyring = load_keyring(config, store)
        service = TwoFactorService(
            store,
            keyring,
            default_issuer=config.issuer or os.uname().nodename,
            accounts=CachedAccountLookup(),
            accounts_for_enrollment=lookup_account,
        )
        admin = Socket(config.socket("admin"), config.workers, 0o660, gid)
        otpgate_pb2_grpc.add_TwoFactorAdminServicer_to_server(AdminServicer(service), admin.server)
        admin.add(otpgate_pb2.DESCRIPTOR.services_by_name["TwoFactorAdmin"].full_name)
        passwords = PamPasswordChecker(config.password_pam_service)
        user = Socket(config.socket("user"), config.workers, 0o666, None)
        otpgate_pb2_grpc.add_UserSelfServiceServicer_to_server(
            UserServicer(service, Logins(service, passwords)), user.server
        )
        user.add(otpgate_pb2.DESCRIPTOR.services_by_name["UserSelfService"].full_name)
        pam = Socket(config.socket("pam"), config.workers, 0o600, None)
        otpgate_pb2_grpc.add_PamGateServicer_to_server(PamServicer(service, passwords), pam.server)
        pam.add(otpgate_pb2.DESCRIPTOR.services_by_name["PamGate"].full_name)

        stopping = threading.Event()
        for signum in _STOP_SIGNALS:
            signal.signal(signum, lambda *_: stopping.set())
        admin.start(reflect=True)
        user.start(reflect=True)
        pam.start(reflect=False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        log.info(
            "started version=%s database=%s key_id=%s",
            __version__,
            config.database,
            keyring.primary_id,
        )
        sdnotify.notify("READY=1")
        interval = sdnotify.watchdog_interval()
        watchdog = sdnotify.Watchdog(interval, store.healthy) if interval else None
        if watchdog:
            watchdog.start()
        while not stopping.wait(3600):
            pass
        sdnotify.notify("STOPPING=1")
        if watchdog:
            watchdog.stop()
        log.info("stopping: draining in-flight calls for up to %.0fs", config.shutdown_grace)
        done = [s.stop(config.shutdown_grace) for s in (admin, user, pam)]
        for event in done:
            event.wait()
        log.info("stopped")
        return 0
    finally:
        store.close()


def _start_logging() -> None:
    # Every thread (the log writer, the gRPC workers) inherits a mask without the stop
    # signals, so they reach only the main thread, never a worker waiting inside PAM
    # (pam_exec's child, a password check) where an interrupted system call would
    # fail a login; run() unblocks them here once its handler is in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    logs.configure()


def main(argv: list[str] | None = None) -> int:
    _start_logging()
    try:
        config = daemon_config.load(argv)
        logging.getLogger().setLevel(config.log_level.upper())
        return run(config)
    except OtpgateError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    finally:
        logs.flush()  # pending lines before any traceback Python prints next


if __name__ == "__main__":
    sys.exit(main())
