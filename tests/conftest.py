"""Shared fixtures: every world test runs on each backend (``--backend`` narrows the set)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from pachyderm import backends
from pachyderm.testing import PostgresServer, missing_binaries

# The `sim` fixture, as a user enables it.
pytest_plugins = ["pachyderm.testing.pytest_plugin"]

BACKENDS = ("memory", "sqlite", "postgres")

# Every property test draws the same examples on every run (CI must be deterministic); a test's
# own settings change the other fields only.
settings.register_profile("pachyderm", derandomize=True, database=None)
settings.load_profile("pachyderm")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="run the backend-parametrised tests only on these backends (default: all)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "make_backend" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--backend") or list(BACKENDS)
        metafunc.parametrize("backend_name", chosen, indirect=False)


@pytest.fixture
def make_backend(
    backend_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[], backends.Backend]:
    """A factory of backends on one storage: each call gives a new object on the same data."""
    memory = backends.Memory()
    if backend_name == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        schema = f"w{next(_schemas)}"

    def make() -> backends.Backend:
        if backend_name == "memory":
            return memory
        if backend_name == "postgres":
            return backends.Postgres(server.dsn, schema=schema, max_size=4)
        return backends.SQLite(tmp_path / "world.db")

    return make


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of our own for the whole session (started once, stopped at the end).

    Skipped, loudly, only when the server programs are not installed at all.
    """
    missing = missing_binaries()
    if missing:
        message = f"PostgreSQL server programs not on PATH ({', '.join(missing)}): tests skipped"
        print(f"\n*** {message} ***", file=sys.stderr)
        pytest.skip(message)
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


_schemas = itertools.count(1)


class PostgresSchemas:
    """Make Postgres backends, each on a new schema of the session's server (fresh storage)."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.schemas: dict[backends.Backend, str] = {}

    def new(self) -> backends.Backend:
        return self._on(f"t{next(_schemas)}")

    def reopen(self, closed: backends.Backend) -> backends.Backend:
        return self._on(self.schemas[closed])

    def _on(self, schema: str) -> backends.Backend:
        backend = backends.Postgres(self.server.dsn, schema=schema, max_size=4)
        self.schemas[backend] = schema
        return backend


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> PostgresSchemas:
    """A factory of Postgres backends on fresh schemas of the session's server."""
    return PostgresSchemas(postgres_server)
