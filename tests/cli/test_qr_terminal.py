"""Terminal QR codes (`--qr utf8`, `--qr ansi`) scan whatever the terminal's theme.

A terminal draws text in colours its user chose: the default foreground and
background (what text gets without SGR colours, and SGR 39/49) are light on dark
or dark on light, and the 16-colour palette is themed too; base16 light themes even
make palette "black" white and "white" dark grey, and base16-shell recolours 256-colour
entries 16-21 as well. So each test here renders qr.emit()'s output as a terminal
would, cell by cell in a theme's colours, writes the picture as a PNG and reads it back
with zbarimg, which shares no code with otpgate or segno.
"""

from __future__ import annotations

import io
import re
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from otpgate.cli import qr
from otpgate.core.totp import provisioning_uri

RGB = tuple[int, int, int]

CELL_WIDTH, CELL_HEIGHT = 4, 8  # pixels: a terminal cell is about twice as tall as wide
WINDOW_MARGIN = 3  # cells of the terminal's own background around the output

# xterm's default colours 0-15; 16-231 (a 6x6x6 cube) and 232-255 (greys) follow.
XTERM_16: tuple[RGB, ...] = (
    (0, 0, 0), (205, 0, 0), (0, 205, 0), (205, 205, 0),
    (0, 0, 238), (205, 0, 205), (0, 205, 205), (229, 229, 229),
    (127, 127, 127), (255, 0, 0), (0, 255, 0), (255, 255, 0),
    (92, 92, 255), (255, 0, 255), (0, 255, 255), (255, 255, 255),
)  # fmt: skip


def xterm_colour(index: int) -> RGB:
    if index < 16:
        return XTERM_16[index]
    if index < 232:
        levels = (0, 95, 135, 175, 215, 255)
        r, g, b = (index - 16) // 36, (index - 16) // 6 % 6, (index - 16) % 6
        return levels[r], levels[g], levels[b]
    grey = 8 + 10 * (index - 232)
    return grey, grey, grey


def hex_rgb(text: str) -> RGB:
    value = int(text.lstrip("#"), 16)
    return value >> 16, value >> 8 & 0xFF, value & 0xFF


@dataclass(frozen=True)
class Theme:
    name: str
    foreground: str  # the default colours: what SGR 39 and 49 (and no SGR at all) give
    background: str
    palette: dict[int, str]  # entries this theme changes in xterm's 256 colours

    def colour(self, index: int) -> RGB:
        return hex_rgb(self.palette[index]) if index in self.palette else xterm_colour(index)


# Base16 "Unikitty Light", as base16-shell sets it: colours 0-15 and 16-21.
BASE16_LIGHT = {
    0: "#ffffff", 1: "#d8137f", 2: "#17ad98", 3: "#dc8a0e", 4: "#775dff", 5: "#aa17e6",
    6: "#149bda", 7: "#6c696e", 8: "#a7a5a8", 9: "#d8137f", 10: "#17ad98", 11: "#dc8a0e",
    12: "#775dff", 13: "#aa17e6", 14: "#149bda", 15: "#322d34", 16: "#d65407",
    17: "#e013d0", 18: "#e1e1e2", 19: "#c4c3c5", 20: "#89878b", 21: "#4f4b51",
}  # fmt: skip
# Base16 "Default Dark".
BASE16_DARK = {
    0: "#181818", 1: "#ab4642", 2: "#a1b56c", 3: "#f7ca88", 4: "#7cafc2", 5: "#ba8baf",
    6: "#86c1b9", 7: "#d8d8d8", 8: "#585858", 9: "#ab4642", 10: "#a1b56c", 11: "#f7ca88",
    12: "#7cafc2", 13: "#ba8baf", 14: "#86c1b9", 15: "#f8f8f8", 16: "#dc9656",
    17: "#a16946", 18: "#282828", 19: "#383838", 20: "#b8b8b8", 21: "#e8e8e8",
}  # fmt: skip

DARK = Theme("dark", "#e5e5e5", "#000000", {})  # light text on black
LIGHT = Theme("light", "#000000", "#ffffff", {})  # dark text on white
THEMES = [
    DARK,
    LIGHT,
    Theme("base16-dark", "#d8d8d8", "#181818", BASE16_DARK),
    Theme("base16-light", "#6c696e", "#ffffff", BASE16_LIGHT),
]
DARK_THEMES = [theme for theme in THEMES if theme.name.endswith("dark")]
TERMINAL_FORMATS = ["utf8", "ansi"]

URIS = {
    "typical": provisioning_uri(
        "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", account="alice", issuer="otpgate-test",
        digits=6, interval=30,
    ),
    "long": provisioning_uri(
        "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ", account="a.very.long.login.name.for.testing",
        issuer="Example Corporation bastion-host-17.eu-west.example.org", digits=8, interval=60,
    ),
}  # fmt: skip


# -- the terminal ----------------------------------------------------------------------


@dataclass
class Pen:
    """SGR state: a palette index or a direct colour, None for the theme's default."""

    foreground: int | RGB | None = None
    background: int | RGB | None = None
    reverse: bool = False

    def colours(self, theme: Theme) -> tuple[RGB, RGB]:
        """(glyph colour, cell background) as drawn."""
        fg = self._rgb(self.foreground, theme, theme.foreground)
        bg = self._rgb(self.background, theme, theme.background)
        return (bg, fg) if self.reverse else (fg, bg)

    @staticmethod
    def _rgb(colour: int | RGB | None, theme: Theme, default: str) -> RGB:
        if colour is None:
            return hex_rgb(default)
        return theme.colour(colour) if isinstance(colour, int) else colour

    def is_default(self) -> bool:
        return self == Pen()


def _extended_colour(params: list[int], i: int) -> tuple[int | RGB, int]:
    """38/48 at params[i]: (5, n) or (2, r, g, b) follow; the colour and the next index."""
    if params[i + 1 : i + 2] == [5] and len(params) > i + 2:
        return params[i + 2], i + 3
    if params[i + 1 : i + 2] == [2] and len(params) > i + 4:
        r, g, b = params[i + 2 : i + 5]
        return (r, g, b), i + 5
    pytest.fail(f"malformed extended colour in SGR {params}")


def apply_sgr(pen: Pen, text: str) -> None:
    params = [int(p) if p else 0 for p in text.split(";")]
    i = 0
    while i < len(params):
        p = params[i]
        i += 1
        if p == 0:
            pen.foreground, pen.background, pen.reverse = None, None, False
        elif p in (1, 22):  # bold, normal intensity: the glyphs here have no weight
            pass
        elif p in (7, 27):
            pen.reverse = p == 7
        elif 30 <= p <= 37 or 90 <= p <= 97:
            pen.foreground = p - 30 if p < 90 else p - 90 + 8
        elif 40 <= p <= 47 or 100 <= p <= 107:
            pen.background = p - 40 if p < 100 else p - 100 + 8
        elif p in (38, 48):
            colour, i = _extended_colour(params, i - 1)
            if p == 38:
                pen.foreground = colour
            else:
                pen.background = colour
        elif p == 39:
            pen.foreground = None
        elif p == 49:
            pen.background = None
        else:  # blink, underline...: nothing a QR code should need
            pytest.fail(f"SGR {p} is not modelled (in {text!r})")


# The cell's upper and lower halves: True where the glyph (the foreground) is drawn.
GLYPHS = {" ": (False, False), "\u2588": (True, True), "\u2580": (True, False)}
GLYPHS["\u2584"] = (False, True)
TOKEN = re.compile(r"\x1b\[([0-9;]*)m|\n|[^\x1b]|\x1b")

Cell = tuple[RGB, RGB]  # colours of the upper and lower halves


@dataclass
class Screen:
    lines: list[list[Cell]]
    pens_at_newlines: list[Pen]
    final_pen: Pen


def run_terminal(output: str, theme: Theme) -> Screen:
    """What a terminal in `theme` shows for `output` (attributes persist across lines,
    as they do on a real terminal)."""
    pen = Pen()
    lines: list[list[Cell]] = [[]]
    pens_at_newlines = []
    for match in TOKEN.finditer(output):
        token = match.group(0)
        if match.group(1) is not None:
            apply_sgr(pen, match.group(1))
        elif token == "\n":
            pens_at_newlines.append(Pen(pen.foreground, pen.background, pen.reverse))
            lines.append([])
        elif token in GLYPHS:
            glyph, background = pen.colours(theme)
            upper, lower = GLYPHS[token]
            lines[-1].append((glyph if upper else background, glyph if lower else background))
        else:
            pytest.fail(f"unexpected {token!r} in the terminal output")
    if not lines[-1]:
        lines.pop()
    return Screen(lines, pens_at_newlines, pen)


def screenshot(screen: Screen, theme: Theme) -> list[list[RGB]]:
    """The window's pixels: the output, and the theme's background around it and
    wherever nothing was written."""
    empty = (hex_rgb(theme.background),) * 2
    width = max(len(line) for line in screen.lines) + 2 * WINDOW_MARGIN
    margin = [[empty] * width for _ in range(WINDOW_MARGIN)]
    cells = margin + [
        [empty] * WINDOW_MARGIN + line + [empty] * (width - WINDOW_MARGIN - len(line))
        for line in screen.lines
    ]
    cells += margin
    pixels = []
    for line in cells:
        for half in (0, 1):
            row = [cell[half] for cell in line for _ in range(CELL_WIDTH)]
            pixels += [row] * (CELL_HEIGHT // 2)
    return pixels


def write_png(pixels: list[list[RGB]], path: Path) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", len(pixels[0]), len(pixels), 8, 2, 0, 0, 0)  # 8-bit RGB
    raw = b"".join(b"\0" + bytes(channel for rgb in row for channel in rgb) for row in pixels)
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    return path


def zbar(path: Path) -> str:
    """The QR code zbarimg reads in an image ("" if none); stderr chatters about D-Bus."""
    result = subprocess.run(
        ["zbarimg", "--raw", "-q", "-Sdisable", "-Sqrcode.enable", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode in (0, 4), result  # 4: no symbol found
    return result.stdout


def scan(output: str, theme: Theme, path: Path) -> str:
    """What zbarimg reads on a screenshot of `output` in `theme`, saved as `path`."""
    return zbar(write_png(screenshot(run_terminal(output, theme), theme), path))


def terminal_output(uri: str, spec: str) -> str:
    out = io.StringIO()
    assert qr.emit(uri, spec, out) is None
    return out.getvalue()


def light(rgb: RGB) -> bool:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b > 127


# -- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("uri_name", URIS)
@pytest.mark.parametrize("theme", THEMES, ids=lambda theme: theme.name)
@pytest.mark.parametrize("spec", TERMINAL_FORMATS)
def test_terminal_qr_decodes_to_the_uri_in_any_theme(
    spec: str, theme: Theme, uri_name: str, tmp_path: Path
) -> None:
    uri = URIS[uri_name]
    png = tmp_path / f"{spec}-{theme.name}.png"
    assert scan(terminal_output(uri, spec), theme, png) == uri + "\n", f"{png} does not scan"


@pytest.mark.parametrize("theme", DARK_THEMES, ids=lambda theme: theme.name)
@pytest.mark.parametrize("spec", TERMINAL_FORMATS)
def test_terminal_qr_draws_its_own_quiet_zone(spec: str, theme: Theme) -> None:
    # ISO/IEC 18004 asks for 4 light modules around the symbol. On a dark theme the
    # terminal's background cannot provide them: the output itself must draw them.
    pixels = screenshot(run_terminal(terminal_output(URIS["typical"], spec), theme), theme)
    lit = [(y, x) for y, row in enumerate(pixels) for x, rgb in enumerate(row) if light(rgb)]
    top, left = min(y for y, _ in lit), min(x for _, x in lit)
    bottom, right = max(y for y, _ in lit), max(x for _, x in lit)
    dark = [
        (y, x)
        for y in range(top, bottom + 1)
        for x in range(left, right + 1)
        if not light(pixels[y][x])
    ]
    assert dark, "no dark modules on the light area"
    symbol_top, symbol_left = min(y for y, _ in dark), min(x for _, x in dark)
    symbol_bottom, symbol_right = max(y for y, _ in dark), max(x for _, x in dark)
    # The top-left finder pattern's outer ring: 7 dark modules along the symbol's top.
    finder = 0
    while not light(pixels[symbol_top][symbol_left + finder]):
        finder += 1
    module = finder / 7
    margins = {
        "top": symbol_top - top,
        "left": symbol_left - left,
        "bottom": bottom - symbol_bottom,
        "right": right - symbol_right,
    }
    assert {side: px / module for side, px in margins.items() if px / module < 4} == {}


@pytest.mark.parametrize("spec", TERMINAL_FORMATS)
def test_terminal_qr_ends_every_line_in_the_default_colours(spec: str) -> None:
    # A newline that scrolls the window fills the new line with the current
    # background on most terminals; and the URI, the prompt or whatever comes next
    # must not inherit the QR code's colours.
    output = terminal_output(URIS["typical"], spec)
    screen = run_terminal(output, DARK)
    assert output.endswith("\n")
    assert all(pen.is_default() for pen in screen.pens_at_newlines)
    assert screen.final_pen.is_default()
