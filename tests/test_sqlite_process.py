"""The SQLite writer in a child process: where it runs, its reuse, its death, the world's turns."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

import pachyderm
from pachyderm import Indeterminate, Unavailable
from pachyderm.backends import (
    Consume,
    Envelope,
    Fence,
    Memory,
    Outbox,
    Receipt,
    SQLite,
    Stored,
    Write,
)
from pachyderm.backends import _sqlite_process as sp
from pachyderm.backends._sqlite_process import IDLE_CHILDREN, Link


def w(key: str, expected: int, version: int) -> Write:
    return Write("T", key, expected, version, 1, b"s")


def writer_of(backend: SQLite) -> Link:
    session = backend._session
    assert session is not None
    link = session.link
    assert isinstance(link, Link)
    return link


def pid_of(backend: SQLite) -> int:
    child = writer_of(backend).child
    assert child is not None
    return child.proc.pid


async def test_the_writer_runs_in_another_process_kept_for_the_next_open(tmp_path: Path) -> None:
    first = SQLite(tmp_path / "a.db")
    await first.open("default")
    try:
        assert await first.commit([w("a", 0, 1)]) == [True]
        pid = pid_of(first)
        assert pid != os.getpid()
        assert first.statistics()["transactions"] == 1  # counted by the child, told the parent
    finally:
        await first.aclose()
    # The idle child serves the next open, of another file.
    second = SQLite(tmp_path / "b.db")
    await second.open("default")
    try:
        assert pid_of(second) == pid
        assert await second.load_many([("T", "a")]) == [None]
        assert await second.commit([w("b", 0, 1)]) == [True]
    finally:
        await second.aclose()
    # Several opens at once: each its own child; at most IDLE_CHILDREN stay.
    many = [SQLite(tmp_path / f"m{i}.db") for i in range(IDLE_CHILDREN + 2)]
    for b in many:
        await b.open("default")
    pids = {pid_of(b) for b in many}
    assert len(pids) == len(many)
    for b in many:
        await b.aclose()
    alive = 0
    for p in pids:
        try:
            os.kill(p, 0)
            alive += 1
        except ProcessLookupError:
            pass
    assert alive <= IDLE_CHILDREN
    third = SQLite(tmp_path / "a.db")
    await third.open("default")
    try:
        assert await third.load_many([("T", "a")]) == [Stored(1, 1, b"s")]
    finally:
        await third.aclose()


async def test_a_writer_process_that_dies_fails_what_it_did_not_answer(tmp_path: Path) -> None:
    backend = SQLite(tmp_path / "w.db")
    await backend.open("default")
    try:
        assert await backend.commit([w("a", 0, 1)]) == [True]
        # Dies while idle: the next group gets a new child, and loses nothing.
        first = pid_of(backend)
        os.kill(first, signal.SIGKILL)
        await asyncio.sleep(0.05)
        assert await backend.commit([w("a", 1, 2)]) == [True]
        second = pid_of(backend)
        assert second != first
        # Dies with a group in it (stopped, then killed): that group's outcome is unknown.
        os.kill(second, signal.SIGSTOP)
        pending = asyncio.ensure_future(backend.commit([w("a", 2, 3)]))
        await asyncio.sleep(0.05)
        assert not pending.done()
        os.kill(second, signal.SIGKILL)
        with pytest.raises(Indeterminate, match="writer process died during a commit"):
            await pending
        # It never ran: the next child finds version 2, and commits on it.
        assert await backend.load_many([("T", "a")]) == [Stored(2, 1, b"s")]
        assert await backend.commit([w("a", 2, 3)]) == [True]
        assert pid_of(backend) not in (first, second)
        assert backend.statistics()["transactions"] == 3
    finally:
        await backend.aclose()


async def test_a_file_the_child_refuses_is_unavailable_and_the_child_serves_on(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(Unavailable):
        await SQLite(bad).open("default")
    good = SQLite(tmp_path / "good.db")
    await good.open("default")
    try:
        assert await good.commit([w("a", 0, 1)]) == [True]
    finally:
        await good.aclose()


class Counter(pachyderm.Entity):
    name = "Counter"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> int:
        return state + 1


class Recording(Memory):
    """A memory backend that prefers turns of 3 entities, and records each commit's size."""

    max_batch: ClassVar[int] = 3

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        self.sizes.append(len(writes))
        return await super().commit(writes)


@pytest.mark.parametrize(("option", "largest"), [(None, 3), (5, 5)])
async def test_a_world_takes_the_backends_turn_size_unless_its_options_say(
    option: int | None, largest: int
) -> None:
    backend = Recording()
    options = {} if option is None else {"max_batch": option}
    async with pachyderm.World(backend, entities=[Counter], **options) as world:
        await asyncio.gather(*[world.activate((Counter, f"k{i}"), "x") for i in range(20)])
    assert max(backend.sizes) == largest
    assert sum(backend.sizes) == 20
    assert SQLite.max_batch == 500
    assert Memory.max_batch == 1000


def test_the_wire_structs_have_the_fields_of_the_backend_rows() -> None:
    # The child decodes writes into these: a field added to a row must be added there too.
    pairs = [
        (Write, sp.WireWrite),
        (Receipt, sp.WireReceipt),
        (Envelope, sp.WireEnvelope),
        (Consume, sp.WireConsume),
        (Outbox, sp.WireOutbox),
        (Fence, sp.WireFence),
    ]
    for row, wire in pairs:
        assert tuple(f.name for f in dataclasses.fields(row)) == wire.__struct_fields__, row
    e = Envelope("A", "a", 1, 0, "B", "b", 0.0, None, b"x")
    write = Write(
        "T",
        "k",
        1,
        2,
        3,
        b"d",
        (Receipt("r", 2, b"res", 1.5),),
        Outbox(sends=(e,), cancels=("n",), consumes=(Consume(("X", "x", 1, 0), "why", True),)),
        (b"e1",),
        True,
        Fence("node", 4, 5),
        False,
    )
    (decoded,) = msgspec.msgpack.decode(
        msgspec.msgpack.encode((write,)), type=tuple[sp.WireWrite, ...]
    )
    assert msgspec.to_builtins(decoded) == msgspec.to_builtins(write)
    assert decoded.outbox is not None
    assert decoded.outbox.sends[0].id == e.id
