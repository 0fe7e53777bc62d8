"""The SQLite writer in a child process: where it runs, its reuse, its death, the world's turns."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

import pachyderm
from pachyderm import Indeterminate, InvalidOptions, Unavailable, backends
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
from pachyderm.backends import _sqlite_child as wire
from pachyderm.backends import _sqlite_process as sp
from pachyderm.backends._sqlite_jobs import COMMIT

from .test_world import Counter


@contextlib.asynccontextmanager
async def opened(path: Path) -> AsyncIterator[SQLite]:
    backend = SQLite(path)
    await backend.open("default")
    try:
        yield backend
    finally:
        await backend.aclose()


def w(key: str, expected: int, version: int, data: bytes = b"s") -> Write:
    return Write("T", key, expected, version, 1, data)


def link_of(backend: SQLite) -> sp.Link:
    session = backend._session
    assert session is not None
    assert session.link is not None
    return session.link


def pid_of(backend: SQLite) -> int:
    child = link_of(backend).child
    assert child is not None
    return child.proc.pid


async def until(condition: Any, what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {seconds} s"
        await asyncio.sleep(0.005)


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """Stop a child (SIGSTOP) for the block; let it go on after, even if the block fails."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_the_writer_runs_in_another_process_kept_for_the_next_open(tmp_path: Path) -> None:
    async with opened(tmp_path / "a.db") as first:
        assert await first.commit([w("a", 0, 1)]) == [True]
        pid = pid_of(first)
        assert pid != os.getpid()
        assert first.statistics()["transactions"] == 1  # counted by the child, told the parent
    # The idle child serves the next open, of another file.
    async with opened(tmp_path / "b.db") as second:
        assert pid_of(second) == pid
        assert await second.load_many([("T", "a")]) == [None]
        assert await second.commit([w("b", 0, 1)]) == [True]
    # Several opens at once: each its own child; at most IDLE_CHILDREN stay.
    many = [SQLite(tmp_path / f"m{i}.db") for i in range(sp.IDLE_CHILDREN + 2)]
    for b in many:
        await b.open("default")
    pids = {pid_of(b) for b in many}
    assert len(pids) == len(many)
    for b in many:
        await b.aclose()
    assert sum(map(alive, pids)) <= sp.IDLE_CHILDREN
    async with opened(tmp_path / "a.db") as third:
        assert await third.load_many([("T", "a")]) == [Stored(1, 1, b"s")]


async def test_a_writer_process_that_dies_fails_what_it_did_not_answer(tmp_path: Path) -> None:
    async with opened(tmp_path / "w.db") as backend:
        link = link_of(backend)
        assert await backend.commit([w("a", 0, 1)]) == [True]
        # Dies while idle: the next group gets a new child, and loses nothing.
        first = pid_of(backend)
        os.kill(first, signal.SIGKILL)
        await until(lambda: link.child is None, "told of the death")
        assert await backend.commit([w("a", 1, 2)]) == [True]
        second = pid_of(backend)
        assert second != first
        # Dies with a group in it (stopped, then killed): that group's outcome is unknown.
        with paused(second):
            pending = asyncio.ensure_future(backend.commit([w("a", 2, 3)]))
            await until(lambda: link.sent, "sent")
            os.kill(second, signal.SIGKILL)
        with pytest.raises(Indeterminate, match="writer process died during a commit"):
            await pending
        # It never ran: the next child finds version 2, and commits on it.
        assert await backend.load_many([("T", "a")]) == [Stored(2, 1, b"s")]
        assert await backend.commit([w("a", 2, 3)]) == [True]
        assert pid_of(backend) not in (first, second)
        assert backend.statistics()["transactions"] == 3


async def test_a_frame_the_child_never_got_whole_goes_to_the_next_child(tmp_path: Path) -> None:
    async with opened(tmp_path / "w.db") as backend:
        link = link_of(backend)
        big = os.urandom(4 << 20)  # more than a pipe holds: the frame waits, half written
        pid = pid_of(backend)
        with paused(pid):
            pending = asyncio.ensure_future(backend.commit([w("big", 0, 1, big)]))
            await until(lambda: link.out, "half written")
            os.kill(pid, signal.SIGKILL)
        assert await pending == [True]  # sent again, whole, to a new child
        assert pid_of(backend) != pid
        assert await backend.load_many([("T", "big")]) == [Stored(1, 1, big)]


async def test_a_bad_value_fails_alone_in_its_group(tmp_path: Path) -> None:
    async with opened(tmp_path / "w.db") as backend:
        pid = pid_of(backend)
        bad_values: list[Write] = [
            w("none", 0, 1, None),  # type: ignore[arg-type]
            msgspec.structs.replace(w("float", 0, 1), version=1.5),  # type: ignore[arg-type]
            msgspec.structs.replace(w("obj", 0, 1), data=object()),  # type: ignore[arg-type]
        ]
        # One group: each bad request beside good ones, all queued in one loop iteration.
        calls = [backend.commit([w(f"good{i}", 0, 1)]) for i in range(3)]
        calls[1:1] = [backend.commit([bad]) for bad in bad_values]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [results[0], results[-2], results[-1]] == [[True]] * 3
        assert all(isinstance(r, TypeError) for r in results[1:4]), results
        assert pid_of(backend) == pid  # the child lives on
        stored = await backend.load_many([("T", f"good{i}") for i in range(3)])
        assert stored == [Stored(1, 1, b"s")] * 3
        assert await backend.load_many([("T", "none"), ("T", "float")]) == [None, None]


async def test_a_child_that_cannot_be_started_fails_the_queue_until_one_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with opened(tmp_path / "w.db") as backend:
        link = link_of(backend)
        assert await backend.commit([w("a", 0, 1)]) == [True]

        def refuse(path: str) -> sp._Child:
            raise Unavailable("no process today")

        monkeypatch.setattr(sp._Child, "take", staticmethod(refuse))
        os.kill(pid_of(backend), signal.SIGKILL)
        await until(lambda: link.child is None, "told of the death")
        with pytest.raises(Unavailable, match="no process today"):
            await backend.commit([w("a", 1, 2)])
        monkeypatch.undo()
        assert await backend.commit([w("a", 1, 2)]) == [True]


@pytest.mark.parametrize("torn", [False, True])
async def test_a_cancelled_aclose_starts_no_new_child(tmp_path: Path, torn: bool) -> None:
    backend = SQLite(tmp_path / "w.db")
    await backend.open("default")
    link = link_of(backend)
    session = backend._session
    assert session is not None
    pid = pid_of(backend)
    # Torn: more than a pipe holds, so the frame is half written when the input is closed.
    data = os.urandom(4 << 20) if torn else b"s"
    with paused(pid):  # then it answers what it has whole, and sees its input ended
        pending = asyncio.ensure_future(backend.commit([w("a", 0, 1, data)]))
        await until(lambda: link.out if torn else link.sent, "sent")
        closing = asyncio.ensure_future(backend.aclose())
        await asyncio.sleep(0.05)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert session.lock.fd is not None  # held while the child may still write
    if torn:  # never run, and not sent again to a new child
        with pytest.raises(Unavailable):
            await pending
    else:
        assert await pending == [True]
    await until(lambda: link.child is None, "ended")
    await until(lambda: not sp._restarts, "restarts done")
    await until(lambda: session.lock.fd is None, "unlocked once the child ended")
    assert link.child is None
    with pytest.raises(Unavailable):
        await link.request(0, (w("b", 0, 1),))
    again = SQLite(tmp_path / "w.db")  # the lock was released; the commit is there if it ran
    await again.open("default")
    try:
        expected = None if torn else Stored(1, 1, data)
        assert await again.load_many([("T", "a")]) == [expected]
    finally:
        await again.aclose()


async def test_a_cancelled_open_leaves_no_child_behind(tmp_path: Path) -> None:
    sp._end_idle()  # so that the open below starts a new child (slower than the timeout)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(SQLite(tmp_path / "w.db").open("default"), 0.001)
    # Once ready, the child is detached and kept idle; nothing is left running unowned.
    await until(lambda: len(sp._idle) == 1, "kept idle")
    kept = sp._idle[0].proc.pid
    gc.collect()  # an unowned child would warn here (ResourceWarning: an error in these tests)
    async with opened(tmp_path / "w.db") as backend:  # the file is free, the child serves
        assert pid_of(backend) == kept
        assert await backend.commit([w("a", 0, 1)]) == [True]


async def test_aclose_from_another_event_loop(tmp_path: Path) -> None:
    backend = SQLite(tmp_path / "w.db")
    await backend.open("default")
    assert await backend.commit([w("a", 0, 1)]) == [True]
    await asyncio.to_thread(asyncio.run, backend.aclose())  # done by the owner loop
    async with opened(tmp_path / "w.db") as again:
        assert await again.load_many([("T", "a")]) == [Stored(1, 1, b"s")]


async def test_a_group_over_the_frame_limit_is_sent_again_request_by_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sp, "MAX_FRAME", 1500)
    async with opened(tmp_path / "w.db") as backend:
        calls = [backend.commit([w(f"k{i}", 0, 1, b"x" * 400)]) for i in range(3)]
        calls.append(backend.commit([w("huge", 0, 1, b"x" * 2000)]))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[:3] == [[True]] * 3
        assert isinstance(results[3], pachyderm.TooLarge)
        assert backend.statistics()["transactions"] == 3  # one group each


async def test_a_file_the_child_refuses_is_unavailable_and_the_child_serves_on(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(Unavailable):
        await SQLite(bad).open("default")
    assert sp._idle
    kept = sp._idle[-1].proc.pid
    async with opened(tmp_path / "good.db") as good:
        assert pid_of(good) == kept
        assert await good.commit([w("a", 0, 1)]) == [True]


def test_a_write_reaches_the_child_whole() -> None:
    # Rows travel as MessagePack arrays (`array_like`) and the child decodes them into the same
    # Structs: every field, every nested row, the envelope's id with it.
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
    encoded = msgspec.msgpack.encode((write,))
    (decoded,) = wire._ARGUMENTS[COMMIT].decode(encoded)
    assert decoded == write
    assert msgspec.to_builtins(decoded) == msgspec.to_builtins(write)
    assert decoded.outbox is not None
    assert decoded.outbox.sends[0].id == e.id == ("A", "a", 1, 0)
    # A row of more fields than its type is refused (the child then fails that job alone).
    fields = msgspec.msgpack.decode(msgspec.msgpack.encode(write))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(fields), type=Write) == write
    too_long = msgspec.msgpack.encode([[*fields, "extra"]])
    with pytest.raises(msgspec.ValidationError):
        wire._ARGUMENTS[COMMIT].decode(too_long)


def test_an_envelope_id_is_always_made_from_its_fields() -> None:
    e = Envelope("A", "a", 1, 0, "B", "b", 0.0, None, b"x")
    assert msgspec.structs.replace(e, version=2, index=3).id == ("A", "a", 2, 3)
    assert Envelope("A", "a", 1, 0, "B", "b", 0.0, None, b"x", ("Z", "z", 9, 9)).id == e.id
    wrong = [*msgspec.structs.astuple(e)[:9], ("Z", "z", 9, 9)]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(wrong), type=Envelope).id == e.id


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


def test_the_writer_option_in_a_url() -> None:
    assert "writer" not in repr(backends.open("sqlite:///x.db"))
    assert repr(backends.open("sqlite:///x.db?writer=thread&synchronous=NORMAL")) == (
        "SQLite('x.db', synchronous='NORMAL', writer='thread')"
    )
    with pytest.raises(InvalidOptions, match="writer"):
        backends.open("sqlite:///x.db?writer=fork")
