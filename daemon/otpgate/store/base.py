"""What the service needs from a store; SQLite today, PostgreSQL later."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from otpgate.core.crypto import Sealed
from otpgate.core.settings import Settings

ANY_SECRET: object = object()  # put_secret(expected=...): no condition


@dataclasses.dataclass(frozen=True)
class SecretRecord:
    username: str
    uid: int
    sealed: Sealed
    otp_digits: int
    interval: int
    created_at: int
    # Highest time step accepted so far (-1: none); codes at or below it are spent.
    last_step: int = -1
    failures: int = 0
    # Consecutive lockouts since the last accepted code: each one doubles the next.
    lockouts: int = 0
    locked_until: int = 0


class Store(Protocol):
    def load_settings(self) -> Settings: ...

    def save_settings(self, settings: Settings, *, audit: str) -> None: ...

    def key_check(self) -> Sealed | None: ...

    def set_key_check(self, sealed: Sealed) -> None: ...

    def key_ids_in_use(self) -> set[str]: ...

    def put_secret(self, record: SecretRecord, *, expected: object = ...) -> bool:
        """Store `record`, replacing the account's secret, in one transaction.

        With `expected` (ANY_SECRET by default: replace whatever is there) it is a
        compare-and-set: None means "only if this uid has no secret", a Sealed
        "only if that is still the secret"; False when the account had changed.
        """
        ...

    def get_secret(self, username: str) -> SecretRecord | None: ...

    def list_secrets(self) -> list[SecretRecord]: ...

    def delete_secret(self, username: str) -> bool: ...

    def reserve_attempt(
        self, username: str, uid: int, *, now: int, threshold: int, lockout_seconds: int
    ) -> SecretRecord | None: ...

    def accept_step(self, username: str, uid: int, step: int) -> bool: ...

    def close(self) -> None: ...
