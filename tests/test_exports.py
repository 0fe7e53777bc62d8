"""The public surface, frozen: a change here is a change of the contract, made on purpose."""

from __future__ import annotations

import subprocess
import sys
import types
from importlib import resources

import pytest

import pachyderm
import pachyderm.backends
import pachyderm.history
import pachyderm.testing

SURFACE = {
    "pachyderm": [
        "ActivationFailed",
        "Clock",
        "Entity",
        "EntityBroken",
        "EventSourced",
        "IncompatibleVersion",
        "Indeterminate",
        "InvalidKey",
        "InvalidOptions",
        "MAX_KEY_BYTES",
        "Overloaded",
        "PachydermError",
        "Rejected",
        "SerializationError",
        "StorageLocked",
        "SystemClock",
        "Timeout",
        "TooLarge",
        "TooManyEffects",
        "Unavailable",
        "UnknownEntityType",
        "Update",
        "Worker",
        "World",
        "WorldOptions",
        "after",
        "backends",
        "cancel",
        "history",
        "send",
    ],
    "pachyderm.backends": [
        "Backend",
        "Consume",
        "Envelope",
        "EnvelopeId",
        "Fence",
        "Memory",
        "Outbox",
        "Postgres",
        "Receipt",
        "SQLite",
        "Stored",
        "StoredEvent",
        "Write",
        "open",
    ],
    "pachyderm.history": [
        "Replay",
        "check",
        "export",
        "replay",
    ],
    "pachyderm.testing": [
        "BackendCase",
        "BackendFactory",
        "CaseFunction",
        "CaseSkipped",
        "ContractViolation",
        "Exploration",
        "Faults",
        "FinalWorld",
        "Pending",
        "PostgresServer",
        "Recording",
        "Reopen",
        "Schedule",
        "Simulation",
        "SimulationError",
        "Step",
        "backend_cases",
        "check_backend",
        "explore",
        "missing_binaries",
        "schedules",
    ],
}
MODULES = {
    "pachyderm": pachyderm,
    "pachyderm.backends": pachyderm.backends,
    "pachyderm.history": pachyderm.history,
    "pachyderm.testing": pachyderm.testing,
}
# The errors of `pachyderm`, each a noun of what went wrong.
ERRORS = [
    "ActivationFailed",
    "EntityBroken",
    "IncompatibleVersion",
    "Indeterminate",
    "InvalidKey",
    "InvalidOptions",
    "Overloaded",
    "PachydermError",
    "Rejected",
    "SerializationError",
    "StorageLocked",
    "Timeout",
    "TooLarge",
    "TooManyEffects",
    "Unavailable",
    "UnknownEntityType",
]


@pytest.mark.parametrize("name", sorted(SURFACE))
def test_all_is_the_frozen_list(name: str) -> None:
    exported = MODULES[name].__all__
    assert sorted(exported) == SURFACE[name]
    assert len(set(exported)) == len(exported), "a name is exported twice"


@pytest.mark.parametrize("name", sorted(SURFACE))
def test_every_exported_name_exists(name: str) -> None:
    module = MODULES[name]
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing


@pytest.mark.parametrize("name", ["pachyderm", "pachyderm.testing"])
def test_nothing_public_looking_is_left_out_of_all(name: str) -> None:
    module = MODULES[name]
    public = {
        n
        for n, value in vars(module).items()
        if not n.startswith("_")
        and n != "annotations"  # from __future__ import annotations
        and not (isinstance(value, types.ModuleType) and value.__name__.startswith("pachyderm."))
    }
    assert public - set(module.__all__) == set()


def test_every_error_is_a_pachyderm_error() -> None:
    errors = sorted(
        n
        for n in pachyderm.__all__
        if isinstance(getattr(pachyderm, n), type)
        and issubclass(getattr(pachyderm, n), BaseException)
    )
    assert errors == ERRORS
    for n in errors:
        cls = getattr(pachyderm, n)
        assert issubclass(cls, pachyderm.PachydermError), n
        assert (cls.__doc__ or "").strip(), f"{n} says when it happens"


def test_errors_that_are_also_builtin_ones() -> None:
    assert issubclass(pachyderm.InvalidKey, ValueError)
    assert issubclass(pachyderm.InvalidOptions, ValueError)
    assert issubclass(pachyderm.UnknownEntityType, LookupError)
    assert issubclass(pachyderm.Timeout, TimeoutError)
    assert issubclass(pachyderm.StorageLocked, pachyderm.Unavailable)


def test_the_package_is_typed() -> None:
    assert resources.files("pachyderm").joinpath("py.typed").is_file()


def test_the_testing_namespace_imports_no_test_framework() -> None:
    code = (
        "import sys, pachyderm.testing; "
        "print(sorted(m for m in ('pytest', 'hypothesis', 'unittest') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
