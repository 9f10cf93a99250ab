"""What fail=safe may allow, and what the hook refuses before asking the daemon.

fail=safe allows only a daemon that did not answer (no connection, or no reply to our
call before the deadline, EOF or GOAWAY). Once it answered, anything but the wanted
verdict denies in both fail modes. Tokens that are not text never reach the daemon.
A fake pam.sock here speaks raw HTTP/2, built by hand (not with the hook's helpers).
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.pam_hook.conftest import FakeGate

ENV = {"PAM_TYPE": "auth", "PAM_USER": "alice", "PAM_SERVICE": "sshd", "PAM_RHOST": "192.0.2.7"}
TIMEOUT = 0.5
RawServer = Callable[[Callable[[socket.socket], None]], str]

# -- a hand-made HTTP/2 peer ------------------------------------------------------------------

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS = 0x1, 0x4
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def field(name: str, value: str) -> bytes:
    """HPACK literal without indexing, new name, no Huffman (short strings only)."""
    return bytes([0, len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


STATUS_200 = b"\x88"  # static table index 8
GRPC = STATUS_200 + field("content-type", "application/grpc")
SERVER_SETTINGS = frame(SETTINGS, 0, 0)
RESPONSE_HEADERS = frame(HEADERS, END_HEADERS, 1, GRPC)


def trailers(status: str, *, only: bool = False) -> bytes:
    block = (GRPC if only else b"") + field("grpc-status", status)
    return frame(HEADERS, END_HEADERS | END_STREAM, 1, block)


def message(payload: bytes) -> bytes:
    return frame(DATA, 0, 1, b"\x00" + len(payload).to_bytes(4, "big") + payload)


def decision(verdict: int) -> bytes:
    return message(pb.PamDecision(verdict=verdict).SerializeToString())


def goaway(last_stream: int, error: int = 0) -> bytes:
    return frame(GOAWAY, 0, 0, last_stream.to_bytes(4, "big") + error.to_bytes(4, "big"))


def rst(error: int = 2) -> bytes:
    return frame(RST_STREAM, 0, 1, error.to_bytes(4, "big"))


def read_request(conn: socket.socket) -> None:
    """Read the hook's preface and frames up to its DATA with END_STREAM."""
    conn.settimeout(5)
    buffer = b""
    while True:
        pos = len(PREFACE)
        while buffer.startswith(PREFACE) and pos + 9 <= len(buffer):
            length = int.from_bytes(buffer[pos : pos + 3], "big")
            if pos + 9 + length > len(buffer):
                break
            if buffer[pos + 3] == DATA and buffer[pos + 4] & END_STREAM:
                return
            pos += 9 + length
        chunk = conn.recv(65536)
        if not chunk:
            return
        buffer += chunk


def answer(*chunks: bytes, then_sleep: float = 0.0) -> Callable[[socket.socket], None]:
    """A peer that reads the request, sends the chunks, maybe hangs, then closes."""

    def behaviour(conn: socket.socket) -> None:
        read_request(conn)
        for chunk in chunks:
            conn.sendall(chunk)
        time.sleep(then_sleep)

    return behaviour


def close_at_once(conn: socket.socket) -> None:
    conn.close()


UNREACHABLE, BAD_ANSWER, ALLOWED, DENIED = "unreachable", "bad answer", "allowed", "denied"

# name -> (peer, outcome). UNREACHABLE: fail=safe allows, fail=secure denies;
# BAD_ANSWER and DENIED: both deny; ALLOWED: both allow.
PEERS: dict[str, tuple[Callable[[socket.socket], None], str]] = {
    # The daemon did not answer.
    "closes at once": (close_at_once, UNREACHABLE),
    "reads, sends nothing, closes": (answer(), UNREACHABLE),
    "SETTINGS, PING, WINDOW_UPDATE, then closes": (
        answer(
            SERVER_SETTINGS, frame(PING, 0, 0, b"8 bytes!"), frame(WINDOW_UPDATE, 0, 0, b"\0\0\1\0")
        ),
        UNREACHABLE,
    ),
    "GOAWAY before headers": (answer(SERVER_SETTINGS, goaway(0)), UNREACHABLE),
    "GOAWAY with an error before headers": (answer(goaway(0, 2)), UNREACHABLE),
    "graceful GOAWAY, then closes before headers": (answer(goaway(1)), UNREACHABLE),
    "hangs past the timeout": (answer(SERVER_SETTINGS, then_sleep=TIMEOUT + 1.0), UNREACHABLE),
    # The daemon answered, and not with a verdict.
    "headers then RST_STREAM": (answer(RESPONSE_HEADERS, rst()), BAD_ANSWER),
    "RST_STREAM without headers": (answer(SERVER_SETTINGS, rst(0)), BAD_ANSWER),
    "grpc-status 13 (trailers only)": (answer(trailers("13", only=True)), BAD_ANSWER),
    "grpc-status 14 (trailers only)": (answer(trailers("14", only=True)), BAD_ANSWER),
    "grpc-status 13 after a message": (
        answer(RESPONSE_HEADERS, decision(pb.VERDICT_ALLOW), trailers("13")),
        BAD_ANSWER,
    ),
    ":status 500": (
        answer(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x8e" + field("grpc-status", "0"))),
        BAD_ANSWER,
    ),
    "headers then closes": (answer(RESPONSE_HEADERS), BAD_ANSWER),
    "headers then GOAWAY": (answer(RESPONSE_HEADERS, goaway(0)), BAD_ANSWER),
    "headers then hangs past the timeout": (
        answer(RESPONSE_HEADERS, then_sleep=TIMEOUT + 1.0),
        BAD_ANSWER,
    ),
    "garbage frame type on our stream": (answer(frame(0xAA, 0, 1, b"junk")), BAD_ANSWER),
    "HTTP/1.1 instead of HTTP/2": (answer(b"HTTP/1.1 400 Bad Request\r\n\r\n"), BAD_ANSWER),
    "frame on another stream": (answer(frame(HEADERS, END_HEADERS, 3, GRPC)), BAD_ANSWER),
    "malformed GOAWAY": (answer(frame(GOAWAY, 0, 0, b"\0")), BAD_ANSWER),
    "bad HPACK index": (answer(frame(HEADERS, END_HEADERS, 1, b"\xff\x7f")), BAD_ANSWER),
    "DATA before headers": (answer(decision(pb.VERDICT_ALLOW)), BAD_ANSWER),
    "garbled protobuf": (answer(RESPONSE_HEADERS, message(b"\x0b"), trailers("0")), BAD_ANSWER),
    # A clean reply: the verdict decides, the same in both fail modes.
    "unknown verdict": (answer(RESPONSE_HEADERS, decision(99), trailers("0")), DENIED),
    "DENY": (answer(RESPONSE_HEADERS, decision(pb.VERDICT_DENY), trailers("0")), DENIED),
    "valid ALLOW": (
        answer(SERVER_SETTINGS, RESPONSE_HEADERS, decision(pb.VERDICT_ALLOW), trailers("0")),
        ALLOWED,
    ),
    "ALLOW during a graceful GOAWAY": (
        answer(goaway(1), RESPONSE_HEADERS, decision(pb.VERDICT_ALLOW), trailers("0")),
        ALLOWED,
    ),
}


def run(hook: ModuleType, argv: list[str], stdin: bytes = b"", **env: str) -> int:
    code: int = hook.run(argv, {**ENV, **env}, io.BytesIO(stdin), io.StringIO())
    return code


@pytest.fixture
def logged(hook: ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(hook, "_log", lambda priority, text: lines.append(text))
    return lines


@pytest.mark.parametrize("name", PEERS)
def test_unary_call_classifies_the_failure(
    hook: ModuleType, raw_server: RawServer, name: str
) -> None:
    peer, outcome = PEERS[name]
    path = raw_server(peer)
    request = hook.encode_request("alice", "sshd", "", "123456")
    started = time.monotonic()
    deadline = started + TIMEOUT
    if outcome == UNREACHABLE:
        with pytest.raises(hook.DaemonUnreachable):
            hook.unary_call(path, "Verify", request, deadline)
    elif outcome == BAD_ANSWER:
        with pytest.raises(hook.BadAnswer):
            hook.decode_decision(hook.unary_call(path, "Verify", request, deadline))
    else:
        hook.decode_decision(hook.unary_call(path, "Verify", request, deadline))
    assert time.monotonic() - started < TIMEOUT + 0.5


@pytest.mark.parametrize("fail", ["secure", "safe"])
@pytest.mark.parametrize("name", PEERS)
def test_only_an_unanswered_call_is_allowed_by_fail_safe(
    hook: ModuleType, raw_server: RawServer, logged: list[str], name: str, fail: str
) -> None:
    peer, outcome = PEERS[name]
    path = raw_server(peer)
    argv = ["verify", f"socket={path}", f"timeout={TIMEOUT}", f"fail={fail}"]
    code = run(hook, argv, b"123456")
    if outcome == UNREACHABLE:
        assert code == (0 if fail == "safe" else 1)
        assert len(logged) == 1 and "daemon unreachable" in logged[0]
        assert ("allowed by fail=safe" in logged[0]) == (fail == "safe")
    elif outcome == BAD_ANSWER:
        assert code == 1
        assert len(logged) == 1 and logged[0].startswith("denied, bad answer from the daemon")
    else:
        assert code == (0 if outcome == ALLOWED else 1)
        assert not any("unreachable" in line or "bad answer" in line for line in logged)


@pytest.mark.parametrize("fail", ["secure", "safe"])
def test_missing_socket_is_unreachable(
    hook: ModuleType, tmp_path: Path, logged: list[str], fail: str
) -> None:
    argv = ["check", f"socket={tmp_path / 'none.sock'}", f"fail={fail}"]
    assert run(hook, argv) == (0 if fail == "safe" else 1)
    assert "daemon unreachable" in logged[0] and "cannot connect" in logged[0]


def test_the_reply_parsers_raise_bad_answer(hook: ModuleType) -> None:
    for bad in (b"\x0a\x05ab", b"\x08", b"\x0b", b"\x00\x01"):
        with pytest.raises(hook.BadAnswer):
            hook.decode_decision(bad)
    with pytest.raises(hook.BadAnswer):
        hook.HpackDecoder().decode(b"\xff\x7f")
    assert not hasattr(hook, "DaemonFailure")  # no class left that means "either"


# -- the token on stdin must be text ----------------------------------------------------------

BAD_TOKENS = {
    "not UTF-8": b"\xff\xfe",
    "not UTF-8 after a valid code": b"123456\xff",
    "truncated UTF-8": b"12345\xc3",
    "overlong UTF-8": b"\xc0\xaf123456",
    "encoded surrogate": b"\xed\xa0\x80123456",
    "NUL inside": b"123\x00456",
    "NUL first": b"\x00123456",
    "two trailing NULs": b"123456\x00\x00",
    "NUL then newline": b"123456\x00\n",
    "control character": b"123\x01456",
    "escape": b"\x1b[2J123456",
    "tab": b"pass\tword123456",
    "carriage return": b"123456\r",
    "two trailing newlines": b"123456\n\n",
    "DEL": b"123456\x7f",
    "overlong": b"1" * 2000,
    "one byte too long": b"1" * 1025,
    "one byte too long, with pam_exec's NUL": b"1" * 1025 + b"\x00",
}
GOOD_TOKENS = {
    "a code": (b"123456", "123456"),
    "pam_exec's trailing NUL": (b"123456\x00", "123456"),
    "a trailing newline": (b"123456\n", "123456"),
    "UTF-8 password and code": ("pässwörd€123456".encode(), "pässwörd€123456"),
    "spaces": (b"pass word 123456", "pass word 123456"),
    "exactly the limit": (b"1" * 1024, "1" * 1024),
    "the limit and pam_exec's NUL": (b"1" * 1024 + b"\x00", "1" * 1024),
    "empty": (b"", ""),
    "only pam_exec's NUL": (b"\x00", ""),
}
TOKEN_LINES = [
    ("verify", "secure"),
    ("verify", "safe"),
    ("verify first-factor=required", "secure"),
    ("verify first-factor=required", "safe"),
    ("single-prompt", "secure"),
]
FIRST_FACTOR = {"SSH_AUTH_INFO_0": "publickey ssh-ed25519 AAAA\n"}


@pytest.mark.parametrize(("mode", "fail"), TOKEN_LINES)
@pytest.mark.parametrize("name", BAD_TOKENS)
def test_tokens_that_are_not_text_never_reach_the_daemon(
    hook: ModuleType,
    fake_gate: tuple[FakeGate, str],
    logged: list[str],
    mode: str,
    fail: str,
    name: str,
) -> None:
    gate, path = fake_gate
    gate.reply = lambda request, context: pb.PamDecision(verdict=pb.VERDICT_ALLOW)
    argv = [*mode.split(), f"socket={path}", f"fail={fail}"]
    assert run(hook, argv, BAD_TOKENS[name], **FIRST_FACTOR) == 1
    assert gate.seen == []
    assert len(logged) == 1 and logged[0].startswith("denied: the token on stdin ")


@pytest.mark.parametrize("fail", ["secure", "safe"])
def test_bad_token_denied_even_when_the_daemon_is_down(
    hook: ModuleType, tmp_path: Path, logged: list[str], fail: str
) -> None:
    argv = ["verify", f"socket={tmp_path / 'none.sock'}", f"fail={fail}"]
    assert run(hook, argv, b"\xff\xfe") == 1
    assert logged == ["denied: the token on stdin is not valid UTF-8"]
    assert run(hook, argv, b"123456") == (0 if fail == "safe" else 1)


def test_refusals_say_why_and_never_log_the_token(hook: ModuleType, logged: list[str]) -> None:
    secret = b"hunter2-SECRET-"
    reasons = {
        secret + b"\xff": "not valid UTF-8",
        secret + b"\x00x": "contains a NUL byte",
        secret + b"\x01": "contains a control character",
        secret + b"\x7f": "contains a control character",
        secret * 100: "longer than 1024 bytes",
    }
    for token, reason in reasons.items():
        logged.clear()
        assert run(hook, ["single-prompt", "socket=/nonexistent"], token) == 1
        assert len(logged) == 1 and reason in logged[0]
        assert "SECRET" not in logged[0] and "hunter" not in logged[0]


@pytest.mark.parametrize(("mode", "fail"), TOKEN_LINES)
@pytest.mark.parametrize("name", GOOD_TOKENS)
def test_text_tokens_reach_the_daemon_unchanged(
    hook: ModuleType, fake_gate: tuple[FakeGate, str], mode: str, fail: str, name: str
) -> None:
    gate, path = fake_gate
    gate.reply = lambda request, context: pb.PamDecision(verdict=pb.VERDICT_ALLOW)
    data, expected = GOOD_TOKENS[name]
    argv = [*mode.split(), f"socket={path}", f"fail={fail}"]
    assert run(hook, argv, data, **FIRST_FACTOR) == 0
    assert [request.authtok for _, request in gate.seen] == [expected]


def test_empty_token_lets_the_daemon_decide(
    hook: ModuleType, fake_gate: tuple[FakeGate, str]
) -> None:
    """Prompt-always stacks: an account that needs no code passes whatever (text) it typed."""
    gate, path = fake_gate
    gate.reply = lambda request, context: pb.PamDecision(verdict=pb.VERDICT_NOT_REQUIRED)
    argv = ["verify", f"socket={path}", "first-factor=required"]
    assert run(hook, argv, b"", **FIRST_FACTOR) == 0
    assert run(hook, ["verify", f"socket={path}"], b"") == 1  # without first-factor=required
    assert [request.authtok for _, request in gate.seen] == ["", ""]


# -- single-prompt refuses fail=safe; validate_options -----------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["single-prompt", "fail=safe"], ["single-prompt", "fail=safe", "timeout=2"],
     ["single-prompt", "timeout=2", "fail=safe", "socket=/run/x.sock"]],
)  # fmt: skip
def test_single_prompt_with_fail_safe_is_a_usage_error(
    hook: ModuleType, fake_gate: tuple[FakeGate, str], logged: list[str], argv: list[str]
) -> None:
    gate, path = fake_gate
    gate.reply = lambda request, context: pb.PamDecision(verdict=pb.VERDICT_ALLOW)
    with pytest.raises(hook.UsageError, match="single-prompt"):
        hook.validate_options(argv)
    with pytest.raises(hook.UsageError):
        hook.Options(argv)
    line = [word for word in argv if not word.startswith("socket=")] + [f"socket={path}"]
    assert run(hook, line, b"password123456") == 1  # even where the daemon would allow
    assert gate.seen == []
    assert len(logged) == 1 and "fail=safe" in logged[0] and "single-prompt" in logged[0]
    missing = [word for word in argv if not word.startswith("socket=")] + ["socket=/none.sock"]
    assert run(hook, missing, b"password123456") == 1  # and where the daemon is down


@pytest.mark.parametrize(
    "argv",
    [["check"], ["verify", "fail=safe"], ["check", "fail=safe", "first-factor=required"],
     ["verify", "timeout=2", "fail=safe", "first-factor=required", "socket=/run/o/pam.sock"],
     ["single-prompt"], ["single-prompt", "fail=secure", "timeout=0.1"], ["first-factor-done"]],
)  # fmt: skip
def test_validate_options_accepts_good_lines(hook: ModuleType, argv: list[str]) -> None:
    assert hook.validate_options(argv) is None


@pytest.mark.parametrize(
    "argv",
    [[], ["sideways"], ["check", "colour=blue"], ["check", "timeout=0"], ["check", "fail=maybe"],
     ["check", "socket=relative.sock"], ["check", "fail=safe", "fail=safe"], ["check", "x"],
     ["single-prompt", "first-factor=required"], ["single-prompt", "fail=safe"]],
)  # fmt: skip
def test_validate_options_rejects_bad_lines(hook: ModuleType, argv: list[str]) -> None:
    with pytest.raises(hook.UsageError) as info:
        hook.validate_options(argv)
    assert str(info.value)


@pytest.mark.parametrize("fail", ["secure", "safe"])
@pytest.mark.parametrize(
    "mode", ["check", "verify", "verify first-factor=required", "single-prompt"]
)
def test_an_unavailable_database_is_left_to_the_fail_mode(
    hook: ModuleType, fake_gate: tuple[FakeGate, str], logged: list[str], mode: str, fail: str
) -> None:
    # The daemon answered, but decided nothing: its database did not answer in time.
    gate, path = fake_gate
    gate.reply = lambda request, context: pb.PamDecision(verdict=pb.VERDICT_UNAVAILABLE)
    argv = [*mode.split(), f"socket={path}", f"fail={fail}"]
    code = run(hook, argv, b"123456", **FIRST_FACTOR)
    if mode == "single-prompt" and fail == "safe":
        assert code == 1 and gate.seen == []  # refused as a usage error, as always
        return
    assert code == (0 if fail == "safe" else 1)
    assert len(logged) == 1 and "database unavailable" in logged[0]
    assert logged[0].startswith("allowed by fail=safe" if fail == "safe" else "denied")
