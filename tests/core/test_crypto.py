"""Sealing secrets, and the checks on key files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from otpgate.core.crypto import (
    Keyring,
    account_binding,
    create_key_file,
    key_id_of,
    load_key_file,
)
from otpgate.errors import ConfigError, KeyMismatch


def test_seal_open_round_trip_and_fresh_nonces() -> None:
    ring = Keyring(os.urandom(32))
    a = ring.seal(b"SECRET", account_binding("alice", 1000))
    b = ring.seal(b"SECRET", account_binding("alice", 1000))
    assert a.nonce != b.nonce and a.ciphertext != b.ciphertext
    assert b"SECRET" not in a.ciphertext
    assert ring.open(a, account_binding("alice", 1000)) == b"SECRET"


@pytest.mark.parametrize(("name", "uid"), [("bob", 1000), ("alice", 1001)])
def test_ciphertext_bound_to_account(name: str, uid: int) -> None:
    ring = Keyring(os.urandom(32))
    sealed = ring.seal(b"SECRET", account_binding("alice", 1000))
    with pytest.raises(KeyMismatch):
        ring.open(sealed, account_binding(name, uid))


def test_wrong_key_and_rotation() -> None:
    old, new = os.urandom(32), os.urandom(32)
    sealed = Keyring(old).seal(b"S", b"ad")
    with pytest.raises(KeyMismatch, match="no loaded key"):
        Keyring(new).open(sealed, b"ad")
    rotated = Keyring(new, (old,))
    assert rotated.open(sealed, b"ad") == b"S"
    assert rotated.seal(b"S", b"ad").key_id == key_id_of(new)


def test_tampered_ciphertext_refused() -> None:
    ring = Keyring(os.urandom(32))
    sealed = ring.seal(b"S", b"ad")
    bad = type(sealed)(
        sealed.key_id, sealed.nonce, bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    )
    with pytest.raises(KeyMismatch):
        ring.open(bad, b"ad")


def test_created_key_file_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "k"
    key = create_key_file(str(path))
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_key_file(str(path)) == key
    with pytest.raises(FileExistsError):
        create_key_file(str(path))


def test_raw_32_byte_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"k" * 32)
    path.chmod(0o400)
    assert load_key_file(str(path)) == b"k" * 32


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_key_file_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k"
    create_key_file(str(path))
    path.chmod(mode)
    with pytest.raises(ConfigError, match=f"mode {mode:04o}"):
        load_key_file(str(path))


def test_key_file_symlink_directory_and_size_refused(tmp_path: Path) -> None:
    target = tmp_path / "k"
    create_key_file(str(target))
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="cannot open"):
        load_key_file(str(link))
    with pytest.raises(ConfigError, match="not a regular file"):
        load_key_file(str(tmp_path))
    short = tmp_path / "short"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="31 bytes"):
        load_key_file(str(short))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"!" * 44)
    garbage.chmod(0o600)
    with pytest.raises(ConfigError, match="base64"):
        load_key_file(str(garbage))


def test_key_file_of_another_owner_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    create_key_file(str(path))
    if os.geteuid() == 0:
        os.chown(path, 4242, 4242)
        with pytest.raises(ConfigError, match="owned by uid 4242"):
            load_key_file(str(path))
    else:
        with pytest.raises(ConfigError, match="owned by"):
            load_key_file(str(path), allowed_owners=(0,))


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_key_file(str(tmp_path / "none"))
