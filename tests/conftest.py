"""Shared fixtures: every world test runs on each backend (``--backend`` narrows the set)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

from pachyderm import backends

# The `sim` fixture, as a user enables it.
pytest_plugins = ["pachyderm.testing.pytest_plugin"]

BACKENDS = ("memory", "sqlite")

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
def make_backend(backend_name: str, tmp_path: Path) -> Callable[[], backends.Backend]:
    """A factory of backends on one storage: each call gives a new object on the same data."""
    memory = backends.Memory()

    def make() -> backends.Backend:
        if backend_name == "memory":
            return memory
        return backends.SQLite(tmp_path / "world.db")

    return make
