"""The hook against a real grpcio server, raw sockets, and its own parsers."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import time
from types import ModuleType

import grpc
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.pam_hook.conftest import HOOK_LAUNCHER, FakeGate

ENV = {"PAM_TYPE": "auth", "PAM_USER": "alice", "PAM_SERVICE": "sshd", "PAM_RHOST": "192.0.2.7"}


def run(hook: ModuleType, argv: list[str], stdin: bytes = b"", **env: str) -> tuple[int, str]:
    out = io.StringIO()
    code = hook.run(argv, {**ENV, **env}, io.BytesIO(stdin), out)
    return code, out.getvalue()


def decision(verdict: int, message: str = "") -> object:
    return lambda request, context: pb.PamDecision(verdict=verdict, message=message)


# -- verdicts ----------------------------------------------------------------------------

CHECK_EXITS = {
    pb.VERDICT_NOT_REQUIRED: 0,
    pb.VERDICT_OTP_REQUIRED: 1,
    pb.VERDICT_ALLOW: 1,  # check never lets a login through on ALLOW
    pb.VERDICT_DENY: 1,
    pb.VERDICT_LOCKED: 1,
    pb.VERDICT_NOT_ENROLLED: 1,
    pb.VERDICT_UNSPECIFIED: 1,
    99: 1,
}
VERIFY_EXITS = {**{v: 1 for v in CHECK_EXITS}, pb.VERDICT_ALLOW: 0}
# After a passed first factor, "no code needed" lets verify pass (a stack that always
# prompts); without that assurance it never does.
AFTER_FIRST_FACTOR_EXITS = {**VERIFY_EXITS, pb.VERDICT_NOT_REQUIRED: 0}


@pytest.mark.parametrize("fail", ["secure", "safe"])  # a verdict is never a daemon failure
@pytest.mark.parametrize(("verdict", "expected"), CHECK_EXITS.items())
def test_check_verdicts(
    hook: ModuleType, fake_gate: tuple[FakeGate, str], verdict: int, expected: int, fail: str
) -> None:
    gate, path = fake_gate
    gate.reply = decision(verdict, f"msg {verdict}")  # type: ignore[assignment]
    code, out = run(hook, ["check", f"socket={path}", f"fail={fail}"])
    assert code == expected
    assert out == f"msg {verdict}\n"
    assert gate.seen[0][0] == "Check"


@pytest.mark.parametrize(
    ("mode", "verdict", "expected"),
    [(mode, v, e) for mode in ("verify", "verify fail=safe", "single-prompt")
     for v, e in VERIFY_EXITS.items()]
    + [(mode, v, e) for mode in ("verify first-factor=required",
                                 "verify first-factor=required fail=safe")
       for v, e in AFTER_FIRST_FACTOR_EXITS.items()],
)  # fmt: skip
def test_verify_verdicts(
    hook: ModuleType, fake_gate: tuple[FakeGate, str], mode: str, verdict: int, expected: int
) -> None:
    gate, path = fake_gate
    gate.reply = decision(verdict)  # type: ignore[assignment]
    argv = [*mode.split(), f"socket={path}"]
    code, out = run(hook, argv, b"123456", SSH_AUTH_INFO_0="password\n")
    assert (code, out) == (expected, "")


def test_request_carries_exactly_the_pam_items(
    hook: ModuleType, fake_gate: tuple[FakeGate, str]
) -> None:
    gate, path = fake_gate
    run(hook, ["verify", f"socket={path}"], "pässword123456\0".encode())
    name, request = gate.seen[0]
    assert name == "Verify"
    assert (request.username, request.service, request.rhost) == ("alice", "sshd", "192.0.2.7")
    assert request.authtok == "pässword123456"  # trailing NUL from pam_exec stripped


def test_long_message_survives(hook: ModuleType, fake_gate: tuple[FakeGate, str]) -> None:
    gate, path = fake_gate
    gate.reply = decision(pb.VERDICT_DENY, "x" * 10_000)  # type: ignore[assignment]
    code, out = run(hook, ["verify", f"socket={path}"], b"1")
    assert code == 1 and out == "x" * 512 + "\n"  # shown, but trimmed for the terminal


def test_oversized_reply_denies_in_both_fail_modes(
    hook: ModuleType, fake_gate: tuple[FakeGate, str]
) -> None:
    gate, path = fake_gate
    gate.reply = decision(pb.VERDICT_ALLOW, "x" * 40_000)  # type: ignore[assignment]
    assert run(hook, ["verify", f"socket={path}"], b"1")[0] == 1
    assert run(hook, ["verify", f"socket={path}", "fail=safe"], b"1")[0] == 1  # it answered


def test_control_characters_never_reach_the_terminal(
    hook: ModuleType, fake_gate: tuple[FakeGate, str]
) -> None:
    gate, path = fake_gate
    gate.reply = decision(pb.VERDICT_DENY, "bad\x1b[2Jcode\r\n")  # type: ignore[assignment]
    assert run(hook, ["verify", f"socket={path}"], b"1")[1] == "bad[2Jcode\n"


# -- daemon failures and the fail mode -----------------------------------------------------
# fail=safe allows only a daemon that did not answer (test_fail_modes.py has the cases);
# an error status, a crash or a garbled reply is an answer, and denies in both modes.


@pytest.mark.parametrize(
    "status",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT,
     grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND],
)  # fmt: skip
def test_error_status_denies_in_both_fail_modes(
    hook: ModuleType, fake_gate: tuple[FakeGate, str], status: grpc.StatusCode
) -> None:
    gate, path = fake_gate

    def fail(request: pb.PamRequest, context: grpc.ServicerContext) -> pb.PamDecision:
        context.abort(status, "nope: ünïcode message")
        raise AssertionError

    gate.reply = fail  # type: ignore[assignment]
    assert run(hook, ["verify", f"socket={path}"], b"1") == (1, "")
    assert run(hook, ["verify", f"socket={path}", "fail=safe"], b"1") == (1, "")


def test_servicer_crash_denies_in_both_fail_modes(
    hook: ModuleType, fake_gate: tuple[FakeGate, str]
) -> None:
    gate, path = fake_gate

    def crash(request: pb.PamRequest, context: grpc.ServicerContext) -> pb.PamDecision:
        raise RuntimeError("boom")

    gate.reply = crash  # type: ignore[assignment]
    assert run(hook, ["check", f"socket={path}"])[0] == 1
    assert run(hook, ["check", f"socket={path}", "fail=safe"])[0] == 1


def test_unimplemented_method_against_the_real_daemon(hook: ModuleType, daemon) -> None:  # type: ignore[no-untyped-def]
    # admin.sock serves no PamGate: the real server answers UNIMPLEMENTED.
    assert run(hook, ["check", f"socket={daemon.admin_socket}"])[0] == 1
    assert run(hook, ["check", f"socket={daemon.admin_socket}", "fail=safe"])[0] == 1


def test_real_daemon_reply_shapes(hook: ModuleType, daemon, user) -> None:  # type: ignore[no-untyped-def]
    import pyotp

    admin = daemon.admin()
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1), timeout=5)
    sock = f"socket={daemon.socket('pam')}"
    assert run(hook, ["check", sock], PAM_USER=user.name) == (0, "")  # not enrolled, optional
    admin.UpdateConfig(
        pb.UpdateConfigRequest(enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED), timeout=5
    )
    code, out = run(hook, ["check", sock], PAM_USER=user.name)
    assert code == 1 and "otpgate renew-secret" in out
    entry = admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    totp = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
    assert run(hook, ["check", sock], PAM_USER=user.name)[0] == 1  # OTP_REQUIRED
    assert run(hook, ["verify", sock], totp.now().encode(), PAM_USER=user.name) == (0, "")
    code, out = run(hook, ["verify", sock], totp.now().encode(), PAM_USER=user.name)
    assert code == 1 and "already used" in out
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=False), timeout=5)
    assert run(hook, ["check", sock], PAM_USER=user.name)[0] == 0  # 2FA off: NOT_REQUIRED


def test_missing_socket_and_non_socket(hook: ModuleType, tmp_path) -> None:  # type: ignore[no-untyped-def]
    plain = tmp_path / "plain"
    plain.write_text("x")
    for path in (str(tmp_path / "none.sock"), str(plain)):
        assert run(hook, ["check", f"socket={path}"])[0] == 1
        assert run(hook, ["check", f"socket={path}", "fail=safe"])[0] == 0


def test_frozen_daemon_verdict_within_timeout(
    hook: ModuleType, fake_gate: tuple[FakeGate, str]
) -> None:
    gate, path = fake_gate

    def hang(request: pb.PamRequest, context: grpc.ServicerContext) -> pb.PamDecision:
        time.sleep(3)
        return pb.PamDecision(verdict=pb.VERDICT_ALLOW)

    gate.reply = hang  # type: ignore[assignment]
    started = time.monotonic()
    assert run(hook, ["verify", f"socket={path}", "timeout=0.5"], b"1")[0] == 1
    assert time.monotonic() - started < 1.5


def _silent(conn: socket.socket) -> None:
    time.sleep(2)


@pytest.mark.parametrize(
    "behaviour",
    [
        lambda c: c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"),
        lambda c: c.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"),  # SETTINGS, then close
        lambda c: c.sendall(b"\x00\x40\x00\x01\x04\x00\x00\x00\x01"),  # 16 KiB+ frame header
        lambda c: c.sendall(b"\x00\x00\x01\x07\x00\x00\x00\x00\x00\x00"),  # short GOAWAY
        lambda c: c.sendall(b"\x00\x00\x02\x01\x05\x00\x00\x00\x01\x88\xff"),  # bad HPACK index
        lambda c: c.sendall(  # :status 200 and END_STREAM but no grpc-status
            b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\x88"
        ),
        _silent,
    ],
)
def test_garbled_or_silent_peers_deny(hook: ModuleType, raw_server, behaviour) -> None:  # type: ignore[no-untyped-def]
    path = raw_server(behaviour)
    started = time.monotonic()
    assert run(hook, ["verify", f"socket={path}", "timeout=1"], b"1")[0] == 1
    assert time.monotonic() - started < 2.5


# -- usage and environment ------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[], ["sideways"], ["check", "colour=blue"], ["check", "timeout=0"], ["check", "timeout=x"],
     ["check", "timeout=31"], ["check", "fail=maybe"], ["check", "socket=relative.sock"],
     ["check", "fail=safe", "fail=safe"], ["check", "noequals"],
     ["check", "first-factor=optional"], ["single-prompt", "first-factor=required"],
     ["first-factor-done", "first-factor=required"], ["single-prompt", "fail=safe"],
     ["single-prompt", "timeout=2", "fail=safe"]],
)  # fmt: skip
def test_bad_pam_lines_deny_even_in_safe_mode(hook: ModuleType, argv: list[str]) -> None:
    assert run(hook, argv)[0] == 1


@pytest.mark.parametrize(
    "env",
    [{"PAM_TYPE": "account"}, {"PAM_TYPE": ""}, {"PAM_USER": ""}, {"PAM_USER": "a/b"},
     {"PAM_USER": "x" * 300}, {"PAM_USER": "bad\nname"}, {"PAM_SERVICE": ""}],
)  # fmt: skip
def test_implausible_environment_denies(
    hook: ModuleType, fake_gate: tuple[FakeGate, str], env: dict[str, str]
) -> None:
    gate, path = fake_gate
    assert run(hook, ["check", f"socket={path}", "fail=safe"], **env)[0] == 1
    assert gate.seen == []


def test_too_long_token_denied(hook: ModuleType, fake_gate: tuple[FakeGate, str]) -> None:
    gate, path = fake_gate
    assert run(hook, ["verify", f"socket={path}"], b"1" * 2000)[0] == 1
    assert gate.seen == []


def test_first_factor_done(hook: ModuleType) -> None:
    assert run(hook, ["first-factor-done"], SSH_AUTH_INFO_0="password\n")[0] == 0
    assert run(hook, ["first-factor-done"], SSH_AUTH_INFO_0="")[0] == 1
    assert run(hook, ["first-factor-done"])[0] == 1


@pytest.mark.parametrize("mode", ["check", "verify"])
def test_first_factor_required_denies_before_asking_the_daemon(
    hook: ModuleType, fake_gate: tuple[FakeGate, str], mode: str
) -> None:
    gate, path = fake_gate
    wanted = pb.VERDICT_NOT_REQUIRED if mode == "check" else pb.VERDICT_ALLOW
    gate.reply = decision(wanted)  # type: ignore[assignment]
    argv = [mode, f"socket={path}", "first-factor=required", "fail=safe"]
    assert run(hook, argv, b"123456")[0] == 1
    assert run(hook, argv, b"123456", SSH_AUTH_INFO_0=" \n")[0] == 1
    assert gate.seen == []
    assert run(hook, argv, b"123456", SSH_AUTH_INFO_0="publickey ssh-ed25519 AAAA\n")[0] == 0
    assert [name for name, _ in gate.seen] == ["Check" if mode == "check" else "Verify"]


# -- protobuf and HPACK ---------------------------------------------------------------------


def test_protobuf_round_trip_against_generated_code(hook: ModuleType) -> None:
    raw = hook.encode_request("alice", "sshd", "", "0123")
    assert pb.PamRequest.FromString(raw) == pb.PamRequest(
        username="alice", service="sshd", authtok="0123"
    )
    reply = pb.PamDecision(verdict=pb.VERDICT_LOCKED, message="wait", retry_after_seconds=300)
    # An unknown field (number 9, varint) in between is skipped.
    data = reply.SerializeToString() + b"\x48\x01"
    assert hook.decode_decision(data) == (pb.VERDICT_LOCKED, "wait", 300)
    for bad in (b"\x0a\x05ab", b"\x08", b"\x0b", b"\x00\x01"):
        with pytest.raises(hook.BadAnswer):
            hook.decode_decision(bad)


RFC7541_C3 = [  # requests without Huffman coding, sharing one dynamic table
    ("828684410f7777772e6578616d706c652e636f6d",
     [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]),
    ("828684be58086e6f2d6361636865",
     [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com"),
      ("cache-control", "no-cache")]),
    ("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
     [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"),
      (":authority", "www.example.com"), ("custom-key", "custom-value")]),
]  # fmt: skip
RFC7541_C4 = [  # the same requests, Huffman coded
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]


def test_hpack_rfc7541_examples(hook: ModuleType) -> None:
    plain, huffman = hook.HpackDecoder(), hook.HpackDecoder()
    for (hex_plain, expected), hex_huffman in zip(RFC7541_C3, RFC7541_C4, strict=True):
        assert plain.decode(bytes.fromhex(hex_plain)) == expected
        assert huffman.decode(bytes.fromhex(hex_huffman)) == expected
    assert huffman.dynamic == [("custom-key", "custom-value"), ("cache-control", "no-cache"),
                               (":authority", "www.example.com")]  # fmt: skip


def test_huffman_rejects_bad_padding_and_eos(hook: ModuleType) -> None:
    with pytest.raises(hook.BadAnswer):
        hook.huffman_decode(b"\xf1\xe3\x00")  # padding must be ones
    with pytest.raises(hook.BadAnswer):
        hook.huffman_decode(b"\xff\xff\xff\xff")  # EOS inside the string


# -- as pam_exec runs it ------------------------------------------------------------------------


def test_launcher_under_system_python_without_site(fake_gate: tuple[FakeGate, str]) -> None:
    gate, path = fake_gate
    gate.reply = decision(pb.VERDICT_ALLOW)  # type: ignore[assignment]
    env = {k: v for k, v in ENV.items()}
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", str(HOOK_LAUNCHER), "verify", f"socket={path}"],
        input=b"654321", capture_output=True, env=env, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert gate.seen[0][1].authtok == "654321"
    assert result.stderr == b""
    gate.reply = decision(pb.VERDICT_DENY, "Invalid code.")  # type: ignore[assignment]
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", str(HOOK_LAUNCHER), "verify", f"socket={path}"],
        input=b"654321", capture_output=True, env=env, timeout=30,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (1, b"Invalid code.\n")
    assert os.path.exists(HOOK_LAUNCHER.parent / "__pycache__")
