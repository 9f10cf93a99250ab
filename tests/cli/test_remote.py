"""`otpgate --server`: the CLI against a central otpgated's network listener.

Real TLS (certificates from otpgate.pki, tests.fleet_harness), a real central
otpgated, the real CLI as a subprocess. The remote runs are made by an ordinary
local user (runuser), who holds the certificate files and cannot open the central's
admin.sock, with OTPGATE_SOCKET naming a socket that does not exist: whatever they
achieve went over the network. Every admin command runs both ways, remotely as an
admin certificate and locally on admin.sock as root, and the two --json outputs
(and exit statuses, and stderr) must be the same but for what differs by nature
(a new secret, new recovery codes, seconds counting down).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from otpgate import pki
from otpgate.v1 import otpgate_pb2 as pb
from tests.cli.test_cli import CLI, cli, oathtool, run, secret_of, wrong_code
from tests.conftest import RUNUSER, LocalUser
from tests.fleet_harness import Central, Pki

Python = tuple[str, dict[str, str]]
Result = subprocess.CompletedProcess[str]
ADMIN, HELPDESK = "cli-admin1", "cli-helpdesk1"
ROLES = {ADMIN: "admin", HELPDESK: "helpdesk"}
NO_SOCKET = "/nonexistent/otpgate/admin.sock"
RECOVERY_CODE = re.compile(r"[a-z2-7]{4}(-[a-z2-7]{4})+")


# -- the operator: an ordinary user with certificates ---------------------------------


@dataclass
class Operator:
    """A help-desk person's account: no access to any admin.sock; their certificates
    in ~/certs (NAME.crt, NAME.key 0600, ca.crt), all theirs."""

    user: LocalUser
    home: Path
    python: Python

    @property
    def certs(self) -> Path:
        return self.home / "certs"

    def tls(self, name: str) -> list[str]:
        return [
            "--tls-ca", str(self.certs / "ca.crt"),
            "--tls-cert", str(self.certs / f"{name}.crt"),
            "--tls-key", str(self.certs / f"{name}.key"),
        ]  # fmt: skip

    def run(
        self, *args: str, env: Mapping[str, str | None] | None = None, stdin: str = ""
    ) -> Result:
        """The CLI as this user, HOME their home, OTPGATE_SOCKET a missing socket
        (unless `env` says otherwise: None for a value unsets it)."""
        executable, python_env = self.python
        full = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "OTPGATE_SOCKET": NO_SOCKET}
        full |= python_env
        for key, value in (env or {}).items():
            if value is None:
                full.pop(key, None)
            else:
                full[key] = value
        return subprocess.run(
            [RUNUSER, "-u", self.user.name, "--", executable, "-m", "otpgate.cli.main", *args],
            input=stdin, capture_output=True, text=True, timeout=60, cwd="/", env=full,
            start_new_session=True,
        )  # fmt: skip

    def remote(self, central: Central, name: str, *args: str) -> Result:
        return self.run("--server", central.address, *self.tls(name), *args)

    def give(self, path: Path, name: str | None = None, *, mode: int = 0o644) -> Path:
        """A copy of `path` in ~/certs, owned by this user."""
        target = self.certs / (name or path.name)
        shutil.copyfile(path, target)
        self.own(target, mode)
        return target

    def own(self, target: Path, mode: int = 0o644) -> Path:
        os.chown(target, self.user.uid, -1)
        target.chmod(mode)
        return target


@pytest.fixture
def operator(make_user: Callable[..., LocalUser], cli_python: Python, fleet_pki: Pki) -> Operator:
    person = make_user("ogtop")
    home = Path(pwd.getpwnam(person.name).pw_dir)
    op = Operator(person, home, cli_python)
    op.certs.mkdir(mode=0o700)
    os.chown(op.certs, person.uid, -1)
    op.give(fleet_pki.ca)
    for name, role in ROLES.items():
        cert, key = fleet_pki.issue(name, role)
        op.give(cert)
        op.give(key, mode=0o600)
    return op


@pytest.fixture
def central(make_central: Callable[..., Central]) -> Central:
    return make_central(ROLES)


# -- helpers ---------------------------------------------------------------------------


def remote_calls(central: Central, name: str) -> list[str]:
    """The admin methods the central logged as called by certificate `name`."""
    pattern = rf"remote_call cert={re.escape(name)} serial=\w+ role=\w+ method=(\w+)"
    return re.findall(pattern, central.daemon.log())


def normal(value: Any) -> Any:
    """A --json output with what differs by nature replaced: the secret in a URI,
    recovery codes, seconds that count down (kept: whether they are 0)."""
    if isinstance(value, dict):
        shaped = {}
        for key, item in value.items():
            if key == "provisioning_uri" and item:
                item = re.sub(r"secret=[A-Z2-7]+", "secret=SECRET", item)
            elif key in ("pending_expires_in", "locked_seconds") and isinstance(item, int):
                item = item > 0
            elif key == "codes":
                assert all(RECOVERY_CODE.fullmatch(c) for c in item), item
                item = len(item)
            shaped[key] = normal(item)
        return shaped
    if isinstance(value, list):
        return [normal(v) for v in value]
    return value


def outcome(result: Result) -> tuple[int, Any, str]:
    """(status, normalised JSON, stderr) of a --json run."""
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, normal(json.loads(result.stdout)), result.stderr


def one_line_error(result: Result, prefix: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(prefix), result.stderr
    return result.stderr


def code_at(secret: str, step: int) -> str:
    return oathtool(secret, step * 30)


def now_step() -> int:
    return int(time.time()) // 30


# -- every admin command, remotely as locally ------------------------------------------


def test_every_admin_command_remotely_as_locally(
    central: Central, operator: Operator, user: LocalUser
) -> None:
    name = user.name

    def remote(*args: str) -> Result:
        return operator.remote(central, ADMIN, "--json", *args)

    def local(*args: str) -> Result:
        return cli(central.daemon, "--json", *args)

    def same(*args: str, status: int = 0) -> tuple[Any, Any]:
        """The command remotely, then locally: the same outcome. Both JSON outputs."""
        there, here = outcome(remote(*args)), outcome(local(*args))
        assert there == here, args
        assert there[0] == status, (args, there)
        return there[1], here[1]

    config, _ = same("config")
    assert config["window"] == 0
    updated, _ = same("update", "window=1", "issuer=Fleet")
    assert (updated["window"], updated["issuer"]) == (1, "Fleet")

    # renew-secret --now: a new secret each time, otherwise the same entry.
    there = outcome(remote("renew-secret", name, "--now", "--qr", "none"))
    fresh = local("renew-secret", name, "--now", "--qr", "none")
    assert there == outcome(fresh) and there[1]["twofactor_auth_configured"]
    secret = secret_of(json.loads(fresh.stdout)["twofactor_config"]["provisioning_uri"])
    uri = remote("provisioning-uri", name)
    assert (uri.returncode, uri.stdout) == (0, local("provisioning-uri", name).stdout)
    assert secret_of(json.loads(uri.stdout)["provisioning_uri"]) == secret

    # verify: two codes of the same secret (window 1), each accepted once.
    step = now_step()
    verified = outcome(remote("verify", name, code_at(secret, step)))
    assert verified == outcome(local("verify", name, code_at(secret, step + 1)))
    assert verified[0] == 0 and verified[1]["valid"]
    assert outcome(remote("verify", name, code_at(secret, step)))[1]["result"] == "replayed"
    wrong = wrong_code(secret)
    refused, _ = same("verify", name, wrong, status=1)
    assert refused["result"] == "invalid"
    shown, _ = same("user", "show", name)
    assert shown["failed_attempts"] == 3  # the replay and one wrong code each way

    unlocked, _ = same("unlock", name)
    assert unlocked["failed_attempts"] == 0

    # renew-secret (pending) and confirm, each way with its own new secret.
    confirmed = []
    for way in (remote, local):
        pending = way("renew-secret", name, "--qr", "none")
        entry = json.loads(pending.stdout)
        assert entry["pending_expires_in"] > 0, pending
        new = secret_of(entry["twofactor_config"]["provisioning_uri"])
        done = way("confirm", name, code_at(new, now_step()))
        confirmed.append((outcome(pending), outcome(done)))
    assert confirmed[0] == confirmed[1]
    assert confirmed[0][1][0] == 0 and confirmed[0][1][1]["pending_expires_in"] is False

    codes, _ = same("recovery-codes", name)
    assert codes == {"username": name, "codes": 10}
    shown, _ = same("user", "show", name)
    assert shown["recovery_codes_left"] == 10
    listed, _ = same("user", "list")
    assert [u["username"] for u in listed] == [name]

    events, _ = same("audit", "--user", name, "--limit", "100")
    paths = {(e["path"], e["caller"].split(" serial=")[0]) for e in events}
    assert ("remote:admin", f"cert={ADMIN}") in paths and ("admin", "") in paths, paths
    rotated, _ = same("rotate-key")
    assert rotated["old_key_ids"] == []

    # unset-secret: remotely, then locally after enrolling again.
    there = outcome(remote("unset-secret", name))
    assert local("renew-secret", name, "--now", "--qr", "none").returncode == 0
    assert there == outcome(local("unset-secret", name))
    assert there[1]["twofactor_auth_configured"] is False

    # import: google-authenticator as a dry run, oath-users for real, each way.
    ga = operator.certs / "google_authenticator"  # files on the operator's laptop
    ga.write_text(
        'JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP\n" RATE_LIMIT 3 30\n" WINDOW_SIZE 3\n'
        f'" DISALLOW_REUSE {step - 1}\n" TOTP_AUTH\n12345678\n87654321\n'
    )
    operator.own(ga)
    dry, _ = same("import", "google-authenticator", "--user", name, str(ga), "--dry-run")
    assert (dry["dry_run"], dry["usernames"]) == (True, [name])
    assert any("RATE_LIMIT" in note for note in dry["notes"])
    users_oath = operator.certs / "users.oath"
    users_oath.write_text(f"HOTP/T30 {name} - 3132333435363738393031323334353637383930\n")
    operator.own(users_oath)
    there = outcome(remote("import", "oath-users", str(users_oath)))
    assert outcome(local("user", "show", name))[1]["twofactor_auth_configured"]
    assert local("unset-secret", name).returncode == 0
    assert there == outcome(local("import", "oath-users", str(users_oath)))
    assert there[1]["usernames"] == [name] and there[1]["dry_run"] is False

    # Every remote run went over the listener, as the admin certificate.
    methods = {
        "GetConfig", "UpdateConfig", "RenewSecret", "GetProvisioningUri", "VerifyToken",
        "Unlock", "ConfirmSecret", "MakeRecoveryCodes", "GetUser", "ListUsers",
        "ListAuditEvents", "RotateKey", "UnsetSecret", "ImportSecrets",
    }  # fmt: skip
    called = set(remote_calls(central, ADMIN))
    assert methods <= called, methods - called


# -- roles -------------------------------------------------------------------------------


def test_a_helpdesk_certificate_renews_but_changes_no_setting(
    central: Central, operator: Operator, user: LocalUser
) -> None:
    refused = operator.remote(central, HELPDESK, "update", "enabled=true")
    line = one_line_error(refused, "PermissionDenied: role helpdesk may not call UpdateConfig")
    assert f"'{HELPDESK}'" in line and central.address in line
    settings = central.daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=5)
    assert not settings.enabled
    assert "remote_refused" in central.daemon.log() and "UpdateConfig" not in remote_calls(
        central, HELPDESK
    )

    renewed = operator.remote(central, HELPDESK, "renew-secret", user.name, "--qr", "none")
    assert renewed.returncode == 0, renewed.stderr
    assert renewed.stdout.startswith("otpauth://totp/")
    entry = central.daemon.admin().GetUser(pb.GetUserRequest(username=user.name), timeout=5)
    assert entry.pending_expires_in > 0  # pending until confirmed, as locally
    # Reading a secret in use is not the help desk's: refused by the role, too.
    uri = operator.remote(central, HELPDESK, "provisioning-uri", user.name)
    one_line_error(uri, "PermissionDenied: role helpdesk may not call GetProvisioningUri")


# -- the profile ---------------------------------------------------------------------------


def _profile(operator: Operator, text: str, directory: Path | None = None) -> Path:
    """remote.toml in ~/.config/otpgate (or `directory`), with copies of the CA and
    of both certificates beside it, named as in `text`'s relative paths."""
    where = directory or operator.home / ".config" / "otpgate"
    where.mkdir(parents=True, exist_ok=True)
    for part in (where, *where.parents):
        if part == operator.home.parent:
            break
        os.chown(part, operator.user.uid, -1)
    for source in operator.certs.iterdir():
        target = where / source.name
        shutil.copy2(source, target)
        os.chown(target, operator.user.uid, -1)
    path = where / "remote.toml"
    path.write_text(text)
    os.chown(path, operator.user.uid, -1)
    return path


def test_the_profile_makes_remote_the_default(central: Central, operator: Operator) -> None:
    def toml(server: str, name: str) -> str:
        return (
            f'server = "{server}"\ntls_ca = "ca.crt"\n'
            f'tls_cert = "{name}.crt"\ntls_key = "{name}.key"\n'
        )

    _profile(operator, toml(central.address, HELPDESK))
    no_socket = {"OTPGATE_SOCKET": None}
    shown = operator.run("config", "--json", env=no_socket)
    assert (shown.returncode, shown.stderr) == (0, ""), shown
    assert json.loads(shown.stdout) == json.loads(cli(central.daemon, "config", "--json").stdout)
    assert remote_calls(central, HELPDESK) == ["GetConfig"]
    # The profile's certificate is a help desk's: settings are refused...
    refused = operator.run("update", "window=2", env=no_socket)
    one_line_error(refused, "PermissionDenied: role helpdesk may not call UpdateConfig")
    # ...unless a flag names another: flags win over the profile, key by key.
    admin = operator.tls(ADMIN)[2:]  # --tls-cert, --tls-key
    changed = operator.run("update", "window=2", *admin, env=no_socket)
    assert (changed.returncode, changed.stderr) == (0, ""), changed
    assert central.daemon.admin().GetConfig(pb.GetConfigRequest(), timeout=5).window == 2

    # A profile whose server is wrong: --server wins over it.
    _profile(operator, toml("127.0.0.1:1", HELPDESK))
    one_line_error(
        operator.run("config", env=no_socket), "ClientError: the otpgated at 127.0.0.1:1"
    )
    fixed = operator.run("--server", central.address, "config", env=no_socket)
    assert fixed.returncode == 0, fixed.stderr

    # $XDG_CONFIG_HOME, when set, is where the profile is.
    xdg = operator.home / "xdg"
    _profile(operator, toml(central.address, ADMIN), xdg / "otpgate")
    xdg_env = {"OTPGATE_SOCKET": None, "XDG_CONFIG_HOME": str(xdg)}
    there = operator.run("user", "list", env=xdg_env)
    assert there.returncode == 0, there.stderr
    assert remote_calls(central, ADMIN)[-1] == "ListUsers"
    # doctor looks at this host: the profile's server is not for it.
    calls = len(remote_calls(central, ADMIN))
    empty = operator.home  # no PAM service files: pam is a problem, found locally
    checked = operator.run(
        "doctor", "--json", "--sshd", "/nonexistent/sshd", "--pam-dir", str(empty), env=xdg_env
    )
    assert (checked.returncode, checked.stderr) == (1, ""), checked  # problems: sshd, pam
    assert central.address not in checked.stdout and json.loads(checked.stdout)["problems"]
    assert len(remote_calls(central, ADMIN)) == calls

    # --socket or OTPGATE_SOCKET: the local otpgated, and the profile is not read
    # (not even a broken one); root here, who may open admin.sock.
    broken = _profile(operator, "tls_crt = 'x.crt'\n")
    before = len(re.findall("remote_call", central.daemon.log()))
    for args, socket_env in ((["--socket", central.daemon.admin_socket], None),
                             ([], central.daemon.admin_socket)):  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "OTPGATE_SOCKET"}
        env["HOME"] = str(operator.home)
        if socket_env:
            env["OTPGATE_SOCKET"] = socket_env
        local = subprocess.run(
            [*CLI, *args, "config"], capture_output=True, text=True, env=env, timeout=60
        )
        assert (local.returncode, local.stderr) == (0, ""), local
    assert len(re.findall("remote_call", central.daemon.log())) == before

    # An unknown key: refused, naming it and the file.
    unknown = one_line_error(operator.run("config", env=no_socket), "InvalidArgument: ")
    assert "'tls_crt'" in unknown and str(broken) in unknown


# -- refusals ------------------------------------------------------------------------------


def test_what_the_cli_refuses_before_or_at_the_connection(
    central: Central, operator: Operator, fleet_pki: Pki, tmp_path: Path
) -> None:
    server = ["--server", central.address]
    ca, cert, key = (operator.tls(ADMIN)[i] for i in (1, 3, 5))
    # Certificates the central does not accept, and a server certificate this
    # client does not: another CA's.
    other = tmp_path / "other"
    pki.init(other, server_name="localhost", ip_addresses=["127.0.0.1"])
    stranger = pki.issue_client(other, ADMIN, role="admin")
    stranger_cert = operator.give(Path(stranger.cert), "stranger.crt")
    stranger_key = operator.give(Path(stranger.key), "stranger.key", mode=0o600)
    other_ca = operator.give(other / pki.CA_CERT, "other-ca.crt")
    shared_key = operator.give(Path(key), "shared.key", mode=0o644)
    expired_cert, expired_key = fleet_pki.expired("cli-expired1")
    expired_cert = operator.give(expired_cert)
    expired_key = operator.give(expired_key, mode=0o600)
    tls_admin = ["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key]
    cases: list[tuple[list[str], str, str]] = [
        ([*server, "--tls-ca", ca, "--tls-key", key, "config"],
         "InvalidArgument: --tls-cert: missing: with --server, give", ""),
        ([*server, "config"], "InvalidArgument: --tls-ca, --tls-cert, --tls-key: missing", ""),
        ([*server, "--tls-ca", ca, "--tls-cert", str(stranger_cert), "--tls-key",
          str(stranger_key), "config"],
         f"ClientError: the otpgated at {central.address} could not be reached or refused "
         f"the certificate {stranger_cert}", ""),
        ([*server, "--tls-ca", str(other_ca), "--tls-cert", cert, "--tls-key", key, "config"],
         f"ClientError: the otpgated at {central.address} could not be trusted", "CERTIFICATE"),
        ([*server, *tls_admin, "--tls-server-name", "wrong.example", "config"],
         f"ClientError: the otpgated at {central.address} could not be trusted", "Hostname"),
        (["--server", "127.0.0.1:1", *tls_admin, "config"],
         "ClientError: the otpgated at 127.0.0.1:1 could not be reached: ", "refused"),
        ([*server, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", str(shared_key), "config"],
         f"InvalidArgument: --tls-key: {shared_key} may be read by others (mode 0644)",
         f"chmod 600 {shared_key}"),
        ([*server, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", str(stranger_key), "config"],
         f"InvalidArgument: --tls-key: {stranger_key} is not the key of {cert}", ""),
        ([*server, "--tls-ca", ca, "--tls-cert", str(expired_cert), "--tls-key",
          str(expired_key), "config"],
         f"InvalidArgument: --tls-cert: {expired_cert} expired at ", "otpgate pki issue"),
        ([*server, "--tls-ca", ca, "--tls-cert", key, "--tls-key", key, "config"],
         f"InvalidArgument: --tls-cert: {key} holds no PEM certificate", ""),
        ([*server, "--tls-ca", "/nonexistent/ca.crt", "--tls-cert", cert, "--tls-key", key,
          "config"],
         "InvalidArgument: --tls-ca: cannot read /nonexistent/ca.crt: No such file", ""),
        (["--server", "otpgate.example.org", *tls_admin, "config"],
         "InvalidArgument: --server: expected HOST:PORT", ""),
        ([*server, "--socket", "/run/otpgate/admin.sock", *tls_admin, "config"],
         "InvalidArgument: --server: and --socket: give one", ""),
        (["--tls-cert", cert, "config"], "InvalidArgument: --tls-cert: only with --server", ""),
        ([*server, *tls_admin, "doctor"],
         "InvalidArgument: --server: doctor checks this host's sshd and otpgated", ""),
        ([*server, *tls_admin, "setup", "ssh", "--flow", "password", "--dry-run"],
         "InvalidArgument: --server: setup ssh checks this host's", ""),
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda case: operator.run(*case[0]), cases))
    for (args, prefix, also), result in zip(cases, results, strict=True):
        line = one_line_error(result, prefix)
        assert also in line, (args, line)
    # None of them called anything; the right server name does.
    assert remote_calls(central, ADMIN) == []
    named = operator.run(*server, *tls_admin, "--tls-server-name", "localhost", "config")
    assert (named.returncode, named.stderr) == (0, ""), named
    assert remote_calls(central, ADMIN) == ["GetConfig"]


def test_help_names_the_remote_options() -> None:
    shown = run("--help")
    text = " ".join(shown.stdout.split())
    for word in ("--server HOST:PORT", "--tls-ca FILE", "--tls-cert FILE", "--tls-key FILE",
                 "--tls-server-name NAME", "otpgate/remote.toml", "OTPGATE_SOCKET"):  # fmt: skip
        assert word in text, word
