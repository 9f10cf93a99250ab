"""Login storm: N hook processes started at once against one daemon."""

from __future__ import annotations

import subprocess
import time

from bench.lib import HOOK, Row, bench_daemon, bench_users
from otpgate.v1 import otpgate_pb2 as pb


def run(quick: bool) -> list[Row]:
    rows: list[Row] = []
    sizes = (50, 200) if quick else (50, 200, 500)
    with bench_users(1) as users, bench_daemon() as daemon:
        daemon.start()
        daemon.admin().UpdateConfig(
            pb.UpdateConfigRequest(enabled=True, services_ssh=True), timeout=10
        )
        # Not enrolled under the optional policy: the daemon answers NOT_REQUIRED, exit 0;
        # any failure (refused connection, timeout) exits 1 under fail=secure.
        env = {"PAM_TYPE": "auth", "PAM_USER": users[0][0], "PAM_SERVICE": "sshd"}
        command = ["/usr/bin/python3", "-I", "-S", str(HOOK), "check",
                   f"socket={daemon.socket('pam')}"]  # fmt: skip
        for count in sizes:
            started = time.perf_counter()
            procs = [
                subprocess.Popen(
                    command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                for _ in range(count)
            ]
            codes = [p.wait() for p in procs]
            elapsed = time.perf_counter() - started
            errors = sum(1 for c in codes if c != 0)
            rows.append(
                Row(
                    "storm",
                    f"{count} hooks at once",
                    elapsed * 1000,
                    f"{errors} errors",
                    "ms",
                    f"{count / elapsed:.0f} verdicts/s; time to the last verdict",
                )
            )
    return rows
