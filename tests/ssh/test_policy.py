"""The access policy end to end: a private sshd on 127.0.0.1 (the shipped PAM and
sshd snippets, the hook, otpgated), logins from 127.0.0.1 and from a second loopback
address, 127.0.0.2, which sshd (UseDNS no, its default) reports as PAM_RHOST. Groups
are made for the test and removed after it."""

# ruff: noqa: F811 - `make_group` is a fixture imported from tests.cli.test_policy
from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable

import paramiko

from otpgate.v1 import otpgate_pb2 as pb
from tests.cli.test_policy import make_group  # noqa: F401 - a fixture
from tests.conftest import Daemon, LocalUser
from tests.ssh.conftest import Sshd, ssh_login
from tests.ssh.test_flows import enroll, wrong

MakeSshd = Callable[..., Sshd]
BASTION = "127.0.0.2"


def enable(daemon: Daemon, **changes: object) -> None:
    request = pb.UpdateConfigRequest(enabled=True, services_ssh=True, window=1)
    for name, value in changes.items():
        if isinstance(value, list):
            getattr(request, name).CopyFrom(pb.StringList(values=value))
        else:
            setattr(request, name, value)
    daemon.admin().UpdateConfig(request, timeout=5)


def session_greeting(port: int, user: LocalUser, *, source: str = "") -> str:
    """Log in with the password alone (no code typed), open a shell on a terminal
    and return what sshd shows first: its login messages, where PAM's messages
    to a login that passed without a prompt go."""
    sock = socket.create_connection(
        ("127.0.0.1", port), 30, source_address=(source, 0) if source else None
    )
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=30)
        # A partial success raises: keyboard-interactive must follow.
        with contextlib.suppress(paramiko.AuthenticationException):
            transport.auth_password(user.name, user.password, fallback=False)
        if not transport.is_authenticated():
            transport.auth_interactive(user.name, lambda title, text, prompts: [""] * len(prompts))
        assert transport.is_authenticated()
        channel = transport.open_session()
        channel.get_pty()
        channel.invoke_shell()
        shown = b""
        deadline = time.monotonic() + 10
        while b"$ " not in shown and time.monotonic() < deadline:
            if channel.recv_ready():
                shown += channel.recv(65536)
            else:
                time.sleep(0.02)
        return shown.decode(errors="replace")
    finally:
        transport.close()
        sock.close()


def audit(daemon: Daemon, user: LocalUser, event: str) -> list[pb.AuditEvent]:
    request = pb.ListAuditEventsRequest(username=user.name)
    events = daemon.admin().ListAuditEvents(request, timeout=5).events
    return [e for e in events if e.event == event]


# -- exempt networks ----------------------------------------------------------------------


def test_no_code_from_an_exempt_network(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enable(daemon, exempt_networks=[f"{BASTION}/32"])
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon)
    login = ssh_login(sshd.port, user.name, password=user.password, source=BASTION)
    assert login.ok and login.prompts == [], sshd.log_path.read_text()
    accepted = f"Accepted keyboard-interactive/pam for {user.name} from {BASTION}"
    deadline = time.monotonic() + 10  # sshd's line may come a moment after the login
    while accepted not in sshd.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert accepted in sshd.log_path.read_text()
    # From anywhere else (127.0.0.1 here) the code is asked, as before.
    assert not ssh_login(sshd.port, user.name, password=user.password).ok
    login = ssh_login(sshd.port, user.name, password=user.password, answers=[totp.now()])
    assert login.ok and len(login.prompts) == 1
    # A wrong password from the exempt network is still a wrong password.
    assert not ssh_login(sshd.port, user.name, password="x" + user.password, source=BASTION).ok
    # No code was looked at from the exempt network: nothing verified, nothing counted.
    assert {e.caller for e in audit(daemon, user, "verify")} == {"rhost=127.0.0.1"}
    # The explanation agrees.
    reply = daemon.admin().ExplainAccess(
        pb.ExplainAccessRequest(username=user.name, rhost=BASTION), timeout=5
    )
    assert reply.explanation == (
        f"would be asked for a code from {BASTION}: no, exempt network {BASTION}/32"
    )


def test_exempt_network_with_the_always_prompting_stack(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enable(
        daemon, exempt_networks=["127.0.0.0/30"], enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED
    )
    totp = enroll(daemon, user)
    sshd = make_sshd("password", daemon, prompt="always")
    # The prompt is always there; from the exempt network whatever is typed passes.
    login = ssh_login(sshd.port, user.name, password=user.password, answers=[""], source=BASTION)
    assert login.ok and len(login.prompts) == 1, sshd.log_path.read_text()
    enable(daemon, exempt_networks=["127.0.0.2/32"])  # 127.0.0.1 no longer in it
    assert not ssh_login(sshd.port, user.name, password=user.password, answers=["1"]).ok
    assert ssh_login(sshd.port, user.name, password=user.password, answers=[totp.now()]).ok


def test_exempt_network_single_prompt_takes_the_password_alone(
    login_daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    daemon = login_daemon
    enable(daemon, exempt_networks=[BASTION])
    totp = enroll(daemon, user)
    sshd = make_sshd("single-prompt", daemon)
    assert ssh_login(sshd.port, user.name, answers=[user.password], source=BASTION).ok
    assert not ssh_login(sshd.port, user.name, answers=[user.password]).ok
    assert ssh_login(sshd.port, user.name, answers=[user.password + totp.now()]).ok


# -- groups -------------------------------------------------------------------------------


def test_required_group_is_asked_even_from_an_exempt_network(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser, make_group: Callable[..., str]
) -> None:
    group = make_group(user.name)
    enable(daemon, exempt_networks=[BASTION], required_groups=[group])  # optional policy
    sshd = make_sshd("password", daemon)
    # No secret: refused, with the hint, whatever enrollment_policy says.
    for source in (BASTION, ""):
        login = ssh_login(
            sshd.port, user.name, password=user.password, answers=["123456"], source=source
        )
        assert not login.ok and "otpgate renew-secret" in login.text, login
    # Enrolled: asked for a code, from the exempt network too.
    totp = enroll(daemon, user)
    assert not ssh_login(sshd.port, user.name, password=user.password, source=BASTION).ok
    bad = ssh_login(
        sshd.port, user.name, password=user.password, answers=[wrong(totp.now())], source=BASTION
    )
    assert not bad.ok and "Invalid code" in bad.text
    login = ssh_login(
        sshd.port, user.name, password=user.password, answers=[totp.now()], source=BASTION
    )
    assert login.ok and len(login.prompts) == 1


def test_exempt_group_is_never_asked(
    daemon: Daemon,
    make_sshd: MakeSshd,
    make_user: Callable[..., LocalUser],
    make_group: Callable[..., str],
) -> None:
    member, other = make_user(), make_user()
    group = make_group(member.name)
    enable(daemon, exempt_groups=[group])
    enroll(daemon, member)
    totp = enroll(daemon, other)
    sshd = make_sshd("password", daemon)
    login = ssh_login(sshd.port, member.name, password=member.password)
    assert login.ok and login.prompts == [], sshd.log_path.read_text()
    assert not ssh_login(sshd.port, other.name, password=other.password).ok
    assert ssh_login(sshd.port, other.name, password=other.password, answers=[totp.now()]).ok
    # Out of the group (gpasswd rewrites /etc/group): asked at the next login.
    subprocess.run(["gpasswd", "-d", member.name, group], check=True, capture_output=True)
    assert not ssh_login(sshd.port, member.name, password=member.password).ok


# -- the enrollment deadline --------------------------------------------------------------


def test_enrollment_deadline_in_the_future_lets_in_with_the_hint(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enable(
        daemon,
        enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED,
        enrollment_deadline="2999-12-31",
    )
    sshd = make_sshd("password", daemon)
    login = ssh_login(sshd.port, user.name, password=user.password, source=BASTION)
    assert login.ok and login.prompts == [], sshd.log_path.read_text()
    # The hook's message to a login that passed without a prompt: sshd shows it when
    # the session starts.
    greeting = session_greeting(sshd.port, user, source=BASTION)
    assert "otpgate renew-secret" in greeting and "2999-12-31 (UTC)" in greeting, greeting
    # Each such login is audited, with where it came from.
    grace = audit(daemon, user, "enrollment_grace")
    assert [(e.detail, e.caller) for e in grace] == [("until=2999-12-31", f"rhost={BASTION}")] * 2


def test_enrollment_deadline_in_the_past_refuses(
    daemon: Daemon, make_sshd: MakeSshd, user: LocalUser
) -> None:
    enable(
        daemon,
        enrollment_policy=pb.ENROLLMENT_POLICY_REQUIRED,
        enrollment_deadline="2000-01-31",
    )
    sshd = make_sshd("password", daemon)
    login = ssh_login(sshd.port, user.name, password=user.password, answers=["123456"])
    assert not login.ok and "otpgate renew-secret" in login.text
    assert audit(daemon, user, "enrollment_grace") == []
    # Enrolled, the account is asked for its code as any other.
    totp = enroll(daemon, user)
    assert ssh_login(sshd.port, user.name, password=user.password, answers=[totp.now()]).ok
