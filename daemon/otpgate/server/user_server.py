"""user.sock's gRPC server, behind the relay: calls cost a thread only once they
have a request, and no caller uid holds more than a few threads.

With the synchronous gRPC server a call takes a worker thread as soon as its
headers arrive and keeps it while it waits, without a deadline, for the request
message: one local user opening 16 streams that never send one starved every
other user of user.sock (found by the attack review). Here the server is
grpc.aio: a stalled call is a coroutine, not a thread. A call with its request
runs the same synchronous servicer in a bounded pool, but only while its caller's
uid has fewer than `calls_per_uid` calls running (root is not limited);
beyond that it is RESOURCE_EXHAUSTED at once. Streams per connection are capped
too, so the relay's connection budget bounds what a uid can leave waiting.

The servicer code is the same as on the other sockets (handlers raise
OtpgateError through server.rpc); it gets a small context that offers what it
uses: peer(), invocation_metadata(), abort(), set_code(), set_details().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2

from otpgate.core.throttle import LineBudget
from otpgate.server.monitor import set_health
from otpgate.server.relay import CallerRegistry

log = logging.getLogger("otpgated")

_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _ThreadContext:
    """What a synchronous servicer may ask of its context, in a pool thread."""

    def __init__(self, peer: str, metadata: Sequence[tuple[str, Any]]) -> None:
        self._peer = peer
        self._metadata = tuple(metadata)
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> Sequence[tuple[str, Any]]:
        return self._metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Abort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class UserServer:
    def __init__(
        self,
        path: str,
        *,
        workers: int,
        calls_per_uid: int,
        callers: CallerRegistry,
        options: Sequence[tuple[str, Any]],
        max_streams_per_connection: int = 32,
    ) -> None:
        self.path = path
        self._callers = callers
        self._calls_per_uid = calls_per_uid
        self._running: dict[int | None, int] = {}  # touched by the loop thread only
        self._pool = futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=os.path.basename(path)
        )
        self._options = [*options, ("grpc.max_concurrent_streams", max_streams_per_connection)]
        self._handlers: dict[str, dict[str, grpc.RpcMethodHandler]] = {}  # type: ignore[type-arg]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="user.sock-grpc", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._busy_lines = LineBudget(1.0, time.monotonic, burst=3)
        self._malformed_lines = LineBudget(1.0, time.monotonic, burst=3)
        self.health = health.HealthServicer()
        self.names: list[str] = []
        # Health's Check only: Watch would hold a stream open for as long as the
        # caller likes, and reflection is on admin.sock for whoever needs it.
        self._add(_HEALTH, self.health, only=("Check",))

    def _run_loop(self) -> None:
        import signal

        # Signals are the main thread's (see server.main).
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def add(self, service: ServiceDescriptor, servicer: object) -> None:
        self._add(service, servicer)

    def _add(
        self, service: ServiceDescriptor, servicer: object, only: Sequence[str] | None = None
    ) -> None:
        methods = self._handlers.setdefault(service.full_name, {})
        for method in service.methods:
            if only is not None and method.name not in only:
                continue
            if method.client_streaming or method.server_streaming:
                raise ValueError(f"{method.full_name}: user.sock serves unary methods only")
            request_class = message_factory.GetMessageClass(method.input_type)
            methods[method.name] = grpc.unary_unary_rpc_method_handler(
                self._behavior(method, request_class, getattr(servicer, method.name)),
                request_deserializer=None,
                response_serializer=lambda m: m.SerializeToString(),
            )
        self.names.append(service.full_name)

    def _behavior(
        self,
        method: MethodDescriptor,
        request_class: type[Message],
        handler: Callable[[Message, Any], Message],
    ) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Any]:
        async def behavior(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
            try:
                request = request_class.FromString(raw)
            except (DecodeError, RuntimeError, ValueError):
                self._note(self._malformed_lines, f"malformed_request method={method.name}")
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request is not a valid {method.input_type.full_name} message "
                    "(bad encoding, or a text field that is not UTF-8)",
                )
                raise  # unreachable: abort raises
            peer = context.peer()
            caller = self._callers.from_peer(peer)
            uid = caller.uid if caller is not None else None
            limited = caller is None or not caller.is_root
            if limited and self._running.get(uid, 0) >= self._calls_per_uid:
                self._note(self._busy_lines, f"user_socket_busy caller_uid={uid}")
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"uid {uid} already has {self._calls_per_uid} calls running: "
                    "try again when one has finished",
                )
            self._running[uid] = self._running.get(uid, 0) + 1
            thread_context = _ThreadContext(peer, tuple(context.invocation_metadata() or ()))
            job = self._pool.submit(handler, request, thread_context)
            # The slot is free when the thread is, not when the caller goes: a caller
            # that cancels its calls must not pile up work beyond its share.
            job.add_done_callback(lambda _: self._release_soon(uid))
            try:
                reply = await asyncio.wrap_future(job)
            except _Abort as abort:
                await context.abort(abort.code, abort.details)
                raise  # unreachable
            if thread_context.code is not None:
                context.set_code(thread_context.code)
            if thread_context.details is not None:
                context.set_details(thread_context.details)
            return reply

        return behavior

    def _release_soon(self, uid: int | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: shutting down
            self._loop.call_soon_threadsafe(self._release, uid)

    def _release(self, uid: int | None) -> None:
        left = self._running.get(uid, 1) - 1
        if left > 0:
            self._running[uid] = left
        else:
            self._running.pop(uid, None)

    @staticmethod
    def _note(budget: LineBudget, line: str) -> None:
        allowed, suppressed = budget.allow()
        if allowed:
            more = f" (and {suppressed} more not logged)" if suppressed else ""
            log.warning("%s%s", line, more)

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        os.chmod(self.path, 0o600)
        self.set_serving(True)
        log.info("listening socket=%s mode=0600 (behind user.sock)", self.path)

    def set_serving(self, serving: bool) -> None:
        set_health(self.health, self.names, serving)

    async def _start(self) -> None:
        server = grpc.aio.server(options=self._options, maximum_concurrent_rpcs=4096)
        server.add_generic_rpc_handlers(
            tuple(
                grpc.method_handlers_generic_handler(name, methods)
                for name, methods in self._handlers.items()
            )
        )
        server.add_insecure_port("unix:" + self.path)
        await server.start()
        self._server = server

    def stop(self, grace: float) -> threading.Event:
        """Stop taking calls, let running ones finish for up to `grace` seconds."""
        done = threading.Event()
        self.health.enter_graceful_shutdown()

        async def _stop() -> None:
            if self._server is not None:
                await self._server.stop(grace)

        def _finished(_: object) -> None:
            self._pool.shutdown(wait=False)
            self._loop.call_soon_threadsafe(self._loop.stop)
            done.set()

        if not self._thread.is_alive():
            done.set()
            return done
        try:
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).add_done_callback(_finished)
        except RuntimeError:  # the loop is already closed: nothing left to drain
            done.set()
        return done

    def alive(self) -> bool:
        return self._thread.is_alive() and self._loop.is_running()
