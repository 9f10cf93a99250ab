"""server.edge.EdgeGateLists: what an edge asks its centrals for its gate files.

Against a real central over mutual TLS: thousands of long names, more than the
central takes in one message (64 KiB), still come back listed. With a stand-in for
the centrals: the names asked about, and a central too old to know AskList.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from otpgate.core.accounts import local_account_names
from otpgate.core.gate_files import MAX_ASK_NAMES, GateLists
from otpgate.errors import UpstreamRefused
from otpgate.server.edge import EdgeGateLists, SeenNames, Upstreams
from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import LocalUser
from tests.fleet_harness import Central, Pki
from tests.server.test_host_gate import TWO_HOSTS, enroll, setup


def test_long_names_beyond_one_message_are_asked_in_batches(
    make_central: Callable[..., Central], fleet_pki: Pki, user: LocalUser, tmp_path: Path
) -> None:
    central = make_central(TWO_HOSTS)
    setup(central)
    enroll(central, user.name)
    cert, key = fleet_pki.issue("edge1", "host")
    upstreams = Upstreams(
        [central.address],
        ca_pem=fleet_pki.ca.read_bytes(),
        cert_pem=cert.read_bytes(),
        key_pem=key.read_bytes(),
        timeout=5,
    )
    try:
        seen = SeenNames()
        # 3,000 logins of names no account has, 40 bytes each: about 130 KiB of names.
        for i in range(3000):
            seen.add(f"someone.with.a.long.name{i:06d}@example")
        seen.add(user.name)  # the latest login
        passwd = tmp_path / "passwd"
        passwd.write_text("root:x:0:0::/root:/bin/sh\n")
        lists = EdgeGateLists(
            upstreams, seen, local_names=lambda: local_account_names(str(passwd))
        )()
    finally:
        upstreams.close()
    assert lists is not None
    assert user.name in lists.asked and "someone.with.a.long.name002999@example" in lists.asked
    assert len(lists.asked) == 3001  # every unknown name is asked, as Check asks it
    assert "root" not in lists.asked  # known, no secret, "optional": no code


class Centrals:
    """Stands in for Upstreams: answers AskList by a rule, or refuses it."""

    def __init__(self, refuse: str = "") -> None:
        self.refuse = refuse
        self.requests: list[list[str]] = []

    def call(self, method: str, request: Any, **_: object) -> pb.AskListReply:
        assert method == "AskList"
        self.requests.append(list(request.usernames))
        if self.refuse:
            raise UpstreamRefused(self.refuse, "refused", "role host may not call AskList")
        return pb.AskListReply(asked=[n for n in request.usernames if n.startswith("a")])


def _lists(centrals: Centrals, seen: SeenNames, passwd: Path, clock: list[float]) -> EdgeGateLists:
    return EdgeGateLists(
        centrals,  # type: ignore[arg-type]
        seen,
        local_names=lambda: local_account_names(str(passwd)),
        clock=lambda: clock[0],
    )


def test_the_hosts_accounts_keep_half_the_names_and_bad_names_are_not_sent(
    tmp_path: Path,
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(f"alocal{i}:x:{i}:{i}::/:/bin/sh\n" for i in range(5000)))
    seen = SeenNames()
    for i in range(5000):
        seen.add(f"aseen{i}")
    seen.add("a b")  # no line of ask can hold it
    centrals = Centrals()
    lists = _lists(centrals, seen, passwd, [0.0])()
    sent = [name for request in centrals.requests for name in request]
    assert len(sent) == MAX_ASK_NAMES and "a b" not in sent
    assert sum(n.startswith("alocal") for n in sent) == MAX_ASK_NAMES // 2
    assert sent[MAX_ASK_NAMES // 2] == "aseen4999"  # then the latest logins first
    assert lists == GateLists(asked=tuple(sent))


def test_centrals_that_do_not_know_asklist_are_asked_again_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:x:1000:1000::/:/bin/sh\n")
    clock = [100.0]
    centrals = Centrals(refuse="PERMISSION_DENIED")
    lists = _lists(centrals, SeenNames(), passwd, clock)
    with caplog.at_level(logging.WARNING, logger="otpgated"):
        assert lists() is None  # the files stay as they are
        assert lists() is None and len(centrals.requests) == 1  # not asked again yet
    (line,) = [r.getMessage() for r in caplog.records if r.name == "otpgated"]
    assert "gate_lists_refused code=PERMISSION_DENIED" in line
    assert "role host may not call AskList" in line
    clock[0] += 601
    centrals.refuse = ""
    assert lists() == GateLists(asked=("alice",)) and len(centrals.requests) == 2
    # Any other refusal is the writer's to log, every time.
    centrals.refuse = "INVALID_ARGUMENT"
    with pytest.raises(UpstreamRefused):
        lists()
