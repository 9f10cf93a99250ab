"""Which store a location names: a postgresql:// URL, or the path of a SQLite file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from otpgate.errors import ConfigError
from otpgate.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from otpgate.store.postgres import PostgresStore

URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(location: str) -> bool:
    return location.startswith(URL_SCHEMES)


def open_store(
    location: str,
    *,
    password_file: str | None = None,
    timeout: float = 2.0,
    upgrade: bool = False,
    host: str = "",
) -> SQLiteStore | PostgresStore:
    if not is_url(location):
        return SQLiteStore(location, upgrade=upgrade, host=host)
    try:
        # Only fleets need it: `pip install 'otpgate[postgres]'`.
        from otpgate.store import postgres
    except ImportError as exc:
        raise ConfigError(
            f"a PostgreSQL database needs its driver ({exc.name} is missing): "
            "pip install 'otpgate[postgres]'"
        ) from None
    return postgres.PostgresStore(
        location, password_file=password_file, timeout=timeout, upgrade=upgrade, host=host
    )
