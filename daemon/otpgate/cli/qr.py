"""QR codes of provisioning URIs, for the terminal or a file."""

from __future__ import annotations

import io
import os
from typing import TextIO

import segno

from otpgate.errors import InvalidArgument

FORMATS = "ansi, utf8, none, png:FILE, svg:FILE"


def check_format(spec: str) -> str:
    kind, _, path = spec.partition(":")
    if kind in ("ansi", "utf8", "none") and not path:
        return spec
    if kind in ("png", "svg") and path:
        return spec
    raise InvalidArgument("--qr", f"must be one of {FORMATS} (got {spec!r})")


def emit(uri: str, spec: str, out: TextIO) -> str | None:
    """Render `uri` as `spec` says; returns the file written, if any."""
    kind, _, path = check_format(spec).partition(":")
    if kind == "none":
        return None
    code = segno.make(uri, error="m", micro=False)
    if kind == "ansi":
        code.terminal(out=out, compact=False)
        return None
    if kind == "utf8":
        code.terminal(out=out, compact=True)
        return None
    buffer = io.BytesIO()
    code.save(buffer, kind=kind, scale=8 if kind == "png" else 4, border=4)
    _write_private(path, buffer.getvalue())
    return path


def _write_private(path: str, data: bytes) -> None:
    # The picture holds the secret: readable by its owner only, and never written
    # through a symlink someone else planted.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
