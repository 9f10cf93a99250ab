"""QR codes of provisioning URIs, for the terminal or a file.

Formats (`--qr`):

- utf8: the default on a terminal. Half blocks (one text line holds two rows of
  modules, one column one module) in explicit colours: black glyphs on a white
  cell background, quiet zone included.
- ansi: plain ASCII: two spaces per module, each with an explicit black or white
  background. Twice as tall as utf8, but needs neither UTF-8 nor a font whose block
  glyphs join up (cell backgrounds always do).
- none: no QR code.
- png:FILE, svg:FILE: a picture, black on white with a quiet zone of 4 modules,
  written mode 0600 (it holds the secret).

A terminal's default colours are its theme's, light on dark or dark on light, so a
picture drawn in them (as segno's terminal output is: blocks in the default
foreground, reverse video) comes out inverted on one of the two, and many scanners
(zbarimg among them) read only dark on light. Even the 16-colour palette is themed
(base16 light themes make "black" white and "white" dark grey). So both terminal
formats set both colours on every line: first the basic ones (SGR 30/40 black, 37/47
white) for terminals that know no more, then the 256-colour palette's white (231,
#ffffff) and darkest grey (232, #080808), which themes do not recolour (base16-shell
recolours 16-21, so not 16, the cube's black). Each line starts with SGR 0 (nothing
left over, such as reverse video, inverts it) and ends with SGR 0 before its newline
(a newline that scrolls would paint the new line in the current background; what
follows gets the terminal's own colours). The quiet zone is drawn, not left to the
terminal's background: 4 modules on every side as ISO/IEC 18004 asks (5 at the
bottom in utf8, which draws rows in pairs). NO_COLOR is not honoured: these colours
are the picture, not decoration; `--qr none` or a file avoids escape sequences.
"""

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
QUIET_ZONE = 4  # light modules around the symbol: ISO/IEC 18004's minimum

# SGR: reset, then the basic colour, then the same from the 256-colour palette.
_RESET = "\x1b[0m"
_DARK_ON_LIGHT = "\x1b[0;30;47;38;5;232;48;5;231m"  # black glyphs, white cells
_DARK_CELL = "\x1b[40;48;5;232m"
_LIGHT_CELL = "\x1b[47;48;5;231m"
# A half-block glyph for (upper module dark, lower module dark): glyphs draw dark.
_HALF_BLOCKS = {
    (False, False): " ",
    (True, True): "\u2588",  # full block
    (True, False): "\u2580",  # upper half block
    (False, True): "\u2584",  # lower half block
}


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
    if kind in ("ansi", "utf8"):
        rows = [[bool(module) for module in row] for row in code.matrix_iter(border=QUIET_ZONE)]
        lines = _half_blocks(rows) if kind == "utf8" else _backgrounds(rows)
        out.write("".join(f"{line}{_RESET}\n" for line in lines))
        return None
    buffer = io.BytesIO()
    code.save(buffer, kind=kind, scale=8 if kind == "png" else 4, border=QUIET_ZONE)
    try:
        _write_private(path, buffer.getvalue())
    except OSError as exc:
        raise ClientError(f"cannot write the QR code to {path}: {_why(exc, path)}") from None
    return path


def _half_blocks(rows: list[list[bool]]) -> list[str]:
    """utf8: two rows of modules (True = dark) a line, an odd last one with a light
    row under it."""
    if len(rows) % 2:
        rows = [*rows, [False] * len(rows[0])]
    return [
        _DARK_ON_LIGHT + "".join(_HALF_BLOCKS[pair] for pair in zip(upper, lower, strict=True))
        for upper, lower in zip(rows[::2], rows[1::2], strict=True)
    ]


def _backgrounds(rows: list[list[bool]]) -> list[str]:
    """ansi: two spaces a module, the colour switched only where it changes."""
    lines = []
    for row in rows:
        line = _RESET  # nothing left over (reverse video...) inverts it
        previous = None
        for dark in row:
            if dark != previous:
                line += _DARK_CELL if dark else _LIGHT_CELL
                previous = dark
            line += "  "
        lines.append(line)
    return lines


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
