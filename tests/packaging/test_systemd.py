"""The systemd unit: valid, and hardened to an exposure of 2.0 or lower."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

UNIT = REPO / "packaging" / "systemd" / "otpgated.service"
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def test_unit_verifies(tmp_path: Path) -> None:
    # verify wants ExecStart to exist: the package installs it; here point it at a binary.
    text = UNIT.read_text().replace("/usr/lib/otpgate/bin/otpgated", "/bin/true")
    unit = tmp_path / "otpgated.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_security_exposure_at_most_2() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_facts() -> None:
    text = UNIT.read_text()
    wanted = ["Type=notify", "WatchdogSec=30s", "RuntimeDirectory=otpgate",
              "StateDirectory=otpgate", "UMask=0077", "LoadCredential=otpgate.key:"]  # fmt: skip
    for line in wanted:
        assert line in text


DROP_INS = REPO / "packaging" / "systemd"


@pytest.mark.parametrize("kind", ["fleet", "central", "edge"])
def test_drop_in_verifies_and_opens_only_the_network(tmp_path: Path, kind: str) -> None:
    drop_in = DROP_INS / f"otpgated-{kind}.conf"
    # A drop-in's lines come after the unit's: the same as one file in that order
    # (its [Service] header reopens that section after the unit's [Install]).
    merged = UNIT.read_text().replace("/usr/lib/otpgate/bin/otpgated", "/bin/true")
    merged += "\n" + drop_in.read_text()
    unit = tmp_path / "otpgated.service"
    unit.write_text(merged)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match, security.stdout + security.stderr
    # Network to one address costs a little exposure; nothing else may.
    assert float(match.group(1)) <= MAX_EXPOSURE + 0.5, security.stdout
    text = drop_in.read_text()
    assert "IPAddressAllow=" in text and "IPAddressDeny=" not in text.split("#")[0]
    if kind == "fleet":
        assert "LoadCredential=otpgate.dbpassword:" in text
    if kind == "edge":
        # An edge holds no key: the unit's key credential is reset, not replaced.
        assert "\nLoadCredential=\n" in text and "otpgate.key:" not in text.split("#")[0]
