"""The SQLite backend: semantics (as the memory backend's), group commit, locking, durability."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pachyderm import Indeterminate, InvalidOptions, StorageLocked, TooLarge, Unavailable
from pachyderm.backends import (
    Backend,
    Consume,
    Envelope,
    Memory,
    Outbox,
    Receipt,
    SQLite,
    Stored,
    Write,
    _sqlite_schema,
)

CHILD = str(Path(__file__).with_name("_sqlite_child.py"))


def w(key: str, expected: int, version: int, data: bytes = b"s", *receipts: Receipt) -> Write:
    return Write("T", key, expected, version, 1, data, tuple(receipts))


@contextlib.asynccontextmanager
async def opened(backend: Backend, world: str = "default") -> AsyncIterator[Backend]:
    await backend.open(world)
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "world.db"


def stat(backend: Backend, name: str) -> float:
    value = backend.statistics()[name]
    assert isinstance(value, int | float)
    return value


def child(mode: str, path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, CHILD, mode, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_child(mode: str, path: Path, timeout: float = 20) -> tuple[int, str, str]:
    """Run the child to its end; a child that hangs is killed and fails the test."""
    proc = child(mode, path)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the {mode} child hung: {out!r} {err!r}")
    return proc.returncode, out, err


# -- semantics ---------------------------------------------------------------------------------


async def test_load_commit_conflict_receipts_roundtrip(db: Path) -> None:
    async with opened(SQLite(db)) as b:
        assert await b.load_many([("T", "a")]) == [None]
        r1 = Receipt("r1", 1, b"reply", 10.0)
        assert await b.commit([w("a", 0, 1, b"one", r1)]) == [True]
        assert await b.commit([w("a", 0, 1, b"other")]) == [False]  # lost: stored is 1
        assert await b.commit([w("a", 1, 3, b"three"), w("b", 5, 6), w("c", 0, 1)]) == [
            True,
            False,  # b was never stored, so expected 5 loses
            True,
        ]
        assert await b.load_many([("T", "a"), ("T", "b"), ("U", "a"), ("T", "a")]) == [
            Stored(3, 1, b"three"),
            None,
            None,
            Stored(3, 1, b"three"),
        ]
        assert await b.receipt("T", "a", "r1") == r1
        assert await b.receipt("T", "a", "r2") is None
        assert await b.receipt("T", "c", "r1") is None
        # A lost write's receipts are not stored.
        assert await b.commit([w("a", 1, 2, b"x", Receipt("r2", 2, b"", 11.0))]) == [False]
        assert await b.receipt("T", "a", "r2") is None
        assert await b.commit([w("a", 3, 4, b"x", Receipt("r3", 4, b"", 20.0))]) == [True]
        assert await b.prune_receipts(15.0) == 1
        assert await b.receipt("T", "a", "r1") is None
        assert await b.receipt("T", "a", "r3") == Receipt("r3", 4, b"", 20.0)
        assert await b.commit([]) == []
        assert await b.load_many([]) == []


async def test_list_keys_prefix_after_paging_and_code_point_order(db: Path) -> None:
    keys = ["a", "ab", "abc", "abd", "b", "é", "\uffff", "\U0001f600", "\U0010ffff", "z\U0010ffffa"]
    memory = Memory()
    async with opened(SQLite(db)) as b, opened(memory):
        for m in (b, memory):
            await m.commit([w(k, 0, 1) for k in keys])
            await m.commit([Write("U", "a", 0, 1, 1, b"")])
        assert await b.list_keys("T") == sorted(keys)
        assert await b.list_keys("T", prefix="ab") == ["ab", "abc", "abd"]
        assert await b.list_keys("T", prefix="ab", after="abc") == ["abd"]
        assert await b.list_keys("T", prefix="z\U0010ffff") == ["z\U0010ffffa"]
        assert await b.list_keys("T", limit=0) == []
        assert await b.list_keys("V") == []
        pages, after = [], None
        while page := await b.list_keys("T", after=after, limit=3):
            pages.append(page)
            after = page[-1]
        assert [len(p) for p in pages] == [3, 3, 3, 1]
        assert [k for p in pages for k in p] == sorted(keys)
        # The same answers as the reference, for many prefixes and bounds (even odd ones).
        probes = ["", "a", "ab", "abc", "b", "c", "é", "\ud7ff", "\ud800", "\uffff", "\U0010ffff"]
        for prefix in probes:
            for after in [None, *probes]:
                for limit in (1, 2, 1000):
                    expected = await memory.list_keys("T", prefix=prefix, after=after, limit=limit)
                    got = await b.list_keys("T", prefix=prefix, after=after, limit=limit)
                    assert got == expected, (prefix, after, limit)


async def test_load_many_of_many_refs_over_several_types(db: Path) -> None:
    async with opened(SQLite(db)) as b:
        assert await b.commit(
            [Write(t, str(i), 0, i + 1, 2, b"%d" % i) for t in "TU" for i in range(1200)]
        )
        refs = [(t, str(i)) for i in range(1300) for t in "TUV"]
        random.Random(1).shuffle(refs)
        got = await b.load_many(refs)
        for (t, k), stored in zip(refs, got, strict=True):
            if t == "V" or int(k) >= 1200:
                assert stored is None
            else:
                assert stored == Stored(int(k) + 1, 2, k.encode())
        # Concurrent loads are answered together, each with its own refs.
        answers = await asyncio.gather(
            *(b.load_many([("T", str(i)), ("T", "x")]) for i in range(50))
        )
        assert answers == [[Stored(i + 1, 2, str(i).encode()), None] for i in range(50)]


async def test_commits_in_one_group_apply_in_call_order_like_memory(db: Path) -> None:
    # Random concurrent commits land in few transactions; the answers and the final rows must be
    # those of the reference applying the same calls one after the other.
    rng = random.Random(7)
    memory = Memory()
    async with opened(SQLite(db)) as b, opened(memory):
        for _ in range(20):
            calls = []
            for _ in range(rng.randint(1, 60)):
                writes, seen = [], set()
                for _ in range(rng.randint(1, 3)):
                    key = rng.choice("abcdef")
                    if key in seen:
                        continue
                    seen.add(key)
                    expected = rng.randint(0, 4)
                    receipt = Receipt(f"r{rng.randint(0, 3)}", expected + 1, b"%d" % expected, 1.0)
                    writes.append(w(key, expected, expected + 1, b"v%d" % rng.random(), receipt))
                calls.append(writes)
            expected_answers = [await memory.commit(c) for c in calls]
            assert await asyncio.gather(*(b.commit(c) for c in calls)) == expected_answers
            refs = [("T", k) for k in "abcdef"]
            assert await b.load_many(refs) == await memory.load_many(refs)
            for key in "abcdef":
                for rid in ("r0", "r1", "r2", "r3"):
                    assert await b.receipt("T", key, rid) == await memory.receipt("T", key, rid)
        assert stat(b, "conflicts") > 0
        assert stat(b, "transactions") < stat(b, "commits")


async def test_one_group_with_an_insert_then_an_update_of_the_same_entity(db: Path) -> None:
    async with opened(SQLite(db)) as b:
        # Queue order: insert (0 -> 1), then update (1 -> 2): both win, in one transaction.
        assert list(
            await asyncio.gather(b.commit([w("a", 0, 1)]), b.commit([w("a", 1, 2, b"2")]))
        ) == [
            [True],
            [True],
        ]
        # Queue order: update of a missing row (loses), then insert (wins).
        assert list(
            await asyncio.gather(b.commit([w("z", 1, 2)]), b.commit([w("z", 0, 1, b"1")]))
        ) == [
            [False],
            [True],
        ]
        assert await b.load_many([("T", "a"), ("T", "z")]) == [
            Stored(2, 1, b"2"),
            Stored(1, 1, b"1"),
        ]
        assert b.statistics()["transactions"] == 2


# -- the outbox -------------------------------------------------------------------------------

KEYS = "abcd"
NAMES = ["t1", "t2"]


class OutboxCalls:
    """Random commit calls with outboxes, aimed so that groups interleave on rows and names.

    ``careful``: aim right (expected versions, rows not taken yet), so that most groups take
    the writer's fast path; else many writes lose. Mutable state: ``versions`` (per key, as the
    reference left them), ``rows`` (rows to consume), ``ids`` (every id ever named), changed by
    ``group`` and ``same``.
    """

    def __init__(self, rng: random.Random, *, careful: bool) -> None:
        self.rng = rng
        self.careful = careful
        self.versions: dict[str, int] = {}
        self.rows: list[Envelope] = []
        self.ids: list[tuple[str, str, int, int]] = []

    def group(self) -> list[list[Write]]:
        """Commit calls to run concurrently; later ones often build on earlier ones."""
        rng = self.rng
        projected = dict(self.versions)  # as if every write of the group so far won
        self.taken: set[tuple[str, str, int, int]] = set()
        calls = []
        for _ in range(rng.randint(1, 8)):
            writes = []
            for key in rng.sample(KEYS, rng.randint(1, 3)):
                writes.append(self.write(key, projected))
            calls.append(writes)
        return calls

    def write(self, key: str, projected: dict[str, int]) -> Write:
        rng, careful = self.rng, self.careful
        expected = projected.get(key, 0)
        if not careful:
            expected = rng.choice([expected] * 4 + [self.versions.get(key, 0), rng.randint(0, 6)])
        check = rng.random() < (0.05 if careful else 0.3)  # version == expected: no sends
        version = expected if check else expected + rng.randint(1, 2)
        projected[key] = version
        consumes = []
        rows = [row for row in self.rows if row.id not in self.taken] if careful else self.rows
        for row in rng.sample(rows, min(len(rows), rng.choice([0, 0, 1, 1, 2, 3]))):
            consumes.append(Consume(row.id, rng.choice([None, None, None, "dead"]), bool(row.due)))
            self.taken.add(row.id)
        if not careful and rng.random() < 0.1:
            consumes.append(Consume(("T", key, 99, rng.randint(0, 9))))  # never sent
        if not careful and consumes and rng.random() < 0.05:
            consumes.append(consumes[0])  # named twice: the write loses
        cancels = tuple(rng.sample(NAMES, rng.choice([0, 0, 0, 1, 2])))
        sends = []
        if not check:
            for index in range(rng.choice([0, 1, 1, 2, 3])):
                # The same id has the same due, in every write that sends it (winning or not):
                # what `Consume.timer` says must be true of the row.
                due = [0.0, 0.0, 1.0, 2.0, 3.0][(ord(key) + 3 * version + index) % 5]
                name = rng.choice([None, *NAMES]) if due else None
                row = Envelope("T", key, version, index, "T", rng.choice(KEYS), due, name, b"m")
                sends.append(row)
        self.rows += sends
        self.ids += [row.id for row in sends] + [c.id for c in consumes]
        outbox = Outbox(tuple(sends), cancels, tuple(consumes))
        return Write("T", key, expected, version, 1, b"%d" % rng.randint(0, 99), (), outbox)

    async def same(self, b: Backend, memory: Backend) -> None:
        """Both backends hold the same rows, outbox and counts; remember the versions."""
        refs = [("T", k) for k in KEYS]
        stored = await memory.load_many(refs)
        assert await b.load_many(refs) == stored
        self.versions = {k: row.version for k, row in zip(KEYS, stored, strict=True) if row}
        assert await b.list_keys("T") == await memory.list_keys("T")
        waiting = await memory.due(float("inf"))
        assert await b.due(float("inf")) == waiting
        assert await b.due(1.5, limit=3) == await memory.due(1.5, limit=3)
        assert await b.exists(self.ids) == await memory.exists(self.ids)
        assert b.outbox_counts() == memory.outbox_counts()
        recent = [] if self.careful else self.rows[-5:]
        self.rows = [row for row in waiting if self.rng.random() < 0.9] + recent


@pytest.mark.parametrize("careful", [False, True], ids=["conflicts", "careful"])
@pytest.mark.parametrize("seed", range(5))
async def test_outbox_commits_in_one_group_apply_in_call_order_like_memory(
    tmp_path: Path, seed: int, careful: bool
) -> None:
    # Concurrent commits consuming, cancelling, replacing and sending rows that the calls before
    # them in the same group sent or took: the answers, the rows, the outbox and its counts must
    # be those of the reference applying the calls one after the other.
    rng = random.Random(seed)
    calls = OutboxCalls(rng, careful=careful)
    memory = Memory()
    path = tmp_path / "outbox.db"
    b = SQLite(path)
    await memory.open("default")
    await b.open("default")
    conflicts = 0.0
    try:
        for step in range(60):
            group = calls.group()
            expected = [await memory.commit(c) for c in group]
            assert await asyncio.gather(*(b.commit(c) for c in group)) == expected, step
            await calls.same(b, memory)
            if step % 20 == 19:  # counted again from the file
                conflicts += stat(b, "conflicts")
                await b.aclose()
                b = SQLite(path)
                await b.open("default")
                await calls.same(b, memory)
        assert conflicts > 0
        assert memory.outbox_counts()["dead"] > 0
    finally:
        await b.aclose()
        await memory.aclose()


async def test_outbox_order_in_one_group(db: Path) -> None:
    # Cases where applying a group's outbox changes kind by kind would differ from call order.
    timer = Envelope("T", "s", 1, 0, "T", "r", 5.0, "t", b"")
    message = Envelope("T", "s", 1, 1, "T", "r", 0.0, None, b"")

    def out(key: str, expected: int, version: int, **outbox: Any) -> Write:
        return Write("T", key, expected, version, 1, b"", (), Outbox(**outbox))

    async with opened(SQLite(db)) as b:

        async def group(*calls: Write) -> list[list[bool]]:
            return list(await asyncio.gather(*(b.commit([c]) for c in calls)))

        assert await b.commit([out("s", 0, 1, sends=(timer, message))]) == [True]
        # The sender cancels its timer, then a receiver consumes it: the receiver loses.
        got = await group(
            out("s", 1, 2, cancels=("t",)),
            out("r", 0, 0, consumes=(Consume(timer.id, None, True),)),
        )
        assert got == [[True], [False]]
        assert await b.exists([timer.id, message.id]) == [False, True]
        # The sender sends a timer t, then cancels it: nothing is left of t.
        again = Envelope("T", "s", 3, 0, "T", "r", 6.0, "t", b"")
        got = await group(out("s", 2, 3, sends=(again,)), out("s", 3, 4, cancels=("t",)))
        assert got == [[True], [True]]
        assert await b.due(float("inf")) == [message]
        # A receiver consumes a row that the group sent just before: it wins.
        third = Envelope("T", "s", 5, 0, "T", "r", 0.0, None, b"")
        got = await group(
            out("s", 4, 5, sends=(third,)), out("r", 0, 1, consumes=(Consume(third.id),))
        )
        assert got == [[True], [True]]
        # Created, then checked at its version, then updated; a check after the update loses.
        got = await group(
            out("n", 0, 1),
            out("n", 1, 1, consumes=(Consume(message.id),)),
            out("n", 1, 2),
            out("n", 1, 1),
        )
        assert got == [[True], [True], [True], [False]]
        assert await b.load_many([("T", "n")]) == [Stored(2, 1, b"")]
        assert b.outbox_counts() == {"messages": 0, "timers": 0, "dead": 0}
        assert b.statistics()["outbox"] == b.outbox_counts()
        assert b.statistics()["transactions"] == 5  # each group was one transaction


async def test_outbox_counts_are_counted_at_open_and_zero_while_closed(db: Path) -> None:
    rows = [Envelope("T", "s", 1, i, "T", "r", float(i % 3), None, b"") for i in range(10)]
    backend = SQLite(db)
    assert backend.outbox_counts() == {"messages": 0, "timers": 0, "dead": 0}
    async with opened(backend) as b:
        assert await b.commit([Write("T", "s", 0, 1, 1, b"", (), Outbox(sends=tuple(rows)))])
        dead = Outbox(consumes=(Consume(rows[0].id, "why"), Consume(rows[1].id, "why", True)))
        assert await b.commit([Write("T", "r", 0, 0, 1, b"", (), dead)]) == [True]
        assert b.outbox_counts() == {"messages": 3, "timers": 5, "dead": 2}
    assert backend.outbox_counts() == {"messages": 0, "timers": 0, "dead": 0}
    async with opened(SQLite(db)) as b:
        assert b.outbox_counts() == {"messages": 3, "timers": 5, "dead": 2}
        assert b.statistics()["outbox"] == {"messages": 3, "timers": 5, "dead": 2}
    async with opened(SQLite(db), "another world") as b:
        assert b.outbox_counts() == {"messages": 0, "timers": 0, "dead": 0}


async def test_worlds_in_one_file_do_not_see_each_other(db: Path) -> None:
    async with opened(SQLite(db), "one") as b:
        assert await b.commit(
            [w("a", 0, 1, b"one"), Write("T", "b", 0, 1, 1, b"", (Receipt("r", 1, b"", 1.0),))]
        )
    async with opened(SQLite(db), "two") as b:
        assert await b.load_many([("T", "a")]) == [None]
        assert await b.list_keys("T") == []
        assert await b.receipt("T", "b", "r") is None
        assert await b.prune_receipts(10.0) == 0
        assert await b.commit([w("a", 0, 1, b"two")]) == [True]  # expected 0: new in this world
    async with opened(SQLite(db), "one") as b:
        assert await b.load_many([("T", "a")]) == [Stored(1, 1, b"one")]
        assert await b.list_keys("T") == ["a", "b"]
        assert await b.receipt("T", "b", "r") == Receipt("r", 1, b"", 1.0)


async def test_closed_or_reopened_backend(db: Path) -> None:
    backend = SQLite(db)
    with pytest.raises(Unavailable):
        await backend.commit([w("a", 0, 1)])
    async with opened(backend):
        with pytest.raises(InvalidOptions):
            await backend.open("default")
    for call in (
        backend.commit([w("a", 0, 1)]),
        backend.load_many([("T", "a")]),
        backend.receipt("T", "a", "r"),
        backend.list_keys("T"),
        backend.prune_receipts(1.0),
    ):
        with pytest.raises(Unavailable):
            await call
    await backend.aclose()  # closing twice is harmless


async def test_aclose_applies_every_queued_commit(db: Path) -> None:
    backend = SQLite(db)
    await backend.open("default")
    tasks = [asyncio.ensure_future(backend.commit([w(str(i), 0, 1)])) for i in range(100)]
    await asyncio.sleep(0)  # the calls are queued, not answered
    await backend.aclose()
    assert [t.result() for t in tasks] == [[True]] * 100
    async with opened(SQLite(db)) as b:
        assert len(await b.list_keys("T")) == 100


async def test_writer_jobs_apply_in_call_order(db: Path) -> None:
    async with opened(SQLite(db)) as b:
        # Called in the same loop iteration: the prune comes after the commit, and sees its receipt.
        commit = asyncio.ensure_future(b.commit([w("a", 0, 1, b"", Receipt("r", 1, b"", 1.0))]))
        prune = asyncio.ensure_future(b.prune_receipts(2.0))
        assert await commit == [True]
        assert await prune == 1
        assert await b.receipt("T", "a", "r") is None


# -- group commit ------------------------------------------------------------------------------


async def test_group_commit_groups_concurrent_calls(db: Path) -> None:
    async with opened(SQLite(db)) as b:
        answers = await asyncio.gather(*(b.commit([w(f"k{i}", 0, 1)]) for i in range(1000)))
        assert answers == [[True]] * 1000
        assert stat(b, "commits") == 1000
        assert stat(b, "writes") == 1000
        assert stat(b, "transactions") <= 10
        assert stat(b, "largest_group") >= 100
        assert stat(b, "average_group") >= 100
        assert stat(b, "pending") == 0
        assert len(await b.list_keys("T", limit=5000)) == 1000


async def test_cancelling_commit_does_not_withdraw_the_write(db: Path) -> None:
    async with opened(SQLite(db)) as b:
        cancelled = asyncio.ensure_future(b.commit([w("a", 0, 1)]))
        other = asyncio.ensure_future(b.commit([w("b", 0, 1)]))
        await asyncio.sleep(0)  # both queued, for one transaction
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        # The other caller of the group is answered (the cancelled one is skipped) ...
        assert await asyncio.wait_for(other, 10) == [True]
        # ... the cancelled write still committed, and the writer thread is alive.
        assert await asyncio.wait_for(b.commit([w("a", 1, 2)]), 10) == [True]
        assert await b.load_many([("T", "a")]) == [Stored(2, 1, b"s")]


async def test_callers_on_other_event_loops_even_closed_ones(db: Path) -> None:
    async with opened(SQLite(db)) as b:
        # A commit from another thread's event loop is answered on that loop.
        assert await asyncio.to_thread(asyncio.run, b.commit([w("a", 0, 1)])) == [True]

        def abandon_a_loop() -> None:
            loop = asyncio.new_event_loop()
            task = loop.create_task(b.commit([w("b", 0, 1)]))
            loop.run_until_complete(asyncio.sleep(0))  # queued
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
            loop.close()  # the writer thread answers a closed loop: nobody listens

        await asyncio.to_thread(abandon_a_loop)
        await asyncio.sleep(0.05)  # let the writer thread answer the closed loop
        assert await asyncio.wait_for(b.commit([w("b", 1, 2), w("c", 0, 1)]), 10) == [True, True]


# -- failures ----------------------------------------------------------------------------------


async def test_full_database_fails_the_commit_and_keeps_the_previous_state(db: Path) -> None:
    async with opened(SQLite(db, max_pages=40)) as b:
        assert await b.commit([w("a", 0, 1, b"small")]) == [True]
        big = b"x" * 400_000  # 100 pages of 4 KiB: over the cap
        with pytest.raises(Unavailable, match="full"):
            await b.commit([w("a", 1, 2, big), w("b", 0, 1)])
        # Together with small requests: only the one that does not fit fails.
        small, large = await asyncio.gather(
            b.commit([w("c", 0, 1, b"c")]), b.commit([w("d", 0, 1, big)]), return_exceptions=True
        )
        assert small == [True]
        assert isinstance(large, Unavailable)
        assert await b.load_many([("T", "a"), ("T", "b"), ("T", "c"), ("T", "d")]) == [
            Stored(1, 1, b"small"),
            None,
            Stored(1, 1, b"c"),
            None,
        ]
        assert await b.commit([w("a", 1, 2, b"still small")]) == [True]
        assert stat(b, "failed_transactions") >= 2
    async with opened(SQLite(db)) as b:  # the cap lifted
        assert await b.commit([w("a", 2, 3, big)]) == [True]
        assert await b.load_many([("T", "a"), ("T", "c")]) == [
            Stored(3, 1, big),
            Stored(1, 1, b"c"),
        ]


async def test_a_bad_value_fails_alone_with_too_large_or_type_error(db: Path) -> None:
    def small_limit(conn: sqlite3.Connection) -> None:
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000)

    async with opened(SQLite(db, _on_connect=small_limit)) as b:
        ok, too_large, no_state, not_bytes = await asyncio.gather(
            b.commit([w("a", 0, 1)]),
            b.commit([w("b", 0, 1, b"x" * 20_000)]),
            b.commit([w("c", 0, 1, None)]),  # type: ignore[arg-type]
            b.commit([w("d", 0, 1, object())]),  # type: ignore[arg-type]
            return_exceptions=True,
        )
        assert ok == [True]
        assert isinstance(too_large, TooLarge)
        assert isinstance(no_state, TypeError)
        assert isinstance(not_bytes, TypeError)
        refs = [("T", k) for k in "abcd"]
        assert await b.load_many(refs) == [Stored(1, 1, b"s"), None, None, None]


async def test_a_failed_commit_statement_is_indeterminate_for_the_whole_group(db: Path) -> None:
    deny = [True]

    def refuse_commit(conn: sqlite3.Connection) -> None:
        def authorizer(action: int, arg1: str | None, *_: object) -> int:
            if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT" and deny[0]:
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK

        conn.set_authorizer(authorizer)

    async with opened(SQLite(db, _on_connect=refuse_commit)) as b:
        first, second = await asyncio.gather(
            b.commit([w("a", 0, 1)]), b.commit([w("b", 0, 1)]), return_exceptions=True
        )
        # The outcome of a failed COMMIT is unknown in general: no retry, one answer for all.
        assert isinstance(first, Indeterminate)
        assert isinstance(second, Indeterminate)
        assert await b.load_many([("T", "a"), ("T", "b")]) == [None, None]  # here: rolled back
        deny[0] = False
        assert await b.commit([w("a", 0, 1)]) == [True]


async def test_a_file_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database" * 100)
    backend = SQLite(path)
    with pytest.raises(Unavailable, match=r"junk\.db"):
        await backend.open("default")
    with pytest.raises(Unavailable):
        await SQLite(tmp_path / "missing" / "folder.db").open("default")
    # A failed open releases the lock: a good file at the same place opens at once.
    path.unlink()
    async with opened(backend) as b:
        assert await b.commit([w("a", 0, 1)]) == [True]


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"synchronous": "OFF"},
        {"synchronous": "EXTRA"},
        {"synchronous": 2},
        {"busy_timeout": -1},
        {"busy_timeout": float("nan")},
        {"busy_timeout": True},
        {"max_pages": 0},
        {"max_pages": 1.5},
        {"writer": "fork"},
        {"writer": None},
    ],
)
def test_bad_options_are_refused_at_construction(db: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidOptions):
        SQLite(db, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["", ":memory:", b"bytes.db", 3])
def test_bad_paths_are_refused(path: object) -> None:
    with pytest.raises(InvalidOptions):
        SQLite(path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "pragma"), [("FULL", 2), ("full", 2), ("NORMAL", 1), ("Normal", 1)]
)
async def test_synchronous_option_reaches_the_writer(db: Path, given: str, pragma: int) -> None:
    seen: list[int] = []

    def probe(conn: sqlite3.Connection) -> None:
        seen.append(conn.execute("PRAGMA synchronous").fetchone()[0])

    async with opened(SQLite(db, synchronous=given, _on_connect=probe)) as b:
        assert await b.commit([w("a", 0, 1)]) == [True]
        assert await b.load_many([("T", "a")]) == [Stored(1, 1, b"s")]
    assert seen == [pragma]


async def test_the_writer_has_a_large_cache_and_wal(db: Path) -> None:
    """A large page cache and WAL: a miss on a big file reads no page from the system."""
    seen: list[tuple[int, int]] = []

    def probe(conn: sqlite3.Connection) -> None:
        cache = conn.execute("PRAGMA cache_size").fetchone()[0]
        seen.append((cache, conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]))

    async with opened(SQLite(db, _on_connect=probe)) as b:
        assert await b.commit([w("a", 0, 1)]) == [True]
    assert seen == [(-_sqlite_schema.CACHE_KIB, _sqlite_schema.WAL_AUTOCHECKPOINT)]
    assert _sqlite_schema.CACHE_KIB >= 32768
    assert _sqlite_schema.WAL_AUTOCHECKPOINT >= 10000
    with contextlib.closing(sqlite3.connect(db)) as conn:  # and so has the reader
        _sqlite_schema.Database.setup_reader(conn)
        assert conn.execute("PRAGMA cache_size").fetchone() == (-_sqlite_schema.CACHE_KIB,)


def test_class_facts(db: Path) -> None:
    assert SQLite.scope == "one machine"
    assert SQLite.durable is True
    assert "world.db" in repr(SQLite(db))


# -- one process per file ----------------------------------------------------------------------


async def test_second_open_in_this_process_is_refused(db: Path) -> None:
    async with opened(SQLite(db)):
        with pytest.raises(StorageLocked, match=r"world\.db is already open in this process"):
            await SQLite(db).open("default")
        with pytest.raises(StorageLocked):  # another spelling of the same file
            await SQLite(db.parent / "." / db.name).open("other")
    async with opened(SQLite(db)):  # released by aclose
        pass


async def test_second_process_gets_storage_locked_quickly(db: Path) -> None:
    async with opened(SQLite(db)):
        started = time.monotonic()
        _, out, err = await asyncio.to_thread(run_child, "lock", db)
        assert time.monotonic() - started < 10  # fails fast (mostly interpreter start-up)
        assert out.startswith("LOCKED"), (out, err)
        assert str(db) in out
        assert f"pid {os.getpid()}" in out
    _, out, err = await asyncio.to_thread(run_child, "lock", db)
    assert out.strip() == "OPENED", (out, err)


def test_acknowledged_commits_survive_sigkill(db: Path) -> None:
    proc = child("writer", db)
    assert proc.stdout is not None
    acked: dict[str, int] = {}
    lines = 0
    deadline = time.monotonic() + 30
    while lines < 400 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        key, version = line.split()
        acked[key] = int(version)
        lines += 1
    proc.send_signal(signal.SIGKILL)
    # Read the rest through `proc.stdout`: `communicate` would read the pipe only, and lose what
    # `readline` has already buffered.
    rest = proc.stdout.read()
    _, err = proc.communicate(timeout=30)
    for line in rest.splitlines():  # printed before the kill, so acknowledged too
        key, version = line.split()
        acked[key] = int(version)
    assert lines >= 400, err
    assert proc.returncode == -signal.SIGKILL

    async def check() -> None:
        async with opened(SQLite(db)) as b:
            keys = sorted(acked)
            for key, stored in zip(keys, await b.load_many([("T", k) for k in keys]), strict=True):
                assert stored is not None
                # Nothing acknowledged is lost; at most the one commit in flight is extra.
                assert acked[key] <= stored.version <= acked[key] + 1, (key, acked[key], stored)
                assert stored.data == str(stored.version).encode()

    asyncio.run(check())


def test_interpreter_exits_without_aclose_and_with_a_commit_in_flight(db: Path) -> None:
    returncode, out, err = run_child("noclose", db)
    assert returncode == 0, err
    assert out.strip() == "DONE"
    assert err == ""

    async def check() -> None:
        async with opened(SQLite(db)) as b:  # the lock died with the process
            assert (await b.load_many([("T", "a")]))[0] == Stored(1, 1, b"one")

    asyncio.run(check())


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_pending_counts_a_collected_commit_after_a_prune(db: Path, writer: str) -> None:
    async with opened(SQLite(db, writer=writer)) as b:
        assert await b.prune_receipts(0.0) == 0  # a request handed over at once
        pending = asyncio.ensure_future(b.commit([w("a", 0, 1)]))
        await asyncio.sleep(0)  # collected, not yet handed over
        assert stat(b, "pending") == 1
        assert await pending == [True]
        assert stat(b, "pending") == 0
