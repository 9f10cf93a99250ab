"""The trust boundary, attacked for real: an ordinary local user (runuser) against a
running otpgated, through the world-connectable user.sock.

Each test replays one finding of the first attack on the trust boundary and checks
it is refused: no password oracle, no starvation of pam.sock and admin.sock, no
traceback or INTERNAL for malformed bytes, no secret for a password alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import grpc
import pyotp
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import REPO, RUNUSER, Daemon, LocalUser
from tests.server.test_user_socket import enable, enroll, login

HOOK = REPO / "pam_hook" / "otpgate_pam_hook.py"

# Helpers every attacker script starts with: stubs on user.sock, raw calls.
_PRELUDE = """
import json, os, socket, sys, threading, time
import grpc
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc
SOCK = sys.argv[1]
ARGS = json.loads(sys.argv[2])
def stub():
    return pb_grpc.UserSelfServiceStub(grpc.insecure_channel("unix:" + SOCK))
def code_of(exc):
    return exc.code().name if isinstance(exc, grpc.Call) else type(exc).__name__
def login(s, name, password):
    try:
        reply = s.LoginEx(pb.LoginExRequest(mechanism=pb.PASSWORD_PLAIN, username=name,
                                            password=password), timeout=10)
        return pb.ResponseType.Name(reply.response_type), reply
    except grpc.RpcError as exc:
        return code_of(exc), exc
"""


def attack(
    python: tuple[str, dict[str, str]],
    attacker: LocalUser,
    daemon: Daemon,
    script: str,
    args: object = None,
    *,
    timeout: float = 120,
) -> dict:
    """Run `script` as `attacker`; it prints one JSON object as its last line."""
    executable, env = python
    result = subprocess.run(
        [RUNUSER, "-u", attacker.name, "--", executable, "-c",
         _PRELUDE + textwrap.dedent(script), daemon.socket("user"), json.dumps(args or {})],
        capture_output=True, text=True, timeout=timeout, cwd="/",
        env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- finding 1: the password oracle --------------------------------------------------------


def test_ordinary_user_cannot_check_another_accounts_password(
    public_login_daemon: Daemon,
    make_user: object,
    cli_python: tuple[str, dict[str, str]],
) -> None:
    attacker, victim = make_user(), make_user()  # type: ignore[operator]
    out = attack(
        cli_python,
        attacker,
        public_login_daemon,
        """
        s = stub()
        answers = [login(s, ARGS["victim"], p)[0] for p in ["a", "b", ARGS["right"], "c"]]
        answers.append(login(s, "no-such-user-here", "x")[0])
        _, exc = login(s, ARGS["victim"], ARGS["right"])
        print(json.dumps({"answers": answers, "details": exc.details()}))
        """,
        {"victim": victim.name, "right": victim.password},
    )
    # Refused before any check, the right password included: nothing to learn.
    assert out["answers"] == ["PERMISSION_DENIED"] * 5
    assert f"uid {attacker.uid} may log in as itself only" in out["details"]
    log = public_login_daemon.log()
    assert f"login_refused user={victim.name} caller_uid={attacker.uid} caller_pid=" in log
    # No password check of the victim ran at all.
    assert f"login user={victim.name}" not in log


def test_guessing_own_password_is_no_faster_than_su(
    public_login_daemon: Daemon,
    make_user: object,
    cli_python: tuple[str, dict[str, str]],
) -> None:
    """Sixteen connections in parallel, for 4 seconds: a password is checked at most
    at t=0 and once the first failure's 3 s delay has passed."""
    attacker = make_user()  # type: ignore[operator]
    out = attack(
        cli_python,
        attacker,
        public_login_daemon,
        """
        counts, lock = {}, threading.Lock()
        def guess(i):
            s = stub()
            end = time.monotonic() + 4.0
            n = 0
            while time.monotonic() < end:
                answer, _ = login(s, ARGS["me"], f"wrong-{i}-{n}")
                n += 1
                with lock:
                    counts[answer] = counts.get(answer, 0) + 1
        threads = [threading.Thread(target=guess, args=(i,)) for i in range(16)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(json.dumps(counts))
        """,
        {"me": attacker.name},
    )
    checked = out.get("AUTH_ERR", 0)
    print(f"guesses checked in 4 s over 16 connections: {checked}; refused unchecked: {out}")
    assert 1 <= checked <= 2, out
    assert out.get("RESOURCE_EXHAUSTED", 0) > 16, out
    # Every other guess was refused unchecked (throttled).
    assert set(out) <= {"AUTH_ERR", "RESOURCE_EXHAUSTED"}, out
    log = public_login_daemon.log()
    line = f"login user={attacker.name} caller_uid={attacker.uid} caller_pid="
    assert log.count(line) == checked  # every check that ran is logged, with its caller


def test_stolen_session_or_attempt_token_is_useless_to_another_uid(
    public_login_daemon: Daemon,
    make_user: object,
    cli_python: tuple[str, dict[str, str]],
) -> None:
    owner, thief = make_user(), make_user()  # type: ignore[operator]
    enable(public_login_daemon)
    session = login(public_login_daemon, owner.name, owner.password)  # root may log anyone in
    assert session.response_type == pb.SUCCESS
    totp = enroll(public_login_daemon, owner)  # enrolled after that session began
    attempt = login(public_login_daemon, owner.name, owner.password)
    assert attempt.response_type == pb.OTP_REQUIRED
    out = attack(
        cli_python,
        thief,
        public_login_daemon,
        """
        s = stub()
        md = [("authorization", "Bearer " + ARGS["session"])]
        try:
            s.GetUser(pb.GetUserRequest(), metadata=md, timeout=5)
            user = "OK"
        except grpc.RpcError as exc:
            user = code_of(exc)
        reply = s.LoginExContinue(pb.LoginExContinueRequest(mechanism=pb.OTP_TOKEN,
            attempt_token=ARGS["attempt"], otp_token=ARGS["code"]), timeout=5)
        print(json.dumps({"user": user, "cont": pb.ResponseType.Name(reply.response_type)}))
        """,
        {"session": session.session_token, "attempt": attempt.attempt_token, "code": totp.now()},
    )
    assert out == {"user": "UNAUTHENTICATED", "cont": "AUTH_ERR"}
    # The owner's attempt was left untouched by the thief's try.
    reply = login_continue(public_login_daemon, attempt.attempt_token, totp.now())
    assert reply.response_type == pb.SUCCESS


def login_continue(daemon: Daemon, attempt: str, code: str) -> pb.LoginExResponse:
    request = pb.LoginExContinueRequest(
        mechanism=pb.OTP_TOKEN, attempt_token=attempt, otp_token=code
    )
    reply: pb.LoginExResponse = daemon.user().LoginExContinue(request, timeout=10)
    return reply


def test_private_socket_is_root_only_and_unrelayed_callers_get_nothing(
    public_login_daemon: Daemon, user: LocalUser, cli_python: tuple[str, dict[str, str]]
) -> None:
    private = Path(public_login_daemon.runtime_dir) / "private"
    assert os.stat(private).st_mode & 0o777 == 0o700
    out = attack(
        cli_python,
        user,
        public_login_daemon,
        """
        try:
            socket.socket(socket.AF_UNIX).connect(ARGS["path"])
            print(json.dumps("connected"))
        except OSError as exc:
            print(json.dumps(type(exc).__name__))
        """,
        {"path": str(private / "user.sock")},
    )
    assert out == "PermissionError"
    # Even root, straight to the gRPC server (not through the relay): refused.
    channel = grpc.insecure_channel("unix:" + str(private / "user.sock"))
    from otpgate.v1 import otpgate_pb2_grpc as pb_grpc

    with pytest.raises(grpc.RpcError) as refused:
        pb_grpc.UserSelfServiceStub(channel).LoginEx(
            pb.LoginExRequest(mechanism=pb.PASSWORD_PLAIN, username=user.name,
                              password=user.password), timeout=5,
        )  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- finding 2: starvation -------------------------------------------------------------------


def _hook_verify(daemon: Daemon, user: LocalUser, code: str, *options: str) -> tuple[int, float]:
    env = {"PAM_USER": user.name, "PAM_SERVICE": "sshd-otpgate-starve", "PAM_TYPE": "auth"}
    started = time.monotonic()
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", str(HOOK), "verify",
         f"socket={daemon.socket('pam')}", *options],
        input=code.encode(), env=env, capture_output=True, timeout=30,
    )  # fmt: skip
    return result.returncode, time.monotonic() - started


def test_5000_connections_from_one_user_leave_pam_and_admin_answering(
    public_login_daemon: Daemon,
    make_user: object,
    cli_python: tuple[str, dict[str, str]],
) -> None:
    attacker, enrolled, bystander = make_user(), make_user(), make_user()  # type: ignore[operator]
    daemon = public_login_daemon
    daemon.admin().UpdateConfig(
        pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1),
        timeout=5,
    )
    totp = enroll(daemon, enrolled)
    _, before = _hook_verify(daemon, enrolled, "000000")  # the normal time, this machine
    script = """
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held, failed = [], 0
    for _ in range(ARGS["n"]):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(SOCK)
            held.append(s)
        except OSError:
            failed += 1
            s.close()
    # Each one starts an HTTP/2 connection and stays idle.
    for s in held:
        try:
            s.send(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n")
        except OSError:
            pass
    print(json.dumps({"held": len(held), "failed": failed}), flush=True)
    sys.stdin.readline()
    """
    executable, env = cli_python
    holder = subprocess.Popen(
        [RUNUSER, "-u", attacker.name, "--", executable, "-c", _PRELUDE + textwrap.dedent(script),
         daemon.socket("user"), json.dumps({"n": 5000})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd="/", env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        status = json.loads(holder.stdout.readline())
        assert status["held"] + status["failed"] == 5000, status
        time.sleep(0.5)  # the relay has accepted (and closed) what it would not keep
        assert daemon.proc is not None
        fds = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
        code, seconds = _hook_verify(daemon, enrolled, totp.now())
        wrong, _ = _hook_verify(daemon, enrolled, "000000", "fail=safe")
        config = daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=3)
        other = login(daemon, bystander.name, bystander.password)
        print(f"hook verify while 5,000 connections held: {seconds * 1000:.0f} ms "
              f"(before: {before * 1000:.0f} ms); daemon descriptors {fds}")  # fmt: skip
        assert code == 0  # within the hook's own 3 s timeout, or it would have denied
        assert wrong == 1  # a daemon that answers is never taken for one that is down
        assert config.enabled
        assert other.response_type == pb.SUCCESS  # another user is served too
        assert fds < 300, fds  # 16 links of the attacker, not 5,000
    finally:
        holder.communicate("\n", timeout=30)
    assert f"user_socket_refused caller_uid={attacker.uid}" in daemon.log()
    assert daemon.log().count("user_socket_refused") < 50  # refusals are not a log flood


def test_stalled_streams_from_one_user_leave_user_sock_to_the_others(
    public_login_daemon: Daemon,
    make_user: object,
    cli_python: tuple[str, dict[str, str]],
) -> None:
    """16 connections x 32 streams that send headers and never a request (the attack
    review's B1): with a synchronous server they held every worker thread."""
    attacker, bystander = make_user(), make_user()  # type: ignore[operator]
    daemon = public_login_daemon
    script = """
    def frame(kind, flags, stream, payload=b""):
        return (len(payload).to_bytes(3, "big") + bytes([kind, flags])
                + stream.to_bytes(4, "big") + payload)
    def literal(name, value):
        return b"\\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
    headers = (b"\\x83\\x86" + literal(b":path", b"/otpgate.v1.UserSelfService/LoginEx")
               + literal(b":authority", b"localhost")
               + literal(b"content-type", b"application/grpc") + literal(b"te", b"trailers"))
    held = []
    for _ in range(16):
        s = socket.socket(socket.AF_UNIX)
        s.connect(SOCK)
        s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + frame(4, 0, 0)
                  + frame(4, 1, 0)
                  + b"".join(frame(1, 4, 1 + 2 * i, headers) for i in range(32)))
        held.append(s)
    print(json.dumps({"held": len(held)}), flush=True)
    sys.stdin.readline()
    """
    executable, env = cli_python
    holder = subprocess.Popen(
        [RUNUSER, "-u", attacker.name, "--", executable, "-c", _PRELUDE + textwrap.dedent(script),
         daemon.socket("user"), "{}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd="/", env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert json.loads(holder.stdout.readline()) == {"held": 16}
        time.sleep(1.0)  # every stream has reached the server
        out = attack(
            cli_python,
            bystander,
            daemon,
            """
            started = time.monotonic()
            answer, _ = login(stub(), ARGS["me"], ARGS["password"])
            print(json.dumps({"answer": answer, "seconds": time.monotonic() - started}))
            """,
            {"me": bystander.name, "password": bystander.password},
        )
        assert out["answer"] == "SUCCESS", out
        assert out["seconds"] < 5, out
    finally:
        holder.communicate("\n", timeout=30)


def test_user_sock_offers_no_long_lived_streams(public_login_daemon: Daemon) -> None:
    channel = grpc.insecure_channel("unix:" + public_login_daemon.socket("user"))
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1  # SERVING
    with pytest.raises(grpc.RpcError) as refused:
        next(iter(stub.Watch(health_pb2.HealthCheckRequest(), timeout=5)))
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_self_service_renewals_are_spaced(login_daemon: Daemon, user: LocalUser) -> None:
    """Each renewal is a durable write and a log line: not as fast as one can ask."""
    session = login(login_daemon, user.name, user.password)
    meta = [("authorization", f"Bearer {session.session_token}")]
    stub = login_daemon.user()
    stub.RenewSecret(pb.RenewSecretRequest(), timeout=5, metadata=meta)
    with pytest.raises(grpc.RpcError) as refused:
        stub.RenewSecret(pb.RenewSecretRequest(), timeout=5, metadata=meta)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "renewed a secret moments ago" in refused.value.details()


def test_bogus_login_continues_do_not_flood_the_log(
    public_login_daemon: Daemon, user: LocalUser, cli_python: tuple[str, dict[str, str]]
) -> None:
    out = attack(
        cli_python,
        user,
        public_login_daemon,
        """
        s = stub()
        answers = {}
        for i in range(300):
            reply = s.LoginExContinue(pb.LoginExContinueRequest(mechanism=pb.OTP_TOKEN,
                attempt_token=f"made-up-{i}", otp_token="123456"), timeout=5)
            name = pb.ResponseType.Name(reply.response_type)
            answers[name] = answers.get(name, 0) + 1
        print(json.dumps(answers))
        """,
    )
    assert out == {"AUTH_ERR": 300}
    assert public_login_daemon.log().count("reason=no_pending_attempt") <= 12


def test_self_service_code_checks_are_spaced(login_daemon: Daemon, user: LocalUser) -> None:
    session = login(login_daemon, user.name, user.password)  # not enrolled: LEVEL_1
    meta = [("authorization", f"Bearer {session.session_token}")]
    stub = login_daemon.user()
    first = stub.VerifyToken(pb.VerifyTokenRequest(token="123456"), timeout=5, metadata=meta)
    assert first.result == pb.VERIFY_RESULT_NOT_ENROLLED
    with pytest.raises(grpc.RpcError) as refused:
        stub.VerifyToken(pb.VerifyTokenRequest(token="123456"), timeout=5, metadata=meta)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- finding 4: malformed requests ----------------------------------------------------------


def test_malformed_requests_get_invalid_argument_and_no_traceback(
    public_login_daemon: Daemon, user: LocalUser, cli_python: tuple[str, dict[str, str]]
) -> None:
    out = attack(
        cli_python,
        user,
        public_login_daemon,
        """
        channel = grpc.insecure_channel("unix:" + SOCK)
        bad = [b"\\xff\\xff\\xff", b"\\x12\\x02\\xff\\xfe", b"\\x0a\\xff", b"\\x08"]
        codes = {}
        for method in ["LoginEx", "LoginExContinue", "GetUser", "RenewSecret"]:
            call = channel.unary_unary(f"/otpgate.v1.UserSelfService/{method}")
            for i in range(50):
                try:
                    call(bad[i % len(bad)], timeout=5)
                    name = "OK"
                except grpc.RpcError as exc:
                    name = code_of(exc)
                codes[name] = codes.get(name, 0) + 1
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            check(b"\\x0a\\x02\\xff\\xfe", timeout=5)
            codes["health"] = "OK"
        except grpc.RpcError as exc:
            codes["health"] = code_of(exc)
        print(json.dumps(codes))
        """,
    )
    assert out == {"INVALID_ARGUMENT": 200, "health": "INVALID_ARGUMENT"}
    log = public_login_daemon.log()
    assert "Traceback" not in log and "Exception deserializing" not in log
    assert 1 <= log.count("malformed_request") <= 10  # rate-limited, not one per call


def test_non_utf8_code_on_pam_socket_is_invalid_argument(public_login_daemon: Daemon) -> None:
    channel = grpc.insecure_channel("unix:" + public_login_daemon.socket("pam"))
    verify = channel.unary_unary("/otpgate.v1.PamGate/Verify")
    request = b"\x0a\x04root\x12\x04sshd\x22\x02\xff\xfe"  # authtok = ff fe
    with pytest.raises(grpc.RpcError) as refused:
        verify(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in public_login_daemon.log()


# -- finding 6: a password alone never reads a secret ----------------------------------------


def test_password_alone_never_shows_an_existing_secret(
    public_login_daemon: Daemon, user: LocalUser, cli_python: tuple[str, dict[str, str]]
) -> None:
    daemon = public_login_daemon  # 2FA is off (the default)
    early = login(daemon, user.name, user.password)  # a LEVEL_1 session, before enrolling
    assert early.response_type == pb.SUCCESS
    enroll(daemon, user)
    out = attack(
        cli_python,
        user,
        daemon,
        """
        s = stub()
        answer, reply = login(s, ARGS["me"], ARGS["password"])
        result = {"login": answer}
        md = [("authorization", "Bearer " + ARGS["early"])]
        for name, request in [("uri", pb.GetProvisioningUriRequest()),
                              ("renew", pb.RenewSecretRequest())]:
            try:
                getattr(s, "GetProvisioningUri" if name == "uri" else "RenewSecret")(
                    request, metadata=md, timeout=5)
                result[name] = "OK"
            except grpc.RpcError as exc:
                result[name] = code_of(exc)
        print(json.dumps(result))
        """,
        {"me": user.name, "password": user.password, "early": early.session_token},
    )
    # The switch is off, yet an enrolled account must prove its code (LEVEL_2) first,
    # and the session opened before the secret existed no longer serves.
    assert out == {"login": "OTP_REQUIRED", "uri": "UNAUTHENTICATED", "renew": "UNAUTHENTICATED"}


# -- finding 7: locked accounts, malformed codes ---------------------------------------------


def test_locked_account_gets_auth_err_and_malformed_codes_count(
    login_daemon: Daemon, user: LocalUser
) -> None:
    daemon = login_daemon
    daemon.admin().UpdateConfig(
        pb.UpdateConfigRequest(enabled=True, lockout_threshold=3), timeout=5
    )
    totp = enroll(daemon, user)
    first = login(daemon, user.name, user.password)
    for junk in ("abc", "", "\u0661\u0662\u0663\u0664\u0665\u0666"):  # Arabic-Indic digits
        first = login_continue(daemon, first.attempt_token, junk)
    assert first.response_type == pb.AUTH_ERR
    shown = daemon.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert shown.locked_seconds > 0, shown  # three malformed codes: locked
    # Locked: even the right password (and a right code) gets AUTH_ERR, as documented.
    assert login(daemon, user.name, user.password).response_type == pb.AUTH_ERR
    assert isinstance(totp, pyotp.TOTP)
