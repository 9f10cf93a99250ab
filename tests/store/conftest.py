"""The PostgreSQL server the store tests share (one per session), if one can run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.store.pg_harness import PgServer, skip_reason


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PgServer()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def pg_tls_server() -> Iterator[PgServer]:
    """A second server that also listens on 127.0.0.1 and lets in only TLS there."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PgServer(tls=True)
    try:
        yield server
    finally:
        server.remove()
