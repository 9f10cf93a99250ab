"""Trusted paths: a StrictModes-style check of every directory on the way to a file,
and opening a file without following a symlink anywhere on its path.

A key file's own mode means nothing if someone else can write to a directory above
it: they can rename the next component away and put their own in its place (a key
they chose, or a link to one). So, as OpenSSH's StrictModes does for
authorized_keys, every component from / down to the file must be owned by root or
by the daemon's user and be writable by nobody else. One exception: a directory
owned by root with the sticky bit (/tmp, 1777) may be an ancestor further up, because
there nobody can rename or remove an entry they do not own; it may never be the
directory holding the file itself, where anyone may take the file's name first.

Components are examined with lstat, never followed: a symlink anywhere is refused,
since whoever owns the link, not the directory it points into, decides where it
leads. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Collection, Iterator
from typing import Literal

from otpgate.errors import ConfigError

ROOT_UID = 0
# The gate files otpgated keeps for the PAM stacks, in runtime_dir/gate beside its
# sockets (core.gate_files makes them; ssh.setup and ssh.doctor name them).
GATE_DIR_NAME = "gate"
ASK_FILE = "ask"
NETWORKS_FILE = "networks.conf"


def _owners(owner_uids: Collection[int] | None) -> tuple[int, ...]:
    return tuple(owner_uids) if owner_uids is not None else (ROOT_UID, os.geteuid())


def _owners_text(owners: tuple[int, ...]) -> str:
    names = dict.fromkeys("root" if uid == ROOT_UID else f"uid {uid}" for uid in owners)
    return " or ".join(names)


def _prefixes(path: str) -> list[str]:
    """The root, then each longer prefix of `path` down to `path` itself, as the kernel walks it.

    Not normalised: "a/../b" goes through "a", so "a" is examined (and refused when it
    is a symlink, whose ".." would be somewhere else entirely).
    """
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)  # getcwd() is already free of links
    chain = ["/"]
    for name in path.split("/"):
        if name in ("", "."):
            continue
        chain.append(os.path.join(chain[-1], name))
    return chain


def _writers(mode: int) -> str:
    who = [name for bit, name in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if mode & bit]
    return " and ".join(who)


def _check_component(
    component: str,
    info: os.stat_result,
    *,
    subject: str,
    owners: tuple[int, ...],
    kind: Literal["file", "dir"],
    holds_subject: bool,
    exact_mode: int | None,
) -> None:
    """One component of `subject`'s path; `holds_subject` for the directory whose
    entries are the subject (the file's directory, or the directory itself)."""
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(
            f"{subject}: {component} is a symbolic link; no component of the path may be one"
        )
    if kind == "dir" and not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{subject}: {component} is not a directory")
    if kind == "file" and not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{subject}: {component} is not a regular file")
    if info.st_uid not in owners:
        raise ConfigError(
            f"{subject}: {component} is owned by uid {info.st_uid}; every component of "
            f"the path must be owned by {_owners_text(owners)}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if exact_mode is not None and mode != exact_mode:
        # Before the writable rule, so that 0777 gets the same remedy as 0755.
        raise ConfigError(
            f"{subject} has mode {mode:04o}; it must be exactly {exact_mode:04o} "
            f"(chmod {exact_mode:o} {component})"
        )
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        return
    sticky_root = bool(mode & stat.S_ISVTX) and info.st_uid == ROOT_UID
    if kind == "dir" and sticky_root and not holds_subject:
        return  # like /tmp further up: nobody can rename what is below it
    if kind == "dir" and holds_subject:
        rule = "the directory holding it must not be writable by group or others, sticky or not"
    else:
        rule = (
            "every component of the path must be writable by its owner only "
            "(a sticky directory owned by root, like /tmp, only further up)"
        )
    raise ConfigError(
        f"{subject}: {component} is writable by {_writers(mode)} (mode {mode:04o}); {rule}"
    )


def _lstat(component: str, subject: str) -> os.stat_result | None:
    try:
        return os.lstat(component)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a name too long, an unreadable directory...
        raise ConfigError(f"{subject}: cannot examine {component}: {exc.strerror}") from None


def check_trusted_path(
    path: str,
    *,
    owner_uids: Collection[int] | None = None,
    leaf_kind: Literal["file", "dir"],
    subject: str | None = None,
    exact_mode: int | None = None,
) -> os.stat_result:
    """Check that `path` and every directory above it exist and are trusted; its lstat.

    Trusted: not a symlink, owned by one of `owner_uids` (default: root and this
    process's effective user), not writable by group or others. A sticky directory
    owned by root is allowed only above the directory that holds `path` (for a
    `leaf_kind` "dir", `path` itself is that directory). `exact_mode`: the leaf's
    permission bits must be exactly these; otherwise the caller checks the leaf's
    own mode (a key file's 0600) as it needs. `subject` names `path` in messages
    ("key file /etc/otpgate/otpgate.key"; default: the path).
    """
    owners = _owners(owner_uids)
    chain = _prefixes(path)
    subject = subject or path
    # The directory whose entries include the subject: no sticky exception there.
    holder = len(chain) - 2 if leaf_kind == "file" else len(chain) - 1
    info: os.stat_result | None = None
    for index, component in enumerate(chain):
        info = _lstat(component, subject)
        if info is None:
            raise ConfigError(f"{subject}: {component} does not exist")
        leaf = index == len(chain) - 1
        _check_component(
            component,
            info,
            subject=subject,
            owners=owners,
            kind=leaf_kind if leaf else "dir",
            holds_subject=index >= holder,
            exact_mode=exact_mode if leaf else None,
        )
    assert info is not None  # the chain has at least "/"
    return info


def check_dir_chain(
    directory: str,
    *,
    owner_uids: Collection[int] | None = None,
    subject: str | None = None,
    exact_mode: int | None = None,
) -> list[str]:
    """Check the chain of `directory`, which is to hold a private file and may not
    exist yet; the missing components, outermost first ([] when it exists).

    What exists is checked as check_trusted_path does, `directory` itself as the
    holding directory (never group or other writable, sticky or not; exactly
    `exact_mode` when given). Nothing is created: call this before creating
    anything, so that nothing is left behind in an untrusted place. `subject`
    names what is checked in messages (default: the directory).
    """
    owners = _owners(owner_uids)
    chain = _prefixes(directory)
    subject = subject or directory
    for index, component in enumerate(chain):
        info = _lstat(component, subject)
        if info is None:
            return chain[index:]
        leaf = index == len(chain) - 1
        _check_component(
            component,
            info,
            subject=subject,
            owners=owners,
            kind="dir",
            holds_subject=leaf,
            exact_mode=exact_mode if leaf else None,
        )
    return []


def prepare_dir(
    path: str,
    mode: int,
    *,
    exact: bool = False,
    parents: bool = False,
    owner_uids: Collection[int] | None = None,
    subject: str | None = None,
) -> None:
    """Make sure `path` is a trusted directory, creating it (mode `mode`) when missing.

    The chain is checked before anything is created. With `parents`, missing
    directories above it are created with `mode` too; without, a missing parent is
    an error. With `exact`, the directory must have exactly `mode` (the state
    directory: 0700, nothing for group or others, not even read); otherwise it
    need only pass the chain rule (not writable by group or others). `subject`
    names `path` in messages ("state directory /var/lib/otpgate"; default: the path).
    """
    subject = subject or path
    exact_mode = mode if exact else None
    missing = check_dir_chain(path, owner_uids=owner_uids, subject=subject, exact_mode=exact_mode)
    if len(missing) > 1 and not parents:
        raise ConfigError(f"cannot create {subject}: {missing[0]} does not exist")
    for component in missing:
        try:
            os.mkdir(component, mode)
        except FileExistsError:
            continue  # made meanwhile: the check below judges it
        except OSError as exc:
            raise ConfigError(f"cannot create {subject}: {component}: {exc.strerror}") from None
        os.chmod(component, mode)  # mkdir's mode is cut by the umask
    check_trusted_path(
        path, owner_uids=owner_uids, leaf_kind="dir", subject=subject, exact_mode=exact_mode
    )


# -- opening without following links ---------------------------------------------------

# O_PATH: a directory we may search but not read is still a step on the way.
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def parent_nofollow(path: str) -> Iterator[tuple[int, str]]:
    """Reach the directory holding `path` without following a symlink: (its fd, the
    last name); the fd is closed on exit.

    Each directory is opened with O_NOFOLLOW relative to the one before, from / or
    the working directory, so what is reached is what the components name now, not
    where a link planted by a directory's owner points. Raises OSError whose
    filename is the component at fault: ELOOP with strerror "is a symbolic link"
    for a link, the failing open's error otherwise (ENOENT, ENOTDIR, EACCES...).
    The last name is not looked up: open or stat it with dir_fd and O_NOFOLLOW.
    """
    names = path.split("/")
    last = names.pop()
    if last in ("", ".", ".."):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    absolute = path.startswith("/")
    fd = os.open("/" if absolute else ".", _DIR_FLAGS)
    try:
        shown = "/" if absolute else ""
        for name in names:
            if name in ("", "."):
                continue
            shown = os.path.join(shown, name)
            try:
                next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except NotADirectoryError:
                # O_DIRECTORY|O_NOFOLLOW says ENOTDIR for a link too: tell them apart.
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    raise OSError(errno.ELOOP, "is a symbolic link", shown) from None
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), shown) from None
            except OSError as exc:
                raise type(exc)(exc.errno, exc.strerror, shown) from None
            os.close(fd)
            fd = next_fd
        yield fd, last
    finally:
        os.close(fd)


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Replace `path` with `text` in one rename, so a reader sees the old file or the
    new one, never part of either; the new file gets `mode` before it is renamed
    into place. A symlink at `path` is replaced, never followed."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".otpgate-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
