"""The pytest plugin: a ``sim`` fixture, its seed, and the seed in every failing test's report.

Enable it in a ``conftest.py`` with ``pytest_plugins = ["pachyderm.testing.pytest_plugin"]`` (or
``pytest -p pachyderm.testing.pytest_plugin``). Nothing else imports it, so pytest stays out of the
library's dependencies. (It is not registered as an automatic ``pytest11`` plugin: pytest would
then rewrite the asserts of the whole ``pachyderm`` package in every test run that has it
installed.)

- ``sim``: a ``Simulation``, closed after the test. Its entity types and other arguments come from
  the marker ``@pytest.mark.simulation(entities=[...], faults=..., **world_options)``.
- The seed: the marker's ``seed=``, else ``--sim-seed=N`` (or ``--sim-seed=random``), else one
  derived from the test's id, so that a test replays the same run every time.
- A failing test's report gets a "pachyderm simulation" section: the seed, the faults injected
  and how to replay, for every simulation the ``sim`` fixture made.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from ._simulation import Simulation

_SIMS = pytest.StashKey[list[Simulation]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pachyderm")
    group.addoption(
        "--sim-seed",
        default=None,
        help="seed of the `sim` fixture: an int, or 'random' (default: derived from the test id)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "simulation(entities=[...], seed=None, faults=None, **options): "
        "how the pachyderm `sim` fixture is made",
    )


def _seed(request: pytest.FixtureRequest, given: Any) -> int:
    if given is not None:
        return int(given)
    option = request.config.getoption("--sim-seed")
    if option == "random":
        return random.SystemRandom().randrange(2**32)
    if option is not None:
        return int(option)
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def sim(request: pytest.FixtureRequest) -> Iterator[Simulation]:
    """A ``Simulation`` made from the test's ``simulation`` marker; closed after the test."""
    marker = request.node.get_closest_marker("simulation")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    entities = kwargs.pop("entities", marker.args[0] if marker is not None and marker.args else ())
    seed = _seed(request, kwargs.pop("seed", None))
    simulation = Simulation(entities, seed=seed, **kwargs)
    request.node.stash.setdefault(_SIMS, []).append(simulation)
    yield simulation
    simulation.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for simulation in item.stash.get(_SIMS, ()):
            report.sections.append(("pachyderm simulation", simulation.report()))
    return report
