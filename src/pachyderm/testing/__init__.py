"""Testing tools: a deterministic simulation of a world, and the backend contract.

The simulation (see ``docs/testing.md``):

- ``Simulation(entities=[...], seed=...)`` runs the real world runtime on the memory backend, in
  virtual time, with a seeded scheduler and faults on demand (``Faults``, ``duplicate()``,
  ``delay()``, ``crash_commit()``, ``restart()``); its calls are plain functions.
- ``explore(setup, entities=..., max_depth=..., max_runs=...)`` runs a scenario under every
  delivery order and returns the distinct final worlds (``Exploration``, ``FinalWorld``).
- ``schedules()`` is a Hypothesis strategy of seeds and faults (Hypothesis is imported only when
  it is called); the ``sim`` fixture is in the pytest plugin ``pachyderm.testing.pytest_plugin``.

The backend contract: ``await check_backend(make_backend, reopen=...)`` runs the whole contract
and raises ``ContractViolation`` naming the failing cases; ``backend_cases()`` lists the same
cases as ``(name, run)`` pairs, for a test framework to parametrize over.

``PostgresServer().start()`` runs a throwaway PostgreSQL server of one's own (``initdb`` and
``pg_ctl`` in a temporary folder, on 127.0.0.1 only, as ``nobody`` when run as root), for tests
and examples that need one; ``stop()`` removes it.

Nothing here imports a test framework at import time.
"""

from __future__ import annotations

from ._contract import BackendCase as BackendCase
from ._contract import BackendFactory as BackendFactory
from ._contract import CaseFunction as CaseFunction
from ._contract import CaseSkipped as CaseSkipped
from ._contract import ContractViolation as ContractViolation
from ._contract import Reopen as Reopen
from ._contract import backend_cases as backend_cases
from ._contract import check_backend as check_backend
from ._explore import Exploration as Exploration
from ._explore import FinalWorld as FinalWorld
from ._explore import Schedule as Schedule
from ._explore import explore as explore
from ._network import Faults as Faults
from ._postgres import PostgresServer as PostgresServer
from ._postgres import missing_binaries as missing_binaries
from ._simulation import Pending as Pending
from ._simulation import Recording as Recording
from ._simulation import Simulation as Simulation
from ._simulation import SimulationError as SimulationError
from ._simulation import Step as Step
from ._strategies import schedules as schedules

__all__ = [
    # the simulation
    "Simulation",
    "Faults",
    "Pending",
    "Recording",
    "Step",
    "SimulationError",
    "explore",
    "Exploration",
    "FinalWorld",
    "Schedule",
    "schedules",
    # the backend contract
    "check_backend",
    "backend_cases",
    "BackendCase",
    "BackendFactory",
    "CaseFunction",
    "CaseSkipped",
    "ContractViolation",
    "Reopen",
    # a throwaway PostgreSQL server
    "PostgresServer",
    "missing_binaries",
]
