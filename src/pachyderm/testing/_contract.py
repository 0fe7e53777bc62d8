"""The backend contract: the cases every backend passes, framework-free.

A backend author runs the whole contract with ``await check_backend(factory)``, or hands the
cases of ``backend_cases()`` to a test framework one by one (each case is a plain coroutine
function).
Nothing here imports a test framework: a case fails by raising ``AssertionError`` (never a bare
``assert``, so ``python -O`` cannot turn the contract off), and declines by raising
``CaseSkipped``. The cases of the outbox live in ``_contract_outbox`` and those of event logs in
``_contract_events``; they run after these.

The factory contract:

- ``make_backend()`` returns a new, unopened backend on fresh, empty storage, every call.
- ``reopen(closed)`` (optional) returns a backend on the same storage as ``closed``, a backend that
  was opened and then closed. It may return ``closed`` itself when the backend can be reopened
  (the memory backend keeps its data per object, so ``reopen=lambda b: b`` is right for it).
  Without ``reopen``, cases that need the same storage twice reopen the same object, and the
  durability case is skipped.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import NamedTuple, TypeAlias

from .._entity import MAX_KEY_BYTES
from .._errors import InvalidOptions, Unavailable
from ..backends._base import Backend, Receipt, Stored, Write

__all__ = [
    "BackendCase",
    "BackendFactory",
    "CaseFunction",
    "CaseSkipped",
    "ContractViolation",
    "Reopen",
    "backend_cases",
    "check_backend",
]

#: Returns a new, unopened backend on fresh storage.
BackendFactory: TypeAlias = Callable[[], Backend]
#: Returns a backend on the same storage as a closed one (possibly the same object).
Reopen: TypeAlias = Callable[[Backend], Backend]
#: One case of the contract: ``await case(make_backend, reopen)`` passes, or raises.
CaseFunction: TypeAlias = Callable[[BackendFactory, Reopen | None], Awaitable[None]]


class BackendCase(NamedTuple):
    """One case of the contract, by name; unpacks as ``(name, run)``."""

    name: str
    run: CaseFunction


class CaseSkipped(Exception):
    """Raised by a case that does not apply to this backend (for example durability in memory).

    ``str()`` of it is the reason.
    """


class ContractViolation(AssertionError):
    """The backend failed one or more cases of the contract.

    ``failures`` pairs each failing case's name with what it raised, in the order the cases ran.
    ``__cause__`` is the first failure (its traceback shows where it failed).
    """

    failures: tuple[tuple[str, BaseException], ...]

    def __init__(self, failures: Sequence[tuple[str, BaseException]], *, total: int) -> None:
        self.failures = tuple(failures)
        lines = [f"{len(self.failures)} of {total} backend contract cases failed:"]
        lines += [f"  {name}: {type(exc).__name__}: {exc}" for name, exc in self.failures]
        super().__init__("\n".join(lines))

    @property
    def names(self) -> list[str]:
        """The names of the failing cases."""
        return [name for name, _ in self.failures]


_CASES: list[BackendCase] = []


def backend_cases() -> list[BackendCase]:
    """Return every case of the contract, in the order ``check_backend`` runs them.

    Each case is ``(name, run)``; ``await run(make_backend, reopen)`` returns on success, raises
    ``AssertionError`` (or whatever the backend raised) on failure, and raises ``CaseSkipped`` when
    it does not apply.
    A test framework parametrizes over this list; names are stable identifiers.

    Returns:
        A new list; changing it changes nothing here.
    """
    return list(_CASES)


async def check_backend(
    make_backend: BackendFactory,
    *,
    reopen: Reopen | None = None,
    case_timeout: float | None = 60.0,
) -> None:
    """Run every case of the backend contract; raise if any fails.

    Every case runs, even after a failure, each on backends of its own, and closes them before it
    returns.
    Cancelling this closes the running case's backends and reports nothing.

    Args:
        make_backend: a zero-argument callable returning a new, unopened backend on fresh storage,
            every call (a backend class with a no-argument constructor, such as ``Memory``, is one).
        reopen: returns a backend on the same storage as the closed backend it is given (it may
            return that same object). Needed for the durability case; see the module docstring.
        case_timeout: seconds each case may take before it counts as failed (``None``: no
            limit). The whole run is not limited; wrap it in ``asyncio.timeout`` for that.

    Raises:
        ContractViolation: one or more cases failed; ``failures`` names them.
        InvalidOptions: ``case_timeout`` is not positive.
    """
    if case_timeout is not None and not case_timeout > 0:
        raise InvalidOptions(f"case_timeout is positive seconds or None; got {case_timeout!r}")
    failures: list[tuple[str, BaseException]] = []
    for case in _CASES:
        try:
            async with asyncio.timeout(case_timeout):
                await case.run(make_backend, reopen)
        except CaseSkipped:
            continue
        except Exception as exc:  # every failure is reported, whatever its type
            failures.append((case.name, exc))
    if failures:
        raise ContractViolation(failures, total=len(_CASES)) from failures[0][1]


def _case(fn: CaseFunction) -> CaseFunction:
    name = getattr(fn, "__name__", repr(fn)).removeprefix("_").removeprefix("case_")
    _CASES.append(BackendCase(name, fn))
    return fn


# ---------------------------------------------------------------------------------------------
# Helpers. Checks raise AssertionError explicitly: `assert` vanishes under `python -O`.

_T = "contract.T"
_U = "contract.U"
_WORLD = "contract"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 240 else f"{text[:240]}... ({len(text)} characters)"


async def _race(backend: Backend, make: Callable[[int], Write], count: int, what: str) -> int:
    """Commit ``make(i)`` for every ``i < count`` at once; exactly one may win: its ``i``."""
    results = await asyncio.gather(*(backend.commit([make(i)]) for i in range(count)))
    winners = [i for i, result in enumerate(results) if result == [True]]
    losers = [i for i, result in enumerate(results) if result == [False]]
    _expect_equal(len(winners), 1, f"winners among {count} {what}")
    _expect_equal(len(losers), count - 1, f"losers among {count} {what}")
    return winners[0]


def _expect_equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: expected {_short(expected)}, got {_short(actual)}")


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def _new(make_backend: BackendFactory) -> Backend:
    backend = make_backend()
    _expect(isinstance(backend, Backend), f"make_backend() returned {backend!r}, not a Backend")
    return backend


def _again(closed: Backend, reopen: Reopen | None) -> Backend:
    backend = closed if reopen is None else reopen(closed)
    _expect(isinstance(backend, Backend), f"reopen() returned {backend!r}, not a Backend")
    return backend


@asynccontextmanager
async def _opened(backend: Backend, world: str = _WORLD) -> AsyncIterator[Backend]:
    # aclose even when open failed: a half-opened backend must release what it holds.
    try:
        await backend.open(world)
        yield backend
    finally:
        await backend.aclose()


def _write(
    key: str,
    expected: int,
    version: int | None = None,
    *,
    type_name: str = _T,
    data: bytes = b"",
    type_version: int = 1,
    receipts: Iterable[Receipt] = (),
) -> Write:
    version = expected + 1 if version is None else version
    return Write(type_name, key, expected, version, type_version, data, tuple(receipts))


async def _commit(backend: Backend, writes: Sequence[Write], expected: list[bool]) -> None:
    result = await backend.commit(writes)
    _expect(isinstance(result, list), f"commit() returned {type(result).__name__}, not a list")
    _expect(all(type(flag) is bool for flag in result), f"commit() flags not bool: {result!r}")
    keys = [(w.type_name, w.key, w.expected) for w in writes]
    _expect_equal(result, expected, f"commit() of (type, key, expected) {keys}")


async def _load(backend: Backend, key: str, type_name: str = _T) -> Stored | None:
    (row,) = await backend.load_many([(type_name, key)])
    if row is not None:
        _expect(isinstance(row, Stored), f"load_many() returned {row!r}, not a Stored")
        _expect(type(row.data) is bytes, f"Stored.data is {type(row.data).__name__}, not bytes")
    return row


async def _expect_row(backend: Backend, key: str, row: Stored | None, type_name: str = _T) -> None:
    _expect_equal(await _load(backend, key, type_name), row, f"load of ({type_name!r}, {key!r})")


async def _expect_keys(backend: Backend, expected: list[str], type_name: str = _T) -> None:
    _expect_equal(await backend.list_keys(type_name), expected, f"list_keys({type_name!r})")


async def _expect_receipt(
    backend: Backend, key: str, id: str, receipt: Receipt | None, type_name: str = _T
) -> None:
    got = await backend.receipt(type_name, key, id)
    _expect_equal(got, receipt, f"receipt({type_name!r}, {key!r}, {id!r})")


# ---------------------------------------------------------------------------------------------
# Rows and conditional commits.


@_case
async def _case_load_missing(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A fresh world stores nothing: no row, no key, no receipt."""
    async with _opened(_new(make_backend)) as backend:
        _expect_equal(await backend.load_many([(_T, "missing")]), [None], "load of a missing ref")
        _expect_equal(await backend.load_many([]), [], "load_many([])")
        await _expect_keys(backend, [])
        await _expect_receipt(backend, "missing", "r", None)
        _expect_equal(await backend.prune_receipts(float("inf")), 0, "prune_receipts(inf)")


@_case
async def _case_create_and_update(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """expected=0 creates; version, type_version and data round-trip; expected=n updates."""
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_write("k", 0, data=b"one", type_version=3)], [True])
        await _expect_row(backend, "k", Stored(1, 3, b"one"))
        await _expect_keys(backend, ["k"])
        await _commit(backend, [_write("k", 1, data=b"two", type_version=4)], [True])
        await _expect_row(backend, "k", Stored(2, 4, b"two"))
        await _commit(backend, [_write("k", 0, data=b"again")], [False])
        await _expect_row(backend, "k", Stored(2, 4, b"two"))


@_case
async def _case_conditional_commit(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A write whose expected version is not stored loses and changes nothing, receipts included."""
    mine = Receipt("mine", 2, b"reply", 1.0)
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_write("k", 0, 2, data=b"kept", receipts=[mine])], [True])
        for expected in (0, 1, 3, 7):
            lost = Receipt(f"lost{expected}", expected + 1, b"x", 2.0)
            write = _write("k", expected, data=b"overwritten", type_version=9, receipts=[lost])
            await _commit(backend, [write], [False])
            await _expect_receipt(backend, "k", lost.id, None)
        await _expect_row(backend, "k", Stored(2, 1, b"kept"))
        await _expect_receipt(backend, "k", "mine", mine)
        ghost = Receipt("ghost", 6, b"x", 2.0)
        await _commit(backend, [_write("never", 5, receipts=[ghost])], [False])
        await _expect_row(backend, "never", None)
        await _expect_receipt(backend, "never", "ghost", None)
        await _expect_keys(backend, ["k"])


@_case
async def _case_mixed_batch(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """One batch of winners and losers applies only the winners; flags follow the writes' order."""
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_write("a", 0, data=b"a1"), _write("b", 0, data=b"b1")], [True] * 2)
        batch = [
            _write("a", 1, data=b"a2", receipts=[Receipt("ra", 2, b"ok", 1.0)]),
            _write("b", 0, data=b"b-lost", receipts=[Receipt("rb", 1, b"no", 1.0)]),
            _write("c", 0, data=b"c1", receipts=[Receipt("rc", 1, b"ok", 1.0)]),
            _write("d", 4, data=b"d-lost", receipts=[Receipt("rd", 5, b"no", 1.0)]),
            _write("a", 0, type_name=_U, data=b"ua1"),
        ]
        await _commit(backend, batch, [True, False, True, False, True])
        await _expect_row(backend, "a", Stored(2, 1, b"a2"))
        await _expect_row(backend, "b", Stored(1, 1, b"b1"))
        await _expect_row(backend, "c", Stored(1, 1, b"c1"))
        await _expect_row(backend, "d", None)
        await _expect_row(backend, "a", Stored(1, 1, b"ua1"), _U)
        await _expect_receipt(backend, "a", "ra", Receipt("ra", 2, b"ok", 1.0))
        await _expect_receipt(backend, "b", "rb", None)
        await _expect_receipt(backend, "c", "rc", Receipt("rc", 1, b"ok", 1.0))
        await _expect_receipt(backend, "d", "rd", None)
        await _expect_keys(backend, ["a", "b", "c"])
        await _commit(backend, [], [])


@_case
async def _case_coalesced_versions(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A write of k coalesced activations stores version expected + k; no version in between."""
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_write("k", 0, 3, data=b"3")], [True])
        await _expect_row(backend, "k", Stored(3, 1, b"3"))
        await _commit(backend, [_write("k", 3, 1003, data=b"1003")], [True])
        await _expect_row(backend, "k", Stored(1003, 1, b"1003"))
        for stale in (1, 2, 4, 1002):
            await _commit(backend, [_write("k", stale, data=b"stale")], [False])
        await _commit(backend, [_write("k", 1003, 2**40, data=b"big")], [True])
        await _expect_row(backend, "k", Stored(2**40, 1, b"big"))


@_case
async def _case_load_many_order(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """load_many answers in the order asked, duplicates included, beyond any batch size limit."""
    async with _opened(_new(make_backend)) as backend:
        writes = [_write("a", 0, data=b"a"), _write("b", 0, 2, data=b"b")]
        await _commit(backend, [*writes, _write("a", 0, type_name=_U, data=b"ua")], [True] * 3)
        a, b, ua = Stored(1, 1, b"a"), Stored(2, 1, b"b"), Stored(1, 1, b"ua")
        refs = [(_T, "b"), (_T, "zz"), (_T, "a"), (_T, "b"), (_U, "a"), (_U, "b"), (_T, "a")]
        got = await backend.load_many(refs)
        _expect_equal(got, [b, None, a, b, ua, None, a], f"load_many({refs})")
        many = [(_T, "b") if i % 3 else (_T, f"missing{i}") for i in range(1500)]
        got = await backend.load_many(many)
        _expect_equal(got, [b if i % 3 else None for i in range(1500)], "load_many of 1500 refs")


# ---------------------------------------------------------------------------------------------
# Worlds and receipts.


@_case
async def _case_world_namespacing(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """Each world sees only its own rows, keys and receipts, on the same storage."""
    first, second = "world-a", "world-a-2"  # one name a prefix of the other, on purpose
    ra, rb = Receipt("r", 1, b"from a", 1.0), Receipt("r", 1, b"from b", 1.0)
    backend = _new(make_backend)
    async with _opened(backend, first):
        await _commit(backend, [_write("k", 0, 2, data=b"a", receipts=[ra])], [True])
    backend = _again(backend, reopen)
    async with _opened(backend, second):
        await _expect_row(backend, "k", None)
        await _expect_keys(backend, [])
        await _expect_receipt(backend, "k", "r", None)
        _expect_equal(await backend.prune_receipts(float("inf")), 0, "prune in an empty world")
        await _commit(backend, [_write("k", 2, data=b"b")], [False])
        await _commit(backend, [_write("k", 0, data=b"b", receipts=[rb])], [True])
    backend = _again(backend, reopen)
    async with _opened(backend, first):
        await _expect_row(backend, "k", Stored(2, 1, b"a"))
        await _expect_keys(backend, ["k"])
        await _expect_receipt(backend, "k", "r", ra)
        _expect_equal(await backend.prune_receipts(2.0), 1, "prune_receipts(2.0) in world-a")
    backend = _again(backend, reopen)
    async with _opened(backend, second):
        await _expect_row(backend, "k", Stored(1, 1, b"b"))
        await _expect_receipt(backend, "k", "r", rb)


@_case
async def _case_receipts_atomic(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """Receipts commit with their write, round-trip exactly, and belong to one entity."""
    first = Receipt("call-1", 1, bytes(range(256)), 1_700_000_000.123456)
    second = Receipt("call-2", 1, b"", 0.5)
    third = Receipt("call-3", 3, b"\x00reply", 1_700_000_001.0)
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_write("k", 0, receipts=[first, second])], [True])
        await _expect_receipt(backend, "k", "call-1", first)
        await _expect_receipt(backend, "k", "call-2", second)
        got = await backend.receipt(_T, "k", "call-1")
        _expect(got is not None and type(got.result) is bytes, f"Receipt.result not bytes: {got}")
        await _commit(backend, [_write("k", 1, 3, receipts=[third])], [True])
        await _commit(backend, [_write("k", 3)], [True])
        for receipt in (first, second, third):
            await _expect_receipt(backend, "k", receipt.id, receipt)
        await _expect_receipt(backend, "other", "call-1", None)
        await _expect_receipt(backend, "k", "call-1", None, _U)
        await _expect_receipt(backend, "k", "call-4", None)


@_case
async def _case_prune_receipts(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """prune_receipts deletes only receipts strictly older than ``before``, and counts them."""
    old, also_old = Receipt("old", 1, b"1", 1.0), Receipt("also-old", 1, b"4", 1.5)
    edge, new = Receipt("edge", 1, b"2", 2.0), Receipt("new", 1, b"3", 3.0)
    async with _opened(_new(make_backend)) as backend:
        batch = [
            _write("a", 0, data=b"a", receipts=[old, new]),
            _write("b", 0, data=b"b", receipts=[edge]),
            _write("a", 0, type_name=_U, receipts=[also_old]),
        ]
        await _commit(backend, batch, [True] * 3)
        _expect_equal(await backend.prune_receipts(0.5), 0, "prune_receipts(0.5)")
        _expect_equal(await backend.prune_receipts(2.0), 2, "prune_receipts(2.0)")
        await _expect_receipt(backend, "a", "old", None)
        await _expect_receipt(backend, "a", "also-old", None, _U)
        await _expect_receipt(backend, "b", "edge", edge)
        await _expect_receipt(backend, "a", "new", new)
        _expect_equal(await backend.prune_receipts(2.0), 0, "prune_receipts(2.0) again")
        _expect_equal(await backend.prune_receipts(10.0), 2, "prune_receipts(10.0)")
        await _expect_receipt(backend, "a", "new", None)
        await _expect_row(backend, "a", Stored(1, 1, b"a"))
        await _expect_keys(backend, ["a", "b"])


# ---------------------------------------------------------------------------------------------
# Listing keys.

_UNICODE_KEYS = [
    "a",
    "B",
    "b",
    "Z",
    "~",
    "a b",
    "\u00e9",  # é, precomposed
    "e\u0301",  # é, decomposed: a different key, never normalised
    "\u00ff",
    "\u65e5",  # 日
    "\u65e5\u672c",  # 日本
    "\ufb01",  # a BMP code point above the surrogates: UTF-16 order differs from code points
    "\U0001f418",  # elephant, outside the BMP
    "\U0001f418\U0001f418",
    "\U0010ffff",
    "\U0001f418" * (MAX_KEY_BYTES // 4),  # the longest key there is
]

_PREFIX_KEYS = [
    "A",
    "a",
    "ab",
    "abc",
    "abd",
    "ab\U0001f418",
    "ab\U0010ffff",
    "ac",
    "a_b",
    "axb",
    "a%",
    "a%c",
    "a*b",
    "a?b",
    "a[b",
    "a\\b",
    "b",
    "\u65e5",
    "\u65e5\u672c",
    "\u65e5\u672c\u8a9e",
    "\U0010ffff",
    "\U0010ffffx",
]

# SQL LIKE and GLOB wildcards, case folding, and upper bounds computed by incrementing the last
# character: the usual ways a prefix filter goes wrong.
_PREFIXES = [
    "",
    "a",
    "A",
    "ab",
    "abc",
    "a_",
    "a%",
    "a*",
    "a?",
    "a[",
    "a\\",
    "\u65e5\u672c",
    "\U0010ffff",
    "zzz",
]


async def _store_keys(backend: Backend, keys: Iterable[str], type_name: str = _T) -> None:
    writes = [_write(key, 0, type_name=type_name, data=key.encode()) for key in keys]
    await _commit(backend, writes, [True] * len(writes))


@_case
async def _case_list_keys_order(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """list_keys sorts by code point; unicode keys (to the longest) round-trip unchanged."""
    async with _opened(_new(make_backend)) as backend:
        await _store_keys(backend, reversed(_UNICODE_KEYS))
        await _expect_keys(backend, sorted(_UNICODE_KEYS))
        rows = await backend.load_many([(_T, key) for key in _UNICODE_KEYS])
        expected = [Stored(1, 1, key.encode()) for key in _UNICODE_KEYS]
        _expect_equal(rows, expected, "load of unicode keys")


@_case
async def _case_list_keys_prefix(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A prefix selects exactly the keys starting with it, literally and case-sensitively."""
    async with _opened(_new(make_backend)) as backend:
        await _store_keys(backend, _PREFIX_KEYS)
        for prefix in _PREFIXES:
            expected = sorted(key for key in _PREFIX_KEYS if key.startswith(prefix))
            got = await backend.list_keys(_T, prefix=prefix)
            _expect_equal(got, expected, f"list_keys(prefix={prefix!r})")


@_case
async def _case_list_keys_paging(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """``after`` and ``limit`` page through the keys with no gap and no duplicate."""
    keys = sorted(_PREFIX_KEYS)
    async with _opened(_new(make_backend)) as backend:
        await _store_keys(backend, _PREFIX_KEYS)
        for limit in (1, 2, 7, 1000):
            for prefix in ("", "a", "ab"):
                pages = await _all_pages(backend, prefix, limit)
                expected = [key for key in keys if key.startswith(prefix)]
                _expect_equal(pages, expected, f"pages of {limit} with prefix={prefix!r}")
        for after in ("", "a", "aa", "ab", "ab\U0001f418", "b", "\U0010ffffx"):
            got = await backend.list_keys(_T, after=after)
            _expect_equal(got, [k for k in keys if k > after], f"list_keys(after={after!r})")
        got = await backend.list_keys(_T, prefix="ab", after="a")
        _expect_equal(got, [k for k in keys if k.startswith("ab")], "after below the prefix")
        _expect_equal(await backend.list_keys(_T, prefix="ab", after="ac"), [], "after beyond")
        _expect_equal(await backend.list_keys(_T, limit=3), keys[:3], "list_keys(limit=3)")


async def _all_pages(backend: Backend, prefix: str, limit: int) -> list[str]:
    out: list[str] = []
    after: str | None = None
    while True:
        page = await backend.list_keys(_T, prefix=prefix, after=after, limit=limit)
        _expect(len(page) <= limit, f"list_keys(limit={limit}) returned {len(page)} keys")
        # Without this, a backend that answers `after` inclusively would page forever.
        _expect(
            after is None or all(key > after for key in page),
            f"list_keys(after={after!r}) returned {page!r}",
        )
        out += page
        if len(page) < limit:
            return out
        after = page[-1]


@_case
async def _case_list_keys_per_type(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """Keys of one type are never listed or loaded as another's, even where names nest."""
    # ("T", "x.a") and ("T.x", "a") would collide if a backend joined type and key with a dot.
    refs = [("T", "a"), ("T", "b"), ("T", "x.a"), ("T2", "a"), ("T2", "c"), ("T.x", "a")]
    async with _opened(_new(make_backend)) as backend:
        writes = [_write(k, 0, type_name=t, data=f"{t}/{k}".encode()) for t, k in refs]
        await _commit(backend, writes, [True] * len(writes))
        for type_name in ("T", "T2", "T.x", "t", "T.", "Unknown"):
            expected = sorted(k for t, k in refs if t == type_name)
            await _expect_keys(backend, expected, type_name)
        rows = await backend.load_many(refs)
        _expect_equal(rows, [Stored(1, 1, f"{t}/{k}".encode()) for t, k in refs], "load by type")


# ---------------------------------------------------------------------------------------------
# Values.


@_case
async def _case_binary_data(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """Any bytes round-trip: every byte value, NULs, and the empty string."""
    values = [bytes(range(256)), bytes(range(255, -1, -1)), b"", b"\x00", b"\x00" * 9, b"\xff"]
    async with _opened(_new(make_backend)) as backend:
        writes = [_write(f"k{i}", 0, data=value) for i, value in enumerate(values)]
        await _commit(backend, writes, [True] * len(writes))
        for i, value in enumerate(values):
            await _expect_row(backend, f"k{i}", Stored(1, 1, value))


@_case
async def _case_large_value(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """A 1 MiB state round-trips, created and then replaced."""
    rng = random.Random(1)
    first, second = rng.randbytes(1 << 20), rng.randbytes(1 << 20)
    async with _opened(_new(make_backend)) as backend:
        await _commit(backend, [_write("big", 0, data=first)], [True])
        await _expect_row(backend, "big", Stored(1, 1, first))
        await _commit(backend, [_write("big", 1, data=second)], [True])
        await _expect_row(backend, "big", Stored(2, 1, second))


# ---------------------------------------------------------------------------------------------
# Durability, concurrency, lifecycle.


@_case
async def _case_durability(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """What a durable backend committed is there after aclose and reopen, and stays conditional."""
    backend = _new(make_backend)
    if not backend.durable or reopen is None:
        why = "the backend is not durable" if not backend.durable else "no reopen was given"
        raise CaseSkipped(f"durability needs a durable backend and reopen: {why}")
    receipt = Receipt("call", 5, b"reply", 3.0)
    keys = [f"k{i:02}" for i in range(20)]
    async with _opened(backend):
        await _store_keys(backend, keys)
        await _commit(backend, [_write("k00", 1, 5, data=b"five", receipts=[receipt])], [True])
    for generation in range(2):
        backend = _again(backend, reopen)
        async with _opened(backend):
            await _expect_keys(backend, keys)
            await _expect_row(backend, "k00", Stored(5 + generation, 1, b"five"))
            await _expect_row(backend, "k19", Stored(1, 1, b"k19"))
            await _expect_receipt(backend, "k00", "call", receipt)
            await _commit(backend, [_write("k00", 4 + generation, data=b"five")], [False])
            await _commit(backend, [_write("k00", 5 + generation, data=b"five")], [True])


@_case
async def _case_concurrent_distinct(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """200 concurrent commits of distinct entities all win."""
    keys = [f"k{i:03}" for i in range(200)]
    async with _opened(_new(make_backend)) as backend:
        results = await asyncio.gather(
            *(backend.commit([_write(key, 0, data=key.encode())]) for key in keys)
        )
        _expect_equal(results, [[True]] * len(keys), "200 concurrent commits")
        rows = await backend.load_many([(_T, key) for key in keys])
        _expect_equal(rows, [Stored(1, 1, key.encode()) for key in keys], "their rows")
        await _expect_keys(backend, keys)


@_case
async def _case_concurrent_same_key(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """Of 50 concurrent commits expecting the same version of one entity, exactly one wins."""
    async with _opened(_new(make_backend)) as backend:
        for expected in (0, 1):

            def write(i: int, expected: int = expected) -> Write:
                return _write("k", expected, data=b"%d" % i)

            winner = await _race(backend, write, 50, f"commits expecting {expected}")
            await _expect_row(backend, "k", Stored(expected + 1, 1, b"%d" % winner))


@_case
async def _case_statistics(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """statistics() is a dict keyed by str, before open, while open and after close."""
    backend = _new(make_backend)
    _expect_statistics(backend, "before open")
    async with _opened(backend):
        _expect_statistics(backend, "when open")
        await _commit(backend, [_write("k", 0)], [True])
        _expect_statistics(backend, "after a commit")
    _expect_statistics(backend, "after aclose")


def _expect_statistics(backend: Backend, when: str) -> None:
    stats = backend.statistics()
    _expect(isinstance(stats, dict), f"statistics() {when} returned {type(stats).__name__}")
    _expect(all(isinstance(k, str) for k in stats), f"statistics() {when} has non-str keys")


def _operations(backend: Backend) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    return [
        ("load_many", lambda: backend.load_many([(_T, "k")])),
        ("commit", lambda: backend.commit([_write("other", 0)])),
        ("receipt", lambda: backend.receipt(_T, "k", "r")),
        ("prune_receipts", lambda: backend.prune_receipts(10.0)),
        ("list_keys", lambda: backend.list_keys(_T)),
    ]


async def _expect_unavailable(backend: Backend, when: str) -> None:
    for name, call in _operations(backend):
        try:
            await call()
        except Unavailable:
            continue
        raise AssertionError(f"{name}() {when} did not raise Unavailable")


@_case
async def _case_closed_unavailable(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """After aclose every operation raises Unavailable; aclose again is harmless."""
    backend = _new(make_backend)
    async with _opened(backend):
        await _commit(backend, [_write("k", 0)], [True])
    await _expect_unavailable(backend, "after aclose")
    await backend.aclose()


@_case
async def _case_unopened_unavailable(make_backend: BackendFactory, reopen: Reopen | None) -> None:
    """Before open every operation raises Unavailable; aclose of an unopened backend is harmless."""
    backend = _new(make_backend)
    try:
        await _expect_unavailable(backend, "before open")
    finally:
        await backend.aclose()


# The outbox and event log cases, in modules of their own; they register here with `_case`
# (imported last, as they import the helpers above).
from . import _contract_events as _contract_events  # noqa: E402
from . import _contract_outbox as _contract_outbox  # noqa: E402
