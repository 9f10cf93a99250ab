"""user.sock's front door: who is calling, from the kernel, and a budget per caller.

gRPC Python tells a servicer nothing about the process on the other end of a Unix
socket (`peer()` is just "unix:", and local credentials only say "local"). So
user.sock is not a gRPC server. This relay accepts there, asks the kernel who
connected (SO_PEERCRED: pid, uid, gid), refuses callers over their budget, and
copies bytes unchanged to the real gRPC server on a private socket (in a 0700
directory: only root can connect there). Its side of each copy is bound to a
unique abstract name, which gRPC does report as the peer
(`unix-abstract:otpgate-user/...`); the servicer looks the caller up by that name
in a registry only this relay writes. A connection that did not come through the
relay has no name in the registry and gets nothing.

Budgets (all callers but root): connections per uid, bytes per second per uid
(a token bucket: enough for any CLI session, far too few to keep the daemon
busy), idle time; and for everyone together, a total that leaves the process's
descriptors to pam.sock and admin.sock. One thread, non-blocking sockets, no
thread per connection: 5,000 attackers' connections cost a few milliseconds of
accept-and-close, not 5,000 descriptors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import secrets
import selectors
import signal
import socket
import struct
import threading
import time

from otpgate.core.throttle import Clock, LineBudget, TokenBucket

log = logging.getLogger("otpgated")

PEER_PREFIX = "unix-abstract:"
NAME_PREFIX = "otpgate-user/"
_CHUNK = 65536
_HIGH_WATER = 256 * 1024  # bytes waiting for one side before we stop reading the other
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclasses.dataclass(frozen=True)
class Caller:
    """The process that connected to user.sock, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def describe(self) -> str:
        return f"caller_uid={self.uid} caller_pid={self.pid}"


class CallerRegistry:
    """Abstract socket name -> Caller, for every connection the relay holds open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callers: dict[str, Caller] = {}

    def add(self, name: str, caller: Caller) -> None:
        with self._lock:
            self._callers[name] = caller

    def remove(self, name: str) -> None:
        with self._lock:
            self._callers.pop(name, None)

    def from_peer(self, peer: str) -> Caller | None:
        """The caller behind a gRPC peer string, or None (not relayed, or gone)."""
        if not peer.startswith(PEER_PREFIX + NAME_PREFIX):
            return None
        with self._lock:
            return self._callers.get(peer[len(PEER_PREFIX) :])

    def __len__(self) -> int:
        with self._lock:
            return len(self._callers)


@dataclasses.dataclass(frozen=True)
class Budgets:
    max_connections: int = 1024
    max_per_uid: int = 16
    bytes_per_second: int = 8 * 1024
    burst_bytes: int = 256 * 1024
    idle_seconds: float = 300.0


class _Link:
    """One caller's connection and our connection to the gRPC server behind it."""

    def __init__(self, client: socket.socket, upstream: socket.socket, name: str, caller: Caller):
        self.client, self.upstream, self.name, self.caller = client, upstream, name, caller
        self.to_upstream = bytearray()
        self.to_client = bytearray()
        self.last_active = 0.0
        self.throttled = False
        self.closed = False
        self.events: dict[socket.socket, int] = {client: 0, upstream: 0}


def peer_credentials(sock: socket.socket) -> Caller:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return Caller(pid, uid, gid)


class UserSocketRelay:
    def __init__(
        self,
        public_path: str,
        upstream_path: str,
        registry: CallerRegistry,
        budgets: Budgets,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.public_path = public_path
        self._bound = False
        self.upstream_path = upstream_path
        self.registry = registry
        self.budgets = budgets
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._links: dict[socket.socket, _Link] = {}
        self._per_uid: dict[int, int] = {}
        self._buckets: dict[int, TokenBucket] = {}
        self._counter = 0
        self._stopping = threading.Event()
        self._close_listener = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._refusals = LineBudget(1.0, clock, burst=5)
        self._errors = LineBudget(1.0, clock, burst=3)
        self._last_sweep = 0.0

    # -- life cycle -------------------------------------------------------------------

    def bind(self) -> None:
        """Bind user.sock (under the daemon's umask 077: widened by the caller)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.public_path)
        listener.listen(4096)  # the kernel caps it at net.core.somaxconn
        listener.setblocking(False)
        self._listener = listener
        self._bound = True

    def start(self) -> None:
        assert self._listener is not None, "bind() first"
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="user.sock-relay", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        """Close user.sock: new callers are refused by the kernel; links stay."""
        self._close_listener.set()
        self._wake()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for link in list(self._links.values()):
            self._close(link)
        if self._listener is not None:
            self._listener.close()
        if self._bound:
            # Ours (bind() made it): a stopped daemon leaves no socket that looks served.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.public_path)
        self._wake_r.close()
        self._wake_w.close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def connection_count(self) -> int:
        return len(self.registry)

    # -- the loop ---------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        # Signals are the main thread's (see server.main): never deliver one here.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while not self._stopping.is_set():
            try:
                self._once()
            except Exception as exc:  # a bug here must not end user.sock for good
                allowed, suppressed = self._errors.allow()
                if allowed:
                    more = f" (and {suppressed} more not logged)" if suppressed else ""
                    log.error("user_socket_relay_error error=%s%s", type(exc).__name__, more)

    def _once(self) -> None:
        throttled = any(link.throttled for link in self._links.values())
        try:
            ready = self._selector.select(0.1 if throttled else 1.0)
        except OSError:  # EINTR cannot happen (signals blocked); anything else: retry
            return
        for key, mask in ready:
            if key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
                if self._close_listener.is_set() and self._listener is not None:
                    self._selector.unregister(self._listener)
                    self._listener.close()
                    self._listener = None
            elif key.fileobj is self._listener:
                self._accept_all()
            else:
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                link = self._links.get(sock)
                if link is not None and not link.closed:
                    self._service(link, sock, mask)
        now = self._clock()
        if throttled:
            for link in list(self._links.values()):
                if link.throttled and not link.closed:
                    self._update(link)
        if now - self._last_sweep >= 1.0:
            self._last_sweep = now
            self._sweep(now)

    def _accept_all(self) -> None:
        assert self._listener is not None
        for _ in range(256):  # then let the links run: a flood must not starve them
            try:
                client, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors (EMFILE/ENFILE): what the budgets exist to prevent.
                # The connection stays queued, so the listener stays readable: rest a
                # moment rather than spin on it.
                self._refused(
                    None, f"accept_failed errno={errno.errorcode.get(exc.errno or 0, '?')}"
                )
                time.sleep(0.1)
                return
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        try:
            caller = peer_credentials(client)
        except OSError:
            client.close()
            return
        budgets = self.budgets
        if len(self._links) // 2 >= budgets.max_connections:
            client.close()
            self._refused(caller, f"total_limit limit={budgets.max_connections}")
            return
        if not caller.is_root and self._per_uid.get(caller.uid, 0) >= budgets.max_per_uid:
            client.close()
            self._refused(caller, f"per_uid_limit limit={budgets.max_per_uid}")
            return
        self._counter += 1
        name = f"{NAME_PREFIX}{os.getpid()}/{self._counter}/{secrets.token_hex(6)}"
        upstream: socket.socket | None = None
        try:
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.bind("\0" + name)
            upstream.setblocking(False)
            self.registry.add(name, caller)
            upstream.connect(self.upstream_path)
        except OSError as exc:
            self.registry.remove(name)
            if upstream is not None:
                upstream.close()
            client.close()
            self._refused(
                caller, f"upstream_failed errno={errno.errorcode.get(exc.errno or 0, '?')}"
            )
            return
        client.setblocking(False)
        assert upstream is not None
        link = _Link(client, upstream, name, caller)
        link.last_active = self._clock()
        self._links[client] = self._links[upstream] = link
        self._per_uid[caller.uid] = self._per_uid.get(caller.uid, 0) + 1
        self._update(link)

    def _refused(self, caller: Caller | None, reason: str) -> None:
        allowed, suppressed = self._refusals.allow()
        if allowed:
            who = caller.describe() if caller else "caller_uid=?"
            more = f" (and {suppressed} more refusals not logged)" if suppressed else ""
            log.warning("user_socket_refused %s reason=%s%s", who, reason, more)

    def _bucket(self, uid: int) -> TokenBucket:
        bucket = self._buckets.get(uid)
        if bucket is None:
            bucket = TokenBucket(
                self.budgets.bytes_per_second, self.budgets.burst_bytes, self._clock
            )
            self._buckets[uid] = bucket
        return bucket

    def _service(self, link: _Link, sock: socket.socket, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                pending = link.to_upstream if sock is link.upstream else link.to_client
                sent = sock.send(pending)
                del pending[:sent]
            if mask & selectors.EVENT_READ:
                if sock is link.client:
                    if not self._read_client(link):
                        return
                else:
                    data = sock.recv(_CHUNK)
                    if not data:
                        self._finish(link, link.to_client, link.client)
                        return
                    link.to_client += data
                link.last_active = self._clock()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(link)
            return
        self._update(link)

    def _read_client(self, link: _Link) -> bool:
        limit = _CHUNK
        bucket = None
        if not link.caller.is_root:
            bucket = self._bucket(link.caller.uid)
            limit = min(limit, int(bucket.available()))
            if limit <= 0:
                link.throttled = True
                self._update(link)
                return False
        data = link.client.recv(limit)
        if not data:
            self._finish(link, link.to_upstream, link.upstream)
            return False
        if bucket is not None:
            bucket.take(len(data))
        link.to_upstream += data
        return True

    def _finish(self, link: _Link, pending: bytearray, sock: socket.socket) -> None:
        # One side ended: hand the other what is already here (best effort), then close.
        with contextlib.suppress(OSError):
            if pending:
                sock.send(pending)
        self._close(link)

    def _update(self, link: _Link) -> None:
        if link.closed:
            return
        if link.throttled and not link.caller.is_root:
            link.throttled = self._bucket(link.caller.uid).available() < 1
        want_client = 0
        if not link.throttled and len(link.to_upstream) < _HIGH_WATER:
            want_client |= selectors.EVENT_READ
        if link.to_client:
            want_client |= selectors.EVENT_WRITE
        want_upstream = 0
        if len(link.to_client) < _HIGH_WATER:
            want_upstream |= selectors.EVENT_READ
        if link.to_upstream:
            want_upstream |= selectors.EVENT_WRITE
        for sock, wanted in ((link.client, want_client), (link.upstream, want_upstream)):
            current = link.events[sock]
            if wanted == current:
                continue
            if current == 0:
                self._selector.register(sock, wanted, None)
            elif wanted == 0:
                self._selector.unregister(sock)
            else:
                self._selector.modify(sock, wanted, None)
            link.events[sock] = wanted

    def _close(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        for sock in (link.client, link.upstream):
            if link.events.get(sock):
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(sock)
            self._links.pop(sock, None)
            sock.close()
        self.registry.remove(link.name)
        uid = link.caller.uid
        left = self._per_uid.get(uid, 1) - 1
        if left > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)

    def _sweep(self, now: float) -> None:
        idle = self.budgets.idle_seconds
        for link in {id(v): v for v in self._links.values()}.values():
            if now - link.last_active > idle:
                self._close(link)
        # Forget buckets of uids with no connection once they are full again, so the
        # table stays as small as the set of current callers.
        for uid in [u for u, b in self._buckets.items() if u not in self._per_uid]:
            if self._buckets[uid].available() >= self.budgets.burst_bytes:
                del self._buckets[uid]
