"""The gate files on disk: core.paths.write_atomic (as server.gate_writer calls it)
and GateWriter in a temporary directory, then as a real otpgated (central and edge) keeps them in
runtime_dir/gate."""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from otpgate.core.crypto import create_key_file
from otpgate.core.gate_files import ASK_FILE, NETWORKS_FILE, GateLists, render_networks
from otpgate.core.paths import write_atomic
from otpgate.server.gate_writer import GateWriter
from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser
from tests.fleet_harness import Central, Pki, edge_toml, free_port

COMMENT = "# Written by otpgated; rewritten whenever settings or secrets change.\n"
OPEN = COMMENT + "+ : ALL : ALL\n"  # networks.conf without exempt networks


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def poll(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until predicate() held; fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - start


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@pytest.fixture
def gate_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "gate"
    directory.mkdir(mode=0o700)
    return directory


@pytest.fixture
def bait(tmp_path: Path) -> Path:
    """A file outside the directory that a planted link points at."""
    path = tmp_path / "bait"
    path.write_text("not to be written\n")
    path.chmod(0o644)
    return path


# -- the atomic write ---------------------------------------------------------------------


def write_file(directory: str, name: str, text: str) -> None:
    """As the writer writes each file."""
    write_atomic(os.path.join(directory, name), text, 0o600)


def test_write_file_makes_a_root_only_file_and_leaves_the_directory(gate_dir: Path) -> None:
    gate_dir.chmod(0o755)  # whatever the directory's mode, it stays
    old = os.umask(0)  # the file's mode does not come from the umask
    try:
        write_file(str(gate_dir), ASK_FILE, "alice\n")
        (gate_dir / NETWORKS_FILE).write_text("old\n")
        (gate_dir / NETWORKS_FILE).chmod(0o666)  # replaced, not rewritten in place
        write_file(str(gate_dir), NETWORKS_FILE, OPEN)
    finally:
        os.umask(old)
    assert _mode(gate_dir) == 0o755
    for name, text in ((ASK_FILE, "alice\n"), (NETWORKS_FILE, OPEN)):
        path = gate_dir / name
        assert path.read_text() == text
        assert stat.S_ISREG(os.lstat(path).st_mode) and _mode(path) == 0o600
        assert os.lstat(path).st_uid == os.geteuid()
    assert sorted(p.name for p in gate_dir.iterdir()) == [ASK_FILE, NETWORKS_FILE]


def test_files_and_links_planted_beside_it_are_never_written_through(
    gate_dir: Path, bait: Path
) -> None:
    # The new text goes to a fresh file of a random name (O_EXCL), never to a name
    # someone could have taken first.
    (gate_dir / ".ask.tmp").write_text("root\nleft by a crash\n")
    (gate_dir / ".otpgate-planted").symlink_to(bait)
    for text in ("alice\n", "bob\n"):
        write_file(str(gate_dir), ASK_FILE, text)
        assert (gate_dir / ASK_FILE).read_text() == text
    assert bait.read_text() == "not to be written\n" and _mode(bait) == 0o644
    assert sorted(p.name for p in gate_dir.iterdir()) == [".ask.tmp", ".otpgate-planted", ASK_FILE]


def test_a_link_planted_at_the_target_is_replaced_by_a_file(gate_dir: Path, bait: Path) -> None:
    target = gate_dir / ASK_FILE
    target.symlink_to(bait)
    write_file(str(gate_dir), ASK_FILE, "alice\n")
    assert not target.is_symlink() and stat.S_ISREG(os.lstat(target).st_mode)
    assert target.read_text() == "alice\n" and _mode(target) == 0o600
    assert bait.read_text() == "not to be written\n" and _mode(bait) == 0o644


def test_a_failed_rename_leaves_no_tmp_file(gate_dir: Path) -> None:
    (gate_dir / NETWORKS_FILE).mkdir()  # a file can not replace it
    with pytest.raises(IsADirectoryError):
        write_file(str(gate_dir), NETWORKS_FILE, OPEN)
    assert sorted(p.name for p in gate_dir.iterdir()) == [NETWORKS_FILE]


# -- GateWriter --------------------------------------------------------------------------


class Lists:
    """A build function whose answer (or failure) the test sets; counts its calls."""

    def __init__(self, lists: GateLists) -> None:
        self.lists = lists
        self.error: Exception | None = None
        self.calls = 0

    def __call__(self) -> GateLists:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.lists


ALICE = GateLists(asked=("alice",), networks=("10.0.0.0/8",))


def test_write_now_writes_both_files(gate_dir: Path) -> None:
    assert GateWriter(str(gate_dir), Lists(ALICE)).write_now()
    assert (gate_dir / ASK_FILE).read_text() == "alice\n"
    assert (gate_dir / NETWORKS_FILE).read_text() == render_networks(ALICE)
    assert "- : ALL : 10.0.0.0/8\n" in render_networks(ALICE)


def test_when_the_lists_can_not_be_made_the_old_files_stay(
    gate_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build = Lists(ALICE)
    writer = GateWriter(str(gate_dir), build)
    assert writer.write_now()
    before = {p.name: p.read_bytes() for p in gate_dir.iterdir()}
    secret = "JBSWY3DPEHPK3PXP"
    build.error = RuntimeError(f"database away; otpauth://totp/x?secret={secret} alice")
    with caplog.at_level(logging.WARNING, logger="otpgated"):
        assert writer.write_now() is False
    assert {p.name: p.read_bytes() for p in gate_dir.iterdir()} == before
    lines = [r.getMessage() for r in caplog.records if r.name == "otpgated"]
    assert len(lines) == 1 and lines[0].startswith("gate_files_not_written error=RuntimeError")
    # The exception's text is not logged: it may carry anything (here a secret, a name).
    assert secret not in lines[0] and "alice" not in lines[0] and "otpauth" not in lines[0]
    # An OSError says what happened, not where.
    caplog.clear()
    build.error = None
    missing = gate_dir / "gone"
    with caplog.at_level(logging.WARNING, logger="otpgated"):
        assert GateWriter(str(missing), build).write_now() is False
    (line,) = [r.getMessage() for r in caplog.records if r.name == "otpgated"]
    assert line.startswith("gate_files_not_written error=FileNotFoundError")
    assert "No such file or directory" in line and str(missing) not in line


def _writer_threads() -> int:
    return sum(t.name == "gate-writer" for t in threading.enumerate())


def test_changed_leads_to_a_rewrite_soon_and_stop_joins(gate_dir: Path) -> None:
    build = Lists(GateLists())
    writer = GateWriter(str(gate_dir), build, refresh_seconds=3600)
    threads = _writer_threads()
    writer.start()  # writes soon, in its thread, then waits for changes
    poll(lambda: _text(gate_dir / ASK_FILE) == "" and build.calls == 1, timeout=3)
    assert _writer_threads() == threads + 1
    build.lists = ALICE
    writer.changed()
    both = ("alice\n", render_networks(ALICE))
    poll(lambda: (_text(gate_dir / ASK_FILE), _text(gate_dir / NETWORKS_FILE)) == both, timeout=3)
    started = time.monotonic()
    writer.stop()
    assert time.monotonic() - started < 2 and _writer_threads() == threads
    # Nobody keeps them current now: the files go (the directory stays).
    assert list(gate_dir.iterdir()) == []
    writer.stop()  # twice: nothing more


def test_stop_before_start_does_not_raise(gate_dir: Path) -> None:
    # server.main stops the writer in `finally`, also when the service could not be
    # made (a wrong key): stop must not hide that error behind its own.
    GateWriter(str(gate_dir), Lists(GateLists())).stop()


def test_the_refresh_puts_a_replaced_file_right_without_a_change(gate_dir: Path) -> None:
    writer = GateWriter(str(gate_dir), Lists(ALICE), refresh_seconds=0.05)
    writer.start()
    try:
        hostile = gate_dir / "hostile"
        hostile.write_text("root\nALL\n")
        hostile.chmod(0o666)
        hostile.rename(gate_dir / ASK_FILE)
        poll(lambda: _text(gate_dir / ASK_FILE) == "alice\n", timeout=2)
        assert _mode(gate_dir / ASK_FILE) == 0o600
    finally:
        writer.stop()


def test_min_spacing_bounds_rewrites_and_stop_does_not_wait_it_out(gate_dir: Path) -> None:
    build = Lists(GateLists())
    writer = GateWriter(str(gate_dir), build, refresh_seconds=3600, min_spacing=10)
    writer.start()
    poll(lambda: build.calls == 1, timeout=2)
    for _ in range(50):  # a burst of new names: nothing until the spacing has passed
        writer.changed()
    time.sleep(0.2)
    assert build.calls == 1
    started = time.monotonic()
    writer.stop()
    assert time.monotonic() - started < 2 and build.calls == 1


def test_a_dear_list_is_made_less_often(gate_dir: Path) -> None:
    class Slow(Lists):
        def __call__(self) -> GateLists:
            time.sleep(0.1)  # many accounts, their groups from a directory
            return super().__call__()

    build = Slow(ALICE)
    writer = GateWriter(str(gate_dir), build, refresh_seconds=0.01)
    writer.start()
    try:
        time.sleep(1.5)
        # Each 0.1 s build waits ten times as long before the next periodic one:
        # 2 or 3 builds, where a 0.01 s refresh alone would make over ten.
        assert 1 <= build.calls <= 3, build.calls
    finally:
        writer.stop()


# -- a real otpgated -------------------------------------------------------------------


def _gate(daemon: Daemon) -> Path:
    return daemon.runtime_dir / "gate"


def _files(daemon: Daemon) -> tuple[str | None, str | None]:
    gate = _gate(daemon)
    return _text(gate / ASK_FILE), _text(gate / NETWORKS_FILE)


def test_a_started_daemon_keeps_root_only_gate_files(daemon: Daemon) -> None:
    gate = _gate(daemon)
    poll(lambda: _quiet(gate))  # written by the writer's thread, just after the start
    assert stat.S_ISDIR(os.lstat(gate).st_mode) and _mode(gate) == 0o700
    assert os.lstat(gate).st_uid == 0
    assert sorted(p.name for p in gate.iterdir()) == [ASK_FILE, NETWORKS_FILE]
    for name in (ASK_FILE, NETWORKS_FILE):
        assert stat.S_ISREG(os.lstat(gate / name).st_mode)
        assert _mode(gate / name) == 0o600 and os.lstat(gate / name).st_uid == 0
    assert _files(daemon) == ("", OPEN)  # 2FA off (the default): nobody listed


def test_admin_changes_rewrite_the_files_within_moments(daemon: Daemon, user: LocalUser) -> None:
    admin, ask = daemon.admin(), _gate(daemon) / ASK_FILE
    listed = f"{user.name}\n"
    mapped = ipaddress.ip_network("::ffff:10.0.0.0/104")  # Python's spelling of it
    exempt = COMMENT + (
        f"- : ALL : 10.0.0.0/8\n- : ALL : {mapped}\n- : ALL : 2001:db8::/32\n+ : ALL : ALL\n"
    )

    def until(files: tuple[str | None, str | None]) -> None:
        poll(lambda: _files(daemon) == files, timeout=5)

    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True, services_ssh=True), timeout=5)
    admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    until((listed, OPEN))
    networks = pb.StringList(values=["10.0.0.0/8", "2001:db8::/32"])
    admin.UpdateConfig(pb.UpdateConfigRequest(exempt_networks=networks), timeout=5)
    until((listed, exempt))
    first = os.lstat(ask).st_ino
    admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    poll(lambda: os.lstat(ask).st_ino != first, timeout=5)  # rewritten, to the same text
    assert _files(daemon) == (listed, exempt)
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=False), timeout=5)
    until(("", exempt))
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True), timeout=5)
    until((listed, exempt))
    admin.UpdateConfig(pb.UpdateConfigRequest(exempt_networks=pb.StringList()), timeout=5)
    until((listed, OPEN))
    admin.UnsetSecret(pb.UnsetSecretRequest(username=user.name), timeout=5)
    until(("", OPEN))


def test_a_replaced_file_is_put_right_by_the_next_rewrite(
    daemon: Daemon, user: LocalUser, bait: Path
) -> None:
    admin, gate = daemon.admin(), _gate(daemon)
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True, services_ssh=True), timeout=5)
    admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    listed = (f"{user.name}\n", OPEN)
    poll(lambda: _files(daemon) == listed and _quiet(gate))
    # Someone with root's rights lists everyone, lets every address skip the check,
    # and leaves links where the daemon writes; each put in place in one rename, as
    # the daemon may be writing meanwhile.
    hostile = gate / "hostile"

    def plant() -> bool:
        hostile.write_text("root\nALL\nnobody\n")
        hostile.chmod(0o666)
        hostile.rename(gate / ASK_FILE)
        hostile.symlink_to(bait)
        hostile.rename(gate / NETWORKS_FILE)
        return _text(gate / ASK_FILE) == "root\nALL\nnobody\n" and (
            (gate / NETWORKS_FILE).is_symlink()
        )

    poll(plant)  # again if a rewrite came in between
    assert _text(gate / NETWORKS_FILE) == "not to be written\n"
    admin.UpdateConfig(pb.UpdateConfigRequest(window=2), timeout=5)  # any change
    poll(lambda: _files(daemon) == listed and _quiet(gate) and _mode(gate / ASK_FILE) == 0o600)
    for name in (ASK_FILE, NETWORKS_FILE):
        assert stat.S_ISREG(os.lstat(gate / name).st_mode) and _mode(gate / name) == 0o600
    assert bait.read_text() == "not to be written\n" and _mode(bait) == 0o644


def _quiet(gate: Path) -> bool:
    """No rewrite under way: only the two files (no temporary file, nothing planted)."""
    return sorted(p.name for p in gate.iterdir()) == [ASK_FILE, NETWORKS_FILE]


def test_a_daemon_refused_its_key_says_why_in_one_line(daemon: Daemon) -> None:
    # The gate writer exists before the service checks the key; its stop in `finally`
    # once raised RuntimeError ("cannot join thread before it is started") over it.
    daemon.stop()
    daemon.key_file.unlink()
    create_key_file(str(daemon.key_file))
    result = daemon.run_to_exit()
    assert result.returncode == 1
    assert "ERROR KeyMismatch: " in result.stderr and "refusing to start" in result.stderr
    assert "Traceback" not in result.stderr and "RuntimeError" not in result.stderr


# -- an edge -------------------------------------------------------------------------------


def test_an_edge_without_an_answering_central_lists_nobody(
    make_daemon: Callable[..., Daemon],
    fleet_pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("edge")
    config = root / "otpgated.toml"
    config.write_text(edge_toml(fleet_pki, "edge1", [f"127.0.0.1:{free_port()}"]))
    # What a central left behind on this host, before it became an edge.
    gate = root / "run" / "gate"
    gate.mkdir(parents=True)
    (root / "run").chmod(0o755)
    gate.chmod(0o700)
    (gate / ASK_FILE).write_text("alice\n")
    (gate / NETWORKS_FILE).write_text(
        render_networks(GateLists(("alice",), ("alice",), ("10.0.0.0/8",)))
    )
    edge = make_daemon("--config", str(config), root=root)
    assert _files(edge) == ("", OPEN)
    for name in (ASK_FILE, NETWORKS_FILE):
        assert _mode(gate / name) == 0o600
    # Its later rewrites ask the centrals (HostGate.AskList); none answers, so the
    # files stay as written at start.
    poll(lambda: "gate_files_not_written" in edge.log())
    assert _files(edge) == ("", OPEN)


def test_an_edge_lists_what_its_central_answers(
    make_central: Callable[..., Central], make_edge: Callable[..., Daemon], user: LocalUser
) -> None:
    central = make_central()
    admin = central.daemon.admin()
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True, services_ssh=True), timeout=5)
    admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    edge = make_edge(central.address)
    ask = _gate(edge) / ASK_FILE
    # This host's accounts (getpwall) are asked about at start. Of them only user is
    # enrolled; root is known and not enrolled (optional): not listed. (Only these
    # two: an account another test removes meanwhile is unknown, and listed as Check
    # would ask it.)
    poll(lambda: user.name in (_text(ask) or "").splitlines(), timeout=5)
    assert "root" not in ask.read_text().splitlines()
    assert _text(_gate(edge) / NETWORKS_FILE) == OPEN and _mode(ask) == 0o600
