"""Where the daemon's key comes from: a systemd credential, or a key file."""

from __future__ import annotations

import logging
import os

from otpgate.core.crypto import Keyring, create_key_file, key_id_of, load_key_file
from otpgate.core.paths import check_dir_chain, prepare_dir
from otpgate.core.ports import Store
from otpgate.errors import ConfigError
from otpgate.server.config import DaemonConfig

log = logging.getLogger("otpgated")


def check_key_location(config: DaemonConfig) -> None:
    """Refuse an untrusted key directory before otpgated creates anything at all
    (state directory, database, sockets): a refusal leaves the disk as it was."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and os.path.exists(os.path.join(credentials, config.key_credential)):
        return  # load_keyring checks the credential, chain included
    check_dir_chain(os.path.dirname(config.key_file), subject=f"key file {config.key_file}")


def load_keyring(config: DaemonConfig, store: Store) -> Keyring:
    keyring = _load_primary(config, store)
    old = _old_key(config)
    if old is None:
        return keyring
    log.info("key_loaded role=old key_id=%s (for a rotation: otpgate rotate-key)", key_id_of(old))
    return keyring.with_older(old)


def _old_key(config: DaemonConfig) -> bytes | None:
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        path = os.path.join(credentials, config.old_key_credential)
        if os.path.exists(path):
            return load_key_file(path)
    if config.old_key_file:
        return load_key_file(config.old_key_file)
    return None


def _load_primary(config: DaemonConfig, store: Store) -> Keyring:
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        path = os.path.join(credentials, config.key_credential)
        if os.path.exists(path):
            # The same checks, chain included: systemd's directory passes them as it
            # is (/run/credentials root 0755, the unit's own directory a read-only
            # mount owned by root, mode 0700 or 0500, the file 0400), and a
            # CREDENTIALS_DIRECTORY pointing anywhere else earns no more trust.
            key = load_key_file(path)
            log.info(
                "key_loaded source=credential name=%s key_id=%s",
                config.key_credential,
                key_id_of(key),
            )
            return Keyring(key)
    path = config.key_file
    if os.path.lexists(path):
        key = load_key_file(path)
        log.info("key_loaded source=file path=%s key_id=%s", path, key_id_of(key))
        return Keyring(key)
    check = store.key_check()
    if check is not None:
        # Never mint a fresh key over a database sealed with another: that would
        # strand every enrolled user.
        raise ConfigError(
            f"key file {path} does not exist, but the database is sealed with key id "
            f"{check.key_id}: restore that key (or point key_file at it)"
        )
    if not config.create_key:
        raise ConfigError(f"key file {path} does not exist and key creation is disabled")
    # Chain checked before anything is made, so an untrusted place gets no directory
    # and no key; what is missing is created 0700.
    prepare_dir(os.path.dirname(path), 0o700, parents=True, subject=f"key file {path}")
    key = create_key_file(path)
    log.warning(
        "key_created path=%s key_id=%s: back this file up; without it every secret is lost",
        path,
        key_id_of(key),
    )
    return Keyring(key)
