"""otpgate-pam-hook: asks otpgated, through pam.sock, whether a login may pass.

Run by pam_exec as `/usr/bin/python3 -I -S otpgate-pam-hook MODE [OPTION=VALUE...]`.
Standard library only, and no heavy imports: it runs as root on every login and
must start in milliseconds, also where only the system Python is sane.

It speaks just enough gRPC (HTTP/2 with prior knowledge over a Unix socket, HPACK,
one unary call) to ask one question, and denies on anything it does not fully
understand. Exit 0 lets PAM continue with success; 1 denies.

Modes:  check              0 when the account needs no code for this service now
        verify             0 when the code on stdin (expose_authtok) is right
        single-prompt      0 when stdin holds the password immediately followed by the code
        first-factor-done  0 when sshd reports a passed first factor (SSH_AUTH_INFO_0);
                           the shipped stacks test that with /bin/sh, without Python
Options: socket=PATH (absolute; default /run/otpgate/pam.sock)
         timeout=SECONDS (0.1..30; default 3)
         fail=secure|safe (what an unreachable daemon or database means: deny, or
             allow and log it)
         first-factor=required (check, verify: deny unless sshd reports a passed first
             factor, so one call does what a first-factor-done line would; verify then
             also passes when the daemon says the account needs no code now)

fail=safe allows only when nobody could decide: the connection to the socket
failed, or no reply to our call (response HEADERS or RST_STREAM on our stream) came
before the deadline or before the connection ended (EOF, GOAWAY), or the daemon
answered with the verdict UNAVAILABLE (its shared database did not answer in time).
Once the daemon has answered, anything else but the wanted verdict denies in both
fail modes: an error status, a reset call, a non-200 :status, bytes that do not
parse, a reply cut short, an unknown verdict. single-prompt refuses fail=safe (a
usage error, so it always denies): there the daemon is the only check of the
password, and fail=safe would let anyone in without one while the daemon is down.

The token on stdin (verify, single-prompt; check and first-factor-done read none)
must be text, whatever the mode and the fail mode: valid UTF-8, at most MAX_AUTHTOK
bytes, no NUL or other control character (C0 or DEL), after dropping the one NUL or
newline pam_exec ends it with. Anything else denies before the daemon is asked. An
empty token is text and goes to the daemon, which decides.

validate_options(argv) checks a PAM line's MODE [OPTION=VALUE...] without running
anything, for tools that write such lines.
"""

# Built-in modules only: `socket` imports selectors and enum (5 ms per login), and
# `os` alone costs more than a millisecond when Python starts with -S.
import _socket
import posix
import sys
import time

# No `from __future__ import annotations` either (a file read per login): annotations
# naming these type-only imports are strings.
TYPE_CHECKING = False  # typing and collections.abc cost milliseconds at every start
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import BinaryIO, TextIO

EXIT_ALLOW, EXIT_DENY = 0, 1
MODES = ("check", "verify", "single-prompt", "first-factor-done")
_RPC = {"check": "Check", "verify": "Verify", "single-prompt": "VerifySinglePrompt"}
DEFAULT_SOCKET = "/run/otpgate/pam.sock"
MAX_AUTHTOK = 1024
MAX_MESSAGE = 16 * 1024  # a PamDecision is tens of bytes; anything near this is wrong
MAX_FRAME = 16384  # HTTP/2's default SETTINGS_MAX_FRAME_SIZE, which we never raise
MAX_HEADER_BLOCK = 16384

# Verdict numbers of otpgate.v1.Verdict.
ALLOW, DENY, NOT_REQUIRED, OTP_REQUIRED, LOCKED, NOT_ENROLLED, UNAVAILABLE = 1, 2, 3, 4, 5, 6, 7
_VERDICT_NAMES = {
    ALLOW: "allow",
    DENY: "deny",
    NOT_REQUIRED: "not_required",
    OTP_REQUIRED: "otp_required",
    LOCKED: "locked",
    NOT_ENROLLED: "not_enrolled",
    UNAVAILABLE: "unavailable",
}


class DaemonUnreachable(Exception):
    """The daemon did not answer: the connection failed, or it ended or the deadline
    passed before any reply to our call began. The only failure fail=safe may allow."""


class BadAnswer(Exception):
    """The daemon answered, but not with a reply the hook accepts: an error status, a
    reset call, garbled HTTP/2, HPACK or protobuf, a reply cut short. Always deny."""


class UsageError(Exception):
    """The PAM line, the environment or the token on stdin is wrong: always deny."""


# -- protobuf: PamRequest out, PamDecision in ----------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_request(username: str, service: str, rhost: str, authtok: str) -> bytes:
    out = bytearray()
    for number, text in ((1, username), (2, service), (3, rhost), (4, authtok)):
        if text:
            data = text.encode("utf-8")  # strict: protobuf strings are valid UTF-8
            out += _varint(number << 3 | 2) + _varint(len(data)) + data
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise BadAnswer("malformed protobuf varint")


def decode_decision(data: bytes) -> tuple[int, str, int]:
    """(verdict, message, retry_after_seconds) of a PamDecision."""
    verdict, message, retry = 0, "", 0
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            if number == 1:
                verdict = value
            elif number == 3:
                retry = value
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise BadAnswer("truncated protobuf field")
            if number == 2:
                message = data[pos : pos + length].decode("utf-8", "replace")
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(data):
                raise BadAnswer("truncated protobuf field")
        else:
            raise BadAnswer(f"unsupported protobuf wire type {wire}")
        if number == 0:
            raise BadAnswer("protobuf field number 0")
    return verdict, message, retry


# -- HPACK (RFC 7541) ---------------------------------------------------------------------

_STATIC = [
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"),
    (":path", "/index.html"), (":scheme", "http"), (":scheme", "https"), (":status", "200"),
    (":status", "204"), (":status", "206"), (":status", "304"), (":status", "400"),
    (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""),
    ("accept", ""), ("access-control-allow-origin", ""), ("age", ""), ("allow", ""),
    ("authorization", ""), ("cache-control", ""), ("content-disposition", ""),
    ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
    ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""),
    ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""),
    ("max-forwards", ""), ("proxy-authenticate", ""), ("proxy-authorization", ""),
    ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""), ("server", ""),
    ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
    ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
]  # fmt: skip

# The HPACK Huffman code (RFC 7541 Appendix B) is canonical, so the code length of
# each of the 257 symbols (chr(48 + length), symbol 256 is EOS) defines it entirely.
_HUFFMAN_LENGTHS = (
    "=GLLLLLLLHNLLNLLLLLLLLNLLLLLLLLL6::<=68;::8;8666555666666678?6<:=67777777777777777777777"
    "878=C=>6?56565666577666567655677777?;>=LDFDDFFFGFGGGGGHGHHFGHGGGGEFGFGGHFEDFFGGEGFFHEFGG"
    "EEFEGFGGDFFFGFFGJJDCFGFIJJJKKJHICEJKKJKHEEJJLKKKDHDEFEEGFFIIHHJGJKJJKKKKKLKKKKKJN"
)
_huffman_decode_table: dict[tuple[int, int], int] | None = None


def _huffman_table() -> dict[tuple[int, int], int]:
    """(code length, code) -> symbol, built on first use (only Huffman strings need it)."""
    global _huffman_decode_table
    if _huffman_decode_table is None:
        lengths = [ord(c) - 48 for c in _HUFFMAN_LENGTHS]
        table: dict[tuple[int, int], int] = {}
        order = sorted(range(257), key=lambda s: (lengths[s], s))
        code, previous = -1, lengths[order[0]]
        for symbol in order:
            code = (code + 1) << (lengths[symbol] - previous)
            previous = lengths[symbol]
            table[(previous, code)] = symbol
        _huffman_decode_table = table
    return _huffman_decode_table


def huffman_decode(data: bytes) -> bytes:
    table = _huffman_table()
    out = bytearray()
    code = length = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = code << 1 | (byte >> shift) & 1
            length += 1
            symbol = table.get((length, code))
            if symbol is not None:
                if symbol == 256:
                    raise BadAnswer("HPACK Huffman string contains EOS")
                out.append(symbol)
                code = length = 0
            elif length > 30:
                raise BadAnswer("invalid HPACK Huffman code")
    # What is left must be a prefix of EOS (all ones), shorter than a byte.
    if length > 7 or code != (1 << length) - 1:
        raise BadAnswer("invalid HPACK Huffman padding")
    return bytes(out)


class HpackDecoder:
    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = max_size
        self.size = max_size
        self.dynamic: list[tuple[str, str]] = []

    def _entry(self, index: int) -> tuple[str, str]:
        if 1 <= index <= len(_STATIC):
            return _STATIC[index - 1]
        position = index - len(_STATIC) - 1
        if 0 <= position < len(self.dynamic):
            return self.dynamic[position]
        raise BadAnswer(f"HPACK index {index} out of range")

    def _add(self, name: str, value: str) -> None:
        self.dynamic.insert(0, (name, value))
        self._evict()

    def _evict(self) -> None:
        while self.dynamic and sum(len(n) + len(v) + 32 for n, v in self.dynamic) > self.size:
            self.dynamic.pop()

    @staticmethod
    def _integer(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
        if pos >= len(data):
            raise BadAnswer("truncated HPACK integer")
        limit = (1 << prefix) - 1
        value = data[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            if pos >= len(data) or shift > 28:
                raise BadAnswer("malformed HPACK integer")
            byte = data[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    def _string(self, data: bytes, pos: int) -> tuple[str, int]:
        if pos >= len(data):
            raise BadAnswer("truncated HPACK string")
        huffman = bool(data[pos] & 0x80)
        length, pos = self._integer(data, pos, 7)
        if pos + length > len(data):
            raise BadAnswer("truncated HPACK string")
        raw = data[pos : pos + length]
        text = huffman_decode(raw) if huffman else raw
        return text.decode("utf-8", "replace"), pos + length

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        pos = 0
        while pos < len(block):
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = self._integer(block, pos, 7)
                headers.append(self._entry(index))
                continue
            if first & 0xE0 == 0x20:  # dynamic table size update
                size, pos = self._integer(block, pos, 5)
                if size > self.max_size:
                    raise BadAnswer("HPACK table size above the agreed maximum")
                self.size = size
                self._evict()
                continue
            indexing = bool(first & 0x40)
            index, pos = self._integer(block, pos, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, pos = self._string(block, pos)
            value, pos = self._string(block, pos)
            if indexing:
                self._add(name, value)
            headers.append((name, value))
        return headers


def _literal(name: str | int, value: str) -> bytes:
    """A header field without indexing, never Huffman-coded (RFC 7541 6.2.2)."""
    encoded = value.encode("ascii")
    if isinstance(name, int):  # index of a static-table name; all ours are below 15
        head = bytes([name])
    else:
        raw = name.encode("ascii")
        head = b"\x00" + _hpack_length(len(raw)) + raw
    return head + _hpack_length(len(encoded)) + encoded


def _hpack_length(value: int) -> bytes:
    if value < 127:
        return bytes([value])
    out = bytearray([127])
    value -= 127
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# -- HTTP/2 (RFC 9113), one unary gRPC call --------------------------------------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 3, 4, 5, 6, 7, 8, 9,
)  # fmt: skip
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
STREAM = 1


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


class Connection:
    """One HTTP/2 connection to pam.sock, which knows whether the daemon has answered.

    Until a HEADERS or RST_STREAM frame for our stream has arrived, the connection
    failing, ending or outlasting the deadline means the daemon did not answer
    (DaemonUnreachable). From then on the same events are a reply cut short
    (BadAnswer). Bytes the daemon sent that do not parse are always BadAnswer.
    """

    def __init__(self, path: str, deadline: float) -> None:
        self.deadline = deadline
        self.answered = False
        self.buffer = b""
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            self._timeout()
            self.sock.connect(path)
        except BaseException as exc:
            self.sock.close()
            if isinstance(exc, OSError):  # TimeoutError included
                reason = exc.strerror or exc
                raise DaemonUnreachable(f"cannot connect to {path}: {reason}") from None
            raise

    def lost(self, what: str) -> "DaemonUnreachable | BadAnswer":
        """The exception for the connection failing, ending or timing out now."""
        if self.answered:
            return BadAnswer(f"{what} in the middle of the reply")
        return DaemonUnreachable(f"{what} before the daemon answered")

    def _timeout(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self.lost("timed out")
        self.sock.settimeout(remaining)

    def send(self, data: bytes) -> None:
        self._timeout()
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise self.lost("timed out") from None
        except OSError as exc:
            raise self.lost(f"send failed ({exc.strerror or exc})") from None

    def _recv_exact(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._timeout()
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise self.lost("timed out") from None
            except OSError as exc:
                raise self.lost(f"receive failed ({exc.strerror or exc})") from None
            if not chunk:
                raise self.lost("connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def read_frame(self) -> tuple[int, int, int, bytes]:
        head = self._recv_exact(9)
        length = int.from_bytes(head[:3], "big")
        if length > MAX_FRAME:
            raise BadAnswer("HTTP/2 frame larger than allowed")
        kind, flags = head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        return kind, flags, stream, self._recv_exact(length)

    def close(self) -> None:
        self.sock.close()


def _unpad(flags: int, payload: bytes) -> bytes:
    if flags & PADDED:
        if not payload or payload[0] >= len(payload):
            raise BadAnswer("bad HTTP/2 padding")
        payload = payload[1 : len(payload) - payload[0]]
    return payload


def unary_call(path: str, method: str, request: bytes, deadline: float) -> bytes:
    """Send one gRPC request; the reply message bytes. Raises DaemonUnreachable when
    the daemon did not answer, BadAnswer when it answered anything but a clean reply."""
    connection = Connection(path, deadline)
    try:
        return _exchange(connection, method, request)
    finally:
        connection.close()


def _exchange(connection: Connection, method: str, request: bytes) -> bytes:
    headers = (
        b"\x83\x86"  # :method POST, :scheme http (static table)
        + _literal(4, f"/otpgate.v1.PamGate/{method}")
        + _literal(1, "localhost")
        + _literal("content-type", "application/grpc")
        + _literal("te", "trailers")
    )
    body = b"\x00" + len(request).to_bytes(4, "big") + request
    connection.send(
        _PREFACE
        + _frame(SETTINGS, 0, 0, b"\x00\x02\x00\x00\x00\x00")  # ENABLE_PUSH = 0
        + _frame(HEADERS, END_HEADERS, STREAM, headers)
        + _frame(DATA, END_STREAM, STREAM, body)
    )
    decoder = HpackDecoder()
    blocks: list[list[tuple[str, str]]] = []
    pending: bytes | None = None  # a header block waiting for CONTINUATION frames
    pending_end = False
    data = b""
    while True:
        kind, flags, stream, payload = connection.read_frame()
        if stream == STREAM and kind in (HEADERS, RST_STREAM):
            connection.answered = True  # whatever follows, the daemon has answered
        if pending is not None and kind != CONTINUATION:
            raise BadAnswer("HTTP/2 header block interrupted")
        if kind == SETTINGS:
            if stream != 0:
                raise BadAnswer("SETTINGS on a stream")
            if not flags & ACK:
                connection.send(_frame(SETTINGS, ACK, 0, b""))
        elif kind == PING:
            if stream != 0 or len(payload) != 8:
                raise BadAnswer("malformed HTTP/2 PING")
            if not flags & ACK:
                connection.send(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise BadAnswer("malformed HTTP/2 WINDOW_UPDATE")
        elif kind == GOAWAY:
            if stream != 0 or len(payload) < 8:
                raise BadAnswer("malformed HTTP/2 GOAWAY")
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if last < STREAM:
                # The daemon is going away (shutting down, restarting) without
                # having taken our call; after a reply began, the reply is cut short.
                error = int.from_bytes(payload[4:8], "big")
                raise connection.lost(f"GOAWAY (error code {error})")
            # A graceful shutdown that still serves our call: read on. The
            # connection ending next is classified like any other end.
        elif kind == RST_STREAM and stream == STREAM:
            if len(payload) != 4:
                raise BadAnswer("malformed HTTP/2 RST_STREAM")
            error = int.from_bytes(payload, "big")
            raise BadAnswer(f"the daemon reset the call (error code {error})")
        elif stream != STREAM:
            raise BadAnswer(f"unexpected HTTP/2 frame {kind} on stream {stream}")
        elif kind == HEADERS:
            if blocks and not flags & END_STREAM:
                raise BadAnswer("trailers without END_STREAM")
            payload = _unpad(flags, payload)
            if flags & PRIORITY:
                payload = payload[5:]
            pending_end = bool(flags & END_STREAM)
            pending = payload
            if flags & END_HEADERS:
                blocks.append(decoder.decode(pending))
                pending = None
        elif kind == CONTINUATION:
            if pending is None:
                raise BadAnswer("CONTINUATION without HEADERS")
            pending += payload
            if len(pending) > MAX_HEADER_BLOCK:
                raise BadAnswer("header block too large")
            if flags & END_HEADERS:
                blocks.append(decoder.decode(pending))
                pending = None
        elif kind == DATA:
            if not blocks:
                raise BadAnswer("DATA before the reply's HEADERS")
            data += _unpad(flags, payload)
            if len(data) > MAX_MESSAGE + 5:
                raise BadAnswer("reply too large")
            if flags & END_STREAM:
                raise BadAnswer("reply ended without gRPC trailers")
        else:
            raise BadAnswer(f"unexpected HTTP/2 frame type {kind}")
        if pending is None and pending_end and blocks:
            return _grpc_reply(blocks, data)


def _grpc_reply(blocks: list[list[tuple[str, str]]], data: bytes) -> bytes:
    first, trailers = dict(blocks[0]), dict(blocks[-1])
    if first.get(":status") != "200":
        raise BadAnswer(f"HTTP status {first.get(':status')}")
    if not first.get("content-type", "").startswith("application/grpc"):
        raise BadAnswer("reply is not gRPC")
    if len(blocks) > 2:
        raise BadAnswer("unexpected extra header blocks")
    status = trailers.get("grpc-status")
    if status is None:
        raise BadAnswer("reply without grpc-status")
    if status != "0":
        message = trailers.get("grpc-message", "")
        raise BadAnswer(f"daemon error (grpc-status {status}): {message[:200]}")
    if len(blocks) == 1:
        raise BadAnswer("OK status without a reply message")
    if len(data) < 5 or data[0] != 0:
        raise BadAnswer("missing or compressed gRPC message")
    length = int.from_bytes(data[1:5], "big")
    if length != len(data) - 5:
        raise BadAnswer("gRPC message length does not match")
    return data[5:]


# -- the hook ---------------------------------------------------------------------------------


class Options:
    """The PAM line's arguments: a mode, then OPTION=VALUE words. Unknown ones are errors."""

    def __init__(self, argv: list[str]) -> None:
        if not argv or argv[0] not in MODES:
            raise UsageError(f"first argument must be a mode: {', '.join(MODES)}")
        self.mode = argv[0]
        self.socket = DEFAULT_SOCKET
        self.timeout = 3.0
        self.fail_safe = False
        self.first_factor_required = False
        seen: set[str] = set()
        for word in argv[1:]:
            key, sep, value = word.partition("=")
            if not sep or key in seen:
                raise UsageError(f"bad or repeated option {word!r}")
            seen.add(key)
            if key == "socket":
                if not value.startswith("/"):
                    raise UsageError("socket= must be an absolute path")
                self.socket = value
            elif key == "timeout":
                try:
                    self.timeout = float(value)
                except ValueError:
                    raise UsageError("timeout= must be a number of seconds") from None
                if not 0.1 <= self.timeout <= 30:
                    raise UsageError("timeout= must be from 0.1 to 30 seconds")
            elif key == "fail":
                if value not in ("secure", "safe"):
                    raise UsageError("fail= must be secure or safe")
                self.fail_safe = value == "safe"
            elif key == "first-factor":
                if value != "required":
                    raise UsageError("first-factor= must be required")
                if self.mode not in ("check", "verify"):
                    raise UsageError("first-factor= is only for the check and verify modes")
                self.first_factor_required = True
            else:
                raise UsageError(f"unknown option {key!r}")
        if self.mode == "single-prompt" and self.fail_safe:
            # Here the daemon is the only check of the password too: fail=safe would
            # let anyone in, with no password, whenever the daemon is down.
            raise UsageError("fail=safe is not allowed with single-prompt (it checks the password)")


def validate_options(argv: list[str]) -> None:
    """Raise UsageError, with the reason, unless argv (MODE [OPTION=VALUE...], as on the
    PAM line) is one the hook accepts. Pure: reads nothing, touches nothing."""
    Options(argv)


def _pam_item(env: "Mapping[str, str]", name: str, *, required: bool) -> str:
    value = env.get(name, "")
    if required and not value:
        raise UsageError(f"{name} is not set (is this run by pam_exec?)")
    if len(value) > 256 or not value.isprintable() or "/" in value:
        raise UsageError(f"{name} is not a plausible value")
    return value


def _read_authtok(stdin: "BinaryIO") -> str:
    """The token pam_exec wrote (one trailing NUL or newline dropped), if it is text:
    valid UTF-8, no control characters, at most MAX_AUTHTOK bytes. The reason for a
    refusal never includes the token."""
    data = stdin.read(MAX_AUTHTOK + 2)
    if data.endswith((b"\0", b"\n")):
        data = data[:-1]
    if len(data) > MAX_AUTHTOK:
        raise UsageError(f"the token on stdin is longer than {MAX_AUTHTOK} bytes")
    try:
        text = data.decode("utf-8")  # strict: no surrogates either
    except UnicodeDecodeError:
        raise UsageError("the token on stdin is not valid UTF-8") from None
    if "\0" in text:
        raise UsageError("the token on stdin contains a NUL byte")
    if any(c < " " or c == "\x7f" for c in text):
        raise UsageError("the token on stdin contains a control character")
    return text


def _say(out: "TextIO", message: str) -> None:
    text = "".join(c for c in message[:512] if c.isprintable())
    if text:
        print(text, file=out, flush=True)


LOG_ERR, LOG_WARNING, LOG_NOTICE = 3, 4, 5


def _log(priority: int, text: str) -> None:
    import syslog  # only when there is something to say

    syslog.openlog("otpgate-pam-hook", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(priority, text)


def run(argv: list[str], env: "Mapping[str, str]", stdin: "BinaryIO", out: "TextIO") -> int:
    try:
        options = Options(argv)
        if env.get("PAM_TYPE") != "auth":
            raise UsageError(f"PAM_TYPE is {env.get('PAM_TYPE')!r}; only auth is supported")
        # sshd lists the methods already passed; empty in a first round.
        first_factor_done = bool(env.get("SSH_AUTH_INFO_0", "").strip())
        if options.mode == "first-factor-done":
            return EXIT_ALLOW if first_factor_done else EXIT_DENY
        if options.first_factor_required and not first_factor_done:
            # For check this only means "ask for a code"; the verify line then refuses.
            if options.mode == "verify":
                _read_authtok(stdin)  # read what pam_exec writes, so it never meets a closed pipe
                _log(LOG_NOTICE, "denied: no first factor passed before the code")
            return EXIT_DENY
        user = _pam_item(env, "PAM_USER", required=True)
        service = _pam_item(env, "PAM_SERVICE", required=True)
        rhost = _pam_item(env, "PAM_RHOST", required=False)
        authtok = _read_authtok(stdin) if options.mode != "check" else ""
    except UsageError as exc:
        _log(LOG_ERR, f"denied: {exc}")
        return EXIT_DENY
    deadline = time.monotonic() + options.timeout
    where = f"user={user} service={service} mode={options.mode}"
    try:
        reply = unary_call(
            options.socket,
            _RPC[options.mode],
            encode_request(user, service, rhost, authtok),
            deadline,
        )
        verdict, message, _retry = decode_decision(reply)
    except DaemonUnreachable as exc:
        # Only here, where the daemon gave no answer at all, may fail=safe allow.
        if options.fail_safe:
            _log(LOG_WARNING, f"allowed by fail=safe, daemon unreachable: {where}: {exc}")
            return EXIT_ALLOW
        _log(LOG_ERR, f"denied, daemon unreachable: {where}: {exc}")
        return EXIT_DENY
    except BadAnswer as exc:  # the daemon answered, and not with a verdict: deny
        _log(LOG_ERR, f"denied, bad answer from the daemon: {where}: {exc}")
        return EXIT_DENY
    if verdict == UNAVAILABLE:
        # Nothing was decided, as when the daemon is down: the same rule.
        if options.fail_safe:
            _log(LOG_WARNING, f"allowed by fail=safe, database unavailable: {where}")
            return EXIT_ALLOW
        _log(LOG_ERR, f"denied, database unavailable: {where}")
        return EXIT_DENY
    _say(out, message)
    if options.mode == "check":
        wanted: tuple[int, ...] = (NOT_REQUIRED,)
    elif options.mode == "verify" and options.first_factor_required:
        # Another factor has passed, so the daemon's "no code needed" may let this
        # login through: a stack that prompts every account then works where 2FA is
        # off, or for accounts not enrolled under "optional". Without that assurance
        # verify fails closed, whatever stack it was put in.
        wanted = (ALLOW, NOT_REQUIRED)
    else:
        wanted = (ALLOW,)
    name = _VERDICT_NAMES.get(verdict, f"unknown({verdict})")
    if verdict in wanted:
        return EXIT_ALLOW
    if verdict not in (OTP_REQUIRED, NOT_REQUIRED):
        _log(LOG_NOTICE, f"{where} verdict={name}")
    return EXIT_DENY


def main(argv: list[str] | None = None) -> int:
    try:
        env = {
            k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
            for k, v in posix.environ.items()
        }
        return run(sys.argv[1:] if argv is None else argv, env, sys.stdin.buffer, sys.stdout)
    except Exception as exc:  # a bug here must deny, whatever the fail mode, and say little
        try:
            _log(LOG_ERR, f"denied, internal error: {type(exc).__name__}")
        finally:
            return EXIT_DENY  # noqa: B012


if __name__ == "__main__":
    sys.exit(main())
