"""Login latency through pamtester: pam_permit alone, our hook, pam_oath and
pam_google_authenticator, each with a valid, unused code for the same secret.

Every login uses its own bench user (a code, once accepted, is spent for that
user in every module here), so each sample is a real first-time success. Two
floors are measured with them: pam_exec running /bin/true (what any pam_exec hook
pays: fork, and closing every descriptor up to the hard RLIMIT_NOFILE), and
pam_exec running a Python that does nothing (what any Python hook pays). The
stacks take turns, sample by sample, so drift on a noisy machine hits them alike.

Prompt when needed is the shipped otpgate-ssh-publickey stack: its gate lines
(pam_listfile, pam_access) read the bench daemon's runtime_dir/gate, which lists
every bench account (the run waits until it does), so `check` is skipped and one
hook call (`verify`) runs. The same stack pointed at a gate directory that lists
nobody (as an edge's before its first answer, or a missing file) measures the old
path: `check`, then `verify`.
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
from bench.ssh_login import SHIPPED_GATE, SHIPPED_HOOK, _otpgate_stack, _wait_listed
from otpgate.v1 import otpgate_pb2 as pb

PY = f"/usr/bin/python3 -I -S {HOOK}"
GATED = "otpgate, prompt when needed (gate + verify: 1 call)"
UNGATED = "otpgate, prompt when needed, without gate files (check + verify: 2 calls)"


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


def when_needed_stack(hook_socket: str, gate_dir: Path) -> str:
    """The shipped otpgate-ssh-publickey stack, its gate lines reading `gate_dir` and
    its hook asking `hook_socket`, as pamtester can run it: pamtester cannot pass
    sshd's SSH_AUTH_INFO_0, so without first-factor=required, which costs nothing
    (no system call, no daemon question)."""
    text = _otpgate_stack("otpgate-ssh-publickey", hook_socket, gate_dir)
    text = text.replace(" first-factor=required", "")
    assert SHIPPED_HOOK not in text and SHIPPED_GATE not in text, text
    assert "first-factor" not in text and f"file={gate_dir}/ask" in text, text
    assert f"accessfile={gate_dir}/networks.conf" in text, text
    return text


def empty_gate_dir(parent: Path) -> Path:
    """parent/gate-empty: gate files that list nobody (what an edge writes before the
    centrals answer), so every login through a stack reading them runs `check`."""
    gate_dir = parent / "gate-empty"
    gate_dir.mkdir(mode=0o700)
    for name, text in (("ask", ""), ("networks.conf", "+ : ALL : ALL\n")):
        (gate_dir / name).write_text(text)
        (gate_dir / name).chmod(0o600)
    return gate_dir


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
        with bench_users(count * 5) as users, bench_daemon() as daemon:
            daemon.start()
            names = [n for n, _ in users]
            admin = daemon.admin()
            admin.UpdateConfig(
                pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1), timeout=10
            )
            secret = base64.b32encode(os.urandom(20)).decode()
            # otpgated makes its own secrets (none can be imported): our logins use the
            # code of each user's own secret; the cost does not depend on its value.
            ours, ours_always = names[:count], names[3 * count : 4 * count]
            ours_ungated = names[4 * count :]
            totps = {}
            for name in ours + ours_always + ours_ungated:
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
            # The shipped stack, with the daemon's gate files and with ones listing nobody.
            gate_dir = Path(sock).parent / "gate"  # the daemon's runtime_dir/gate
            _wait_listed(gate_dir, ours)
            hook = _pam_service(when_needed_stack(sock, gate_dir))
            hook_ungated = _pam_service(when_needed_stack(sock, empty_gate_dir(workdir)))
            always = _pam_service(
                "auth optional pam_echo.so Verification code:\n"
                f"auth requisite {verify}\nauth required pam_permit.so\n"
            )
            services += [permit, exec_true, exec_python, hook, hook_ungated, always]
            _pamtester(permit, names[0], "")  # warm caches
            stacks: list[tuple[str, Callable[[int], float]]] = [
                ("pam_permit only", lambda i: _pamtester(permit, names[i], "")),
                ("floor: pam_exec + /bin/true", lambda i: _pamtester(exec_true, names[i], "")),
                ("floor: pam_exec + python3 -I -S -c pass",
                 lambda i: _pamtester(exec_python, names[i], "")),
                ("otpgate, prompt always (verify: 1 call)",
                 lambda i: _pamtester(always, ours_always[i], totps[ours_always[i]].now())),
                (GATED, lambda i: _pamtester(hook, ours[i], totps[ours[i]].now())),
                (UNGATED,
                 lambda i: _pamtester(hook_ungated, ours_ungated[i],
                                      totps[ours_ungated[i]].now())),
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
                if name == UNGATED:
                    gated, _ = stats_ms(samples[GATED])
                    note += f"; {median / gated:.2f}x with the gate files"
                    note += f" (+{median - gated:.2f} ms)"
                rows.append(Row("login latency", name, median, spread, "ms", note))
    finally:
        for service in services:
            Path("/etc/pam.d", service).unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return rows
