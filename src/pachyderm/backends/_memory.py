"""The memory backend: the reference implementation, one process, no durability."""

from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence
from typing import ClassVar

from .._errors import InvalidOptions, Unavailable
from ._base import Backend, Envelope, EnvelopeId, Receipt, Stored, StoredEvent, Write

__all__ = ["Memory"]

# `Envelope.key` without a Python call per row: what the outbox's pages are sorted by.
_KEY = operator.attrgetter("due", "sender_type", "sender_key", "version", "index")


class _Space:
    """One world's data. Mutable state: all of it, changed only by `Memory` methods."""

    __slots__ = (
        "counts",
        "dead",
        "events",
        "names",
        "outbox",
        "receipts",
        "rows",
        "snapshot",
        "sorted",
    )

    def __init__(self) -> None:
        # type name -> key -> its row. A `Stored` is nothing the garbage collector tracks, so
        # neither is a dict of them, however many rows it holds and however often they change
        # (a tuple per row would be tracked when it is made: every commit would add one to the
        # young generation, which at a million entities the next young collection walks, object
        # by object, out of cache). Loads give the stored rows themselves (rows are immutable).
        self.rows: dict[str, dict[str, Stored]] = {}
        # (type name, key) -> the log of an event-sourced entity: (type_version, data) of the
        # event of seq i + 1 at index i.
        self.events: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
        # type name -> keys sorted, rebuilt on the first listing after a new key (inserting into a
        # sorted list would make creating n entities cost O(n^2)).
        self.sorted: dict[str, list[str]] = {}
        self.receipts: dict[tuple[str, str, str], Receipt] = {}
        # The outbox: rows waiting (by id), dead letters (id -> (row, why)), named timers.
        self.outbox: dict[EnvelopeId, Envelope] = {}
        self.dead: dict[EnvelopeId, tuple[Envelope, str]] = {}
        self.names: dict[tuple[str, str, str], EnvelopeId] = {}
        self.counts = {"messages": 0, "timers": 0, "dead": 0}
        # The last `due` scan: its `until`, its rows sorted, the key of the last row it gave and
        # where the next page starts, so that a page that continues it costs O(page).
        self.snapshot: tuple[float, list[Envelope], object, int] | None = None

    def take(self, id: EnvelopeId) -> Envelope | None:
        """Remove a waiting row (and its name); return it, or None if it is not waiting."""
        row = self.outbox.pop(id, None)
        if row is not None:
            self.counts["timers" if row.due else "messages"] -= 1
            if row.name is not None:
                self.names.pop((row.sender_type, row.sender_key, row.name), None)
        return row

    def put(self, row: Envelope) -> None:
        if row.name is not None:
            name = (row.sender_type, row.sender_key, row.name)
            old = self.names.get(name)
            if old is not None:
                self.take(old)
            self.names[name] = row.id
        self.outbox[row.id] = row
        self.counts["timers" if row.due else "messages"] += 1

    def sorted_keys(self, type_name: str) -> list[str]:
        keys = self.sorted.get(type_name)
        if keys is None:
            table = self.rows.get(type_name)
            keys = self.sorted[type_name] = [] if table is None else sorted(table)
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
            table = rows.get(type_name)
            out.append(None if table is None else table.get(key))
        return out

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        space = self._open_space()
        rows = space.rows
        out = [True] * len(writes)
        for i, w in enumerate(writes):
            table = rows.get(w.type_name)
            if table is None:
                table = rows[w.type_name] = {}
            row = table.get(w.key)
            stored = 0 if row is None else row.version  # 0: not stored (a version is >= 1)
            if stored != w.expected:
                out[i] = False
                continue
            events = w.events
            if events:
                log = space.events.get((w.type_name, w.key))
                if (0 if log is None else len(log)) != w.expected:
                    out[i] = False  # the fence: an event of seq > expected is stored
                    continue
            outbox = w.outbox
            if outbox is not None and outbox.consumes:
                consumes = outbox.consumes
                if len(consumes) == 1:  # the common case, without a set
                    gone = consumes[0].id not in space.outbox
                else:
                    ids = {c.id for c in consumes}
                    gone = len(ids) < len(consumes) or not ids <= space.outbox.keys()
                if gone:
                    out[i] = False  # a message it applies is gone: applied or cancelled
                    continue
            if w.version != w.expected:
                if row is None:
                    space.sorted.pop(w.type_name, None)
                if not events:
                    table[w.key] = Stored(w.version, w.type_version, w.data)
                else:
                    if log is None:
                        log = space.events[(w.type_name, w.key)] = []
                    log.extend((w.type_version, e) for e in events)
                    if w.snapshot:
                        table[w.key] = Stored(w.version, w.type_version, w.data, w.version)
                    elif row is None:  # a new row, until a snapshot
                        table[w.key] = Stored(w.version, w.type_version, b"", 0)
                    else:  # the row keeps its snapshot
                        table[w.key] = Stored(w.version, row.type_version, row.data, row.snapshot)
            if outbox is not None:
                for c in outbox.consumes:
                    taken = space.take(c.id)
                    if c.dead is not None and taken is not None:
                        space.dead[c.id] = (taken, c.dead)
                        space.counts["dead"] += 1
                for name in outbox.cancels:
                    id = space.names.get((w.type_name, w.key, name))
                    if id is not None:
                        space.take(id)
                for envelope in outbox.sends:
                    space.put(envelope)
            if w.receipts:
                for r in w.receipts:
                    space.receipts[(w.type_name, w.key, r.id)] = r
        self._commits += 1
        self._writes += len(writes)
        return out

    async def read_events(
        self, type_name: str, key: str, *, after: int = 0, limit: int = 1000
    ) -> list[StoredEvent]:
        log = self._open_space().events.get((type_name, key), ())
        start = max(after, 0)
        return [
            StoredEvent(seq, *log[seq - 1])
            for seq in range(start + 1, min(len(log), start + max(limit, 0)) + 1)
        ]

    async def receipt(self, type_name: str, key: str, id: str) -> Receipt | None:
        return self._open_space().receipts.get((type_name, key, id))

    async def prune_receipts(self, before: float) -> int:
        receipts = self._open_space().receipts
        old = [k for k, r in receipts.items() if r.at < before]
        for k in old:
            del receipts[k]
        return len(old)

    async def due(
        self,
        until: float,
        *,
        after: tuple[float, str, str, int, int] | None = None,
        limit: int = 1000,
    ) -> list[Envelope]:
        space = self._open_space()
        snapshot = space.snapshot
        if (
            snapshot is not None
            and after is not None
            and snapshot[0] == until
            and snapshot[2] == after
        ):
            rows, i = snapshot[1], snapshot[3]  # the next page of the last scan
        else:
            # A new scan, which sees every row committed before it: sort what is due once.
            rows = sorted([r for r in space.outbox.values() if r.due <= until], key=_KEY)
            i = 0 if after is None else bisect.bisect_right(rows, after, key=_KEY)
        out: list[Envelope] = []
        live = space.outbox
        while i < len(rows) and len(out) < limit:
            row = rows[i]
            if live.get(row.id) is row:  # skip rows applied or replaced since the scan began
                out.append(row)
            i += 1
        space.snapshot = (
            None if i >= len(rows) else (until, rows, _KEY(out[-1]) if out else after, i)
        )
        return out

    async def exists(self, ids: Sequence[EnvelopeId]) -> list[bool]:
        live = self._open_space().outbox
        return [id in live for id in ids]

    def outbox_counts(self) -> dict[str, int]:
        space = self._space
        return {"messages": 0, "timers": 0, "dead": 0} if space is None else dict(space.counts)

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
            "events": 0 if space is None else sum(len(log) for log in space.events.values()),
            "outbox": self.outbox_counts(),
        }
