"""The backend contract (``pachyderm.testing``), run on every backend of the project."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest

from pachyderm.backends import Backend, Memory, SQLite, Write
from pachyderm.testing import (
    BackendCase,
    ContractViolation,
    backend_cases,
    check_backend,
)

from .conftest import PostgresSchemas

CASES = backend_cases()
IDS = [case.name for case in CASES]


class SQLiteFiles:
    """Make SQLite backends, each on a new file of ``folder``, and reopen them on theirs.

    Mutable state: ``count`` and ``paths``, changed only by ``new`` and ``reopen``.
    """

    def __init__(self, folder: Path, writer: str = "process") -> None:
        self.folder = folder
        self.writer = writer
        self.count = 0
        self.paths: dict[Backend, Path] = {}

    def new(self) -> Backend:
        self.count += 1
        return self._on(self.folder / f"contract-{self.count}.db")

    def reopen(self, closed: Backend) -> Backend:
        return self._on(self.paths[closed])

    def _on(self, path: Path) -> Backend:
        backend = SQLite(str(path), writer=self.writer)
        self.paths[backend] = path
        return backend


def _same_memory(closed: Backend) -> Backend:
    # The memory backend keeps its data per object: reopening means opening the same object.
    return closed


async def _run(case: BackendCase, make_backend: type[Backend] | SQLiteFiles) -> None:
    factory, reopen = (
        (make_backend.new, make_backend.reopen)
        if isinstance(make_backend, SQLiteFiles)
        else (make_backend, _same_memory)
    )
    await case.run(factory, reopen)  # a CaseSkipped here fails the test: nothing is skipped


# Memory is not durable: the durability case does not apply to it (on SQLite it must run).
MEMORY_CASES = [case for case in CASES if case.name != "durability"]


@pytest.mark.parametrize("case", MEMORY_CASES, ids=[case.name for case in MEMORY_CASES])
async def test_memory(case: BackendCase) -> None:
    await _run(case, Memory)


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_sqlite(case: BackendCase, tmp_path: Path) -> None:
    await _run(case, SQLiteFiles(tmp_path))


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_sqlite_with_its_writer_in_a_thread(case: BackendCase, tmp_path: Path) -> None:
    await _run(case, SQLiteFiles(tmp_path, writer="thread"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_postgres(case: BackendCase, postgres: PostgresSchemas) -> None:
    await case.run(postgres.new, postgres.reopen)


async def test_check_backend_passes_on_memory() -> None:
    await check_backend(Memory, reopen=_same_memory)


async def test_check_backend_passes_on_memory_without_reopen() -> None:
    await check_backend(Memory)


async def test_check_backend_passes_on_sqlite(tmp_path: Path) -> None:
    files = SQLiteFiles(tmp_path)
    await check_backend(files.new, reopen=files.reopen)


def test_cases_have_unique_names() -> None:
    assert len(set(IDS)) == len(IDS)
    assert all(isinstance(case, tuple) and len(case) == 2 for case in CASES)


class IgnoresExpected(Memory):
    """A broken backend: its commit writes whatever version is stored."""

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        rows = await self.load_many([(w.type_name, w.key) for w in writes])
        current = [0 if row is None else row.version for row in rows]
        return await super().commit(
            [msgspec.structs.replace(w, expected=v) for w, v in zip(writes, current, strict=True)]
        )


class ForgetsOnReopen(Memory):
    """A broken durable backend: it claims durability, but a reopened object starts empty."""

    durable = True


async def test_check_backend_fails_on_a_backend_ignoring_expected() -> None:
    with pytest.raises(ContractViolation) as caught:
        await check_backend(IgnoresExpected, reopen=_same_memory)
    names = caught.value.names
    assert "conditional_commit" in names
    assert "mixed_batch" in names
    assert "concurrent_same_key" in names
    assert "load_missing" not in names
    assert "conditional_commit: AssertionError" in str(caught.value)
    assert isinstance(caught.value.__cause__, AssertionError)


async def test_check_backend_fails_on_a_backend_forgetting_on_reopen() -> None:
    def reopen(closed: Backend) -> Backend:
        return ForgetsOnReopen()

    with pytest.raises(ContractViolation) as caught:
        await check_backend(ForgetsOnReopen, reopen=reopen)
    assert "durability" in caught.value.names
    assert "world_namespacing" in caught.value.names


async def test_check_backend_reports_a_hung_case_as_failed() -> None:
    class Hangs(Memory):
        async def list_keys(
            self, type_name: str, *, prefix: str = "", after: str | None = None, limit: int = 1000
        ) -> list[str]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    with pytest.raises(ContractViolation) as caught:
        await check_backend(Hangs, case_timeout=0.05)
    assert "list_keys_order" in caught.value.names
    assert all(isinstance(exc, TimeoutError) for _, exc in caught.value.failures)
