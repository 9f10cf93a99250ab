"""How the CLI talks to otpgated: one typed Protocol, one class per transport.

- AdminClient: admin.sock (root and the admin group); every call is allowed.
- SelfServiceClient: user.sock, for everyone else. It logs in first (password, then
  a code when the account is enrolled) and acts on the caller's own account only;
  the admin calls raise PermissionDenied, naming the command, before anything is
  asked or sent.

- RemoteAdminClient: a central otpgated's network listener over mutual TLS
  (cli.remote chooses it and reads the certificates); the same admin calls, which
  otpgated allows or refuses by the client certificate's role.

connect() picks one; nothing outside this module knows gRPC.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import os
import pwd
import re
import socket
import stat
import tomllib
from typing import Protocol, TypeVar

# gRPC core reads it once, at import: without it a refused TLS handshake adds gRPC's
# own info line to the one line the CLI prints for an error.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
import grpc
from google.protobuf.message import Message

from otpgate.cli.prompts import Secrets
from otpgate.cli.remote import Remote
from otpgate.core import recovery
from otpgate.core.totp import check_token_format
from otpgate.errors import (
    ClientError,
    OtpgateError,
    PermissionDenied,
    TooManyAttempts,
    Unauthenticated,
)
from otpgate.server.config import DEFAULT_CONFIG_FILE, DaemonConfig
from otpgate.v1 import otpgate_pb2 as pb
from otpgate.v1 import otpgate_pb2_grpc as pb_grpc

# LoginExContinue's tries per login (otpgated's core.login.OTP_RETRIES; a test holds
# them equal): how the CLI tells "three codes refused" from "locked" without asking.
LOGIN_CODE_TRIES = 3
CODE_NOT_ACCEPTED = "wrong, or already used (wait for the next code)"

Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)


@dataclasses.dataclass(frozen=True)
class Verification:
    """A verdict on a code. `result` is a VerifyResult name (valid, invalid, replayed,
    not_enrolled, locked) or, on user.sock, invalid_or_replayed: a login that refuses
    a code does not say which. `locked_seconds` is None when the lock's end is unknown."""

    valid: bool
    result: str
    locked_seconds: int | None = 0
    recovery_codes_left: int | None = None  # a recovery code was accepted: how many remain


class Client(Protocol):
    """What the commands need from otpgated. Usernames are explicit: the commands
    resolve "you" (the real uid's name) themselves."""

    location: str  # where otpgated was reached, for messages

    def get_config(self) -> pb.TwoFactorConfig: ...
    def update_config(self, changes: pb.UpdateConfigRequest) -> pb.TwoFactorConfig: ...
    def renew_secret(
        self, user: str, *, otp_digits: int, interval: int, pending: bool
    ) -> pb.UserEntry: ...
    def confirm_secret(self, user: str, token: str) -> pb.UserEntry: ...
    def provisioning_uri(self, user: str) -> str: ...
    def verify(self, user: str, token: str) -> Verification: ...
    def unset_secret(self, user: str) -> pb.UserEntry: ...
    def get_user(self, user: str) -> pb.UserEntry: ...
    def list_users(self) -> list[pb.UserEntry]: ...
    def unlock(self, user: str) -> pb.UserEntry: ...
    def rotate_key(self) -> pb.RotateKeyResponse: ...
    def audit_events(self, request: pb.ListAuditEventsRequest) -> pb.ListAuditEventsResponse: ...
    def import_secrets(self, accounts: list[pb.ImportedAccount], *, dry_run: bool) -> list[str]: ...
    def recovery_codes(self, user: str) -> list[str]: ...
    def explain_access(self, user: str, rhost: str) -> pb.ExplainAccessResponse: ...
    def close(self) -> None: ...


class RpcFailed(OtpgateError):
    """otpgated refused or failed a request; `kind` names the gRPC status
    (InvalidArgument, NotFound...) and is what the CLI prints as the type."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def current_user() -> str:
    # The real uid, not $USER: the environment is the caller's to forge.
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        raise ClientError(f"uid {os.getuid()} has no account name (NSS): name USER") from None


def connect(
    socket_path: str,
    timeout: float,
    *,
    command: str,
    secrets: Secrets,
    remote: Remote | None = None,
) -> Client:
    """The client for `remote` when given, else for `socket_path`: admin.sock when
    the caller may open it, else user.sock beside it (an ordinary user). Nothing is
    sent yet, and a socket that is missing is reported at the first call: `setup ssh
    --undo` needs no daemon."""
    if remote is not None:
        return RemoteAdminClient(remote, timeout, command=command)
    user_socket = os.path.join(os.path.dirname(socket_path), "user.sock")
    if os.path.basename(socket_path) == "user.sock":
        return SelfServiceClient(socket_path, timeout, command=command, secrets=secrets)
    if _refused(socket_path) and os.path.exists(user_socket):
        return SelfServiceClient(
            user_socket, timeout, command=command, secrets=secrets, admin_socket=socket_path
        )
    return AdminClient(socket_path, timeout, command=command)


def _refused(path: str) -> bool:
    """A socket is there but this caller may not open it."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISSOCK(info.st_mode) and not os.access(path, os.R_OK | os.W_OK)


def admin_group(admin_socket: str) -> str | None:
    """The group allowed on admin.sock: the socket's group, which otpgated set at
    start from its admin_group, even when a flag overrode its configuration file;
    that file when the socket cannot be looked at; None when neither tells."""
    try:
        return grp.getgrgid(os.stat(admin_socket).st_gid).gr_name
    except (OSError, KeyError):
        return _configured_admin_group(admin_socket)


def _configured_admin_group(admin_socket: str) -> str | None:
    try:
        with open(DEFAULT_CONFIG_FILE, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    defaults = DaemonConfig()
    runtime_dir = data.get("runtime_dir", defaults.runtime_dir)
    if not isinstance(runtime_dir, str) or os.path.join(runtime_dir, "admin.sock") != admin_socket:
        return None  # that file configures some other otpgated
    group = data.get("admin_group", defaults.admin_group)
    return group if isinstance(group, str) else None


def _admins(admin_socket: str | None) -> str:
    group = admin_group(admin_socket) if admin_socket else None
    return (
        f"root or a member of the group {group}" if group else "root or in otpgated's admin group"
    )


def needs_admin(command: str, admin_socket: str | None) -> PermissionDenied:
    return PermissionDenied(f"{command} needs admin rights: run it as {_admins(admin_socket)}")


def _check_socket(path: str, command: str) -> None:
    hint = "is otpgated running? (--socket or OTPGATE_SOCKET name another socket)"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ClientError(f"no otpgated socket at {path}: {hint}") from None
    except PermissionError:
        raise ClientError(f"cannot reach {path}: permission denied") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ClientError(f"{path} is not a socket: {hint}")
    if not os.access(path, os.R_OK | os.W_OK):
        raise needs_admin(command, path)


def _rpc_error(exc: grpc.RpcError, location: str) -> OtpgateError:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else "") or "no details"
    if code == grpc.StatusCode.UNAVAILABLE:
        return ClientError(f"cannot reach otpgated at {location}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(f"otpgated at {location} did not answer in time")
    kind = "".join(part.capitalize() for part in code.name.split("_"))
    return RpcFailed(kind, details)


def _probe_listener(path: str) -> None:
    """Fail at once when nobody listens (a socket left by a stopped otpgated), which
    waiting for the connection would only turn into a timeout."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        raise ClientError(f"cannot reach otpgated at {path}: nobody listens there") from None
    except OSError:
        pass  # busy (EAGAIN) or anything else: let gRPC wait and report
    finally:
        probe.close()


def _status(exc: grpc.RpcError) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.Call) else None


def verification_from_pb(response: pb.VerifyTokenResponse) -> Verification:
    name = pb.VerifyResult.Name(response.result).removeprefix("VERIFY_RESULT_").lower()
    left = response.recovery_codes_left if response.HasField("recovery_codes_left") else None
    return Verification(response.valid, name, response.locked_seconds, left)


class _Transport:
    """One gRPC channel to a Unix socket, opened at the first call. (RemoteAdminClient
    opens its channel differently and words its failures differently, nothing else.)"""

    def __init__(self, socket_path: str, timeout: float, command: str) -> None:
        self.location = socket_path
        self._timeout = timeout
        self._command = command
        self._channel: grpc.Channel | None = None
        # user.sock's listen queue is shared by every local user, and one of them can
        # fill it for a moment (SECURITY.md): there, wait for the connection within
        # the timeout instead of failing at the first refused connect().
        self._wait_for_ready = False

    def _open(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = self._new_channel()
        return self._channel

    def _new_channel(self) -> grpc.Channel:
        _check_socket(self.location, self._command)
        if self._wait_for_ready:
            _probe_listener(self.location)
        return grpc.insecure_channel("unix:" + self.location)

    def _failure(self, exc: grpc.RpcError) -> OtpgateError:
        return _rpc_error(exc, self.location)

    def _call(
        self,
        rpc: grpc.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> Response:
        try:
            return rpc(
                request,
                timeout=self._timeout,
                metadata=metadata,
                wait_for_ready=self._wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise self._failure(exc) from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class AdminClient(_Transport):
    """admin.sock: otpgated trusts every caller here as a full admin."""

    def __init__(self, socket_path: str, timeout: float, *, command: str) -> None:
        super().__init__(socket_path, timeout, command)
        self._stub: pb_grpc.TwoFactorAdminStub | None = None

    def _admin(self) -> pb_grpc.TwoFactorAdminStub:
        if self._stub is None:
            self._stub = pb_grpc.TwoFactorAdminStub(self._open())
        return self._stub

    def get_config(self) -> pb.TwoFactorConfig:
        return self._call(self._admin().GetConfig, pb.GetConfigRequest())

    def update_config(self, changes: pb.UpdateConfigRequest) -> pb.TwoFactorConfig:
        return self._call(self._admin().UpdateConfig, changes)

    def renew_secret(
        self, user: str, *, otp_digits: int, interval: int, pending: bool
    ) -> pb.UserEntry:
        request = _renew_request(user, otp_digits, interval, pending)
        return self._call(self._admin().RenewSecret, request)

    def confirm_secret(self, user: str, token: str) -> pb.UserEntry:
        request = pb.ConfirmSecretRequest(username=user, token=token)
        return self._call(self._admin().ConfirmSecret, request)

    def provisioning_uri(self, user: str) -> str:
        request = pb.GetProvisioningUriRequest(username=user)
        return self._call(self._admin().GetProvisioningUri, request).provisioning_uri

    def verify(self, user: str, token: str) -> Verification:
        request = pb.VerifyTokenRequest(username=user, token=token)
        return verification_from_pb(self._call(self._admin().VerifyToken, request))

    def unset_secret(self, user: str) -> pb.UserEntry:
        return self._call(self._admin().UnsetSecret, pb.UnsetSecretRequest(username=user))

    def get_user(self, user: str) -> pb.UserEntry:
        return self._call(self._admin().GetUser, pb.GetUserRequest(username=user))

    def list_users(self) -> list[pb.UserEntry]:
        return list(self._call(self._admin().ListUsers, pb.ListUsersRequest()).users)

    def unlock(self, user: str) -> pb.UserEntry:
        return self._call(self._admin().Unlock, pb.UnlockRequest(username=user))

    def rotate_key(self) -> pb.RotateKeyResponse:
        return self._call(self._admin().RotateKey, pb.RotateKeyRequest())

    def audit_events(self, request: pb.ListAuditEventsRequest) -> pb.ListAuditEventsResponse:
        return self._call(self._admin().ListAuditEvents, request)

    def import_secrets(self, accounts: list[pb.ImportedAccount], *, dry_run: bool) -> list[str]:
        request = pb.ImportSecretsRequest(accounts=accounts, dry_run=dry_run)
        return list(self._call(self._admin().ImportSecrets, request).usernames)

    def recovery_codes(self, user: str) -> list[str]:
        request = pb.MakeRecoveryCodesRequest(username=user)
        return list(self._call(self._admin().MakeRecoveryCodes, request).codes)

    def explain_access(self, user: str, rhost: str) -> pb.ExplainAccessResponse:
        request = pb.ExplainAccessRequest(username=user, rhost=rhost)
        return self._call(self._admin().ExplainAccess, request)


class RemoteAdminClient(AdminClient):
    """The admin API of a central otpgated's network listener, over mutual TLS: the
    same calls as admin.sock's, which otpgated allows or refuses by the role that
    [roles] gives the client certificate's name."""

    def __init__(self, remote: Remote, timeout: float, *, command: str) -> None:
        super().__init__(remote.server, timeout, command=command)
        self._remote = remote

    def _new_channel(self) -> grpc.Channel:
        remote = self._remote
        credentials = grpc.ssl_channel_credentials(
            root_certificates=remote.ca, private_key=remote.key, certificate_chain=remote.cert
        )
        options = []
        if remote.server_name:
            options.append(("grpc.ssl_target_name_override", remote.server_name))
        return grpc.secure_channel(remote.server, credentials, options=options)

    def _failure(self, exc: grpc.RpcError) -> OtpgateError:
        remote = self._remote
        code = _status(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            return _unreachable(remote, exc.details() if isinstance(exc, grpc.Call) else "")
        failure = _rpc_error(exc, remote.server)
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            # The role or the revocation is the server's word; say whose certificate.
            assert isinstance(failure, RpcFailed)
            who = "" if repr(remote.name) in str(failure) else f"certificate {remote.name!r}, "
            return RpcFailed(failure.kind, f"{failure} ({who}otpgated at {remote.server})")
        return failure


# gRPC's words (1.85) for a connection that never was, and for the server's
# certificate refused here; anything else that ends a TLS connection before an
# answer is most often the server refusing this client's certificate.
_NO_CONNECTION = ("Connection refused", "DNS resolution failed", "No route to host",
                  "Network is unreachable", "Failed to connect to remote host")  # fmt: skip
_SERVER_REFUSED_HERE = ("CERTIFICATE_VERIFY_FAILED", "Hostname Verification", "verification check")


def _unreachable(remote: Remote, details: str) -> ClientError:
    details = details or "no details"
    where = f"the otpgated at {remote.server}"
    if any(words in details for words in _NO_CONNECTION):
        return ClientError(f"{where} could not be reached: {details}")
    if any(words in details for words in _SERVER_REFUSED_HERE):
        return ClientError(
            f"{where} could not be trusted: its certificate must chain to {remote.ca_file} "
            f"and name the host of --server (or --tls-server-name): {details}"
        )
    return ClientError(
        f"{where} could not be reached or refused the certificate {remote.cert_file} "
        f"(not from the CA it trusts, or expired?): {details}"
    )


def _renew_request(
    user: str, otp_digits: int, interval: int, pending: bool
) -> pb.RenewSecretRequest:
    options = pb.TwoFactorOptions(otp_digits=otp_digits, interval=interval)
    return pb.RenewSecretRequest(username=user, twofactor_options=options, pending=pending)


class SelfServiceClient(_Transport):
    """user.sock: log in as the real uid's account (otpgated checks with the kernel
    that it is), then act on that account only."""

    def __init__(
        self,
        socket_path: str,
        timeout: float,
        *,
        command: str,
        secrets: Secrets,
        admin_socket: str | None = None,
    ) -> None:
        super().__init__(socket_path, timeout, command)
        self._wait_for_ready = True
        self.username = current_user()
        self._secrets = secrets
        self._admin_socket = admin_socket or os.path.join(
            os.path.dirname(socket_path), "admin.sock"
        )
        self._stub: pb_grpc.UserSelfServiceStub | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    # -- what user.sock does not offer --------------------------------------------------

    def get_config(self) -> pb.TwoFactorConfig:
        raise needs_admin(self._command, self._admin_socket)

    def update_config(self, changes: pb.UpdateConfigRequest) -> pb.TwoFactorConfig:
        raise needs_admin(self._command, self._admin_socket)

    def unset_secret(self, user: str) -> pb.UserEntry:
        raise needs_admin(self._command, self._admin_socket)

    def list_users(self) -> list[pb.UserEntry]:
        raise needs_admin(self._command, self._admin_socket)

    def unlock(self, user: str) -> pb.UserEntry:
        raise needs_admin(self._command, self._admin_socket)

    def rotate_key(self) -> pb.RotateKeyResponse:
        raise needs_admin(self._command, self._admin_socket)

    def audit_events(self, request: pb.ListAuditEventsRequest) -> pb.ListAuditEventsResponse:
        raise needs_admin(self._command, self._admin_socket)

    def import_secrets(self, accounts: list[pb.ImportedAccount], *, dry_run: bool) -> list[str]:
        raise needs_admin(self._command, self._admin_socket)

    def explain_access(self, user: str, rhost: str) -> pb.ExplainAccessResponse:
        raise needs_admin(self._command, self._admin_socket)

    # -- the caller's own account -------------------------------------------------------

    def renew_secret(
        self, user: str, *, otp_digits: int, interval: int, pending: bool
    ) -> pb.UserEntry:
        self._own(user)
        return self._session_call(
            self._user().RenewSecret, _renew_request(user, otp_digits, interval, pending)
        )

    def confirm_secret(self, user: str, token: str) -> pb.UserEntry:
        self._own(user)
        request = pb.ConfirmSecretRequest(username=user, token=token)
        return self._session_call(self._user().ConfirmSecret, request)

    def provisioning_uri(self, user: str) -> str:
        self._own(user)
        request = pb.GetProvisioningUriRequest(username=user)
        return self._session_call(self._user().GetProvisioningUri, request).provisioning_uri

    def get_user(self, user: str) -> pb.UserEntry:
        self._own(user)
        return self._session_call(self._user().GetUser, pb.GetUserRequest(username=user))

    def recovery_codes(self, user: str) -> list[str]:
        # The login asks for a code when the account has a secret: a LEVEL_2 session.
        self._own(user)
        request = pb.MakeRecoveryCodesRequest(username=user)
        return list(self._session_call(self._user().MakeRecoveryCodes, request).codes)

    def verify(self, user: str, token: str) -> Verification:
        """The code to check is the login's second factor: asking for another one
        first would spend the current step, and TOKEN would then be a replay."""
        self._own(user)
        if not self._metadata:
            # Checked here: at a login a malformed code counts as a wrong one.
            if recovery.normalise(token) is None:
                check_token_format(token)
            reply = self._password_login()
            if reply.response_type == pb.OTP_REQUIRED:
                after = self._continue(reply.attempt_token, token)
                if after.response_type == pb.SUCCESS:
                    self._start(after)
                    return Verification(True, "valid", 0)
                if after.response_type == pb.OTP_REQUIRED:
                    return Verification(False, "invalid_or_replayed", 0)
                # Refused at the first try: otpgated ends an attempt early only for a
                # locked account (or one whose secret went away meanwhile).
                return Verification(False, "locked", None)
            self._start(reply)  # no secret: a password session, and VerifyToken says so
        request = pb.VerifyTokenRequest(username=user, token=token)
        return verification_from_pb(self._session_call(self._user().VerifyToken, request))

    def close(self) -> None:
        if self._metadata and self._stub is not None:
            # A session nobody will use again should not outlive the command.
            with contextlib.suppress(grpc.RpcError):
                self._stub.Logout(
                    pb.LogoutRequest(), timeout=self._timeout, metadata=self._metadata
                )
            self._metadata = ()
        super().close()

    # -- logging in -----------------------------------------------------------------------

    def _user(self) -> pb_grpc.UserSelfServiceStub:
        if self._stub is None:
            self._stub = pb_grpc.UserSelfServiceStub(self._open())
        return self._stub

    def _own(self, user: str) -> None:
        # otpgated refuses it too; refusing here spares a password prompt for nothing.
        if user != self.username:
            raise PermissionDenied(
                f"{self._command}: as {self.username} you may act on your own account only, "
                f"not on {user}'s: for that, run it as {_admins(self._admin_socket)}"
            )

    def _session_call(
        self, rpc: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        if not self._metadata:
            self._login()
        return self._call(rpc, request, self._metadata)

    def _login(self) -> None:
        reply = self._password_login()
        tries = 0
        while reply.response_type == pb.OTP_REQUIRED:
            if tries:
                left = LOGIN_CODE_TRIES - tries
                tries_left = f"{left} {'try' if left == 1 else 'tries'} left"
                self._secrets.tell(f"code not accepted: {CODE_NOT_ACCEPTED}; {tries_left}")
            try:
                code = self._secrets.ask("One-time code: ")
            except ClientError:
                if not tries:
                    raise
                raise Unauthenticated(
                    f"login failed: the code was not accepted: {CODE_NOT_ACCEPTED}"
                ) from None
            reply = self._continue(reply.attempt_token, code)
            tries += 1
        if reply.response_type != pb.SUCCESS:  # AUTH_ERR after a code
            if tries >= LOGIN_CODE_TRIES:
                raise Unauthenticated(
                    f"login failed: {tries} codes not accepted (wrong, or already used); "
                    "too many wrong codes lock the account"
                )
            raise Unauthenticated(_LOCKED)
        self._start(reply)

    def _password_login(self) -> pb.LoginExResponse:
        stub = self._user()  # a missing daemon is reported before a password is asked for
        password = self._secrets.ask(f"Password for {self.username}: ")
        request = pb.LoginExRequest(
            mechanism=pb.PASSWORD_PLAIN,
            username=self.username,
            password=password,
            login_options=pb.AuthCommonOptions(user_info=False),
        )
        try:
            reply = stub.LoginEx(
                request, timeout=self._timeout, wait_for_ready=self._wait_for_ready
            )
        except grpc.RpcError as exc:
            details = exc.details() if isinstance(exc, grpc.Call) else ""
            wait = re.search(r"try again in (\d+) s", details or "")
            if _status(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED and wait:
                # otpgated's delay after a wrong password (README: "try again in N s");
                # other RESOURCE_EXHAUSTED answers (too many calls at once) stay as they are.
                raise TooManyAttempts(details or "", float(wait[1])) from None
            raise _rpc_error(exc, self.location) from None
        if reply.response_type == pb.EXPIRED:
            raise Unauthenticated(
                "login failed: your password or account has expired: change it first (passwd)"
            )
        if reply.response_type == pb.AUTH_ERR:
            # otpgated answers both alike, so that a password guesser learns nothing.
            raise Unauthenticated(
                f"login failed: wrong password for {self.username}, or the account is locked "
                "after too many wrong codes"
            )
        return reply

    def _continue(self, attempt_token: str, code: str) -> pb.LoginExResponse:
        request = pb.LoginExContinueRequest(
            mechanism=pb.OTP_TOKEN,
            attempt_token=attempt_token,
            otp_token=code,
            login_options=pb.AuthCommonOptions(user_info=False),
        )
        return self._call(self._user().LoginExContinue, request)

    def _start(self, reply: pb.LoginExResponse) -> None:
        self._metadata = (("authorization", f"Bearer {reply.session_token}"),)


_LOCKED = (
    "login failed: the account is locked after too many wrong codes: wait, or ask an "
    "administrator (a new secret, otpgate renew-secret, clears the lock)"
)
