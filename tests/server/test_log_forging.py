"""An ordinary local user, talking raw HTTP/2 to user.sock, cannot write a line of its
own into otpgated's log, nor put raw control characters or undecodable bytes there.

gRPC core logs a peer's GOAWAY debug text verbatim (newlines included), and grpc's
Python layer logs request metadata that is not UTF-8. The attacker here is a real
unprivileged process (runuser) with a raw socket: whatever sits in front of the
gRPC server on that path, these bytes are what a caller can send.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from otpgate.server.logs import LIMIT_PER_SECOND
from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
# Only the standard library: any user can run the system Python.
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

FORGED = "verify user=root via=pam:sshd result=valid"

ATTACK = r"""
import socket, struct, sys, time

FORGED = b"verify user=root via=pam:sshd result=valid"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, GOAWAY = 0, 1, 4, 7
END_STREAM, END_HEADERS, ACK = 1, 4, 1


def frame(kind, flags, stream, payload):
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
    return head + struct.pack(">I", stream) + payload


def header(name, value):  # HPACK literal without indexing, new name, no Huffman
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sys.argv[1])
    s.sendall(PREFACE + frame(SETTINGS, 0, 0, b""))
    return s


def frames(s):
    buf = b""
    while True:
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            size = int.from_bytes(buf[:3], "big")
            yield buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9 : 9 + size]
            buf = buf[9 + size :]
        try:
            data = s.recv(65536)
        except OSError:
            return
        if not data:
            return
        buf += data


# 1. GOAWAY whose debug data holds a whole fake log line, and terminal controls.
s = connect()
debug = b"\n" + FORGED + b"\n\x1b[2J\x1b[31m\rE\x00\x07\x7f\xc2\x85" + FORGED + b"\xff\xfe\n"
s.sendall(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 2) + debug))
for _ in frames(s):  # the server answers, then closes
    pass
s.close()

# 2. A call whose authorization value is not UTF-8 (and holds controls).
s = connect()
block = b"".join([
    header(b":method", b"POST"), header(b":scheme", b"http"),
    header(b":path", b"/otpgate.v1.UserSelfService/GetUser"),
    header(b":authority", b"localhost"), header(b"content-type", b"application/grpc"),
    header(b"te", b"trailers"),
    header(b"authorization", b"Bearer \xff\xfe\x1b[31m\xc2\x85" + FORGED + b"\x85\xe2\x80\xa8"),
])
s.sendall(frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, END_STREAM, 1, b"\x00" * 5))
answered = False
for kind, flags, stream, _ in frames(s):
    if kind == SETTINGS and not flags & ACK:
        s.sendall(frame(SETTINGS, ACK, 0, b""))
    if kind == HEADERS and stream == 1 and flags & END_STREAM:
        answered = True  # the trailers: the call went through the server
        break
s.sendall(frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0)))
s.close()
print("answered" if answered else "no answer")
"""

_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


@pytest.fixture(params=["default", "INFO"])
def grpc_verbosity(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The daemon's own choice, or an operator who asked for gRPC core's info lines
    (then the GOAWAY text does reach the log, and must arrive defused)."""
    if request.param == "default":
        monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    else:
        monkeypatch.setenv("GRPC_VERBOSITY", request.param)
    return str(request.param)


@pytest.fixture
def public_login_daemon(grpc_verbosity: str, public_login_daemon: Daemon) -> Iterator[Daemon]:
    # The conftest fixture, started once grpc_verbosity has set the environment.
    yield public_login_daemon


def test_a_local_user_cannot_forge_or_garble_log_lines(
    grpc_verbosity: str, public_login_daemon: Daemon, user: LocalUser
) -> None:
    daemon = public_login_daemon
    assert daemon.proc is not None
    pid = daemon.proc.pid
    attack = subprocess.run(
        [RUNUSER, "-u", user.name, "--", PYTHON, "-I", "-c", ATTACK, daemon.socket("user")],
        capture_output=True, text=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert attack.returncode == 0, attack.stderr
    assert attack.stdout.strip() == "answered"
    # Still serving everyone else.
    assert daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=5).window >= 0
    assert daemon.stop() == 0  # everything pending is written by now

    raw = daemon.log_path.read_bytes()
    text = raw.decode("utf-8", "backslashreplace")
    own = re.compile(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} otpgated\[{pid}\] "
        r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S"
    )
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) > 3
    wrong: list[str] = []
    for number, line in enumerate(lines[:-1], 1):
        if not own.match(line):
            wrong.append(f"{number}: not our format: {line!r}")
        if line.lstrip(" \t\x1b[0123456789;JmrE").startswith(FORGED) or line.strip() == FORGED:
            wrong.append(f"{number}: forged: {line!r}")
    wrong += [f"raw control {m.group()!r} at {m.start()}" for m in _CONTROL.finditer(text)]
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        wrong.append(f"not UTF-8: {exc}")
    assert not wrong, "\n".join(wrong)
    if grpc_verbosity == "INFO":
        # gRPC core's GOAWAY line arrived, as one line of ours, its text escaped.
        goaway = [line for line in lines if "Got goaway" in line]
        assert goaway and all(" grpc.core: " in line for line in goaway), goaway
        assert f"\\n{FORGED}\\n\\x1b[2J" in goaway[0]
    else:
        assert "Got goaway" not in text  # gRPC core's info lines stay out by default
    # The bad metadata is reported, without its value (a credential).
    assert "invalid UTF-8" in text and "Bearer" not in text


FLOOD = r"""
import socket, struct, sys, threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload):
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
    return head + struct.pack(">I", stream) + payload


# A :method gRPC core refuses: one error line of gRPC's own per connection.
BAD = PREFACE + frame(4, 0, 0, b"") + frame(1, 4, 1, b"\x00\x07:method\x03P\xffT")


def run():
    for _ in range(int(sys.argv[2])):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(0.05)
        try:
            s.connect(sys.argv[1])
            s.sendall(BAD)
            while s.recv(65536):
                pass
        except OSError:
            pass
        s.close()


threads = [threading.Thread(target=run) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


@pytest.mark.parametrize("grpc_verbosity", ["default"], indirect=True)
def test_a_local_user_cannot_flood_the_log(
    grpc_verbosity: str, public_login_daemon: Daemon, user: LocalUser
) -> None:
    daemon = public_login_daemon
    started = time.monotonic()
    flood = subprocess.run(
        [RUNUSER, "-u", user.name, "--", PYTHON, "-I", "-c", FLOOD, daemon.socket("user"), "100"],
        capture_output=True, text=True, timeout=120, cwd="/", env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert flood.returncode == 0, flood.stderr
    assert daemon.stop() == 0
    lines = daemon.log().splitlines()
    grpc_lines = [line for line in lines if "Error parsing ':method'" in line]
    # 400 connections, each worth a line of gRPC core's: a few a second get through.
    assert len(grpc_lines) <= LIMIT_PER_SECOND * (seconds + 2), (len(grpc_lines), seconds)
    if len(grpc_lines) >= LIMIT_PER_SECOND:  # the limit was reached: the rest is counted
        assert any("log_suppressed logger=grpc.core" in line for line in lines)
