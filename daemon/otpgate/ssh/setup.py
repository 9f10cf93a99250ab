"""`otpgate setup ssh`: wire sshd to otpgate safely, and undo it.

Every file it changes is backed up first and written atomically; the result is
checked with `sshd -t` and `otpgate doctor`'s checks before sshd is reloaded,
and any failure restores the backups. It refuses a wiring that would lock every
administrator out, unless forced.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable
from importlib import resources

from otpgate.core.paths import GATE_DIR_NAME, write_atomic
from otpgate.errors import FailedPrecondition, InvalidArgument, OtpgateError
from otpgate.ssh import doctor

FLOWS = ("password", "publickey", "single-prompt")
# when-needed asks the daemon before prompting (one hook call more per login); always
# prompts every account, which suits the "required" enrollment policy.
PROMPTS = ("when-needed", "always")
HOOK_CANDIDATES = ("/usr/lib/otpgate/otpgate-pam-hook", "/usr/local/lib/otpgate/otpgate-pam-hook")
_TEMPLATE_HOOK = "/usr/local/lib/otpgate/otpgate-pam-hook"
_TEMPLATE_GATE_DIR = "/run/otpgate/gate"
_COMMON_AUTH = re.compile(r"^@include\s+common-auth\s*$", re.MULTILINE)
_OUR_INCLUDE = re.compile(r"^@include\s+otpgate-ssh-[a-z-]+\s*$", re.MULTILINE)
DROPIN_NAME = "otpgate.conf"
_MANIFEST = "manifest.json"


class SetupError(OtpgateError):
    """Setup refused or failed; the host's files are as they were."""


@dataclasses.dataclass(frozen=True)
class Paths:
    pam_dir: str = "/etc/pam.d"
    sshd_config: str = "/etc/ssh/sshd_config"
    sshd_config_dir: str = "/etc/ssh/sshd_config.d"
    sshd: str = "/usr/sbin/sshd"
    backup_dir: str = "/var/lib/otpgate/setup-backup"

    @property
    def pam_service(self) -> str:
        return os.path.basename(self.sshd)

    @property
    def pam_file(self) -> str:
        return os.path.join(self.pam_dir, self.pam_service)

    def snippet_file(self, name: str) -> str:
        return os.path.join(self.pam_dir, name)

    @property
    def dropin(self) -> str:
        return os.path.join(self.sshd_config_dir, DROPIN_NAME)


def snippet(name: str) -> str:
    return resources.files("otpgate.ssh").joinpath("snippets", name).read_text()


def pam_snippet_name(flow: str, prompt: str = "when-needed") -> str:
    if flow not in FLOWS:
        raise InvalidArgument("--flow", f"must be one of {', '.join(FLOWS)}")
    if prompt not in PROMPTS:
        raise InvalidArgument("--prompt", f"must be one of {', '.join(PROMPTS)}")
    if prompt == "always":
        if flow == "single-prompt":
            raise InvalidArgument("--prompt", "always is for the password and publickey flows")
        return f"otpgate-ssh-{flow}-always"
    return f"otpgate-ssh-{flow}"


def render_pam(name: str, hook: str, hook_options: str = "") -> str:
    text = snippet(name)
    replacement = hook + (" {mode} " + hook_options if hook_options else " {mode}")
    text = re.sub(
        re.escape(_TEMPLATE_HOOK) + r" (\S+)",
        lambda m: replacement.format(mode=m.group(1)),
        text,
    )
    # The daemon keeps its gate files beside its sockets (runtime_dir/gate).
    sockets = [o.split("=", 1)[1] for o in hook_options.split() if o.startswith("socket=")]
    if sockets:
        text = text.replace(
            _TEMPLATE_GATE_DIR, os.path.join(os.path.dirname(sockets[-1]), GATE_DIR_NAME)
        )
    return text


def check_hook_line(name: str, hook: str, hook_options: str) -> None:
    """Refuse, before anything is written, a hook that is not there or options it
    would refuse at every login (it denies on a PAM line it does not accept)."""
    module_path = os.path.join(os.path.dirname(hook), "otpgate_pam_hook.py")
    if os.path.basename(hook) == "otpgate_pam_hook.py":
        module_path = hook
    if not os.path.isfile(hook) or not os.path.isfile(module_path):
        raise InvalidArgument(
            "--hook", f"no otpgate hook at {hook} (with otpgate_pam_hook.py beside it)"
        )
    spec = importlib.util.spec_from_file_location("otpgate_pam_hook_checked", module_path)
    if spec is None or spec.loader is None:
        raise InvalidArgument("--hook", f"cannot load {module_path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        validate = module.validate_options
    except Exception as exc:  # an older or broken hook: do not wire it in
        raise InvalidArgument(
            "--hook", f"{module_path} is not a hook this otpgate can check ({type(exc).__name__})"
        ) from None
    modes = re.findall(re.escape(_TEMPLATE_HOOK) + r" (\S+)", snippet(name))
    for mode in modes:
        try:
            validate([mode, *hook_options.split()])
        except module.UsageError as exc:
            raise InvalidArgument(
                "--hook-options", f"the hook ({mode}) would refuse: {exc}"
            ) from None


def default_hook() -> str:
    return next((p for p in HOOK_CANDIDATES if os.path.exists(p)), HOOK_CANDIDATES[0])


@dataclasses.dataclass(frozen=True)
class Change:
    path: str
    new: str | None  # None: remove the file


@dataclasses.dataclass(frozen=True)
class FileChange:
    """One file that setup or undo writes or removes, with its text before and after
    (for `--dry-run`'s diff and `--json`)."""

    action: str  # "write", "restore" or "remove"
    path: str
    old: str | None  # the file as it is now; None: there is none
    new: str | None  # None: removed


class Report(list[str]):
    """What setup or undo did (or would do): one line each, as printed (still a list
    of lines, as it was before it carried data), and the same as data: `changes` in
    the order applied, `reloaded` what reloading sshd said (None in a dry run)."""

    def __init__(
        self,
        lines: Iterable[str],
        changes: list[FileChange],
        *,
        dry_run: bool,
        reloaded: str | None = None,
    ) -> None:
        super().__init__(lines)
        self.changes = changes
        self.dry_run = dry_run
        self.reloaded = reloaded


def _current(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def plan(
    flow: str, paths: Paths, hook: str, hook_options: str = "", prompt: str = "when-needed"
) -> list[Change]:
    name = pam_snippet_name(flow, prompt)
    if not os.path.isabs(hook):
        raise InvalidArgument("--hook", "must be an absolute path")
    try:
        with open(paths.pam_file, encoding="utf-8") as f:
            service = f.read()
    except OSError as exc:
        raise SetupError(f"cannot read {paths.pam_file}: {exc.strerror}") from None
    include = f"@include {name}"
    if _OUR_INCLUDE.search(service):
        new_service = _OUR_INCLUDE.sub(include, service)
    elif _COMMON_AUTH.search(service):
        new_service = _COMMON_AUTH.sub(
            f"# @include common-auth   (replaced by: otpgate setup ssh; undo: --undo)\n{include}",
            service,
            count=1,
        )
    else:
        raise SetupError(
            f"{paths.pam_file} has no '@include common-auth' line to replace: wire it by hand "
            "(README, 'SSH wiring')"
        )
    _check_dropin_is_read(paths)
    check_hook_line(name, hook, hook_options)
    return [
        Change(paths.snippet_file(name), render_pam(name, hook, hook_options)),
        Change(paths.pam_file, new_service),
        Change(paths.dropin, snippet(f"otpgate-{flow}.conf")),
    ]


def _check_dropin_is_read(paths: Paths) -> None:
    try:
        with open(paths.sshd_config, encoding="utf-8") as f:
            main = f.read()
    except OSError as exc:
        raise SetupError(f"cannot read {paths.sshd_config}: {exc.strerror}") from None
    pattern = re.compile(
        r"^\s*Include\s+" + re.escape(paths.sshd_config_dir) + r"/\*\.conf\s*$",
        re.MULTILINE | re.IGNORECASE,
    )
    if not pattern.search(main):
        raise SetupError(
            f"{paths.sshd_config} does not Include {paths.sshd_config_dir}/*.conf: the drop-in "
            "would be ignored"
        )


class Transaction:
    """Applies changes with backups; `rollback()` puts every file back as it was."""

    def __init__(self, backup_dir: str) -> None:
        self.backup_dir = backup_dir
        self.saved: dict[str, str | None] = {}  # path -> original text, None: did not exist

    def apply(self, change: Change) -> None:
        if change.path not in self.saved:
            try:
                with open(change.path, encoding="utf-8") as f:
                    self.saved[change.path] = f.read()
            except FileNotFoundError:
                self.saved[change.path] = None
        if change.new is None:
            if os.path.exists(change.path):
                os.unlink(change.path)
        else:
            write_atomic(change.path, change.new)

    def rollback(self) -> None:
        for path, text in self.saved.items():
            if text is None:
                if os.path.exists(path):
                    os.unlink(path)
            else:
                write_atomic(path, text)

    def keep_backup(self) -> None:
        """Record the originals so that --undo can restore them later."""
        os.makedirs(self.backup_dir, mode=0o700, exist_ok=True)
        manifest = os.path.join(self.backup_dir, _MANIFEST)
        previous = load_backup(self.backup_dir)
        # The first setup's originals are the ones to return to.
        merged = {**self.saved, **previous}
        write_atomic(manifest, json.dumps(merged, indent=1), mode=0o600)


def load_backup(backup_dir: str) -> dict[str, str | None]:
    try:
        with open(os.path.join(backup_dir, _MANIFEST), encoding="utf-8") as f:
            data: dict[str, str | None] = json.load(f)
            return data
    except FileNotFoundError:
        return {}


def sshd_test(paths: Paths) -> None:
    result = subprocess.run(
        [paths.sshd, "-t", "-f", paths.sshd_config], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise SetupError(f"sshd -t refused the configuration: {result.stderr.strip()}")


def reload_sshd(pidfile: str = "/run/sshd.pid") -> str:
    """Ask the running sshd to reread its configuration; established sessions stay."""
    if shutil.which("systemctl") and os.path.isdir("/run/systemd/system"):
        for unit in ("ssh.service", "sshd.service"):
            probe = subprocess.run(
                ["systemctl", "is-active", "--quiet", unit], capture_output=True, timeout=30
            )
            if probe.returncode == 0:
                subprocess.run(["systemctl", "reload", unit], check=True, timeout=60)
                return f"reloaded {unit}"
    try:
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return "sshd is not running: nothing to reload"
    os.kill(pid, signal.SIGHUP)
    return f"sent SIGHUP to sshd ({pid})"


Checks = Callable[[Paths, str], list[str]]


def doctor_checks(paths: Paths, flow: str) -> list[str]:
    config = doctor.parse_sshd_t(doctor.sshd_effective_config(paths.sshd, paths.sshd_config))
    stack = doctor.read_pam_auth(paths.pam_service, paths.pam_dir)
    return doctor.check_sshd(config, doctor.detect_flow(stack)) + doctor.check_pam(
        paths.pam_service, stack, doctor.root_owned_chain
    )


def setup(
    flow: str,
    paths: Paths,
    *,
    hook: str,
    hook_options: str = "",
    prompt: str = "when-needed",
    lockout_risk: str | None,
    force: bool = False,
    dry_run: bool = False,
    reload: Callable[[], str] = reload_sshd,
    checks: Checks = doctor_checks,
) -> Report:
    """Wire `flow`; returns what it did (or would do)."""
    changes = plan(flow, paths, hook, hook_options, prompt)
    if lockout_risk and not force:
        raise FailedPrecondition(f"{lockout_risk}; fix that first, or pass --force")
    files = [FileChange("write", c.path, _current(c.path), c.new) for c in changes]
    lines = [f"write {c.path}" for c in changes]
    if dry_run:
        return Report(["dry run, nothing changed:", *lines], files, dry_run=True)
    transaction = Transaction(paths.backup_dir)
    try:
        for change in changes:
            transaction.apply(change)
        sshd_test(paths)
        problems = checks(paths, flow)
        if problems:
            raise SetupError("the new wiring has problems: " + "; ".join(problems))
        transaction.keep_backup()
        reloaded = reload()
    except BaseException:
        transaction.rollback()
        raise
    return Report([*lines, reloaded], files, dry_run=False, reloaded=reloaded)


def undo(paths: Paths, *, dry_run: bool = False, reload: Callable[[], str] = reload_sshd) -> Report:
    saved = load_backup(paths.backup_dir)
    if not saved:
        raise SetupError(f"nothing to undo: no backup in {paths.backup_dir}")
    files = [
        FileChange("restore" if text is not None else "remove", path, _current(path), text)
        for path, text in saved.items()
    ]
    lines = [f"{f.action} {f.path}" for f in files]
    if dry_run:
        return Report(["dry run, nothing changed:", *lines], files, dry_run=True)
    transaction = Transaction(paths.backup_dir)
    try:
        for path, text in saved.items():
            transaction.apply(Change(path, text))
        sshd_test(paths)
        reloaded = reload()
    except BaseException:
        transaction.rollback()
        raise
    os.unlink(os.path.join(paths.backup_dir, _MANIFEST))
    return Report([*lines, reloaded], files, dry_run=False, reloaded=reloaded)
