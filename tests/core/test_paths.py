"""The StrictModes-style chain rule and the no-symlink walk (core/paths.py).

Every test works under pytest's tmp_path (/tmp/pytest-of-root/...: / 0755 and /tmp
1777, both root's, then 0700 directories), so its own chain is a trusted one.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from otpgate.core.crypto import create_key_file, load_key_file
from otpgate.core.paths import check_dir_chain, check_trusted_path, parent_nofollow, prepare_dir
from otpgate.errors import ConfigError

OTHER_UID = 54321  # no such user needed: only the number is checked

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _dir(path: Path, mode: int) -> Path:
    path.mkdir()
    path.chmod(mode)  # mkdir's mode is cut by the umask
    return path


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def test_trusted_chain_accepted(tmp_path: Path) -> None:
    key = tmp_path / "etc" / "k"
    _dir(key.parent, 0o755)
    create_key_file(str(key))
    info = check_trusted_path(str(key), leaf_kind="file")
    assert stat.S_ISREG(info.st_mode)
    assert check_dir_chain(str(key.parent)) == []
    assert len(load_key_file(str(key))) == 32


@pytest.mark.parametrize(
    ("mode", "writers"),
    [(0o777, "group and others"), (0o1777, "group and others"), (0o757, "others")],
)
def test_world_writable_directory_of_the_file_refused(
    tmp_path: Path, mode: int, writers: str
) -> None:
    shared = _dir(tmp_path / "shared", mode)
    key = shared / "k"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load_key_file(str(key))
    assert str(info.value) == (
        f"key file {key}: {shared} is writable by {writers} (mode {mode:04o}); "
        "the directory holding it must not be writable by group or others, sticky or not"
    )


def test_world_writable_ancestor_refused(tmp_path: Path) -> None:
    open_dir = _dir(tmp_path / "open", 0o757)  # not sticky: anyone may rename "sub"
    sub = _dir(open_dir / "sub", 0o700)
    with pytest.raises(ConfigError) as info:
        check_trusted_path(str(sub / "k"), leaf_kind="file")
    assert str(info.value) == (
        f"{sub / 'k'}: {open_dir} is writable by others (mode 0757); every component of the "
        "path must be writable by its owner only (a sticky directory owned by root, like "
        "/tmp, only further up)"
    )


def test_sticky_root_ancestor_accepted(tmp_path: Path) -> None:
    sticky = _dir(tmp_path / "sticky", 0o1777)
    assert os.lstat(sticky).st_uid == 0 or os.geteuid() != 0
    private = _dir(sticky / "private", 0o700)
    key = private / "k"
    create_key_file(str(key))
    assert len(load_key_file(str(key))) == 32
    # A directory directly in it may be the state directory: its files are one further.
    prepare_dir(str(sticky / "state"), 0o700, exact=True)
    assert _mode(sticky / "state") == 0o700


@needs_root
def test_sticky_ancestor_not_owned_by_root_refused(tmp_path: Path) -> None:
    sticky = _dir(tmp_path / "sticky", 0o1777)
    os.chown(sticky, OTHER_UID, -1)
    private = _dir(sticky / "private", 0o700)
    with pytest.raises(ConfigError, match=f"{sticky} is owned by uid {OTHER_UID}"):
        check_trusted_path(str(private), leaf_kind="dir")


@pytest.mark.parametrize("where", ["ancestor", "holder"])
def test_group_writable_refused(tmp_path: Path, where: str) -> None:
    outer = _dir(tmp_path / "outer", 0o770 if where == "ancestor" else 0o755)
    inner = _dir(outer / "inner", 0o770 if where == "holder" else 0o700)
    bad = outer if where == "ancestor" else inner
    with pytest.raises(ConfigError, match=f": {bad} is writable by group \\(mode 0770\\)"):
        check_trusted_path(str(inner / "k"), leaf_kind="file")


@needs_root
@pytest.mark.parametrize("where", ["ancestor", "holder", "leaf"])
def test_owner_not_root_refused(tmp_path: Path, where: str) -> None:
    outer = _dir(tmp_path / "outer", 0o755)
    inner = _dir(outer / "inner", 0o700)
    key = inner / "k"
    create_key_file(str(key))
    bad = {"ancestor": outer, "holder": inner, "leaf": key}[where]
    os.chown(bad, OTHER_UID, -1)
    with pytest.raises(ConfigError) as info:
        check_trusted_path(str(key), leaf_kind="file", subject=f"key file {key}")
    assert str(info.value) == (
        f"key file {key}: {bad} is owned by uid {OTHER_UID}; every component of the path "
        "must be owned by root"
    )
    if where != "leaf":  # (the key's own owner has its own message, from load_key_file)
        with pytest.raises(ConfigError, match=f"{bad} is owned by uid {OTHER_UID}"):
            load_key_file(str(key))


def test_symlink_component_refused(tmp_path: Path) -> None:
    real = _dir(tmp_path / "real", 0o700)
    create_key_file(str(real / "k"))
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError) as info:
        load_key_file(str(link / "k"))
    assert str(info.value) == (
        f"key file {link / 'k'}: {link} is a symbolic link; no component of the path may be one"
    )
    for leaf_kind, path in (("file", link / "k"), ("dir", link)):
        with pytest.raises(ConfigError, match=f": {link} is a symbolic link"):
            check_trusted_path(str(path), leaf_kind=leaf_kind)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=f": {link} is a symbolic link"):
        prepare_dir(str(link / "state"), 0o700, exact=True)
    assert not (real / "state").exists()


def test_dotdot_through_a_symlink_is_walked_as_the_kernel_walks_it(tmp_path: Path) -> None:
    # "link/.." is the parent of link's target, not tmp_path: it must not be folded away.
    elsewhere = _dir(tmp_path / "elsewhere", 0o700)
    _dir(elsewhere / "sub", 0o700)
    (tmp_path / "link").symlink_to(elsewhere / "sub")
    with pytest.raises(ConfigError, match=f": {tmp_path / 'link'} is a symbolic link"):
        check_trusted_path(f"{tmp_path}/link/../k", leaf_kind="file")


def test_relative_path_checked_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = _dir(tmp_path / "shared", 0o777)
    monkeypatch.chdir(shared)
    with pytest.raises(ConfigError, match=f"^k: {shared} is writable by group and others"):
        check_trusted_path("k", leaf_kind="file")


def test_0755_state_dir_refused(tmp_path: Path) -> None:
    state = _dir(tmp_path / "state", 0o755)
    with pytest.raises(ConfigError) as info:
        prepare_dir(str(state), 0o700, exact=True, subject=f"state directory {state}")
    assert str(info.value) == (
        f"state directory {state} has mode 0755; it must be exactly 0700 (chmod 700 {state})"
    )
    assert _mode(state) == 0o755  # reported, not changed


@pytest.mark.parametrize("mode", [0o750, 0o701, 0o777, 0o1777, 0o2700])
def test_state_dir_with_any_group_or_other_bit_refused(tmp_path: Path, mode: int) -> None:
    state = _dir(tmp_path / "state", mode)
    with pytest.raises(ConfigError, match=f"has mode {mode:04o}; .* \\(chmod 700 {state}\\)$"):
        prepare_dir(str(state), 0o700, exact=True)


def test_missing_state_dir_created_0700(tmp_path: Path, umask_zero: None) -> None:
    state = tmp_path / "state"
    prepare_dir(str(state), 0o700, exact=True)
    assert state.is_dir() and _mode(state) == 0o700
    prepare_dir(str(state), 0o700, exact=True)  # and accepted as it is next time


def test_missing_parent_refused_unless_asked_for(tmp_path: Path, umask_zero: None) -> None:
    target = tmp_path / "a" / "b" / "state"
    with pytest.raises(ConfigError) as info:
        prepare_dir(str(target), 0o700, exact=True)
    assert str(info.value) == f"cannot create {target}: {tmp_path / 'a'} does not exist"
    assert not (tmp_path / "a").exists()
    prepare_dir(str(target), 0o700, parents=True)
    assert [_mode(p) for p in (tmp_path / "a", target.parent, target)] == [0o700] * 3


def test_runtime_dir_may_be_0755_but_not_writable(tmp_path: Path, umask_zero: None) -> None:
    run = tmp_path / "run"
    prepare_dir(str(run), 0o755)
    assert _mode(run) == 0o755
    run.chmod(0o775)
    with pytest.raises(ConfigError, match=f"{run} is writable by group \\(mode 0775\\)"):
        prepare_dir(str(run), 0o755)
    run.chmod(0o1777)  # sticky does not help the directory holding the sockets
    with pytest.raises(ConfigError, match=f"{run} is writable by group and others"):
        prepare_dir(str(run), 0o755)


def test_nothing_created_in_an_untrusted_place(tmp_path: Path) -> None:
    shared = _dir(tmp_path / "shared", 0o1777)
    key = shared / "k"
    # As otpgated makes a key: its directory first (chain checked before any mkdir)...
    message = re.escape(f"key file {key}: {shared} is writable by group and others (mode 1777)")
    with pytest.raises(ConfigError, match=message):
        prepare_dir(str(shared), 0o700, parents=True, subject=f"key file {key}")
    with pytest.raises(ConfigError, match=message):  # ...and the key file itself
        create_key_file(str(key))
    unsafe = _dir(tmp_path / "open", 0o757)  # not sticky: nothing is created below it
    with pytest.raises(ConfigError, match=f"{unsafe} is writable by others"):
        prepare_dir(str(unsafe / "d" / "e"), 0o700, parents=True)
    assert list(shared.iterdir()) == [] and list(unsafe.iterdir()) == []
    # Below a sticky root directory, new private directories are fine (sticky further up).
    assert check_dir_chain(str(shared / "d" / "e")) == [str(shared / "d"), str(shared / "d/e")]


def test_not_a_directory_on_the_way_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(ConfigError, match=f": {plain} is not a directory$"):
        check_dir_chain(str(plain / "sub"))


# -- parent_nofollow -------------------------------------------------------------------


def test_parent_nofollow_reaches_the_real_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = _dir(tmp_path / "a", 0o755) / "b"
    sub.mkdir()
    with parent_nofollow(f"{tmp_path}/a/./b/x.png") as (fd, name):
        assert name == "x.png" and os.fstat(fd).st_ino == sub.stat().st_ino
    monkeypatch.chdir(tmp_path / "a")
    with parent_nofollow("b/../b/y.png") as (fd, name):
        assert name == "y.png" and os.fstat(fd).st_ino == sub.stat().st_ino
    with parent_nofollow("z.png") as (fd, name):
        assert name == "z.png" and os.fstat(fd).st_ino == (tmp_path / "a").stat().st_ino


def test_parent_nofollow_refuses_a_symlink_component(tmp_path: Path) -> None:
    target = _dir(tmp_path / "target", 0o700)
    link = tmp_path / "owned-by-someone" / "x"
    link.parent.mkdir()
    link.symlink_to(target)
    with pytest.raises(OSError) as info, parent_nofollow(f"{link}/qr.png"):
        pass
    assert (info.value.errno, info.value.filename) == (errno.ELOOP, str(link))
    assert info.value.strerror == "is a symbolic link"
    assert list(target.iterdir()) == []


def test_parent_nofollow_names_the_failing_component(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(NotADirectoryError) as not_dir, parent_nofollow(f"{plain}/x"):
        pass
    assert not_dir.value.filename == str(plain)
    with pytest.raises(FileNotFoundError) as missing, parent_nofollow(f"{tmp_path}/none/x"):
        pass
    assert missing.value.filename == str(tmp_path / "none")
    with pytest.raises(IsADirectoryError), parent_nofollow(f"{tmp_path}/"):
        pass
