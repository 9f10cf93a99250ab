"""Every binary has a man page, and every option and configuration key is in it."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess

import pytest

from otpgate.cli.main import build_parser
from otpgate.server.config import DaemonConfig
from otpgate.server.config import parser as daemon_parser
from tests.conftest import REPO

MAN = REPO / "packaging" / "man"


def _page(name: str) -> str:
    # Roff escapes hyphens as \-; compare on plain text.
    return (MAN / name).read_text().replace("\\-", "-")


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _long_options(sub)
    return found


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.add(name)
                found |= _commands(sub)
    return found


def test_cli_page_lists_every_option_and_command() -> None:
    page = _page("otpgate.1")
    parser = build_parser()
    missing = {o for o in _long_options(parser) | _commands(parser) if o not in page}
    assert not missing


def test_daemon_page_lists_every_flag() -> None:
    page = _page("otpgated.8")
    assert not {o for o in _long_options(daemon_parser()) if o not in page}


def test_config_page_lists_every_key() -> None:
    page = _page("otpgated.toml.5")
    assert not {f.name for f in dataclasses.fields(DaemonConfig) if f.name not in page}


def test_hook_page_lists_every_mode_and_option() -> None:
    page = _page("otpgate-pam-hook.8")
    for word in ("check", "verify", "single-prompt", "first-factor-done", "socket=", "timeout=",
                 "fail=", "first-factor="):  # fmt: skip
        assert word in page


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
@pytest.mark.parametrize(
    "name", ["otpgate.1", "otpgated.8", "otpgated.toml.5", "otpgate-pam-hook.8"]
)
def test_pages_render_without_warnings(name: str) -> None:
    result = subprocess.run(
        ["man", "--warnings", "-l", str(MAN / name)], capture_output=True, text=True,
        env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "NAME" in result.stdout
