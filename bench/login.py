"""Password-and-code logins through LoginEx + LoginExContinue on user.sock."""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import grpc
import pyotp

from bench.lib import REPO, Row, bench_daemon, bench_users, enroll
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc


def run(quick: bool) -> list[Row]:
    count = 24 if quick else 64
    service = f"otpgate-bench-pw-{secrets.token_hex(4)}"
    pam_file = Path("/etc/pam.d", service)
    pam_file.write_text((REPO / "packaging" / "pam.d" / "otpgate").read_text())
    try:
        with (
            bench_users(count) as users,
            bench_daemon(None, "--password-pam-service", service) as d,
        ):
            d.start()
            d.admin().UpdateConfig(pb.UpdateConfigRequest(enabled=True, window=1), timeout=10)
            codes = enroll(d, [name for name, _ in users])
            stub = pb_grpc.UserSelfServiceStub(grpc.insecure_channel("unix:" + d.socket("user")))
            queue = list(users)
            lock = threading.Lock()
            ok: list[bool] = []

            def worker() -> None:
                while True:
                    with lock:
                        if not queue:
                            return
                        name, password = queue.pop()
                    first = stub.LoginEx(
                        pb.LoginExRequest(
                            mechanism=pb.PASSWORD_PLAIN, username=name, password=password
                        ),
                        timeout=30,
                    )
                    done = stub.LoginExContinue(pb.LoginExContinueRequest(
                        mechanism=pb.OTP_TOKEN, attempt_token=first.attempt_token,
                        otp_token=pyotp.TOTP(codes[name]).now()), timeout=30)  # fmt: skip
                    with lock:
                        ok.append(done.response_type == pb.SUCCESS)

            threads = [threading.Thread(target=worker) for _ in range(8)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
    finally:
        pam_file.unlink(missing_ok=True)
    return [
        Row(
            "login",
            "LoginEx + LoginExContinue, 8 callers",
            len(ok) / elapsed,
            f"{ok.count(False)} failed of {len(ok)}",
            "logins/s",
            "password through PAM (yescrypt) + code",
        )
    ]
