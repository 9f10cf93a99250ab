"""Who may call what on the network listener: a fixed method table per role.

A client certificate's name maps to one role ([roles] in otpgated.toml); a role is
a fixed set of methods, as each Unix socket is, and every other method is
PERMISSION_DENIED. The table is data, so the tests walk every role against every
method of every service the listener serves.
"""

from __future__ import annotations

from otpgate.v1 import otpgate_pb2

ADMIN_SERVICE = "otpgate.v1.TwoFactorAdmin"
_ADMIN = otpgate_pb2.DESCRIPTOR.services_by_name[ADMIN_SERVICE.rsplit(".", 1)[1]]
_HOST = otpgate_pb2.DESCRIPTOR.services_by_name["HostGate"]


def _methods(service: object, names: set[str] | None = None) -> frozenset[str]:
    chosen = [m.name for m in service.methods]  # type: ignore[attr-defined]
    if names is not None:
        unknown = names - set(chosen)
        assert not unknown, f"no such method: {unknown}"
        chosen = [m for m in chosen if m in names]
    return frozenset(f"/{service.full_name}/{m}" for m in chosen)  # type: ignore[attr-defined]


# ExplainAccess reads only what GetConfig and GetUser show, put together.
_READ = {"GetConfig", "GetUser", "ListUsers", "ExplainAccess"}

# Every method a role may call, by gRPC's full name ("/package.Service/Method").
ROLE_METHODS: dict[str, frozenset[str]] = {
    # All that admin.sock allows.
    "admin": _methods(_ADMIN),
    # Duo's Help Desk: reset a person's device (a new secret, none, an unlock,
    # recovery codes, a code checked over the phone), never the settings. Not
    # GetProvisioningUri: reading a secret that stays in use would be a silent way
    # in, where a renewal is seen (the old phone stops working).
    "helpdesk": _methods(
        _ADMIN,
        _READ
        | {"RenewSecret", "ConfirmSecret", "UnsetSecret", "Unlock", "MakeRecoveryCodes"}
        | {"VerifyToken"},
    ),
    # Read only.
    "auditor": _methods(_ADMIN, _READ | {"ListAuditEvents"}),
    # An edge otpgated: the questions of its hook and of its users' self-service.
    "host": _methods(_HOST),
}
ROLES = tuple(ROLE_METHODS)
SERVICES = (_ADMIN, _HOST)


def allowed(role: str | None, method: str) -> bool:
    return role is not None and method in ROLE_METHODS.get(role, frozenset())
