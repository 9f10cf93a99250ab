"""otpgated as a process: sockets, keys, restarts, signals, logs, raw gRPC."""

from __future__ import annotations

import os
import secrets
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pyotp
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from otpgate.core.crypto import create_key_file
from otpgate.v1 import otpgate_pb2 as pb
from tests.conftest import Daemon, LocalUser


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sockets_and_files_have_least_privilege(daemon: Daemon) -> None:
    assert _mode(daemon.admin_socket) == 0o660
    assert os.stat(daemon.admin_socket).st_gid == 0  # --admin-group root
    assert _mode(daemon.socket("pam")) == 0o600
    assert _mode(daemon.runtime_dir) == 0o755
    assert _mode(daemon.state_dir) == 0o700
    assert _mode(daemon.database) == 0o600
    assert _mode(daemon.key_file) == 0o600
    assert "key_created" in daemon.log()


def test_health_and_reflection(daemon: Daemon) -> None:
    for name in ("admin", "pam"):
        channel = grpc.insecure_channel("unix:" + daemon.socket(name))
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel = grpc.insecure_channel("unix:" + daemon.admin_socket)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "otpgate.v1.TwoFactorAdmin" in names
    assert "otpgate.v1.PamGate" not in names  # each socket serves its own table only


def test_each_socket_refuses_the_other_sockets_methods(daemon: Daemon) -> None:
    pam_on_admin = grpc.insecure_channel("unix:" + daemon.admin_socket).unary_unary(
        "/otpgate.v1.PamGate/Verify"
    )
    with pytest.raises(grpc.RpcError) as info:
        pam_on_admin(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    admin_on_pam = grpc.insecure_channel("unix:" + daemon.socket("pam")).unary_unary(
        "/otpgate.v1.TwoFactorAdmin/RenewSecret"
    )
    with pytest.raises(grpc.RpcError) as info:
        admin_on_pam(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_unknown_fields_refused(daemon: Daemon) -> None:
    update = grpc.insecure_channel("unix:" + daemon.admin_socket).unary_unary(
        "/otpgate.v1.TwoFactorAdmin/UpdateConfig"
    )
    # enabled=true (field 1) plus an unknown varint field 99.
    raw = pb.UpdateConfigRequest(enabled=True).SerializeToString() + bytes([0x98, 0x06, 0x01])
    with pytest.raises(grpc.RpcError) as info:
        update(raw, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "99" in (info.value.details() or "")
    assert daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=5).enabled is False


@pytest.mark.parametrize(
    ("field", "value", "bounds"),
    [
        ("window", 11, "0 to 10"),
        ("otp_digits", 5, "6 to 8"),
        ("otp_digits", 9, "6 to 8"),
        ("interval", 4, "5 to 120"),
        ("interval", 121, "5 to 120"),
        ("lockout_threshold", 0, "1 to 100"),
        ("lockout_seconds", 86401, "1 to 86400"),
    ],
)
def test_update_out_of_bounds_changes_nothing(
    daemon: Daemon, field: str, value: int, bounds: str
) -> None:
    admin = daemon.admin()
    before = admin.GetConfig(pb.GetConfigRequest(), timeout=5)
    request = pb.UpdateConfigRequest(enabled=True, **{field: value})
    with pytest.raises(grpc.RpcError) as info:
        admin.UpdateConfig(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"{field}: must be from {bounds} (got {value})"
    assert admin.GetConfig(pb.GetConfigRequest(), timeout=5) == before


def test_bad_enum_and_issuer_refused(daemon: Daemon) -> None:
    admin = daemon.admin()
    for request, field in [
        (
            pb.UpdateConfigRequest(enrollment_policy=pb.ENROLLMENT_POLICY_UNSPECIFIED),
            "enrollment_policy",
        ),
        (pb.UpdateConfigRequest(issuer="a:b"), "issuer"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            admin.UpdateConfig(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith(field + ":")


def test_admin_api_user_flow(daemon: Daemon, user: LocalUser) -> None:
    admin = daemon.admin()
    admin.UpdateConfig(pb.UpdateConfigRequest(window=1), timeout=5)  # step boundaries
    with pytest.raises(grpc.RpcError) as info:
        admin.RenewSecret(pb.RenewSecretRequest(username=user.name + "x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        admin.RenewSecret(
            pb.RenewSecretRequest(
                username=user.name, twofactor_options=pb.TwoFactorOptions(otp_digits=9)
            ),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("otp_digits:")
    entry = admin.RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    assert entry.username == user.name and entry.uid == user.uid and entry.id == user.uid
    assert entry.local and entry.home == f"/home/{user.name}" and entry.shell == "/bin/bash"
    assert entry.twofactor_auth_configured and entry.twofactor_config.secret_configured
    assert (entry.twofactor_config.interval, entry.twofactor_config.otp_digits) == (30, 6)
    uri = entry.twofactor_config.provisioning_uri
    shown = admin.GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert not shown.twofactor_config.HasField("provisioning_uri")  # it holds the secret
    assert (
        admin.GetProvisioningUri(
            pb.GetProvisioningUriRequest(username=user.name), timeout=5
        ).provisioning_uri
        == uri
    )
    code = pyotp.parse_uri(uri).now()
    first = admin.VerifyToken(pb.VerifyTokenRequest(username=user.name, token=code), timeout=5)
    again = admin.VerifyToken(pb.VerifyTokenRequest(username=user.name, token=code), timeout=5)
    assert (first.valid, first.result) == (True, pb.VERIFY_RESULT_VALID)
    assert (again.valid, again.result) == (False, pb.VERIFY_RESULT_REPLAYED)
    assert [u.username for u in admin.ListUsers(pb.ListUsersRequest(), timeout=5).users] == [
        user.name
    ]
    admin.UnsetSecret(pb.UnsetSecretRequest(username=user.name), timeout=5)
    gone = admin.VerifyToken(pb.VerifyTokenRequest(username=user.name, token=code), timeout=5)
    assert gone.result == pb.VERIFY_RESULT_NOT_ENROLLED


def test_secrets_and_codes_never_logged(daemon: Daemon, user: LocalUser) -> None:
    admin = daemon.admin()
    uri = admin.RenewSecret(
        pb.RenewSecretRequest(username=user.name), timeout=5
    ).twofactor_config.provisioning_uri
    secret = pyotp.parse_uri(uri).secret
    code = pyotp.parse_uri(uri).now()
    admin.VerifyToken(pb.VerifyTokenRequest(username=user.name, token=code), timeout=5)
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    admin.VerifyToken(pb.VerifyTokenRequest(username=user.name, token=wrong), timeout=5)
    with pytest.raises(grpc.RpcError):
        admin.VerifyToken(pb.VerifyTokenRequest(username=user.name, token="12345x"), timeout=5)
    daemon.stop()
    log = daemon.log()
    assert f"user={user.name}" in log
    for needle in (secret, secret.lower(), code, wrong, "12345x"):
        assert needle not in log


def test_state_survives_restart_and_sigkill(daemon: Daemon, user: LocalUser) -> None:
    admin = daemon.admin()
    admin.UpdateConfig(pb.UpdateConfigRequest(enabled=True, window=2), timeout=5)
    uri = admin.RenewSecret(
        pb.RenewSecretRequest(username=user.name), timeout=5
    ).twofactor_config.provisioning_uri
    daemon.stop(signal.SIGKILL)
    daemon.start()
    admin = daemon.admin()
    config = admin.GetConfig(pb.GetConfigRequest(), timeout=5)
    assert (config.enabled, config.window) == (True, 2)
    assert (
        admin.GetProvisioningUri(
            pb.GetProvisioningUriRequest(username=user.name), timeout=5
        ).provisioning_uri
        == uri
    )
    code = pyotp.parse_uri(uri).now()
    assert admin.VerifyToken(pb.VerifyTokenRequest(username=user.name, token=code), timeout=5).valid
    daemon.restart()
    replay = daemon.admin().VerifyToken(
        pb.VerifyTokenRequest(username=user.name, token=code), timeout=5
    )
    assert replay.result == pb.VERIFY_RESULT_REPLAYED  # spent steps survive a restart


def _dump(path: Path) -> list[str]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def test_wrong_key_refuses_to_start_and_changes_nothing(daemon: Daemon, user: LocalUser) -> None:
    daemon.admin().RenewSecret(pb.RenewSecretRequest(username=user.name), timeout=5)
    daemon.stop()
    before = _dump(daemon.database)
    daemon.key_file.unlink()
    create_key_file(str(daemon.key_file))
    result = daemon.run_to_exit()
    assert result.returncode == 1
    assert "KeyMismatch" in result.stderr and "refusing to start" in result.stderr
    assert _dump(daemon.database) == before
    assert not os.path.exists(daemon.admin_socket) or not _serving(daemon)


def _serving(daemon: Daemon) -> bool:
    try:
        daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=1)
        return True
    except grpc.RpcError:
        return False


def test_missing_key_with_sealed_database_is_not_replaced(daemon: Daemon) -> None:
    daemon.stop()
    daemon.key_file.unlink()
    result = daemon.run_to_exit()
    assert result.returncode == 1
    assert "does not exist, but the database is sealed" in result.stderr
    assert not daemon.key_file.exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_bad_key_file_mode_refused(daemon: Daemon, mode: int) -> None:
    daemon.stop()
    daemon.key_file.chmod(mode)
    result = daemon.run_to_exit()
    assert result.returncode == 1
    assert f"mode {mode:04o}" in result.stderr and "0600 or tighter" in result.stderr


def test_key_file_owned_by_someone_else_refused(daemon: Daemon) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    daemon.stop()
    os.chown(daemon.key_file, 4242, 4242)
    result = daemon.run_to_exit()
    assert result.returncode == 1 and "owned by uid 4242" in result.stderr


def _world_writable_dir(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o1777)  # like /tmp: sticky, root's, anyone may add a name
    return path


def test_key_file_in_a_world_writable_dir_refused_and_not_created(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(start=False)
    shared = _world_writable_dir(d.root / "shared")
    key = shared / "otpgate.key"
    d.extra_args += ["--key-file", str(key)]
    result = d.run_to_exit()
    assert result.returncode == 1
    assert (
        f"ConfigError: key file {key}: {shared} is writable by group and others (mode 1777); "
        "the directory holding it must not be writable by group or others, sticky or not\n"
    ) in result.stderr
    assert list(shared.iterdir()) == []  # no key (and nothing else) left there
    assert "key_created" not in result.stderr and not _serving(d)
    # Refused before anything was made: no state directory, database or sockets.
    assert not d.state_dir.exists() and not d.runtime_dir.exists()


def test_existing_key_file_in_a_world_writable_dir_refused(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(start=False)
    shared = _world_writable_dir(d.root / "shared")
    key = shared / "otpgate.key"
    create_key_file(str(d.root / "good.key"))
    os.rename(d.root / "good.key", key)  # a perfectly private file, in the wrong place
    d.extra_args += ["--key-file", str(key)]
    result = d.run_to_exit()
    assert result.returncode == 1
    assert f"ConfigError: key file {key}: {shared} is writable by group and others" in result.stderr
    assert "key_loaded" not in result.stderr


def test_key_file_behind_a_symlink_refused(daemon: Daemon) -> None:
    daemon.stop()
    link = daemon.root / "etc-link"
    link.symlink_to(daemon.key_file.parent)
    daemon.extra_args += ["--key-file", str(link / "otpgate.key")]  # the last one wins
    result = daemon.run_to_exit()
    assert result.returncode == 1
    assert f": {link} is a symbolic link; no component of the path may be one" in result.stderr


def test_state_dir_0755_refused_and_nothing_created(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(start=False)
    d.state_dir.mkdir()
    d.state_dir.chmod(0o755)
    result = d.run_to_exit()
    assert result.returncode == 1
    assert (
        f"ConfigError: directory {d.state_dir} has mode 0755; it must be exactly 0700 "
        f"(chmod 700 {d.state_dir})\n"
    ) in result.stderr
    assert list(d.state_dir.iterdir()) == [] and _mode(d.state_dir) == 0o755
    assert not d.runtime_dir.exists() and not d.key_file.exists()
    d.state_dir.chmod(0o700)  # the remedy it names is enough
    d.start()
    assert _mode(d.state_dir) == 0o700


def test_state_dir_of_another_owner_refused(make_daemon) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    d = make_daemon(start=False)
    d.state_dir.mkdir(mode=0o700)
    os.chown(d.state_dir, 54321, 54321)
    result = d.run_to_exit()
    assert result.returncode == 1
    assert f"{d.state_dir} is owned by uid 54321" in result.stderr
    assert list(d.state_dir.iterdir()) == []


def test_runtime_dir_under_a_writable_dir_refused(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(start=False)
    open_dir = d.root / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # not sticky: anyone could swap the socket directory
    d.extra_args += ["--runtime-dir", str(open_dir / "run")]
    result = d.run_to_exit()
    assert result.returncode == 1
    assert f"{open_dir} is writable by group and others (mode 0777)" in result.stderr
    assert list(open_dir.iterdir()) == []


def test_credential_outside_a_trusted_dir_refused(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Not systemd's (which passes as it is): the chain rule holds for any directory.
    creds = _world_writable_dir(tmp_path / "creds")
    create_key_file(str(tmp_path / "k"))
    os.rename(tmp_path / "k", creds / "otpgate.key")
    d = make_daemon(start=False)
    env = dict(os.environ, CREDENTIALS_DIRECTORY=str(creds))
    result = subprocess.run(d.args(), capture_output=True, text=True, timeout=15, env=env)
    assert result.returncode == 1
    assert f"key file {creds}/otpgate.key: {creds} is writable by group and others" in (
        result.stderr
    )


def test_key_from_systemd_credential(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    create_key_file(str(creds / "otpgate.key"))
    d = make_daemon(start=False)
    env = dict(os.environ, CREDENTIALS_DIRECTORY=str(creds))
    log = open(d.log_path, "ab")  # noqa: SIM115
    d.proc = subprocess.Popen(d.args(), stdout=log, stderr=log, env=env)
    log.close()
    d.wait_ready()
    assert "source=credential" in d.log()
    assert not d.key_file.exists()  # no file key was created


def test_unknown_config_option_refused(tmp_path: Path, make_daemon) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "otpgated.toml"
    config.write_text('state_dir = "/tmp/x"\nsecret_sauce = 1\n')
    d = make_daemon("--config", str(config), start=False)
    result = d.run_to_exit()
    assert result.returncode == 1 and "unknown option 'secret_sauce'" in result.stderr


def test_config_file_values_and_flag_override(tmp_path: Path, make_daemon) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "otpgated.toml"
    config.write_text('issuer = "FromFile"\nworkers = 4\n')
    d = make_daemon("--config", str(config))
    assert d.admin().GetConfig(pb.GetConfigRequest(), timeout=5).effective_issuer == "otpgate-test"
    config.write_text("workers = 0\n")
    result = make_daemon("--config", str(config), start=False).run_to_exit()
    assert result.returncode == 1 and "workers must be from 1 to 256" in result.stderr
    config.write_text('workers = "many"\n')
    result = make_daemon("--config", str(config), start=False).run_to_exit()
    assert result.returncode == 1 and "workers must be an integer" in result.stderr


@pytest.fixture
def slow_pam_service() -> str:
    """A PAM service whose auth step takes a second: an in-flight call to drain.

    libpam's failure delay, not pam_exec: a fork inside a gRPC process is its own
    subject (see the note in core/passwords.py).
    """
    name = f"otpgate-test-slow-{secrets.token_hex(4)}"
    path = Path("/etc/pam.d") / name
    path.write_text(
        "auth optional pam_faildelay.so delay=1000000\nauth requisite pam_deny.so\n"
        "account required pam_permit.so\n"
    )
    yield name
    path.unlink()


def test_sigterm_drains_in_flight_calls(
    make_daemon, slow_pam_service: str, user: LocalUser
) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon("--password-pam-service", slow_pam_service)
    d.admin().UpdateConfig(pb.UpdateConfigRequest(enabled=True, services_ssh=True), timeout=5)
    result: dict[str, object] = {}

    def call() -> None:
        result["reply"] = d.pam().VerifySinglePrompt(
            pb.PamRequest(username=user.name, service="sshd", authtok="whatever"), timeout=10
        )
        result["answered_at"] = time.monotonic()

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.4)  # the call is now inside PAM's failure delay (1 s, give or take 25%)
    terminated_at = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    thread.join()
    reply = result["reply"]
    assert isinstance(reply, pb.PamDecision)
    assert reply.verdict == pb.VERDICT_DENY  # answered, not cut off
    assert result["answered_at"] > terminated_at  # SIGTERM came while it was in flight
    assert "stopping: draining" in d.log() and "stopped" in d.log()


def test_second_daemon_on_the_same_sockets_refused(daemon: Daemon, make_daemon) -> None:  # type: ignore[no-untyped-def]
    twin = make_daemon(root=daemon.root, start=False)
    twin.log_path = daemon.root / "twin.log"
    result = twin.run_to_exit()
    assert result.returncode == 1 and "already serving" in result.stderr
    assert daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=5).window == 0


def test_stale_socket_from_a_crash_is_replaced(daemon: Daemon) -> None:
    daemon.stop(signal.SIGKILL)
    assert os.path.exists(daemon.admin_socket)
    daemon.start()
    assert daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=5).window == 0


@pytest.mark.parametrize("journal", [False, True])
def test_log_lines_leave_time_and_pid_to_the_journal(tmp_path: Path, journal: bool) -> None:
    daemon = Daemon(tmp_path)
    daemon.log_path.touch()
    info = os.stat(daemon.log_path)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal:
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
    with open(daemon.log_path, "ab") as log:
        proc = subprocess.Popen(daemon.args(), stdout=log, stderr=log, env=env)
    daemon.proc = proc
    try:
        daemon.wait_ready()
    finally:
        daemon.stop()
    started = next(line for line in daemon.log().splitlines() if "started version=" in line)
    if journal:
        assert started.startswith("INFO started version=")
    else:
        assert f" otpgated[{proc.pid}] INFO started version=" in started
        time.strptime(started[:19], "%Y-%m-%d %H:%M:%S")


def test_a_stop_signal_during_start_waits_for_the_handler() -> None:
    # main() starts logging (and its writer thread) before run() installs the stop
    # handler: a SIGTERM in between must wait for the handler, not kill the daemon.
    program = (
        "import os, signal\n"
        "from otpgate.server import main\n"
        "main._start_logging()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "got = []\n"
        "signal.signal(signal.SIGTERM, lambda *_: got.append(1))\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})\n"
        "print('handled' if got else 'missed')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "handled", done


def test_a_clean_stop_leaves_no_socket_behind(daemon: Daemon) -> None:
    assert daemon.stop(signal.SIGTERM) == 0
    left = sorted(str(p.relative_to(daemon.runtime_dir)) for p in daemon.runtime_dir.rglob("*"))
    # The gate files go too (nobody keeps them current); their directory stays.
    assert left in ([], ["private"], ["gate", "private"]), left
