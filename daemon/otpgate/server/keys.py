"""Where the daemon's key comes from: a systemd credential, or a key file."""

from __future__ import annotations

import logging
import os

from otpgate.core.crypto import Keyring, create_key_file, key_id_of, load_key_file
from otpgate.errors import ConfigError
from otpgate.server.config import DaemonConfig
from otpgate.store.base import Store

log = logging.getLogger("otpgated")


def load_keyring(config: DaemonConfig, store: Store) -> Keyring:
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        path = os.path.join(credentials, config.key_credential)
        if os.path.exists(path):
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
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    key = create_key_file(path)
    log.warning(
        "key_created path=%s key_id=%s: back this file up; without it every secret is lost",
        path,
        key_id_of(key),
    )
    return Keyring(key)
