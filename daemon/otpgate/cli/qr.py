"""QR codes of provisioning URIs, for the terminal or a file."""

from __future__ import annotations

import errno
import io
import os
import stat
from typing import TextIO

import segno

from otpgate.core.paths import parent_nofollow
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
    # Walked as _write_private will walk it: no component followed through a symlink
    # (whoever owns a directory on the way could point a link anywhere root can write).
    try:
        with parent_nofollow(path) as (dir_fd, name):
            try:
                info: os.stat_result | None = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                info = None
            except OSError as exc:  # a name too long...
                raise OSError(exc.errno, exc.strerror, path) from None
            if info is None:
                writable = os.access(".", os.W_OK | os.X_OK, dir_fd=dir_fd)
            else:
                writable = os.access(name, os.W_OK, dir_fd=dir_fd)
    except FileNotFoundError:  # a directory on the way is missing
        raise InvalidArgument("--qr", f"cannot create {path}: no writable directory") from None
    except OSError as exc:  # a link or a file on the way...
        raise InvalidArgument("--qr", f"cannot write {path}: {_why(exc, path)}") from None
    if info is None:
        if not writable:
            raise InvalidArgument("--qr", f"cannot create {path}: no writable directory")
        return
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument("--qr", f"{path} exists and is not a regular file (or is a symlink)")
    if info.st_uid != os.geteuid():
        # Its owner could read the secret we would write into it.
        raise InvalidArgument("--qr", f"{path} exists and belongs to uid {info.st_uid}")
    if not writable:
        raise InvalidArgument("--qr", f"cannot write {path}: permission denied")


def _why(exc: OSError, path: str) -> str:
    """What went wrong, naming the component at fault when it is not `path` itself."""
    if exc.errno == errno.ELOOP and exc.filename:
        return f"{exc.filename} is a symbolic link (no component of the path may be one)"
    if exc.filename and exc.filename != path and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return exc.strerror or str(exc)


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
        raise ClientError(f"cannot write the QR code to {path}: {_why(exc, path)}") from None
    return path


def _write_private(path: str, data: bytes) -> None:
    # The picture holds the secret: readable by its owner only, never written through
    # a symlink (in any component), and never into a file someone else owns (they
    # could read it). O_NONBLOCK: a FIFO put there since the check fails at once
    # instead of hanging; fstat then refuses anything but a regular file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with parent_nofollow(path) as (dir_fd, name):
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        except OSError as exc:  # ELOOP: the file itself is a link
            raise OSError(exc.errno, exc.strerror, path) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise OSError(f"{path} belongs to another user")
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.write(fd, data)
    finally:
        os.close(fd)
