"""The backend contract, continued: the outbox (``Write.outbox``, ``due``, ``exists``, counts).

The cases register with ``_contract._case``, so that ``backend_cases()`` and ``check_backend`` run
them after the others. As there: framework-free, fresh backends per case, checks raise
``AssertionError`` explicitly.

Their vocabulary: a *sender* entity commits a write whose outbox sends ``Envelope`` rows (with
the version that write stores, and their index in it); a *receiver* commits a write that consumes
them. A row *waits* until it is consumed (deleted) or buried (kept as a dead letter).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..backends._base import Backend, Consume, Envelope, EnvelopeId, Outbox, Receipt, Stored, Write
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
    _new,
    _opened,
)

__all__: list[str] = []

_INF = float("inf")
_RECEIVER = "contract.R"  # the type of receivers: nothing else is stored under it


def _env(
    sender: str,
    version: int,
    index: int = 0,
    *,
    due: float = 0.0,
    name: str | None = None,
    data: bytes = b"",
    to: str = "r",
    sender_type: str = _T,
    to_type: str = _RECEIVER,
) -> Envelope:
    """A row sent by ``(sender_type, sender)`` in the write that stores ``version``."""
    return Envelope(sender_type, sender, version, index, to_type, to, due, name, data)


def _take(row: Envelope, dead: str | None = None) -> Consume:
    """The consume of ``row`` (buried as a dead letter when ``dead`` is given)."""
    return Consume(row.id, dead, bool(row.due))


def _ow(
    key: str,
    expected: int,
    version: int | None = None,
    *,
    sends: Iterable[Envelope] = (),
    cancels: Iterable[str] = (),
    consumes: Iterable[Consume] = (),
    type_name: str = _T,
    data: bytes = b"",
    receipts: Iterable[Receipt] = (),
) -> Write:
    """A write with an outbox; ``version`` defaults to ``expected + 1``."""
    version = expected + 1 if version is None else version
    outbox = Outbox(tuple(sends), tuple(cancels), tuple(consumes))
    return Write(type_name, key, expected, version, 1, data, tuple(receipts), outbox)


def _rw(
    key: str,
    expected: int,
    version: int | None = None,
    *,
    take: Iterable[Consume] = (),
    sends: Iterable[Envelope] = (),
    cancels: Iterable[str] = (),
    data: bytes = b"",
    receipts: Iterable[Receipt] = (),
) -> Write:
    """A receiver's write (of type ``_RECEIVER``) consuming ``take``."""
    return _ow(
        key,
        expected,
        version,
        sends=sends,
        cancels=cancels,
        consumes=take,
        type_name=_RECEIVER,
        data=data,
        receipts=receipts,
    )


def _only(key: str, expected: int, *take: Consume) -> Write:
    """A receiver's write that only consumes: ``version == expected``."""
    return _rw(key, expected, expected, take=take)


def _expect_counts(backend: Backend, messages: int, timers: int, dead: int, when: str) -> None:
    counts = backend.outbox_counts()
    _expect(isinstance(counts, dict), f"outbox_counts() {when} is {type(counts).__name__}")
    expected = {"messages": messages, "timers": timers, "dead": dead}
    _expect_equal(counts, expected, f"outbox_counts() {when}")


async def _due(
    backend: Backend,
    until: float = _INF,
    *,
    after: tuple[float, str, str, int, int] | None = None,
    limit: int = 1000,
) -> list[Envelope]:
    rows = await backend.due(until, after=after, limit=limit)
    _expect(isinstance(rows, list), f"due() returned {type(rows).__name__}, not a list")
    for row in rows:
        _expect(isinstance(row, Envelope), f"due() returned {row!r}, not an Envelope")
        _expect(type(row.data) is bytes, f"Envelope.data is {type(row.data).__name__}")
    return rows


async def _expect_due(
    backend: Backend, rows: Iterable[Envelope], when: str, until: float = _INF
) -> None:
    """``due(until)`` is exactly these rows (those due by ``until``), in key order."""
    expected = sorted((row for row in rows if row.due <= until), key=Envelope.key)
    _expect_equal(await _due(backend, until), expected, f"due({until}) {when}")


async def _expect_exists(
    backend: Backend, ids: Sequence[EnvelopeId], expected: list[bool], when: str
) -> None:
    got = await backend.exists(ids)
    _expect(isinstance(got, list), f"exists() returned {type(got).__name__}, not a list")
    _expect(all(type(flag) is bool for flag in got), f"exists() flags not bool: {got!r}")
    _expect_equal(got, expected, f"exists({list(ids)}) {when}")


async def _all_due(backend: Backend, until: float, limit: int) -> list[Envelope]:
    """Every page of ``due(until, limit=limit)``, each after the last row of the previous one."""
    out: list[Envelope] = []
    after: tuple[float, str, str, int, int] | None = None
    while True:
        page = await _due(backend, until, after=after, limit=limit)
        _expect(len(page) <= limit, f"due(limit={limit}) returned {len(page)} rows")
        # Without this, a backend answering `after` inclusively would page forever.
        _expect(
            after is None or all(row.key() > after for row in page),
            f"due(after={after!r}) returned rows at or before it: {page!r}",
        )
        out += page
        if len(page) < limit:
            return out
        after = page[-1].key()


# ---------------------------------------------------------------------------------------------
# Sends.


@_case
async def _case_outbox_sends_atomic(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """Sends are stored with the state that sent them, round-trip exactly, or not at all."""
    message = _env("s", 1, 0, data=bytes(range(256)), to="r\U0001f418")
    timer = _env("s", 1, 1, due=1_700_000_000.123456, name="t\u00e9", data=b"", to_type=_T)
    other = _env("s", 1, 2, data=b"\x00", to="s")
    receipt = Receipt("call", 1, b"reply", 1.0)
    async with _opened(_new(make_backend)) as backend:
        _expect_counts(backend, 0, 0, 0, "in a fresh world")
        await _expect_due(backend, [], "in a fresh world")
        write = _ow("s", 0, sends=[message, timer, other], data=b"one", receipts=[receipt])
        await _commit(backend, [write], [True])
        await _expect_row(backend, "s", Stored(1, 1, b"one"))
        await _expect_receipt(backend, "s", "call", receipt)
        await _expect_due(backend, [message, timer, other], "after the send")
        _expect_counts(backend, 2, 1, 0, "after two messages and a timer")
        # Losing writes store none of their rows (nor their state, nor their receipts).
        lost = [_env("s", 2, 0), _env("s", 2, 1, due=5.0, name="t\u00e9")]
        lost_receipt = Receipt("lost", 2, b"x", 1.0)
        await _commit(backend, [_ow("s", 0, 2, sends=lost, receipts=[lost_receipt])], [False])
        await _commit(backend, [_ow("s", 2, sends=lost)], [False])
        await _commit(backend, [_ow("x", 3, sends=[_env("x", 4)])], [False])
        mixed = [
            _ow("a", 0, sends=[_env("a", 1, due=2.0)]),
            _ow("s", 5, sends=lost),
            _ow("b", 0, sends=[_env("b", 1), _env("b", 1, 1)]),
            _ow("c", 7, sends=[_env("c", 8)]),
        ]
        await _commit(backend, mixed, [True, False, True, False])
        await _expect_row(backend, "s", Stored(1, 1, b"one"))
        await _expect_receipt(backend, "s", "lost", None)
        expected = [message, timer, other, _env("a", 1, due=2.0), _env("b", 1), _env("b", 1, 1)]
        await _expect_due(backend, expected, "after losing writes")
        _expect_counts(backend, 4, 2, 0, "after losing writes")
        await _expect_keys(backend, ["a", "b", "s"])
        await _expect_keys(backend, [], _RECEIVER)  # sending creates no receiver


# ---------------------------------------------------------------------------------------------
# Order, paging, until.

# Rows in key order: due, then sender type, then sender key (by code point), then version and
# index as numbers (2 before 10).
_ORDERED = [
    _env("b", 3, 0),
    _env("b", 3, 2),
    _env("b", 3, 10),
    _env("b", 10, 0),
    _env("z", 1, 0),
    _env("\ufb01", 1, 0),
    _env("\U0001f418", 1, 0),
    _env("a", 1, 0, sender_type=_U),
    _env("a", 2, 0, due=1.0),
    _env("b", 1, 5, due=1.0),
    _env("a", 4, 0, due=1.5, name="x"),
    _env("c", 1, 0, due=1.5),
    _env("b", 2, 0, due=2.0, name="x"),
    _env("a", 2, 0, due=2.0, sender_type=_U, name="x"),
    _env("c", 2, 0, due=1_000_000_000.0),
    _env("a", 3, 1, due=1e300),
]


async def _send_all(backend: Backend, rows: Sequence[Envelope]) -> None:
    """Commit ``rows``, in a scrambled order, each in the write of its sender's version."""
    by_write: dict[tuple[str, str, int], list[Envelope]] = {}
    for row in rows:
        by_write.setdefault((row.sender_type, row.sender_key, row.version), []).append(row)
    stored: dict[tuple[str, str], int] = {}
    for (sender_type, key, version), sends in sorted(by_write.items(), key=lambda i: i[0][2]):
        expected = stored.get((sender_type, key), 0)
        write = _ow(key, expected, version, type_name=sender_type, sends=reversed(sends))
        await _commit(backend, [write], [True])
        stored[(sender_type, key)] = version


@_case
async def _case_outbox_due_order(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """due() gives waiting rows due by ``until`` in key order: due, sender, version, index."""
    async with _opened(_new(make_backend)) as backend:
        await _send_all(backend, _ORDERED)
        _expect_equal(await _due(backend), _ORDERED, "due(inf)")
        _expect_counts(backend, 8, 8, 0, "after the sends")
        for until in (0.0, 0.5, 1.0, 1.5, 1.75, 2.0, 1e9, 1e300, -1.0):
            await _expect_due(backend, _ORDERED, "in key order", until)
        _expect_equal(await _due(backend, _INF, limit=3), _ORDERED[:3], "due(limit=3)")
        _expect_equal(await _due(backend, _INF, limit=0), [], "due(limit=0)")


@_case
async def _case_outbox_due_paging(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """``after`` and ``limit`` page through the due rows, every row exactly once."""
    async with _opened(_new(make_backend)) as backend:
        await _send_all(backend, _ORDERED)
        for until in (_INF, 1.5, 0.0):
            expected = [row for row in _ORDERED if row.due <= until]
            for limit in (1, 2, 3, 7, 1000):
                got = await _all_due(backend, until, limit)
                _expect_equal(got, expected, f"pages of {limit} of due({until})")
        for i, row in enumerate(_ORDERED):
            got = await _due(backend, _INF, after=row.key())
            _expect_equal(got, _ORDERED[i + 1 :], f"due(after={row.key()!r})")
        # A key between rows, and one past every row.
        got = await _due(backend, _INF, after=(1.0, _T, "a", 2, 1))
        _expect_equal(got, _ORDERED[9:], "due(after= a key that no row has)")
        _expect_equal(await _due(backend, _INF, after=(_INF, _U, "", 0, 0)), [], "after all")
        # Rows consumed while paging do not appear on the next pages; the others appear once.
        first = await _due(backend, _INF, limit=4)
        _expect_equal(first, _ORDERED[:4], "the first page of 4")
        gone = [_ORDERED[5], _ORDERED[9], _ORDERED[15]]
        await _commit(backend, [_ow("r", 0, consumes=[_take(row) for row in gone])], [True])
        rest = await _due(backend, _INF, after=first[-1].key(), limit=1000)
        _expect_equal(rest, [row for row in _ORDERED[4:] if row not in gone], "the next page")


@_case
async def _case_outbox_due_new_scan(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A page whose ``after`` is not the key of the last row of the page before is a new scan:
    it sees every row committed before it (an old scan's snapshot may serve only its next page)."""
    async with _opened(_new(make_backend)) as backend:
        await _send_all(backend, _ORDERED)
        first = await _due(backend, _INF, limit=4)
        _expect_equal(first, _ORDERED[:4], "the first page of 4")
        late = [_env("late", 1, due=1.25), _env("bz", 1, 0)]  # new senders, between old rows
        await _send_all(backend, late)
        got = await _due(backend, _INF, after=first[0].key())
        expected = sorted([*_ORDERED[1:], *late], key=Envelope.key)
        _expect_equal(got, expected, "due(after= the first row) once two more rows committed")


# ---------------------------------------------------------------------------------------------
# Consumes.


@_case
async def _case_outbox_consume(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A consume deletes its row, with the receiver's write; a row is consumed at most once."""
    m1, m2, m3 = _env("s", 1, 0), _env("s", 1, 1), _env("s", 1, 2)
    timer = _env("s", 1, 3, due=4.0, name="t")
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_ow("s", 0, sends=[m1, m2, m3, timer])], [True])
        _expect_counts(backend, 3, 1, 0, "after the sends")
        receipt = Receipt("r1", 1, b"ok", 1.0)
        reply = _env("r", 1, 0, sender_type=_RECEIVER, to="s", to_type=_T)
        write = _rw("r", 0, take=[_take(m1)], sends=[reply], data=b"got m1", receipts=[receipt])
        await _commit(backend, [write], [True])
        await _expect_row(backend, "r", Stored(1, 1, b"got m1"), _RECEIVER)
        await _expect_receipt(backend, "r", "r1", receipt, _RECEIVER)
        await _expect_due(backend, [m2, m3, timer, reply], "after consuming m1")
        await _expect_exists(backend, [m1.id, m2.id], [False, True], "after consuming m1")
        _expect_counts(backend, 3, 1, 0, "after consuming m1 and sending a reply")
        # The same row again, by a write that is right about its version: it loses.
        await _commit(backend, [_rw("r", 1, take=[_take(m1)])], [False])
        await _commit(backend, [_rw("q", 0, take=[_take(m1)])], [False])
        await _expect_row(backend, "r", Stored(1, 1, b"got m1"), _RECEIVER)
        await _expect_row(backend, "q", None, _RECEIVER)
        # A timer, and several rows in one write.
        take = [_take(timer), _take(m3), _take(m2)]
        await _commit(backend, [_rw("r", 1, take=take)], [True])
        await _expect_due(backend, [reply], "after consuming the rest")
        _expect_counts(backend, 1, 0, 0, "after consuming the rest")
        # Two receivers racing for one row in one batch: exactly one of them takes it.
        race = [_env("s", 2, 0)]
        await _commit(backend, [_ow("s", 1, sends=race)], [True])
        pair = [_rw("p1", 0, take=[_take(race[0])]), _rw("p2", 0, take=[_take(race[0])])]
        flags = await backend.commit(pair)
        _expect_equal(sorted(flags), [False, True], "two writes consuming one row")
        winner = "p1" if flags[0] else "p2"
        await _expect_keys(backend, [winner, "r"], _RECEIVER)
        await _expect_due(backend, [reply], "after the race")
        _expect_counts(backend, 1, 0, 0, "after the race")


@_case
async def _case_outbox_consume_missing(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A write consuming a row that is not waiting loses: nothing of it is applied."""
    kept, timer = _env("s", 1, 0), _env("s", 1, 1, due=3.0, name="t")
    never = _env("s", 9, 0)
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_ow("s", 0, sends=[kept, timer])], [True])
        await _commit(backend, [_rw("r", 0, 2, data=b"two")], [True])
        before = [kept, timer]
        receipt = Receipt("lost", 3, b"x", 1.0)
        attempts = [
            [_take(never)],
            [_take(kept), _take(never)],
            [_take(never), _take(kept)],
            [_take(kept), Consume((_T, "s", 1, 7))],  # an index never sent
            [_take(kept), Consume((_U, "s", 1, 0))],  # another sender type
            [_take(kept, "why"), _take(never, "why")],
        ]
        for consumes in attempts:
            sends = [_env("r", 3, sender_type=_RECEIVER)]
            write = _rw("r", 2, take=consumes, sends=sends, data=b"three", receipts=[receipt])
            await _commit(backend, [write], [False])
            # The sender's own cancel and send, in a write that consumes a missing row.
            await _commit(backend, [_ow("s", 1, cancels=["t"], consumes=consumes)], [False])
            await _expect_row(backend, "r", Stored(2, 1, b"two"), _RECEIVER)
            await _expect_row(backend, "s", Stored(1, 1, b""))
            await _expect_receipt(backend, "r", "lost", None, _RECEIVER)
            await _expect_due(backend, before, f"after a write consuming {consumes}")
            _expect_counts(backend, 1, 1, 0, f"after a write consuming {consumes}")
        # In a batch, only that write loses.
        batch = [_rw("r", 2, take=[_take(never)]), _rw("q", 0, take=[_take(kept)])]
        await _commit(backend, batch, [False, True])
        await _expect_due(backend, [timer], "after the batch")
        _expect_counts(backend, 0, 1, 0, "after the batch")


@_case
async def _case_outbox_dead_letters(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A buried row is kept as a dead letter: counted, never due, not waiting, not consumable."""
    m1, m2 = _env("s", 1, 0), _env("s", 1, 1)
    timer = _env("s", 1, 2, due=2.0, name="t")
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_ow("s", 0, sends=[m1, m2, timer])], [True])
        await _commit(backend, [_rw("r", 0, take=[_take(m1, "handler failed: boom")])], [True])
        await _expect_due(backend, [m2, timer], "after burying m1")
        await _expect_exists(backend, [m1.id, m2.id], [False, True], "after burying m1")
        _expect_counts(backend, 1, 1, 1, "after burying m1")
        # A dead letter cannot be consumed (nor buried) again.
        for take in (_take(m1), _take(m1, "again")):
            await _commit(backend, [_rw("r", 1, take=[take])], [False])
        await _expect_row(backend, "r", Stored(1, 1, b""), _RECEIVER)
        _expect_counts(backend, 1, 1, 1, "after consuming a dead letter")
        # A dead timer no longer holds its name: a new timer of that name is another row, which
        # a cancel deletes, leaving the dead letter.
        await _commit(backend, [_rw("r", 1, take=[_take(timer, "x")])], [True])
        _expect_counts(backend, 1, 0, 2, "after burying the timer")
        again = _env("s", 2, 0, due=5.0, name="t")
        await _commit(backend, [_ow("s", 1, sends=[again])], [True])
        await _expect_due(backend, [m2, again], "after a new timer named like a dead one")
        _expect_counts(backend, 1, 1, 2, "after a new timer named like a dead one")
        await _commit(backend, [_ow("s", 2, cancels=["t"])], [True])
        await _expect_due(backend, [m2], "after cancelling it")
        await _expect_exists(backend, [timer.id, again.id], [False, False], "after the cancel")
        _expect_counts(backend, 1, 0, 2, "after cancelling it")
        # A write of a sender replacing its timer leaves the dead letter too.
        await _commit(backend, [_ow("s", 3, sends=[_env("s", 4, due=6.0, name="t")])], [True])
        _expect_counts(backend, 1, 1, 2, "after a named send")


# ---------------------------------------------------------------------------------------------
# Named timers.


@_case
async def _case_outbox_named_timers(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A named timer replaces its sender's timer of that name; a cancel takes only the writer's."""
    async with _opened(_new(make_backend)) as backend:
        a1 = _env("a", 1, 0, due=5.0, name="t")
        plain = _env("a", 1, 1, due=5.0)
        b1 = _env("b", 1, 0, due=5.0, name="t")
        u1 = _env("a", 1, 0, due=5.0, name="t", sender_type=_U)
        both = [_ow("a", 0, sends=[a1, plain]), _ow("b", 0, sends=[b1])]
        await _commit(backend, both, [True, True])
        await _commit(backend, [_ow("a", 0, type_name=_U, sends=[u1])], [True])
        _expect_counts(backend, 0, 4, 0, "after four timers")
        # The same name from the same sender replaces; from another sender it does not.
        a2 = _env("a", 2, 0, due=1.0, name="t")
        await _commit(backend, [_ow("a", 1, sends=[a2])], [True])
        await _expect_due(backend, [a2, plain, b1, u1], "after a replaces its timer t")
        await _expect_exists(backend, [a1.id, a2.id], [False, True], "after the replacement")
        _expect_counts(backend, 0, 4, 0, "after the replacement")
        # Two of that name in one write: the second replaces the first.
        a3, a3b = _env("a", 3, 0, due=7.0, name="t"), _env("a", 3, 1, due=8.0, name="t")
        await _commit(backend, [_ow("a", 2, sends=[a3, a3b])], [True])
        await _expect_due(backend, [plain, b1, u1, a3b], "after two sends of t in one write")
        _expect_counts(backend, 0, 4, 0, "after two sends of t in one write")
        # A cancel deletes the writer's own timer of that name only.
        await _commit(backend, [_ow("b", 1, cancels=["t", "never-sent"])], [True])
        await _expect_due(backend, [plain, a3b, u1], "after b cancels t")
        _expect_counts(backend, 0, 3, 0, "after b cancels t")
        await _commit(backend, [_ow("b", 2, cancels=["t"])], [True])  # none left: harmless
        _expect_counts(backend, 0, 3, 0, "after b cancels t again")
        # Cancels come before sends: a write cancelling t and sending t keeps the new t.
        a4 = _env("a", 4, 0, due=9.0, name="t")
        await _commit(backend, [_ow("a", 3, cancels=["t"], sends=[a4])], [True])
        await _expect_due(backend, [plain, u1, a4], "after cancelling and sending t")
        await _commit(backend, [_ow("a", 4, cancels=["t"])], [True])
        await _expect_due(backend, [plain, u1], "after a cancels t")
        _expect_counts(backend, 0, 2, 0, "after a cancels t")
        # Names of timers are per sender type too.
        await _commit(backend, [_ow("a", 1, type_name=_U, cancels=["t"])], [True])
        await _expect_due(backend, [plain], "after (U, a) cancels t")
        _expect_counts(backend, 0, 1, 0, "at the end")


# ---------------------------------------------------------------------------------------------
# Writes that keep their entity's row.


@_case
async def _case_outbox_consume_only(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """``version == expected`` consumes without touching the row (storing none for 0)."""
    rows = [_env("s", 1, i) for i in range(6)]
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_ow("s", 0, sends=rows)], [True])
        # expected 0: no row is stored.
        await _commit(backend, [_only("r", 0, _take(rows[0]))], [True])
        await _expect_row(backend, "r", None, _RECEIVER)
        await _expect_keys(backend, [], _RECEIVER)
        await _expect_exists(backend, [rows[0].id], [False], "after a consume-only write")
        _expect_counts(backend, 5, 0, 0, "after a consume-only write")
        await _commit(backend, [_only("r", 0, _take(rows[1]))], [True])
        await _expect_keys(backend, [], _RECEIVER)
        # Still conditional on the version: a stale or future expected loses.
        for expected in (1, 3):
            await _commit(backend, [_only("r", expected, _take(rows[2]))], [False])
        await _expect_exists(backend, [rows[2].id], [True], "after losing consume-only writes")
        # expected n: the row is kept as it is (version, type version and state).
        await _commit(backend, [_rw("r", 0, 2, data=b"two")], [True])
        await _commit(backend, [_only("r", 0, _take(rows[2]))], [False])
        write = Write(_RECEIVER, "r", 2, 2, 9, b"ignored", (), Outbox(consumes=(_take(rows[2]),)))
        await _commit(backend, [write], [True])
        await _expect_row(backend, "r", Stored(2, 1, b"two"), _RECEIVER)
        await _expect_keys(backend, ["r"], _RECEIVER)
        for expected in (1, 3):
            await _commit(backend, [_only("r", expected, _take(rows[3]))], [False])
        await _commit(backend, [_only("r", 2, _take(rows[3]))], [True])
        await _expect_row(backend, "r", Stored(2, 1, b"two"), _RECEIVER)
        # Consuming a missing row loses here too; a batch mixes both kinds.
        await _commit(backend, [_only("r", 2, _take(rows[3]))], [False])
        batch = [
            _only("r", 2, _take(rows[4])),
            _only("q", 0, _take(rows[5])),
            _rw("p", 0, data=b"p"),
        ]
        await _commit(backend, batch, [True, True, True])
        await _expect_keys(backend, ["p", "r"], _RECEIVER)
        await _expect_row(backend, "r", Stored(2, 1, b"two"), _RECEIVER)
        await _expect_due(backend, [], "after consuming every row")
        _expect_counts(backend, 0, 0, 0, "after consuming every row")


# ---------------------------------------------------------------------------------------------
# exists, counts, reopening, worlds.


@_case
async def _case_outbox_exists(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """exists() tells, per id and in order, whether that row is waiting; beyond batch limits."""
    rows = [_env(f"s{i % 7}", 1 + i // 7, i % 3, due=float(i % 2)) for i in range(40)]
    async with _opened(_new(make_backend)) as backend:
        _expect_equal(await backend.exists([]), [], "exists([])")
        await _send_all(backend, rows)
        taken = rows[::5]
        await _commit(backend, [_only("r", 0, *(_take(row) for row in taken))], [True])
        live = [row for row in rows if row not in taken]
        near = [
            ("s0", "s0", 1, 0),  # the sender key given as the type
            (_U, "s0", 1, 0),
            (_T, "s0", 1, 1),  # row s0 v1 has index 0 only
            (_T, "s0", 0, 0),
            (_T, "s", 1, 0),
            (_T, "s00", 1, 0),
        ]
        ids = [near[0], live[0].id, taken[0].id, live[0].id, *near[1:], live[-1].id]
        expected = [False, True, False, True, *([False] * 5), True]
        await _expect_exists(backend, ids, expected, "of a few ids")
        many = [row.id for row in rows] * 40  # 1600 ids
        flags = [row not in taken for row in rows] * 40
        await _expect_exists(backend, many, flags, "of 1600 ids")
        timers = sum(1 for row in live if row.due)
        _expect_counts(backend, len(live) - timers, timers, 0, "at the end")


@_case
async def _case_outbox_reopen(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """The outbox is there after aclose and open again: rows, names, dead letters and counts.

    On a durable backend given ``reopen`` this is its durability; otherwise the same object is
    opened again (a memory backend keeps its data per object).
    """
    m1, m2 = _env("s", 1, 0), _env("s", 1, 1)
    timer, named = _env("s", 1, 2, due=3.0), _env("s", 1, 3, due=4.0, name="t")
    backend = _new(make_backend)
    async with _opened(backend):
        await _commit(backend, [_ow("s", 0, sends=[m1, m2, timer, named])], [True])
        await _commit(backend, [_only("r", 0, _take(m1, "boom"))], [True])
        _expect_counts(backend, 1, 2, 1, "before aclose")
    backend = _again(backend, reopen)
    async with _opened(backend):
        _expect_counts(backend, 1, 2, 1, "after reopening")
        await _expect_due(backend, [m2, timer, named], "after reopening")
        await _expect_exists(backend, [m1.id, m2.id, named.id], [False, True, True], "reopened")
        await _commit(backend, [_only("r", 0, _take(m1))], [False])
        # The name still belongs to the stored timer: a send of it replaces it.
        again = _env("s", 2, 0, due=5.0, name="t")
        await _commit(backend, [_ow("s", 1, sends=[again])], [True])
        await _commit(backend, [_only("r", 0, _take(m2))], [True])
        _expect_counts(backend, 0, 2, 1, "after a replacement and a consume")
    backend = _again(backend, reopen)
    async with _opened(backend):
        _expect_counts(backend, 0, 2, 1, "after reopening again")
        await _expect_due(backend, [timer, again], "after reopening again")
        await _commit(backend, [_ow("s", 2, cancels=["t"])], [True])
        await _expect_due(backend, [timer], "after the cancel")
        _expect_counts(backend, 0, 1, 1, "after the cancel")


@_case
async def _case_outbox_worlds(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """Each world has its own outbox on the same storage: rows, names, consumes and counts."""
    first, second = "world-a", "world-a-2"  # one name a prefix of the other, on purpose
    message, timer = _env("s", 1, 0), _env("s", 1, 1, due=2.0, name="t")
    backend = _new(make_backend)
    async with _opened(backend, first):
        await _commit(backend, [_ow("s", 0, sends=[message, timer])], [True])
        _expect_counts(backend, 1, 1, 0, "in world-a")
    backend = _again(backend, reopen)
    async with _opened(backend, second):
        _expect_counts(backend, 0, 0, 0, "in world-a-2")
        await _expect_due(backend, [], "in world-a-2")
        await _expect_exists(backend, [message.id, timer.id], [False, False], "in world-a-2")
        await _commit(backend, [_only("r", 0, _take(message))], [False])
        # The same ids and name in this world are other rows.
        mine = _env("s", 1, 1, due=1.0, name="t", data=b"b")
        await _commit(backend, [_ow("s", 0, sends=[mine])], [True])
        await _expect_due(backend, [mine], "in world-a-2 after its send")
        _expect_counts(backend, 0, 1, 0, "in world-a-2 after its send")
    backend = _again(backend, reopen)
    async with _opened(backend, first):
        _expect_counts(backend, 1, 1, 0, "in world-a again")
        await _expect_due(backend, [message, timer], "in world-a again")
        await _commit(backend, [_ow("s", 1, cancels=["t"])], [True])
        await _commit(backend, [_only("r", 0, _take(message))], [True])
        _expect_counts(backend, 0, 0, 0, "in world-a after the cancel and the consume")
    backend = _again(backend, reopen)
    async with _opened(backend, second):
        await _expect_due(backend, [mine], "in world-a-2 at the end")
        _expect_counts(backend, 0, 1, 0, "in world-a-2 at the end")
