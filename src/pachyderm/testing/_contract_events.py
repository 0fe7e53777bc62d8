"""The backend contract, continued: event logs (``Write.events``, ``snapshot``, ``read_events``).

The cases register with ``_contract._case``, so that ``backend_cases()`` and ``check_backend`` run
them after the others. As there: framework-free, fresh backends per case, checks raise
``AssertionError`` explicitly.

Their vocabulary: an *event write* appends its events to an entity's log as seqs ``expected + 1``
.. ``version``; the entity's row then holds ``version`` and, when a write stored one, a
*snapshot*: the state at seq ``Stored.snapshot`` in ``Stored.data`` (0: none, ``data`` empty).
A write's events, row, receipts and outbox changes commit together, or none of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .._errors import Unavailable
from ..backends._base import (
    Backend,
    Consume,
    Envelope,
    Outbox,
    Receipt,
    Stored,
    StoredEvent,
    Write,
)
from ._contract import (
    _T,
    _U,
    BackendFactory,
    Reopen,
    _again,
    _case,
    _commit,
    _expect,
    _expect_equal,
    _expect_keys,
    _expect_receipt,
    _expect_row,
    _load,
    _new,
    _opened,
    _race,
    _write,
)

__all__: list[str] = []

_E = "contract.E"  # the type of event-sourced entities: nothing else is stored under it


def _ew(
    key: str,
    expected: int,
    events: Iterable[bytes],
    *,
    snapshot: bool = False,
    data: bytes = b"",
    type_version: int = 1,
    receipts: Iterable[Receipt] = (),
    outbox: Outbox | None = None,
    type_name: str = _E,
) -> Write:
    """An event write appending ``events``: ``version`` is ``expected + len(events)``."""
    log = tuple(events)
    return Write(
        type_name,
        key,
        expected,
        expected + len(log),
        type_version,
        data,
        tuple(receipts),
        outbox,
        log,
        snapshot,
    )


def _check(key: str, expected: int, *, type_name: str = _E, outbox: Outbox | None = None) -> Write:
    """A check-only write: ``version == expected``, no events (it keeps the row)."""
    return Write(type_name, key, expected, expected, 7, b"not stored", (), outbox)


async def _expect_due(backend: Backend, rows: Iterable[Envelope], when: str) -> None:
    expected = sorted(rows, key=Envelope.key)
    _expect_equal(await backend.due(float("inf")), expected, f"due(inf) {when}")


def _log(first: int, events: Iterable[bytes], type_version: int = 1) -> list[StoredEvent]:
    """The ``StoredEvent`` of each of ``events``, seqs from ``first``."""
    return [StoredEvent(seq, type_version, e) for seq, e in enumerate(events, first)]


async def _read(
    backend: Backend, key: str, *, after: int = 0, limit: int = 1000, type_name: str = _E
) -> list[StoredEvent]:
    got = await backend.read_events(type_name, key, after=after, limit=limit)
    _expect(isinstance(got, list), f"read_events() returned {type(got).__name__}, not a list")
    for event in got:
        _expect(isinstance(event, StoredEvent), f"read_events() returned {event!r}")
        _expect(type(event.data) is bytes, f"StoredEvent.data is {type(event.data).__name__}")
    return got


async def _expect_log(
    backend: Backend,
    key: str,
    expected: Sequence[StoredEvent],
    when: str,
    *,
    after: int = 0,
    limit: int = 1000,
    type_name: str = _E,
) -> None:
    got = await _read(backend, key, after=after, limit=limit, type_name=type_name)
    what = f"read_events({type_name!r}, {key!r}, after={after}, limit={limit}) {when}"
    _expect_equal(got, list(expected), what)


# ---------------------------------------------------------------------------------------------
# Appending, the fence, snapshots.


@_case
async def _case_events_atomic(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """Events append with their row, as seqs expected + 1 .. version; a lost write appends none."""
    first = [bytes(range(256)), b"", b"\x00"]
    async with _opened(_new(make_backend)) as backend:
        await _expect_log(backend, "k", [], "in a fresh world")
        await _commit(backend, [_ew("k", 0, first, type_version=2)], [True])
        await _expect_row(backend, "k", Stored(3, 2, b"", 0), _E)
        await _expect_log(backend, "k", _log(1, first, 2), "after the first write")
        await _expect_keys(backend, ["k"], _E)
        await _commit(backend, [_ew("k", 3, [b"four"], type_version=3)], [True])
        log = [*_log(1, first, 2), StoredEvent(4, 3, b"four")]
        await _expect_log(backend, "k", log, "after the second write")
        # Lost writes (expected too low, too high, or 0 for a stored entity) append nothing,
        # and store neither their row nor their receipts.
        for expected in (0, 1, 3, 5, 9):
            lost = Receipt(f"lost{expected}", expected + 1, b"x", 1.0)
            write = _ew("k", expected, [b"lost", b"lost"], receipts=[lost], snapshot=True)
            await _commit(backend, [write], [False])
            await _expect_receipt(backend, "k", lost.id, None, _E)
        await _commit(backend, [_ew("never", 2, [b"lost"])], [False])
        await _expect_log(backend, "k", log, "after lost writes")
        await _expect_row(backend, "k", Stored(4, 2, b"", 0), _E)
        await _expect_log(backend, "never", [], "of a lost write's entity")
        await _expect_row(backend, "never", None, _E)
        # In one batch, losers leave the winners' events (and rows) whole.
        batch = [
            _ew("a", 0, [b"a1", b"a2"]),
            _ew("k", 2, [b"lost"]),
            _write("s", 0, data=b"state"),
            _ew("b", 0, [b"b1"], receipts=[Receipt("rb", 1, b"ok", 1.0)]),
            _ew("c", 1, [b"lost"]),
            _ew("k", 4, [b"five", b"six"], type_version=4),
        ]
        await _commit(backend, batch, [True, False, True, True, False, True])
        await _expect_log(backend, "a", _log(1, [b"a1", b"a2"]), "of a winner of a mixed batch")
        await _expect_log(backend, "b", _log(1, [b"b1"]), "of a winner of a mixed batch")
        await _expect_log(backend, "c", [], "of a loser of a mixed batch")
        log += _log(5, [b"five", b"six"], 4)
        await _expect_log(backend, "k", log, "after a mixed batch")
        await _expect_row(backend, "k", Stored(6, 2, b"", 0), _E)
        await _expect_row(backend, "s", Stored(1, 1, b"state"))
        await _expect_receipt(backend, "b", "rb", Receipt("rb", 1, b"ok", 1.0), _E)
        await _expect_keys(backend, ["a", "b", "k"], _E)


@_case
async def _case_events_fence(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """An event write loses unless it expects the last seq: one history, in one batch or many."""
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_ew("k", 0, [b"1", b"2"])], [True])
        # Two writes of one entity in one batch: the second expecting the first's version wins.
        await _commit(backend, [_ew("k", 2, [b"3"]), _ew("k", 3, [b"4", b"5"])], [True, True])
        await _expect_log(backend, "k", _log(1, [b"1", b"2", b"3", b"4", b"5"]), "after a chain")
        await _expect_row(backend, "k", Stored(5, 1, b"", 0), _E)
        # ... and the second expecting the old version loses (its seq is taken).
        await _commit(backend, [_ew("k", 5, [b"6"]), _ew("k", 5, [b"x", b"y"])], [True, False])
        # Out of order: the first expects a version the second makes; only the second wins.
        await _commit(backend, [_ew("k", 7, [b"x"]), _ew("k", 6, [b"7"])], [False, True])
        log = _log(1, [b"%d" % seq for seq in range(1, 8)])
        await _expect_log(backend, "k", log, "after conflicting batches")
        await _expect_row(backend, "k", Stored(7, 1, b"", 0), _E)
        # Stale expected versions, in commits of their own.
        for stale in (0, 1, 5, 6):
            await _commit(backend, [_ew("k", stale, [b"stale"])], [False])
        # Two creations of one entity in one batch: the first wins.
        await _commit(backend, [_ew("n", 0, [b"first"]), _ew("n", 0, [b"second"])], [True, False])
        await _expect_log(backend, "n", _log(1, [b"first"]), "after two creations")
        await _expect_log(backend, "k", log, "at the end")
        for expected in (0, 1):

            def write(i: int, expected: int = expected) -> Write:
                return _ew("c", expected, [b"%d" % i])

            winner = await _race(backend, write, 30, f"event writes expecting {expected}")
            expected_log = [StoredEvent(expected + 1, 1, b"%d" % winner)]
            await _expect_log(backend, "c", expected_log, "after them", after=expected)


@_case
async def _case_events_snapshots(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A snapshot stores data and type_version at the write's version; other writes keep it."""
    async with _opened(_new(make_backend)) as backend:
        # A new row without a snapshot: empty data, snapshot 0, the write's type version.
        await _commit(backend, [_ew("n", 0, [b"e1"], data=b"not kept", type_version=3)], [True])
        await _expect_row(backend, "n", Stored(1, 3, b"", 0), _E)
        await _commit(backend, [_ew("n", 1, [b"e2"], type_version=4)], [True])
        await _expect_row(backend, "n", Stored(2, 3, b"", 0), _E)
        # A new row with one, then a write without (kept), then another with one.
        write = _ew("s", 0, [b"e1", b"e2"], snapshot=True, data=b"S2", type_version=4)
        await _commit(backend, [write], [True])
        await _expect_row(backend, "s", Stored(2, 4, b"S2", 2), _E)
        await _commit(backend, [_ew("s", 2, [b"e3"], data=b"not kept", type_version=5)], [True])
        await _expect_row(backend, "s", Stored(3, 4, b"S2", 2), _E)
        write = _ew("s", 3, [b"e4", b"e5"], snapshot=True, data=b"S5", type_version=5)
        await _commit(backend, [write], [True])
        await _expect_row(backend, "s", Stored(5, 5, b"S5", 5), _E)
        await _commit(backend, [_ew("n", 2, [b"e3"], snapshot=True, data=b"N3")], [True])
        await _expect_row(backend, "n", Stored(3, 1, b"N3", 3), _E)
        # Several writes of one entity in one batch: the row is what the last left.
        batch = [
            _ew("s", 5, [b"e6"], snapshot=True, data=b"S6", type_version=6),
            _ew("s", 6, [b"e7"], type_version=7),
            _ew("a", 0, [b"e1"], snapshot=True, data=b"A1"),
            _ew("a", 1, [b"e2"], data=b"not kept"),
            _ew("b", 0, [b"e1"]),
            _ew("b", 1, [b"e2"], snapshot=True, data=b"B2", type_version=2),
            _ew("b", 2, [b"e3"]),
            _ew("c", 0, [b"e1"], type_version=2),
            _ew("c", 1, [b"e2"], type_version=3),
        ]
        await _commit(backend, batch, [True] * len(batch))
        await _expect_row(backend, "s", Stored(7, 6, b"S6", 6), _E)
        await _expect_row(backend, "a", Stored(2, 1, b"A1", 1), _E)
        await _expect_row(backend, "b", Stored(3, 2, b"B2", 2), _E)
        await _expect_row(backend, "c", Stored(2, 2, b"", 0), _E)
        # A snapshot changes nothing of the log; a lost one stores nothing.
        await _commit(backend, [_ew("s", 3, [b"x"], snapshot=True, data=b"lost")], [False])
        await _expect_row(backend, "s", Stored(7, 6, b"S6", 6), _E)
        log = [*_log(1, [b"e1", b"e2"], 4), StoredEvent(3, 5, b"e3")]
        log += [*_log(4, [b"e4", b"e5"], 5), StoredEvent(6, 6, b"e6"), StoredEvent(7, 7, b"e7")]
        await _expect_log(backend, "s", log, "after snapshots")
        log = [StoredEvent(1, 1, b"e1"), StoredEvent(2, 2, b"e2"), StoredEvent(3, 1, b"e3")]
        await _expect_log(backend, "b", log, "after a batch")


@_case
async def _case_events_state_rows(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A state row has snapshot None and no log; a check-only write keeps an event row as is."""
    async with _opened(_new(make_backend)) as backend:
        empty = Write(_T, "u", 0, 1, 1, b"u", events=())  # no events: a state write
        await _commit(backend, [_write("t", 0, data=b"t"), empty], [True, True])
        for key, data in (("t", b"t"), ("u", b"u")):
            row = await _load(backend, key)
            _expect(row is not None and row.snapshot is None, f"a state row's snapshot: {row!r}")
            await _expect_row(backend, key, Stored(1, 1, data))
            await _expect_log(backend, key, [], "of a state entity", type_name=_T)
        write = _ew("e", 0, [b"e1", b"e2"], snapshot=True, data=b"S", type_version=2)
        await _commit(backend, [write, _ew("f", 0, [b"f1"])], [True, True])
        # Check-only writes (version == expected): alone, in a batch, with events=() too.
        await _commit(backend, [_check("e", 2)], [True])
        both = [_check("f", 1), Write(_E, "e", 2, 2, 9, b"no", events=()), _ew("g", 0, [b"g1"])]
        await _commit(backend, both, [True, True, True])
        await _commit(backend, [_check("e", 1), _check("f", 0), _check("h", 3)], [False] * 3)
        await _commit(backend, [_check("h", 0)], [True])  # an entity never stored: stores none
        await _expect_row(backend, "e", Stored(2, 2, b"S", 2), _E)
        await _expect_row(backend, "f", Stored(1, 1, b"", 0), _E)
        await _expect_row(backend, "h", None, _E)
        await _expect_log(backend, "e", _log(1, [b"e1", b"e2"], 2), "after checks")
        await _expect_log(backend, "f", _log(1, [b"f1"]), "after checks")
        await _expect_keys(backend, ["e", "f", "g"], _E)
        # The checked row is still the one to expect.
        await _commit(backend, [_ew("e", 2, [b"e3"]), _ew("f", 1, [b"f2"])], [True, True])
        await _expect_row(backend, "e", Stored(3, 2, b"S", 2), _E)


# ---------------------------------------------------------------------------------------------
# Reading the log.


@_case
async def _case_events_paging(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """``after`` and ``limit`` page through a log in seq order, with no gap and no duplicate."""
    events = [b"%04d" % seq for seq in range(1, 1201)]
    log = _log(1, events)
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_ew("k", 0, events[:1000]), _ew("o", 0, [b"other"])], [True] * 2)
        await _commit(backend, [_ew("k", 1000, events[1000:])], [True])
        first = await _read(backend, "k")
        _expect_equal(first, log[:1000], "read_events() (the default limit is 1000)")
        for limit in (1, 7, 500, 1000):
            pages: list[StoredEvent] = []
            after = 0
            while True:
                page = await _read(backend, "k", after=after, limit=limit)
                _expect(len(page) <= limit, f"read_events(limit={limit}): {len(page)} events")
                _expect(
                    all(event.seq > after for event in page),
                    f"read_events(after={after}) returned events at or before it",
                )
                pages += page
                if len(page) < limit:
                    break
                after = page[-1].seq
            _expect_equal(pages, log, f"pages of {limit}")
        await _expect_log(backend, "k", log[10:15], "", after=10, limit=5)
        await _expect_log(backend, "k", log[1197:], "", after=1197, limit=10)
        await _expect_log(backend, "k", [], "(after the end)", after=1200)
        await _expect_log(backend, "k", [], "(far beyond the end)", after=10**6)
        await _expect_log(backend, "k", [], "", limit=0)
        await _expect_log(backend, "o", _log(1, [b"other"]), "of another entity")
        for key in ("missing", "K", "k ", "\ud800"):
            await _expect_log(backend, key, [], "of an entity never stored")
        for type_name in (_T, _U, "contract", "contract.E.k"):
            await _expect_log(backend, "k", [], "of another type", type_name=type_name)


@_case
async def _case_events_closed(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """read_events raises Unavailable before open and after aclose."""
    backend = _new(make_backend)
    try:
        await _expect_read_unavailable(backend, "before open")
        async with _opened(backend):
            await _commit(backend, [_ew("k", 0, [b"e"])], [True])
            await _expect_log(backend, "k", _log(1, [b"e"]), "when open")
        await _expect_read_unavailable(backend, "after aclose")
    finally:
        await backend.aclose()


async def _expect_read_unavailable(backend: Backend, when: str) -> None:
    try:
        await backend.read_events(_E, "k")
    except Unavailable:
        return
    raise AssertionError(f"read_events() {when} did not raise Unavailable")


# ---------------------------------------------------------------------------------------------
# With receipts and the outbox; reopening; worlds.


@_case
async def _case_events_outbox(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """An event write's events, row, receipts, consumes and sends commit together, or none."""
    inbound = Envelope(_T, "s", 1, 0, _E, "e", 0.0, None, b"to e")
    second = Envelope(_T, "s", 1, 1, _E, "e", 0.0, None, b"to e again")
    reply = Envelope(_E, "e", 2, 0, _T, "s", 0.0, None, b"reply")
    timer = Envelope(_E, "e", 2, 1, _E, "e", 5.0, "tick", b"")
    receipt = Receipt("call", 2, b"ok", 1.0)
    async with _opened(_new(make_backend)) as backend:
        sends = Outbox(sends=(inbound, second))
        await _commit(backend, [Write(_T, "s", 0, 1, 1, b"s", (), sends)], [True])
        ghost = Consume((_T, "s", 9, 0))
        applies = Outbox(sends=(reply, timer), consumes=(Consume(inbound.id),))
        # Lost: a consumed row that is not waiting, a stale expected version. Nothing applied.
        lost_ghost = Outbox(sends=(reply, timer), consumes=(Consume(inbound.id), ghost))
        losers = [
            _ew("e", 0, [b"e1", b"e2"], receipts=[receipt], outbox=lost_ghost, snapshot=True),
            _ew("e", 3, [b"e4"], receipts=[receipt], outbox=applies),
        ]
        for write in losers:
            await _commit(backend, [write], [False])
            await _expect_row(backend, "e", None, _E)
            await _expect_log(backend, "e", [], "after a lost write")
            await _expect_receipt(backend, "e", "call", None, _E)
            _expect_equal(await backend.exists([inbound.id]), [True], "the row it consumes")
            await _expect_due(backend, [inbound, second], "after a lost write")
        # Won: all of it, even next to a loser that consumes the same row.
        win = _ew("e", 0, [b"e1", b"e2"], receipts=[receipt], outbox=applies)
        rival = _ew("f", 0, [b"f1"], outbox=Outbox(consumes=(Consume(inbound.id),)))
        await _commit(backend, [win, rival], [True, False])
        await _expect_row(backend, "e", Stored(2, 1, b"", 0), _E)
        await _expect_log(backend, "e", _log(1, [b"e1", b"e2"]), "after the write won")
        await _expect_receipt(backend, "e", "call", receipt, _E)
        await _expect_row(backend, "f", None, _E)
        await _expect_log(backend, "f", [], "of the rival")
        _expect_equal(await backend.exists([inbound.id, second.id]), [False, True], "consumed")
        await _expect_due(backend, [second, reply, timer], "after the write won")
        # A check-only write consuming a row as dead: the row and the log stay as they were.
        bury = Outbox(consumes=(Consume(second.id, "boom"),))
        await _commit(backend, [_check("e", 2, outbox=bury)], [True])
        await _expect_row(backend, "e", Stored(2, 1, b"", 0), _E)
        await _expect_log(backend, "e", _log(1, [b"e1", b"e2"]), "after a check-only write")
        _expect_equal(backend.outbox_counts(), {"messages": 1, "timers": 1, "dead": 1}, "counts")
        # Cancel and send, with a snapshot.
        message = Envelope(_E, "e", 3, 0, _T, "s", 0.0, None, b"m")
        cancel = Outbox(sends=(message,), cancels=("tick",))
        write = _ew("e", 2, [b"e3"], snapshot=True, data=b"E3", outbox=cancel)
        await _commit(backend, [write], [True])
        await _expect_row(backend, "e", Stored(3, 1, b"E3", 3), _E)
        await _expect_due(backend, [reply, message], "after a cancel and a send")
        _expect_equal(backend.outbox_counts(), {"messages": 2, "timers": 0, "dead": 1}, "counts")


@_case
async def _case_events_reopen(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """Logs, snapshots and the fence are there after aclose and open again.

    On a durable backend given ``reopen`` this is its durability; otherwise the same object is
    opened again (a memory backend keeps its data per object).
    """
    receipt = Receipt("call", 3, b"ok", 2.0)
    backend = _new(make_backend)
    async with _opened(backend):
        await _commit(backend, [_ew("k", 0, [b"e1", b"e2"], snapshot=True, data=b"S2")], [True])
        await _commit(backend, [_ew("k", 2, [b"e3"], type_version=2, receipts=[receipt])], [True])
        await _commit(backend, [_ew("n", 0, [b"n1"], type_version=3)], [True])
    log = [*_log(1, [b"e1", b"e2"]), StoredEvent(3, 2, b"e3")]
    for generation in range(2):
        backend = _again(backend, reopen)
        async with _opened(backend):
            await _expect_row(backend, "k", Stored(3 + generation, 1, b"S2", 2), _E)
            await _expect_row(backend, "n", Stored(1, 3, b"", 0), _E)
            await _expect_log(backend, "k", log, f"after reopening ({generation + 1})")
            await _expect_log(backend, "n", _log(1, [b"n1"], 3), "after reopening")
            await _expect_receipt(backend, "k", "call", receipt, _E)
            await _expect_keys(backend, ["k", "n"], _E)
            for stale in (0, 2 + generation):
                await _commit(backend, [_ew("k", stale, [b"stale"])], [False])
            await _commit(backend, [_ew("k", 3 + generation, [b"more"])], [True])
            log.append(StoredEvent(4 + generation, 1, b"more"))
            await _expect_log(backend, "k", log, "after appending to a reopened log")


@_case
async def _case_events_worlds(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """Each world has its own logs on the same storage: the same entity, other events."""
    first, second = "world-a", "world-a-2"  # one name a prefix of the other, on purpose
    backend = _new(make_backend)
    async with _opened(backend, first):
        await _commit(backend, [_ew("k", 0, [b"a1", b"a2"], snapshot=True, data=b"A")], [True])
    backend = _again(backend, reopen)
    async with _opened(backend, second):
        await _expect_log(backend, "k", [], "in world-a-2")
        await _expect_row(backend, "k", None, _E)
        await _commit(backend, [_ew("k", 2, [b"x"])], [False])
        await _commit(backend, [_ew("k", 0, [b"b1"])], [True])  # new in this world: seq 1 again
        await _expect_log(backend, "k", _log(1, [b"b1"]), "in world-a-2 after its write")
    backend = _again(backend, reopen)
    async with _opened(backend, first):
        await _expect_log(backend, "k", _log(1, [b"a1", b"a2"]), "in world-a again")
        await _expect_row(backend, "k", Stored(2, 1, b"A", 2), _E)
        await _commit(backend, [_ew("k", 2, [b"a3"])], [True])
    backend = _again(backend, reopen)
    async with _opened(backend, second):
        await _expect_log(backend, "k", _log(1, [b"b1"]), "in world-a-2 at the end")
        await _expect_row(backend, "k", Stored(1, 1, b"", 0), _E)
