"""`otpgate doctor`: find unsafe or broken SSH wiring before it locks anyone out.

Reads the effective sshd configuration (`sshd -T`) and the PAM stack sshd uses,
and reports one line per problem. The checks are pure functions over text, so
they are tested without touching the host.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import shlex
import stat
import subprocess
from collections.abc import Callable, Iterable

from otpgate.core.paths import ASK_FILE, GATE_DIR_NAME, NETWORKS_FILE

HOOK_NAME = "otpgate-pam-hook"
_INCLUDE_DEPTH = 8
_ADMIN_GROUPS = ("sudo", "wheel", "admin")


@dataclasses.dataclass(frozen=True)
class PamLine:
    control: str
    module: str
    args: tuple[str, ...]

    @property
    def hook_mode(self) -> str | None:
        """The hook's mode if this line runs otpgate's hook, else None."""
        if os.path.basename(self.module) != "pam_exec.so":
            return None
        for i, arg in enumerate(self.args):
            if _is_hook(arg):
                rest = self.args[i + 1 :]
                return rest[0] if rest else ""
        return None

    @property
    def hook_options(self) -> tuple[str, ...]:
        """The hook's OPTION=VALUE words if this line runs otpgate's hook, else ()."""
        for i, arg in enumerate(self.args):
            if _is_hook(arg):
                return self.args[i + 2 :]
        return ()

    @property
    def hook_path(self) -> str | None:
        return next((a for a in self.args if _is_hook(a)), None)


def _is_hook(arg: str) -> bool:
    name = os.path.basename(arg)
    return name == HOOK_NAME or name.startswith("otpgate_pam_hook")


def parse_sshd_t(text: str) -> dict[str, list[str]]:
    """`sshd -T` output: lower-case keyword -> values (repeated keywords accumulate)."""
    config: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            config.setdefault(key.lower(), []).append(value.strip())
    return config


def read_pam_auth(service: str, pam_dir: str = "/etc/pam.d") -> list[PamLine]:
    """The auth lines of a PAM service, with @include and include/substack expanded."""
    return _auth_lines(os.path.join(pam_dir, service), pam_dir, 0)


def _auth_lines(path: str, pam_dir: str, depth: int) -> list[PamLine]:
    if depth > _INCLUDE_DEPTH:
        return []
    lines: list[PamLine] = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            text = raw.split("#", 1)[0].strip()
            if not text:
                continue
            if text.startswith("@include"):
                lines += _auth_lines(_pam_path(text.split()[1], pam_dir), pam_dir, depth + 1)
                continue
            fields = _split_pam(text)
            if len(fields) < 3 or fields[0].lstrip("-") != "auth":
                continue
            control, module = fields[1], fields[2]
            if control in ("include", "substack"):
                lines += _auth_lines(_pam_path(module, pam_dir), pam_dir, depth + 1)
                continue
            lines.append(PamLine(control, module, tuple(fields[3:])))
    return lines


def _pam_path(name: str, pam_dir: str) -> str:
    return name if os.path.isabs(name) else os.path.join(pam_dir, name)


def _split_pam(text: str) -> list[str]:
    # A control of the form [a=b c=d] is one field despite its spaces.
    if "[" in text and "]" in text:
        head, _, rest = text.partition("[")
        control, _, tail = rest.partition("]")
        return [*head.split(), f"[{control}]", *shlex.split(tail)]
    return shlex.split(text)


def check_sshd(config: dict[str, list[str]], flow: str | None) -> list[str]:
    problems = []
    if config.get("usepam", ["no"])[0] != "yes":
        problems.append("sshd: UsePAM is off: PAM, and so otpgate, is never asked")
    kbd = config.get("kbdinteractiveauthentication", config.get("challengeresponseauthentication"))
    if (kbd or ["no"])[0] != "yes":
        problems.append("sshd: KbdInteractiveAuthentication is off: no code can be asked")
    methods = " ".join(config.get("authenticationmethods", ["any"]))
    if methods == "any":
        problems.append(
            "sshd: AuthenticationMethods is 'any': a password or a key alone lets a user in "
            "without a code"
        )
        return problems
    for method_list in methods.split():
        steps = [step.split(":", 1)[0] for step in method_list.split(",")]
        if "keyboard-interactive" not in steps:
            problems.append(
                f"sshd: AuthenticationMethods list '{method_list}' lets a user in without a code"
            )
        elif flow in ("password", "publickey") and steps == ["keyboard-interactive"]:
            problems.append(
                f"sshd: AuthenticationMethods list '{method_list}' is a single round: with the "
                f"{flow}-then-code PAM stack that is "
                + ("the password alone" if flow == "password" else "denied for everyone")
            )
    return problems


def detect_flow(stack: list[PamLine]) -> str | None:
    modes = [line.hook_mode for line in stack if line.hook_mode is not None]
    if "single-prompt" in modes:
        return "single-prompt"
    after_first = any("first-factor=required" in line.hook_options for line in stack)
    if "first-factor-done" in modes or after_first:
        has_unix = any(os.path.basename(line.module) == "pam_unix.so" for line in stack)
        return "password" if has_unix else "publickey"
    if "verify" in modes:
        return "code-only"
    return None


def check_pam(
    service: str, stack: list[PamLine], owner_ok: Callable[[str], str | None]
) -> list[str]:
    problems = []
    hook_lines = [line for line in stack if line.hook_mode is not None]
    if not hook_lines:
        return [f"pam: service {service} never runs {HOOK_NAME}: no code is ever asked"]
    if not any(line.hook_mode in ("verify", "single-prompt") for line in hook_lines):
        problems.append(f"pam: service {service} runs {HOOK_NAME} but never checks a code")
    if not stack or os.path.basename(stack[-1].module) != "pam_permit.so":
        problems.append(
            f"pam: the auth stack of {service} does not end with pam_permit.so: sshd drops "
            "the session after login (setcred)"
        )
    for line in hook_lines:
        path = line.hook_path or ""
        if line.hook_mode in ("verify", "single-prompt") and "expose_authtok" not in line.args:
            problems.append(
                f"pam: the {line.hook_mode} line lacks expose_authtok: it reads no code"
            )
        if not os.path.isabs(path):
            problems.append(f"pam: hook path {path!r} is not absolute")
            continue
        trouble = owner_ok(path)
        if trouble:
            problems.append(f"pam: hook {path}: {trouble}")
        if "-I" not in line.args:
            problems.append(
                f"pam: hook {path} runs without python3 -I: the environment could change it"
            )
    return problems


def root_owned_chain(path: str) -> str | None:
    """Why `path` could be changed by someone other than root, or None."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    current = path
    while True:
        info = os.stat(current)
        if info.st_uid != 0:
            return f"{current} is not owned by root"
        sticky_dir = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
        if info.st_mode & 0o022 and not sticky_dir:
            return f"{current} is writable by group or others"
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


# The hook's own default (pam_hook: socket=); the daemon writes its gate files beside
# its sockets, runtime_dir/gate.
HOOK_DEFAULT_SOCKET = "/run/otpgate/pam.sock"
GATE_FILES = (ASK_FILE, NETWORKS_FILE)
# The daemon rewrites them every 30 s, less often only while one build takes over 2 s
# (it then waits about 15 builds): ten minutes is stale by any measure.
GATE_STALE_SECONDS = 600
_GATE_COST = "logins still need their code, but each runs the hook twice"
_GATE_WRITER = (
    "otpgated writes it at start: is that daemon running? "
    "its log says gate_files_not_written when it cannot"
)


def same_path(a: str, b: str) -> bool:
    """Whether two spellings name the same place (//, /./, /var/run -> /run)."""
    return os.path.realpath(a) == os.path.realpath(b)


def hook_sockets(stack: list[PamLine]) -> list[str]:
    """The pam.sock each hook line asks (its socket=, else the hook's default), in
    stack order: each pam_exec line is a process of its own."""
    sockets = []
    for line in stack:
        if line.hook_mode is None:
            continue
        given = [o.split("=", 1)[1] for o in line.hook_options if o.startswith("socket=")]
        sockets.append(given[-1] if given else HOOK_DEFAULT_SOCKET)
    return sockets


def check_hook_sockets(stack: list[PamLine], pam_socket: str, admin_socket: str) -> list[str]:
    """Each pam.sock a hook line asks that is not `pam_socket`, the one beside the
    admin.sock doctor reached."""
    astray = dict.fromkeys(s for s in hook_sockets(stack) if not same_path(s, pam_socket))
    return [
        f"pam: the hook asks {asked}, but the otpgated at {admin_socket} listens at "
        f"{pam_socket}: logins are decided by another daemon, or refused when none answers "
        f"(otpgate setup ssh --hook-options socket={pam_socket}, with the line's other "
        "options)"
        for asked in astray
    ]


def gate_paths(stack: list[PamLine]) -> list[str]:
    """The gate files (runtime_dir/gate/ask, networks.conf) the stack's pam_listfile
    and pam_access lines read, in stack order."""
    keys = {"pam_listfile.so": "file=", "pam_access.so": "accessfile="}
    found = []
    for line in stack:
        key = keys.get(os.path.basename(line.module))
        if key is None:
            continue
        for arg in line.args:
            path = arg[len(key) :]
            if (
                arg.startswith(key)
                and os.path.basename(path) in GATE_FILES
                and os.path.basename(os.path.dirname(path)) == GATE_DIR_NAME
            ):
                found.append(path)
    return found


def check_gate(stack: list[PamLine], *, now: float) -> list[str]:
    """Why the gate files the stack reads would not spare a listed login the `check`
    process: missing, not the daemon's, in another directory than the one its daemon
    writes, or stale. None of it skips a code; it makes logins slower."""
    paths = gate_paths(stack)
    sockets = hook_sockets(stack)
    if not paths or not sockets:
        return []
    problems = []
    written = [os.path.join(os.path.dirname(s), GATE_DIR_NAME) for s in sockets]
    directories = list(dict.fromkeys(os.path.dirname(p) for p in paths))
    for directory in directories:
        if not any(same_path(directory, w) for w in written):
            problems.append(
                f"gate: the stack reads files in {directory}, but its hook asks "
                f"{sockets[0]}, whose daemon writes them in {written[0]} (otpgate setup ssh "
                f"rewrites the gate lines): {_GATE_COST}"
            )
            continue
        trouble, _ = _root_only(directory, stat.S_ISDIR, "a directory")
        if trouble:
            problems.append(f"gate: {directory} {trouble}")
            continue
        for path in (p for p in paths if os.path.dirname(p) == directory):
            trouble, info = _root_only(path, stat.S_ISREG, "a regular file")
            if info is not None and now - info.st_mtime > GATE_STALE_SECONDS:
                trouble = (
                    f"was last written {int((now - info.st_mtime) // 60)} min ago (otpgated "
                    "rewrites it every 30 s: is the daemon the hook asks running?): " + _GATE_COST
                )
            if trouble:
                problems.append(f"gate: {path} {trouble}")
    return problems


def _root_only(
    path: str, kind: Callable[[int], bool], kind_name: str
) -> tuple[str | None, os.stat_result | None]:
    """(why `path` is not what otpgated makes, root's alone and of that kind, or None;
    its lstat when it is)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"is missing ({_GATE_WRITER}): {_GATE_COST}", None
    except PermissionError:
        # Only root may look into the gate directory; its cost is unknown, not shown.
        return f"cannot be checked as uid {os.geteuid()}: run otpgate doctor as root", None
    except OSError as exc:
        return f"cannot be checked ({exc.strerror})", None
    mode = stat.S_IMODE(info.st_mode)
    if not kind(info.st_mode):
        return f"is not {kind_name}: {_GATE_COST}", None
    if info.st_uid != 0 or mode & 0o077:
        return (
            f"is not root's alone (owner uid {info.st_uid}, mode {mode:04o}): {_GATE_COST}",
            None,
        )
    return None, info


def unenrolled_admins(enrolled: Iterable[str], admin_group: str) -> tuple[list[str], bool]:
    """(admins, any enrolled): admins are root and members of the usual admin groups."""
    admins = {"root"}
    for name in (*_ADMIN_GROUPS, admin_group):
        try:
            group = grp.getgrnam(name)
        except KeyError:
            continue
        admins.update(group.gr_mem)
        admins.update(p.pw_name for p in pwd.getpwall() if p.pw_gid == group.gr_gid)
    enrolled_set = set(enrolled)
    return sorted(admins), bool(admins & enrolled_set)


# -- the access policy ---------------------------------------------------------------

# Narrower than these, a network is a site's; wider, it holds much of the Internet
# (an IPv4 /8 is a 10.0.0.0/8, an IPv6 /16 covers a continent's allocations).
_WIDE_PREFIX = {4: 8, 6: 16}
_CATCH_ALL_GROUPS = ("users", "domain users")
_FIRST_HUMAN_UID, _NOBODY_UID = 1000, 65534
_NAMES_SHOWN = 10


@dataclasses.dataclass(frozen=True)
class Directory:
    """Accounts and groups as NSS enumerates them (the local files; a directory
    service may enumerate none of its own)."""

    accounts: tuple[tuple[str, int, int], ...]  # name, uid, primary gid
    groups: dict[str, tuple[int, tuple[str, ...]]]  # name -> gid, listed members

    @classmethod
    def from_nss(cls) -> Directory:
        return cls(
            tuple((p.pw_name, p.pw_uid, p.pw_gid) for p in pwd.getpwall()),
            {g.gr_name: (g.gr_gid, tuple(g.gr_mem)) for g in grp.getgrall()},
        )

    def members(self, group: str) -> set[str] | None:
        """Who is in `group` (listed, or by primary group); None: no such group."""
        if group not in self.groups:
            return None
        gid, listed = self.groups[group]
        return set(listed) | {name for name, _, primary in self.accounts if primary == gid}

    def people(self) -> set[str]:
        return {name for name, uid, _ in self.accounts if _FIRST_HUMAN_UID <= uid != _NOBODY_UID}


def _names(names: Iterable[str]) -> str:
    ordered = sorted(names)
    more = len(ordered) - _NAMES_SHOWN
    return ", ".join(ordered[:_NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _have(names: set[str]) -> str:
    return "has" if len(names) == 1 else "have"


def wide_network(text: str) -> str | None:
    """Why exempting `text` spares (nearly) everyone, or None."""
    network = ipaddress.ip_network(text, strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = ipaddress.IPv6Address(int(network.network_address)).ipv4_mapped
        if mapped is not None:  # ::ffff:a.b.c.d/N is an IPv4 network (core.policy)
            network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    if network.prefixlen == 0:
        return f"{text} holds every IPv{network.version} address: no login over it is asked"
    if network.prefixlen < _WIDE_PREFIX[network.version]:
        return f"{text} is very wide (/{network.prefixlen}): it holds much of the Internet"
    return None


def check_policy(
    *,
    ssh_on: bool,
    required: bool,
    exempt_networks: Iterable[str],
    exempt_groups: Iterable[str],
    required_groups: Iterable[str],
    deadline: str,
    enrolled: Iterable[str],
    admins: Iterable[str],
    directory: Directory,
) -> list[str]:
    """What in the access policy exempts (nearly) everyone, matches nobody, or would
    refuse administrators: one line each, as the other checks."""
    problems = []
    for text in exempt_networks:
        why = wide_network(text)
        if why is not None:
            problems.append(f"policy: exempt_networks: {why}")
    people = directory.people()
    for group in exempt_groups:
        members = directory.members(group)
        if members is None:
            continue  # reported below with the required groups
        shared = members & people
        if group in _CATCH_ALL_GROUPS or (len(people) >= 2 and 2 * len(shared) > len(people)):
            problems.append(
                f"policy: exempt_groups: {group} holds most accounts ({len(shared)} of "
                f"{len(people)} with uid {_FIRST_HUMAN_UID} or more): none of them is asked "
                "for a code"
            )
    for field, groups in (("exempt_groups", exempt_groups), ("required_groups", required_groups)):
        for group in groups:
            if directory.members(group) is None:
                problems.append(
                    f"policy: {field}: no group {group} here: the rule matches nobody "
                    "(a directory group NSS cannot list is still matched at login)"
                )
    if deadline and not required:
        problems.append(
            f"policy: enrollment_deadline {deadline} does nothing while enrollment_policy is "
            "optional"
        )
    if not ssh_on:
        return problems
    have_secret, admin_set = set(enrolled), set(admins)
    for group in required_groups:
        members = directory.members(group) or set()
        stuck = members - have_secret
        stuck_admins = stuck & admin_set
        if stuck_admins:
            every = " (every administrator)" if not (admin_set - stuck_admins) else ""
            problems.append(
                f"policy: required_groups: {group}: administrator"
                f"{'' if len(stuck_admins) == 1 else 's'} {_names(stuck_admins)} "
                f"{_have(stuck_admins)} no secret{every}: their SSH logins are refused, from "
                "anywhere (otpgate renew-secret USER, then otpgate confirm USER CODE)"
            )
        elif stuck:
            problems.append(
                f"policy: required_groups: {group}: {_names(stuck)} {_have(stuck)} no secret: "
                "their SSH logins are refused (otpgate renew-secret USER)"
            )
    return problems


def sshd_effective_config(sshd: str, config_file: str | None) -> str:
    command = [sshd, "-T"]
    if config_file:
        command += ["-f", config_file]
    # -T needs host keys it can read; -C evaluates Match blocks for a plain connection.
    command += ["-C", "user=root,host=localhost,addr=127.0.0.1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise OSError(result.stderr.strip() or f"{sshd} -T failed")
    return result.stdout
