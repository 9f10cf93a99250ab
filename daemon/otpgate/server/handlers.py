"""A socket's fixed method table, with requests parsed here rather than by gRPC.

Given a deserializer, gRPC answers bytes it cannot parse with INTERNAL ("Exception
deserializing request!") and logs a five-line traceback per call: any local user
could fill the log, and a hook would read INTERNAL as a daemon failure. So every
method, ours and the health and reflection services alike, receives the raw
bytes; a request that does not parse (bad wire format, a string field that is
not UTF-8) is answered INVALID_ARGUMENT, with at most one warning line a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from otpgate.core.throttle import LineBudget

log = logging.getLogger("otpgated")

_malformed_lines = LineBudget(1.0, time.monotonic, burst=3)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _parse(
    request_class: type[Message],
    raw: bytes,
    method: MethodDescriptor,
    context: grpc.ServicerContext,
) -> Message:
    try:
        return request_class.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        allowed, suppressed = _malformed_lines.allow()
        if allowed:
            more = f" (and {suppressed} more not logged)" if suppressed else ""
            log.warning("malformed_request method=%s bytes=%d%s", method.name, len(raw), more)
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request is not a valid {method.input_type.full_name} message "
            "(bad encoding, or a text field that is not UTF-8)",
        )
        raise  # unreachable: abort raises


def method_table(service: ServiceDescriptor, servicer: Any) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """Every method of `service`, served by the same-named method of `servicer`."""
    handlers: dict[str, Any] = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        behavior = getattr(servicer, method.name)
        handlers[method.name] = _handler(method, request_class, behavior)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _handler(
    method: MethodDescriptor, request_class: type[Message], behavior: Callable[..., Any]
) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
    if method.client_streaming:

        def requests(raw: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Message]:
            for item in raw:
                yield _parse(request_class, item, method, context)

        def streamed(raw: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            return behavior(requests(raw, context), context)

        if method.server_streaming:
            return grpc.stream_stream_rpc_method_handler(streamed, None, _serialize)
        return grpc.stream_unary_rpc_method_handler(streamed, None, _serialize)

    def unary(raw: bytes, context: grpc.ServicerContext) -> Any:
        return behavior(_parse(request_class, raw, method, context), context)

    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(unary, None, _serialize)
    return grpc.unary_unary_rpc_method_handler(unary, None, _serialize)
