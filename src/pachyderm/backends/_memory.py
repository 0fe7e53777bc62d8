"""The memory backend: the reference implementation, one process, no durability."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import ClassVar

from .._errors import InvalidOptions, Unavailable
from ._base import Backend, Receipt, Stored, Write

__all__ = ["Memory"]


class _Space:
    """One world's data. Mutable state: all of it, changed only by `Memory` methods."""

    __slots__ = ("receipts", "rows", "sorted")

    def __init__(self) -> None:
        # type name -> key -> (version, type_version, data). A tuple of ints and bytes is one the
        # garbage collector stops tracking, so a million rows cost it nothing; a `Stored` is made
        # only when a row is loaded.
        self.rows: dict[str, dict[str, tuple[int, int, bytes]]] = {}
        # type name -> keys sorted, rebuilt on the first listing after a new key (inserting into a
        # sorted list would make creating n entities cost O(n^2)).
        self.sorted: dict[str, list[str]] = {}
        self.receipts: dict[tuple[str, str, str], Receipt] = {}

    def sorted_keys(self, type_name: str) -> list[str]:
        keys = self.sorted.get(type_name)
        if keys is None:
            keys = self.sorted[type_name] = sorted(self.rows.get(type_name, ()))
        return keys


class Memory(Backend):
    """Keep everything in this process's memory.

    Same semantics as the durable backends, scoped to one process: the data lives as long as this
    object, so a world reopened on the same ``Memory()`` object finds its entities again.
    Commits return at once; nothing survives the process.
    """

    scope: ClassVar[str] = "one process"
    durable: ClassVar[bool] = False

    def __init__(self) -> None:
        self._spaces: dict[str, _Space] = {}
        self._space: _Space | None = None
        self._commits = 0
        self._writes = 0

    def _open_space(self) -> _Space:
        if self._space is None:
            raise Unavailable("the memory backend is not open")
        return self._space

    async def open(self, world: str) -> None:
        if self._space is not None:
            raise InvalidOptions("this Memory backend is already open for a world")
        self._space = self._spaces.setdefault(world, _Space())

    async def aclose(self) -> None:
        self._space = None

    async def load_many(self, refs: Sequence[tuple[str, str]]) -> list[Stored | None]:
        rows = self._open_space().rows
        out: list[Stored | None] = []
        for type_name, key in refs:
            row = rows.get(type_name, {}).get(key)
            out.append(None if row is None else Stored(*row))
        return out

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        space = self._open_space()
        rows = space.rows
        out = []
        for w in writes:
            table = rows.get(w.type_name)
            if table is None:
                table = rows[w.type_name] = {}
            row = table.get(w.key)
            if (0 if row is None else row[0]) != w.expected:
                out.append(False)
                continue
            if row is None:
                space.sorted.pop(w.type_name, None)
            table[w.key] = (w.version, w.type_version, w.data)
            if w.receipts:
                for r in w.receipts:
                    space.receipts[(w.type_name, w.key, r.id)] = r
            out.append(True)
        self._commits += 1
        self._writes += len(writes)
        return out

    async def receipt(self, type_name: str, key: str, id: str) -> Receipt | None:
        return self._open_space().receipts.get((type_name, key, id))

    async def prune_receipts(self, before: float) -> int:
        receipts = self._open_space().receipts
        old = [k for k, r in receipts.items() if r.at < before]
        for k in old:
            del receipts[k]
        return len(old)

    async def list_keys(
        self, type_name: str, *, prefix: str = "", after: str | None = None, limit: int = 1000
    ) -> list[str]:
        keys = self._open_space().sorted_keys(type_name)
        if after is not None and after >= prefix:
            i = bisect.bisect_right(keys, after)
        else:
            i = bisect.bisect_left(keys, prefix)
        out: list[str] = []
        while i < len(keys) and len(out) < limit and keys[i].startswith(prefix):
            out.append(keys[i])
            i += 1
        return out

    def statistics(self) -> dict[str, object]:
        space = self._space
        return {
            "commits": self._commits,
            "writes": self._writes,
            "entities": 0 if space is None else sum(len(t) for t in space.rows.values()),
        }
