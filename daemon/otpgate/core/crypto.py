"""Secret sealing (AES-256-GCM) and key files.

Each sealed secret carries the id of the key that sealed it, so keys can rotate;
the associated data binds the ciphertext to one account (name and uid), so a row
copied to another account does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from otpgate.core.paths import check_dir_chain
from otpgate.errors import ConfigError, KeyMismatch

KEY_BYTES = 32
NONCE_BYTES = 12
# Raw 32 bytes, or base64 text of them (44 characters) with an optional newline.
_KEY_FILE_SIZES = (KEY_BYTES, 44, 45)


@dataclasses.dataclass(frozen=True)
class Sealed:
    key_id: str
    nonce: bytes
    ciphertext: bytes


def key_id_of(key: bytes) -> str:
    """A public fingerprint of a key: names it without revealing it."""
    return hashlib.sha256(b"otpgate key id\0" + key).hexdigest()[:16]


def account_binding(username: str, uid: int) -> bytes:
    return f"otpgate/v1 secret\0{username}\0{uid}".encode()


class Keyring:
    """The keys the daemon holds: one seals, all of them open."""

    def __init__(self, primary: bytes, older: tuple[bytes, ...] = ()) -> None:
        for key in (primary, *older):
            if len(key) != KEY_BYTES:
                raise ConfigError(f"an encryption key must be {KEY_BYTES} bytes")
        self.primary_id = key_id_of(primary)
        self._ciphers = {key_id_of(k): AESGCM(k) for k in (primary, *older)}

    def with_older(self, key: bytes) -> Keyring:
        """This keyring that also opens (never seals) what `key` sealed."""
        if len(key) != KEY_BYTES:
            raise ConfigError(f"an encryption key must be {KEY_BYTES} bytes")
        if key_id_of(key) == self.primary_id:
            raise ConfigError("the old key is the same as the key: nothing to rotate")
        ring = Keyring.__new__(Keyring)
        ring.primary_id = self.primary_id
        ring._ciphers = {**self._ciphers, key_id_of(key): AESGCM(key)}
        return ring

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._ciphers)

    def seal(self, plaintext: bytes, associated: bytes) -> Sealed:
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._ciphers[self.primary_id].encrypt(nonce, plaintext, associated)
        return Sealed(self.primary_id, nonce, ciphertext)

    def open(self, sealed: Sealed, associated: bytes) -> bytes:
        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise KeyMismatch(f"no loaded key has id {sealed.key_id}")
        try:
            return cipher.decrypt(sealed.nonce, sealed.ciphertext, associated)
        except InvalidTag:
            raise KeyMismatch(
                f"data sealed with key id {sealed.key_id} does not authenticate "
                "(wrong key, or the row was tampered with or moved)"
            ) from None


def load_key_file(path: str, *, allowed_owners: tuple[int, ...] | None = None) -> bytes:
    """Read a key after checking that nobody but its owner could have read or swapped it.

    The file must be a regular file (symlinks refused), owned by root or by this
    process's user, with no group or other permission bits, and of a key's size;
    every directory above it must be trusted too (core/paths.py: owned by those
    owners, no symlink, nobody else may write to it).
    """
    owners = allowed_owners if allowed_owners is not None else (0, os.geteuid())
    # The directories first: in a directory someone else can write to, the file
    # could be theirs by now, or be replaced by theirs before the next start.
    if check_dir_chain(_directory_of(path), owner_uids=owners, subject=f"key file {path}"):
        raise ConfigError(f"key file {path} does not exist")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot open key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"key file {path} is not a regular file")
        if info.st_uid not in owners:
            raise ConfigError(
                f"key file {path} is owned by uid {info.st_uid}; it must be owned by "
                f"root or uid {os.geteuid()}"
            )
        if info.st_mode & 0o077:
            raise ConfigError(
                f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}; "
                "it must be 0600 or tighter"
            )
        if info.st_size not in _KEY_FILE_SIZES:
            raise ConfigError(
                f"key file {path} is {info.st_size} bytes; expected {KEY_BYTES} raw bytes "
                "or their base64 text"
            )
        data = os.read(fd, 64)
    finally:
        os.close(fd)
    return _decode_key(path, data)


def _decode_key(path: str, data: bytes) -> bytes:
    if len(data) == KEY_BYTES:
        return data
    try:
        key = base64.b64decode(data.rstrip(b"\n"), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"key file {path} is not base64 text of a key") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"key file {path} does not hold a {KEY_BYTES}-byte key")
    return key


def _directory_of(path: str) -> str:
    # Not abspath: it would fold "link/.." away, and the kernel does not.
    return os.path.dirname(path) or "."


def create_key_file(path: str) -> bytes:
    """Write a new random key as base64 text, mode 0600; never overwrite a file.

    Its directory must exist and be trusted (core/paths.py) before anything is written.
    """
    missing = check_dir_chain(_directory_of(path), subject=f"key file {path}")
    if missing:
        raise ConfigError(f"cannot create key file {path}: {missing[0]} does not exist")
    key = os.urandom(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(_directory_of(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key
