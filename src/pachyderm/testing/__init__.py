"""Testing tools: the backend contract, for the project's backends and for third-party ones.

``await check_backend(make_backend, reopen=...)`` runs the whole contract and raises
``ContractViolation`` naming the failing cases.
``backend_cases()`` lists the same cases as ``(name, run)`` pairs, for a test framework to
parametrize over. Nothing here imports a test framework.
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

__all__ = [
    # the backend contract
    "check_backend",
    "backend_cases",
    "BackendCase",
    "BackendFactory",
    "CaseFunction",
    "CaseSkipped",
    "ContractViolation",
    "Reopen",
]
