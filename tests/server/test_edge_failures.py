"""An edge's failures that must deny, never read as "the central is away".

fail=safe lets the first factor alone in when nobody could decide; an edge must
therefore say "unavailable" only when no central judged anything, and refuse to run
with a certificate the centrals would refuse (gRPC reports that as a closed socket,
which looks like an outage).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser, hook_exit
from tests.fleet_harness import Central, Pki, edge_toml


@pytest.fixture
def frozen_central(
    make_central: Callable[..., Central], make_edge: Callable[..., Daemon], user: LocalUser
) -> Iterator[tuple[Central, Daemon]]:
    central = make_central()
    admin = central.daemon.admin()
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True, services_ssh=True), timeout=5)
    admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    edge = make_edge(central.address)
    check = pb.PamRequest(username=user.name, service="sshd")
    assert edge.pam().Check(check, timeout=5).verdict == pb.VERDICT_OTP_REQUIRED
    assert central.daemon.proc is not None
    os.kill(central.daemon.proc.pid, signal.SIGSTOP)
    try:
        yield central, edge
    finally:
        os.kill(central.daemon.proc.pid, signal.SIGCONT)


def test_a_code_sent_to_a_central_that_does_not_answer_denies_even_under_fail_safe(
    frozen_central: tuple[Central, Daemon], user: LocalUser
) -> None:
    # The frozen central may judge the code when it wakes up (counted, or spent):
    # "unavailable" would let fail=safe in on a wrong code. A question that changes
    # nothing (Check) may say unavailable; a code may not.
    _central, edge = frozen_central
    started = time.monotonic()
    check = edge.pam().Check(pb.PamRequest(username=user.name, service="sshd"), timeout=5)
    assert check.verdict == pb.VERDICT_UNAVAILABLE
    with pytest.raises(grpc.RpcError) as failed:
        edge.pam().Verify(
            pb.PamRequest(username=user.name, service="sshd", authtok="000000"), timeout=5
        )
    assert failed.value.code() != grpc.StatusCode.OK
    assert "may have judged it" in (failed.value.details() or "")
    assert hook_exit(edge, user.name, "000000", "safe") != 0
    assert time.monotonic() - started < 12


@pytest.mark.parametrize("breakage", ["key_of_another", "expired", "server_certificate"])
def test_an_edge_with_a_certificate_the_centrals_would_refuse_does_not_start(
    breakage: str,
    make_central: Callable[..., Central],
    make_daemon: Callable[..., Daemon],
    fleet_pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    central = make_central()
    root = tmp_path_factory.mktemp("edge")
    toml = edge_toml(fleet_pki, "edge1", [central.address])
    if breakage == "key_of_another":
        _other_cert, other_key = fleet_pki.issue("edge-other", "host")
        toml = toml.replace(str(fleet_pki.directory / "edge1.key"), str(other_key))
        words = "tls_key"
    elif breakage == "expired":
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
        cert, key = fleet_pki.issue("edge-expired", "host", days=1, not_before=past)
        toml = toml.replace(str(fleet_pki.directory / "edge1.crt"), str(cert))
        toml = toml.replace(str(fleet_pki.directory / "edge1.key"), str(key))
        words = "expired"
    else:  # the central's own certificate, made for serverAuth only
        toml = toml.replace(
            str(fleet_pki.directory / "edge1.crt"), str(fleet_pki.directory / "server.crt")
        )
        toml = toml.replace(
            str(fleet_pki.directory / "edge1.key"), str(fleet_pki.directory / "server.key")
        )
        words = "client authentication"
    config = root / "otpgated.toml"
    config.write_text(toml)
    result = make_daemon("--config", str(config), root=root, start=False).run_to_exit()
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "ConfigError" in output and words in output, output
    assert "Traceback" not in output
