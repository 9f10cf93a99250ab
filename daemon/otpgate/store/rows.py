"""Rows to value objects and back, the same for every backend (pure).

The column orders here are the SELECT lists both stores use; key-check and
recovery-key values in `meta` are Sealed objects as JSON.
"""

from __future__ import annotations

import json
from typing import Any

from otpgate.core import audit
from otpgate.core.crypto import Sealed
from otpgate.core.records import SecretRecord
from otpgate.store import schema

# The secrets table's columns (store.schema) but `status`: a record is active.
SECRET_NAMES = tuple(c for c in schema.TABLES["secrets"][0] if c != "status")
SECRET_COLUMNS = ", ".join(SECRET_NAMES)
# A pending secret has the first eight, then expires_at.
PENDING_NAMES = SECRET_NAMES[:8]
PENDING_COLUMNS = ", ".join(PENDING_NAMES)


def secret_values(record: SecretRecord) -> tuple[Any, ...]:
    """`record` in SECRET_NAMES order."""
    return (
        *pending_values(record),
        record.last_step,
        record.failures,
        record.lockouts,
        record.locked_until,
    )


def pending_values(record: SecretRecord) -> tuple[Any, ...]:
    """`record` in PENDING_NAMES order."""
    return (
        record.username,
        record.uid,
        record.sealed.key_id,
        record.sealed.nonce,
        record.sealed.ciphertext,
        record.otp_digits,
        record.interval,
        record.created_at,
    )


def secret_record(row: tuple[Any, ...]) -> SecretRecord:
    """A row in SECRET_NAMES order."""
    (username, uid, key_id, nonce, ct, digits, interval, created, last, fails, locks, until) = row
    return SecretRecord(
        username=username,
        uid=uid,
        sealed=Sealed(key_id, bytes(nonce), bytes(ct)),
        otp_digits=digits,
        interval=interval,
        created_at=created,
        last_step=last,
        failures=fails,
        lockouts=locks,
        locked_until=until,
    )


def pending_record(row: tuple[Any, ...]) -> tuple[SecretRecord, int]:
    """A row in PENDING_NAMES order, then expires_at: the record and its expiry."""
    *head, expires = row
    return secret_record((*head, -1, 0, 0, 0)), expires


def sealed_json(sealed: Sealed) -> str:
    return json.dumps(
        {"key_id": sealed.key_id, "nonce": sealed.nonce.hex(), "ct": sealed.ciphertext.hex()}
    )


def sealed_from_json(value: str) -> Sealed:
    data = json.loads(value)
    return Sealed(data["key_id"], bytes.fromhex(data["nonce"]), bytes.fromhex(data["ct"]))


AUDIT_WRITTEN = "at, event, username, detail, host, path, caller"
AUDIT_READ = "id, " + AUDIT_WRITTEN


def origin() -> tuple[str, str]:
    """The path and caller of the call being served (core.audit), for an audit row."""
    where = audit.origin()
    return where.path, where.caller


def audit_filter(
    username: str | None, since: int | None, until: int | None, before_id: int | None, mark: str
) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause of an audit query and its parameters (`mark`: ? or %s)."""
    clauses, params = [], []
    for clause, value in (
        (f"username = {mark}", username),
        (f"at >= {mark}", since),
        (f"at < {mark}", until),
        (f"id < {mark}", before_id),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(params)
