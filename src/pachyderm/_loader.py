"""The loader: reads entities that are not resident, in batches, and installs their state.

A state entity's row is its state (upgraded from an older ``version`` of its type if need be).
An event-sourced entity's state is rebuilt: its snapshot (if any, and written by this version of
the type), folded with the events after it (``_eventsourced.rebuild``). Until its state is
installed an entity's calls wait in its mailbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from ._codec import UNTYPED, PickleCodec
from ._core._resident import READY, Resident
from ._errors import IncompatibleVersion, PachydermError, Unavailable, failed
from ._eventsourced import rebuild
from .backends._base import Stored

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["encode_init", "fail_load", "load_loop", "wake_loaded"]

_LOAD_BATCH: Final = 1000
_RELOAD_AFTER: Final = 1.0  # seconds before loading again an entity whose commit is in doubt


async def load_loop(engine: Engine) -> None:
    """Load the requested residents, a batch at a time, forever (a task of the engine)."""
    loop = engine.loop
    assert loop is not None
    dispatcher = engine.dispatcher
    to_load = engine.to_load
    while True:
        if not to_load:
            engine.load_waiter = loop.create_future()
            await engine.load_waiter
            continue
        if len(to_load) <= _LOAD_BATCH:  # the common case: all of them, without a pop each
            batch = list(to_load.values())
            to_load.clear()
        else:
            batch = [to_load.pop(ref) for ref in list(to_load)[:_LOAD_BATCH]]
        try:
            rows: Sequence[Stored | None] = await engine.backend.load_many([r.ref for r in batch])
        except PachydermError as exc:
            for resident in batch:
                fail_load(engine, resident, exc)
            continue
        engine.stats["loads"] += len(batch)
        recheck = [r for r in batch if r.recheck]
        doubt = dispatcher.in_doubt(batch)
        if recheck or doubt:
            try:
                await dispatcher.recheck(recheck)
                if doubt:
                    stored = {
                        r.ref: 0 if row is None else row.version
                        for r, row in zip(batch, rows, strict=True)
                    }
                    await dispatcher.resolve_doubt(doubt, stored)
            except PachydermError as exc:
                for resident in batch:
                    fail_load(engine, resident, exc)
                continue
        for resident, row in zip(batch, rows, strict=True):
            if resident.info.events is None:
                _install(engine, resident, row)
                continue
            error = None
            try:
                row = await rebuild(engine, resident, row)
            except Unavailable as exc:
                fail_load(engine, resident, exc)  # the log could not be read: not installed
                continue
            except PachydermError as exc:
                error = exc  # it cannot be used here (broken, newer, ...): calls get the error
            if engine.residents.get(resident.ref) is resident:
                _install(engine, resident, row, error)


def fail_load(engine: Engine, resident: Resident, exc: BaseException) -> None:
    """The resident could not be loaded: forget it, and fail its waiting calls with ``exc``."""
    if engine.residents.get(resident.ref) is resident:
        del engine.residents[resident.ref]
    dispatcher = engine.dispatcher
    if dispatcher.in_doubt([resident]) and not dispatcher.closing:
        # Rows it may have committed wait for its reload to be dispatched: load it again.
        engine.clock.call_later(_RELOAD_AFTER, engine.resident, resident.info, resident.key)
    calls, resident.mailbox = resident.mailbox or [], None
    dispatcher.take_back(resident, calls)
    for call in calls:
        engine.answer(resident, call, exc)
    wake_loaded(resident, exc)


def wake_loaded(resident: Resident, exc: BaseException | None = None) -> None:
    waiters, resident.loaded = resident.loaded, None
    for future in waiters or ():
        if not future.done():
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(exc)


def _install(
    engine: Engine, resident: Resident, row: Stored | None, error: PachydermError | None = None
) -> None:
    """Make a loaded row the resident's committed state (upgrading or refusing it).

    With ``error`` the entity cannot be used here: its calls get that error.
    """
    info = resident.info
    resident.error = None
    if (
        error is None
        and row is not None
        and row.type_version == info.version
        and (row.snapshot is None or info.events is not None)
    ):  # the common case: a row of this version of the type (the loader's hot path)
        version, data = row.version, row.data
        if info.codec is not UNTYPED:
            try:
                info.codec.decode(data)  # refuse bytes that do not fit the declared type now
            except PachydermError as exc:
                data = b""
                resident.error = exc
    else:
        version, data = _other_row(resident, row, error)
    resident.version = resident.tip_version = version
    resident.data = resident.tip_data = data
    resident.tip_obj = None
    resident.phase = READY
    channels = engine.channels
    if channels:
        channels_of = channels.get(resident.ref)
        if channels_of and resident.error is None:
            for channel in channels_of:  # another writer may have moved it on: tell followers
                channel.push(version, data)
    if resident.loaded is not None:  # readers and followers wait for it (calls do not)
        wake_loaded(resident)
    if resident.mailbox:
        engine.schedule(resident)


def _other_row(
    resident: Resident, row: Stored | None, error: PachydermError | None
) -> tuple[int, bytes]:
    """``_install`` of anything but a row of this version: the version and state to install.

    A row it cannot use leaves ``resident.error`` set, and ``b""`` as its state.
    """
    info = resident.info
    try:
        if error is not None:
            raise error
        if row is None:
            return 0, encode_init(resident)
        if info.events is None and row.snapshot is not None:
            resident.error = IncompatibleVersion(
                f"{info.name}:{resident.key!r:.60} is stored as an event-sourced entity; this "
                "code's type is not event-sourced"
            )
        elif row.type_version > info.version:
            resident.error = IncompatibleVersion(
                f"{info.name}:{resident.key!r:.60} was stored by version {row.type_version} "
                f"of the type; this code is version {info.version}"
            )
        else:
            return row.version, _upgrade(resident, row)
    except PachydermError as exc:
        resident.error = exc
    return (0 if row is None else row.version), b""


def encode_init(resident: Resident) -> bytes:
    """The encoded ``init()`` state of the resident's type."""
    entity = resident.info.cls(resident.key)
    try:
        state = entity.init()
    except Exception as exc:
        raise failed(resident.info.name, exc, "init") from exc
    return resident.info.codec.encode(state)


def _upgrade(resident: Resident, row: Stored) -> bytes:
    info = resident.info
    raw_codec = info.codec if isinstance(info.codec, PickleCodec) else UNTYPED
    raw = raw_codec.decode(row.data)
    entity = info.cls(resident.key)
    try:
        state = entity.upgrade(raw, row.type_version)
    except Exception as exc:
        raise failed(info.name, exc, "upgrade") from exc
    data = info.codec.encode(state)
    info.codec.decode(data)
    return data
