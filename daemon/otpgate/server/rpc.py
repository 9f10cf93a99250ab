"""Error translation shared by every servicer: OtpgateError -> gRPC status.

Unexpected exceptions become INTERNAL with a fixed message; the log gets the
exception type and the stack of code locations, never the exception's text (which
could quote a request field).
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from otpgate import errors
from otpgate.core import audit

log = logging.getLogger("otpgated")

_STATUS: list[tuple[type[errors.OtpgateError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.TooManyAttempts, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
]

Handler = TypeVar("Handler", bound=Callable[..., Any])


def unknown_field_numbers(message: Message) -> list[int]:
    """Field numbers this server's schema does not know, anywhere in `message`."""
    unknown = UnknownFieldSet(message)
    numbers = [unknown[i].field_number for i in range(len(unknown))]
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        children = value if descriptor.is_repeated else [value]
        for child in children:
            numbers.extend(unknown_field_numbers(child))
    return sorted(numbers)


def rpc(handler: Handler) -> Handler:
    """Wrap a servicer method: refuse unknown fields, translate errors.

    Handlers report failures by raising OtpgateError, never by context.abort().
    """
    name = handler.__name__

    @functools.wraps(handler)
    def wrapper(self: Any, request: Message, context: grpc.ServicerContext) -> Any:
        unknown = unknown_field_numbers(request)
        if unknown:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request has fields this server does not know (numbers {unknown}); "
                "is the client newer than otpgated?",
            )
        origin = getattr(self, "audit_origin", None)
        try:
            if origin is None:
                return handler(self, request, context)
            # Every audit row this call writes says where it came from (core.audit).
            with audit.from_origin(*origin(request, context)):
                return handler(self, request, context)
        except errors.UpstreamRefused as exc:
            # An edge passes its upstream's answer on as it came.
            context.abort(getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL), exc.details)
        except errors.OtpgateError as exc:
            for kind, code in _STATUS:
                if isinstance(exc, kind):
                    context.abort(code, str(exc))
            log.error("rpc_failed method=%s error=%s: %s", name, type(exc).__name__, exc)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # handlers raise OtpgateError; anything else is a bug
            where = "".join(traceback.format_tb(exc.__traceback__)).replace("\n", " | ")
            log.error("rpc_crashed method=%s error=%s at %s", name, type(exc).__name__, where)
            context.abort(grpc.StatusCode.INTERNAL, "internal error (see the daemon log)")

    return wrapper  # type: ignore[return-value]
