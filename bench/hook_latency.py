"""Login latency through pamtester: pam_permit alone, our hook, pam_oath and
pam_google_authenticator, each with a valid, unused code for the same secret.

Every login uses its own bench user (a code, once accepted, is spent for that
user in every module here), so each sample is a real first-time success. Two
floors are measured with them: pam_exec running /bin/true (what any pam_exec hook
pays: fork, and closing every descriptor up to the hard RLIMIT_NOFILE), and
pam_exec running a Python that does nothing (what any Python hook pays). The
stacks take turns, sample by sample, so drift on a noisy machine hits them alike.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyotp

from bench.lib import HOOK, Row, bench_daemon, bench_users, stats_ms
from otpgate.v1 import otpgate_pb2 as pb

PY = f"/usr/bin/python3 -I -S {HOOK}"


def _pam_service(body: str) -> str:
    name = f"otpgate-bench-{secrets.token_hex(4)}"
    Path("/etc/pam.d", name).write_text(body + "account required pam_permit.so\n")
    return name


def _pamtester(service: str, user: str, typed: str) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        ["pamtester", service, user, "authenticate"],
        input=typed + "\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{service} refused {user}: {result.stderr.strip()}")
    return elapsed


def _module_available(name: str) -> bool:
    return any(Path(d, name).exists() for d in ("/lib/x86_64-linux-gnu/security",
                                               "/usr/lib/x86_64-linux-gnu/security",
                                               "/lib/security", "/usr/lib/security"))  # fmt: skip


def run(quick: bool) -> list[Row]:
    count = 15 if quick else 40
    rows: list[Row] = []
    workdir = Path(tempfile.mkdtemp(prefix="otpgate-bench-pam-"))
    services: list[str] = []
    try:
        with bench_users(count * 4) as users, bench_daemon() as daemon:
            daemon.start()
            names = [n for n, _ in users]
            admin = daemon.admin()
            admin.UpdateConfig(
                pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1), timeout=10
            )
            secret = base64.b32encode(os.urandom(20)).decode()
            # otpgated makes its own secrets (none can be imported): our logins use the
            # code of each user's own secret; the cost does not depend on its value.
            ours, ours_always = names[:count], names[3 * count :]
            totps = {}
            for name in ours + ours_always:
                entry = admin.RenewSecret(pb.RenewSecretRequest(username=name), timeout=10)
                totps[name] = pyotp.parse_uri(entry.twofactor_config.provisioning_uri)
            sock = daemon.socket("pam")
            permit = _pam_service("auth required pam_permit.so\n")
            exec_true = _pam_service(
                "auth required pam_exec.so quiet /bin/true\nauth required pam_permit.so\n"
            )
            exec_python = _pam_service(
                "auth required pam_exec.so quiet /usr/bin/python3 -I -S -c pass\n"
                "auth required pam_permit.so\n"
            )
            opts = f"socket={sock}"
            verify = f"pam_exec.so quiet expose_authtok stdout {PY} verify {opts}"
            # The shipped stacks, as pamtester can run them (it cannot pass sshd's
            # SSH_AUTH_INFO_0, so without the first-factor=required check, which costs
            # nothing: no system call, no daemon question).
            hook = _pam_service(
                f"auth [success=done default=ignore] pam_exec.so quiet stdout {PY} check {opts}\n"
                f"auth requisite {verify}\nauth required pam_permit.so\n"
            )
            always = _pam_service(
                "auth optional pam_echo.so Verification code:\n"
                f"auth requisite {verify}\nauth required pam_permit.so\n"
            )
            services += [permit, exec_true, exec_python, hook, always]
            _pamtester(permit, names[0], "")  # warm caches
            stacks: list[tuple[str, Callable[[int], float]]] = [
                ("pam_permit only", lambda i: _pamtester(permit, names[i], "")),
                ("floor: pam_exec + /bin/true", lambda i: _pamtester(exec_true, names[i], "")),
                ("floor: pam_exec + python3 -I -S -c pass",
                 lambda i: _pamtester(exec_python, names[i], "")),
                ("otpgate, prompt always (verify: 1 call)",
                 lambda i: _pamtester(always, ours_always[i], totps[ours_always[i]].now())),
                ("otpgate, prompt when needed (check + verify: 2 calls)",
                 lambda i: _pamtester(hook, ours[i], totps[ours[i]].now())),
            ]  # fmt: skip
            oath_users = names[count : 2 * count]
            if _module_available("pam_oath.so"):
                users_file = workdir / "users.oath"
                users_file.write_text(
                    "".join(
                        f"HOTP/T30 {n} - {base64.b32decode(secret).hex()}\n" for n in oath_users
                    )
                )
                users_file.chmod(0o600)
                oath = _pam_service(
                    f"auth requisite pam_oath.so usersfile={users_file} window=1\n"
                    "auth required pam_permit.so\n"
                )
                services.append(oath)
                stacks.append(
                    (
                        "pam_oath",
                        lambda i: _pamtester(oath, oath_users[i], pyotp.TOTP(secret).now()),
                    )
                )
            ga_users = names[2 * count :]
            if _module_available("pam_google_authenticator.so"):
                ga_dir = workdir / "ga"
                ga_dir.mkdir()
                for n in ga_users:
                    f = ga_dir / n
                    f.write_text(f'{secret}\n" RATE_LIMIT 100 30\n" DISALLOW_REUSE\n" TOTP_AUTH\n')
                    f.chmod(0o600)
                ga = _pam_service(
                    "auth requisite pam_google_authenticator.so "
                    f"secret={ga_dir}/${{USER}} user=root\n"
                    "auth required pam_permit.so\n"
                )
                services.append(ga)
                stacks.append(
                    (
                        "pam_google_authenticator",
                        lambda i: _pamtester(ga, ga_users[i], pyotp.TOTP(secret).now()),
                    )
                )
            samples: dict[str, list[float]] = {name: [] for name, _ in stacks}
            for i in range(count):
                for name, fn in stacks:
                    samples[name].append(fn(i))
            base, _ = stats_ms(samples["pam_permit only"])
            for name, values in samples.items():
                median, spread = stats_ms(values)
                note = (
                    ""
                    if name == "pam_permit only"
                    else (f"+{median - base:.2f} ms, {median / base:.2f}x pam_permit")
                )
                rows.append(Row("login latency", name, median, spread, "ms", note))
    finally:
        for service in services:
            Path("/etc/pam.d", service).unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return rows
