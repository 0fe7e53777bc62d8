"""The PostgreSQL backend's writes: a batch's statements, all at once or one write at a time.

``Batch.assume_all_win`` runs every write of a ``commit`` call together, one statement per kind
(rows, events, consumes, buries, cancels, sends), and says whether every condition held; if one
did not, the caller rolls the transaction back and ``decide_one`` runs the writes in queue
order, each in a savepoint that is rolled back when one of its conditions fails. Both paths run
the same statements: the fast one with every write's rows, the slow one with one write's.

The fast path refuses (returns ``None``) where running kinds together could differ from queue
order: two writes of one entity, a write naming a row twice, a consume of a row that the batch
sends, or of a row of a sender whose write cancels or replaces named timers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._base import Fence, Write

__all__ = ["Batch", "decide_one"]


def _count(status: str) -> int:
    """The row count of a command tag (``INSERT 0 5``, ``DELETE 3``)."""
    return int(status.rsplit(" ", 1)[-1])


class Batch:
    """The statements of one transaction. Mutable state: ``delta`` (outbox rows by kind)."""

    def __init__(self, conn: Any, statements: dict[str, str], world: str) -> None:
        self.conn = conn
        self.sql = statements
        self.world = world
        self.delta = {"messages": 0, "timers": 0, "dead": 0}
        # The fences of the batch's writes that hold (checked and locked by `check_fences`).
        self.held: set[Fence] = set()

    async def check_fences(self, writes: Sequence[Write]) -> None:
        """Check the leases the writes need, and share-lock them until the transaction ends."""
        fences = list(dict.fromkeys(w.fence for w in writes if w.fence is not None))
        if fences:
            rows = await self.conn.fetch(
                self.sql["fences"],
                self.world,
                [f.partition for f in fences],
                [f.node for f in fences],
                [f.epoch for f in fences],
            )
            self.held = {Fence(owner, p, epoch) for p, owner, epoch in rows}

    def fenced_out(self, write: Write) -> bool:
        """Whether the write needs a lease that is not held (then it loses)."""
        return write.fence is not None and write.fence not in self.held

    async def assume_all_win(self, writes: Sequence[Write]) -> list[bool] | None:
        """Run all the writes at once; ``[True, ...]`` if every condition held, else None."""
        refs = {(w.type_name, w.key) for w in writes}
        if len(refs) < len(writes) or any(self.fenced_out(w) for w in writes):
            return None
        renamers: set[tuple[str, str]] = set()
        sent: set[tuple[str, str, int, int]] = set()
        for w in writes:
            outbox = w.outbox
            if outbox is not None:
                if outbox.cancels or any(e.name is not None for e in outbox.sends):
                    renamers.add((w.type_name, w.key))
                sent.update(e.id for e in outbox.sends)
        for w in writes:
            outbox = w.outbox
            if outbox is not None and outbox.consumes:
                ids = [c.id for c in outbox.consumes]
                if len(set(ids)) < len(ids):
                    return None
                if any(id in sent or (id[0], id[1]) in renamers for id in ids):
                    return None
        delta = {"messages": 0, "timers": 0, "dead": 0}
        if not await self.rows(writes) or not await self.outbox(writes, delta):
            return None
        self._merge(delta)
        return [True] * len(writes)

    def _merge(self, delta: dict[str, int]) -> None:
        for kind, change in delta.items():
            self.delta[kind] += change

    async def rows(self, writes: Sequence[Write]) -> bool:
        """The writes' conditional row changes and their events; whether every one held."""
        conn, sql, world = self.conn, self.sql, self.world
        updates, inserts, checks = [], [], []
        for w in writes:
            if w.version == w.expected:
                checks.append(w)
            elif w.expected:
                updates.append(w)
            else:
                inserts.append(w)
        if updates:
            columns: list[list[Any]] = [[] for _ in range(8)]
            for w in updates:
                keep = bool(w.events) and not w.snapshot
                snapshot = w.version if w.events and w.snapshot else None
                row: tuple[Any, ...] = (w.type_name, w.key, w.expected, w.version,
                                        w.type_version, b"" if keep else w.data, snapshot,
                                        keep)  # fmt: skip
                for column, value in zip(columns, row, strict=True):
                    column.append(value)
            if len(await conn.fetch(sql["update"], world, *columns)) != len(updates):
                return False
        if inserts:
            columns = [[] for _ in range(6)]
            for w in inserts:
                new: tuple[Any, ...]
                if not w.events:
                    new = (w.type_name, w.key, w.version, w.type_version, w.data, None)
                elif w.snapshot:
                    new = (w.type_name, w.key, w.version, w.type_version, w.data, w.version)
                else:
                    new = (w.type_name, w.key, w.version, w.type_version, b"", 0)
                for column, value in zip(columns, new, strict=True):
                    column.append(value)
            if len(await conn.fetch(sql["insert"], world, *columns)) != len(inserts):
                return False
        if checks:
            rows = await conn.fetch(
                sql["check"], world, [w.type_name for w in checks], [w.key for w in checks]
            )
            stored = {(t, k): v for t, k, v in rows}
            if any(stored.get((w.type_name, w.key), 0) != w.expected for w in checks):
                return False
        events: list[list[Any]] = [[] for _ in range(5)]
        for w in writes:
            if w.events and w.version != w.expected:
                for seq, event in enumerate(w.events, w.expected + 1):
                    for column, value in zip(
                        events, (w.type_name, w.key, seq, w.type_version, event), strict=True
                    ):
                        column.append(value)
        if events[0]:
            # The row's version condition already fences a second writer; a taken seq (a log
            # that is ahead of its row) makes the write lose all the same.
            status = await conn.execute(sql["append"], world, *events)
            if _count(status) != len(events[0]):
                return False
        return True

    async def outbox(self, writes: Sequence[Write], delta: dict[str, int]) -> bool:
        """The writes' outbox changes: consumes (conditions), cancels, sends; whether all held."""
        conn, sql, world = self.conn, self.sql, self.world
        consumes: list[list[Any]] = [[] for _ in range(4)]
        buries: list[list[Any]] = [[] for _ in range(5)]
        cancels: list[list[Any]] = [[] for _ in range(3)]
        sends: list[list[Any]] = [[] for _ in range(9)]
        for w in writes:
            outbox = w.outbox
            if outbox is None:
                continue
            for c in outbox.consumes:
                if c.dead is None:
                    for column, value in zip(consumes, c.id, strict=True):
                        column.append(value)
                else:
                    for column, value in zip(buries, (*c.id, c.dead), strict=True):
                        column.append(value)
            # Cancels delete the writer's own timers; a named send first deletes its sender's
            # waiting row of that name (and of two sends of one name, the second replaces the
            # first).
            named = [(w.type_name, w.key, name) for name in outbox.cancels]
            kept: dict[tuple[str, str, str] | int, Any] = {}
            for i, e in enumerate(outbox.sends):
                if e.name is None:
                    kept[i] = e
                else:
                    timer = (e.sender_type, e.sender_key, e.name)
                    kept.pop(timer, None)
                    kept[timer] = e
                    named.append(timer)
            for timer in dict.fromkeys(named):
                for column, value in zip(cancels, timer, strict=True):
                    column.append(value)
            for e in kept.values():
                row = (e.sender_type, e.sender_key, e.version, e.index, e.to_type, e.to_key,
                       e.due, e.name, e.data)  # fmt: skip
                for column, value in zip(sends, row, strict=True):
                    column.append(value)
        for statement, columns in (("consume", consumes), ("bury", buries)):
            if columns[0]:
                dues = await conn.fetch(sql[statement], world, *columns)
                if len(dues) != len(columns[0]):
                    return False
                for (due,) in dues:
                    delta["timers" if due else "messages"] -= 1
                if statement == "bury":
                    delta["dead"] += len(dues)
        if cancels[0]:
            delta["timers"] -= len(await conn.fetch(sql["cancel"], world, *cancels))
        if sends[0]:
            await conn.execute(sql["send"], world, *sends)
            for due in sends[6]:
                delta["timers" if due else "messages"] += 1
        return True

    async def put_receipts(self, winners: Sequence[Write]) -> None:
        """Store the receipts of the writes that won (in the same transaction)."""
        columns: list[list[Any]] = [[] for _ in range(6)]
        for w in winners:
            for r in w.receipts:
                for column, value in zip(
                    columns, (w.type_name, w.key, r.id, r.version, r.result, r.at), strict=True
                ):
                    column.append(value)
        if columns[0]:
            await self.conn.execute(self.sql["put_receipts"], self.world, *columns)


async def decide_one(batch: Batch, write: Write) -> bool:
    """Apply one write in a savepoint, in queue order; roll it back alone if it lost."""
    outbox = write.outbox
    if outbox is not None and len({c.id for c in outbox.consumes}) < len(outbox.consumes):
        return False  # a write naming a row twice loses
    if batch.fenced_out(write):
        write.fenced = True
        return False  # its node does not hold its partition's lease (any more)
    savepoint = batch.conn.transaction()
    await savepoint.start()
    delta = {"messages": 0, "timers": 0, "dead": 0}
    try:
        won = await batch.rows([write]) and await batch.outbox([write], delta)
    except BaseException:
        await savepoint.rollback()
        raise
    if won:
        await savepoint.commit()
        batch._merge(delta)
    else:
        await savepoint.rollback()
    return won
