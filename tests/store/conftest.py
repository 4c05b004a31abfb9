"""Fixtures of the traffic store tests: a PostgreSQL server, and a fresh database on it per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from router.config import StoreConfig
from tests.store.postgres import Postgres, find_bindir, postgres_server

DSN_ENV = "TRIAGE_TEST_STORE_DSN"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server for the session (skips where PostgreSQL is not installed)."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (bash tests/setup.sh installs it as root)")
    with postgres_server(bindir) as server:
        yield server


@pytest.fixture
def pg_store(postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> StoreConfig:
    """A `kind: postgres` store config on an empty database; its DSN is in the env (children too)."""
    monkeypatch.setenv(DSN_ENV, postgres.create_database("t_" + uuid.uuid4().hex[:12]))
    return StoreConfig(kind="postgres", dsn_env=DSN_ENV, flush_interval_s=0.05)
