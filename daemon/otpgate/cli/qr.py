"""QR codes of provisioning URIs, for the terminal or a file."""

from __future__ import annotations

import io
import os
import stat
from typing import TextIO

import segno

from otpgate.errors import ClientError, InvalidArgument

FORMATS = "ansi, utf8, none, png:FILE, svg:FILE"


def check_format(spec: str) -> str:
    """Check `spec` and, for a file, that it can be written: before anything changes
    (renew-secret must not replace a secret whose QR code it then cannot save)."""
    kind, _, path = spec.partition(":")
    if kind in ("ansi", "utf8", "none") and not path:
        return spec
    if kind in ("png", "svg") and path:
        _check_writable(path)
        return spec
    raise InvalidArgument("--qr", f"must be one of {FORMATS} (got {spec!r})")


def _check_writable(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise InvalidArgument("--qr", f"cannot create {path}: no writable directory") from None
        return
    except OSError as exc:  # not a directory on the way, name too long, symlink loop...
        raise InvalidArgument("--qr", f"cannot write {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument("--qr", f"{path} exists and is not a regular file (or is a symlink)")
    if info.st_uid != os.geteuid():
        # Its owner could read the secret we would write into it.
        raise InvalidArgument("--qr", f"{path} exists and belongs to uid {info.st_uid}")
    if not os.access(path, os.W_OK):
        raise InvalidArgument("--qr", f"cannot write {path}: permission denied")


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
    try:
        _write_private(path, buffer.getvalue())
    except OSError as exc:
        raise ClientError(f"cannot write the QR code to {path}: {exc.strerror or exc}") from None
    return path


def _write_private(path: str, data: bytes) -> None:
    # The picture holds the secret: readable by its owner only, never written through
    # a symlink, and never into a file someone else owns (they could read it).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise OSError(f"{path} belongs to another user")
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.write(fd, data)
    finally:
        os.close(fd)
