"""Event-sourced entities in the engine: run commands into events, and rebuild states from logs.

An event-sourced entity is a resident like any other: its committed ``(version, data)`` is the
seq of its last event and the encoded state after it, so following, reading, coalescing and the
output gate work unchanged. What differs is how a call runs (``run_events``: ``handle`` decides
the events, ``apply`` folds them into the tip state) and what its write carries (``Write.events``
and, every ``snapshot_every`` events, the state as a snapshot: ``event_write``), and how it is
loaded (``rebuild``: the snapshot folded with the events after it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from ._codec import UNTYPED
from ._core._resident import Call, Resident
from ._entity import EntityInfo, EventSourced, Update
from ._errors import (
    EXPECTED,
    ActivationFailed,
    EntityBroken,
    IncompatibleVersion,
    Rejected,
    SerializationError,
    TooLarge,
    Unavailable,
    failed,
)
from ._outbox import effects_of
from .backends._base import Stored, StoredEvent, Write

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = [
    "MAX_EVENTS",
    "Append",
    "decode_event",
    "event_write",
    "fold",
    "rebuild",
    "run_events",
]

#: The most events one command may append (``TooLarge`` beyond).
MAX_EVENTS: Final = 1000
_raw_encode = UNTYPED.raw_encode
#: Events read per page while rebuilding a state.
_REBUILD_PAGE: Final = 10_000


class Append:
    """The message of ``World.append``: append ``events`` without a command, at seq ``expected``."""

    __slots__ = ("events", "expected")

    def __init__(self, events: tuple[Any, ...], expected: int) -> None:
        self.events = events
        self.expected = expected


def run_events(engine: Engine, resident: Resident, batch: list[Call]) -> None:
    """Run calls of an event-sourced entity on its tip; each lands in ``pending``.

    A call's ``events`` are its encoded events, ``version`` the seq of its last one (``None``
    when it appended none: then the state is unchanged, and ``result`` is the state, or the
    error). If ``apply`` raises, the entity is broken: that call and the rest of the batch get
    ``EntityBroken`` (deliveries go back to the outbox), and nothing of them is committed.

    Runs once per entity per turn, so the common case (a command whose events and state are
    immutable scalars) is inlined here; ``_decide`` does the rest.
    """
    info = resident.info
    if resident.error is not None:
        engine.refuse_batch(resident, batch)
        return
    pending = resident.pending if resident.pending is not None else []
    tip, tip_data, tip_obj = resident.tip_version, resident.tip_data, resident.tip_obj
    cls, key = info.cls, resident.key
    shareable, scalar_events = info.shareable, info.event_shareable
    max_event = engine.options.max_message_bytes
    max_state = engine.options.max_state_bytes
    ran = 0
    for index, call in enumerate(batch):
        if call.future.done():  # timed out or cancelled while queued: nothing happens
            engine.skip(resident, call)
            continue
        entity = cls.__new__(cls)
        entity.key = key
        message = call.message
        try:
            if tip_obj is not None and scalar_events and type(message) is not Append:
                produced = entity.handle(message, tip_obj)  # type: ignore[attr-defined]
                if (
                    type(produced) is list
                    and len(produced) == 1
                    and type(produced[0]) in scalar_events
                ):
                    # One scalar event on a scalar state: no copy to make, and once `apply` has
                    # run the call is finished here (it never runs twice).
                    event = produced[0]
                    data = _raw_encode(event)
                    if len(data) > max_event:
                        raise TooLarge(
                            f"an event is {len(data)} bytes; max_message_bytes is {max_event}"
                        )
                    try:
                        state = entity.apply(event, tip_obj)  # type: ignore[attr-defined]
                    except Exception as exc:
                        raise _broken(info, key, exc, tip + 1) from exc
                    if type(state) in shareable:
                        new, value, obj = info.encode_scalar(state), state, state
                    else:
                        new = info.codec.encode(state)
                        value, obj = info.codec.decode(new), None
                    if len(new) > max_state:
                        raise TooLarge(
                            f"the new state is {len(new)} bytes; max_state_bytes is {max_state}"
                        )
                    call.result = value
                    ran += 1
                    tip += 1
                    call.version = tip
                    call.data = tip_data = new
                    call.events = (data,)
                    tip_obj = obj
                    if call.delivery is not None:
                        resident.fx = True
                    pending.append(call)
                    continue
                decided = _decide(engine, resident, call, tip, tip_data, tip_obj, produced)
            else:
                decided = _decide(engine, resident, call, tip, tip_data, tip_obj, _UNSET)
        except EntityBroken as exc:
            resident.error = exc
            resident.pending = pending
            resident.tip_version, resident.tip_data, resident.tip_obj = tip, tip_data, tip_obj
            engine.stats["activations"] += ran
            engine.refuse_batch(resident, batch[index:])
            return
        except EXPECTED as exc:
            call.result = exc
        except OverflowError as exc:  # a scalar beyond 64 bits
            call.result = SerializationError(f"cannot encode an event or a state: {exc}")
        except Exception as exc:
            call.result = failed(info.name, exc, "handle")
        else:
            events, effects, data, value, obj = decided
            call.result = value
            ran += 1
            if events:
                tip += len(events)
                call.version = tip
                call.data = tip_data = data
                call.events = events
                tip_obj = obj
            if effects is not None:
                call.effects = effects
                resident.fx = True
        if call.delivery is not None:
            resident.fx = True
        pending.append(call)
    resident.pending = pending or None  # never an empty list: else the entity never looks idle
    resident.tip_version, resident.tip_data, resident.tip_obj = tip, tip_data, tip_obj
    engine.stats["activations"] += ran


#: `_decide` is to call `handle` itself.
_UNSET: Final = object()


def _decide(
    engine: Engine,
    resident: Resident,
    call: Call,
    tip: int,
    tip_data: bytes,
    tip_obj: Any,
    produced: Any,
) -> tuple[tuple[bytes, ...], Any, bytes, Any, Any]:
    """Run one call: ``(encoded events, effects, new state bytes, the caller's copy, tip_obj)``.

    ``produced`` is what ``handle`` returned when the caller already called it, else
    ``_UNSET``. ``tip_obj`` is the decoded tip when it is immutable (shared, never copied), else
    None; so are events of an immutable type.
    """
    info = resident.info
    codec = info.codec
    entity: EventSourced = info.cls.__new__(info.cls)  # type: ignore[assignment]
    entity.key = resident.key
    message = call.message
    effects: tuple[object, ...] = ()
    if type(message) is Append:
        if message.expected != tip:
            raise Rejected(
                f"{info.name}:{resident.key!r:.60} has {tip} events; the append expected "
                f"{message.expected}"
            )
        produced = message.events
    else:
        if produced is _UNSET:
            state = tip_obj if tip_obj is not None else codec.decode(tip_data)
            produced = entity.handle(message, state)
        if type(produced) is Update:
            produced, effects = produced.state, produced.effects
        if not isinstance(produced, list | tuple):
            raise ActivationFailed(
                f"{info.name}.handle returns a list of events (or an Update of one); "
                f"got {type(produced).__qualname__}"
            )
    if not produced:
        if effects:
            raise ActivationFailed(
                f"{info.name}.handle returned effects without events: effects follow from "
                "events, so a command with effects appends at least one"
            )
        if tip_obj is not None:
            return (), None, tip_data, tip_obj, tip_obj
        return (), None, tip_data, codec.decode(tip_data), None
    options = engine.options
    if len(produced) > MAX_EVENTS:
        raise TooLarge(f"a command appended {len(produced)} events; at most {MAX_EVENTS}")
    event_codec = info.events
    assert event_codec is not None
    immutable = info.event_shareable
    limit = options.max_message_bytes
    encoded: list[bytes] = []
    copies: list[Any] = []
    for event in produced:
        if type(event) in immutable:  # a scalar: no preparation, and no copy to make
            try:
                data = _raw_encode(event)
            except OverflowError as exc:
                raise SerializationError(f"cannot encode {event!r:.40}: {exc}") from exc
            copies.append(event)
        else:
            data = event_codec.encode(event)
            copies.append(event_codec.decode(data))
        if len(data) > limit:
            raise TooLarge(f"an event is {len(data)} bytes; max_message_bytes is {limit}")
        encoded.append(data)
    # Fold fresh copies onto a fresh state: what a replay of the log will do, exactly.
    state = tip_obj if tip_obj is not None else codec.decode(tip_data)
    seq = tip
    for event in copies:
        seq += 1
        state = _apply(info, entity, event, state, seq)
    outbox = effects_of(engine, resident, effects, seq) if effects else None
    if type(state) in info.shareable:
        try:
            new = info.encode_scalar(state)
        except OverflowError as exc:
            raise SerializationError(f"cannot encode {state!r:.40}: {exc}") from exc
        value = obj = state
    else:
        new = codec.encode(state)
        value, obj = codec.decode(new), None
    if len(new) > options.max_state_bytes:
        raise TooLarge(
            f"the new state is {len(new)} bytes; max_state_bytes is {options.max_state_bytes}"
        )
    return tuple(encoded), outbox, new, value, obj


def _apply(info: EntityInfo, entity: EventSourced, event: Any, state: Any, seq: int) -> Any:
    try:
        return entity.apply(event, state)
    except Exception as exc:
        raise _broken(info, entity.key, exc, seq) from exc


def _broken(info: EntityInfo, key: str, exc: Exception, seq: int) -> EntityBroken:
    error = EntityBroken(
        f"{info.name}:{key!r:.60} is broken: apply raised {type(exc).__name__} at event {seq}: "
        f"{exc}"
    )
    error.__cause__ = exc
    return error


def event_write(write: Write, info: EntityInfo, calls: list[Call]) -> None:
    """Fill the event part of an event-sourced entity's write from the calls it commits."""
    if write.version == write.expected:
        write.events = None
        write.snapshot = False
        return
    if len(calls) == 1:  # the common case: one command, whose events are the write's
        write.events = calls[0].events
    else:
        events: list[bytes] = []
        for call in calls:
            if call.events:
                events.extend(call.events)
        write.events = tuple(events)
    every = info.snapshot_every
    write.snapshot = every != 0 and write.version // every > write.expected // every


def decode_event(info: EntityInfo, key: str, stored: StoredEvent) -> Any:
    """Decode a stored event for this version of its type (upgrading an older one).

    Raises ``IncompatibleVersion`` for an event of a newer version, ``SerializationError`` for
    bytes that do not fit the declared ``event_type``, ``ActivationFailed`` if
    ``upgrade_event`` raised.
    """
    codec = info.events
    assert codec is not None
    if stored.type_version == info.version:
        return codec.decode(stored.data)
    if stored.type_version > info.version:
        raise IncompatibleVersion(
            f"event {stored.seq} of {info.name}:{key!r:.60} was written by version "
            f"{stored.type_version} of the type; this code is version {info.version}"
        )
    entity: EventSourced = info.cls(key)  # type: ignore[assignment]
    try:
        event = entity.upgrade_event(UNTYPED.decode(stored.data), stored.type_version)
    except Exception as exc:
        raise failed(info.name, exc, "upgrade_event") from exc
    return codec.decode(codec.encode(event))


def _start(info: EntityInfo, key: str, row: Stored) -> tuple[int, Any]:
    """Where a rebuild starts: ``(seq, state)`` of a usable snapshot, else ``(0, init())``."""
    if row.snapshot is None:
        raise IncompatibleVersion(
            f"{info.name}:{key!r:.60} is stored as a state entity, not an event-sourced one"
        )
    if row.snapshot and row.type_version > info.version:
        raise IncompatibleVersion(
            f"the snapshot of {info.name}:{key!r:.60} was written by version {row.type_version} "
            f"of the type; this code is version {info.version}"
        )
    if row.snapshot and row.type_version == info.version:
        return row.snapshot, info.codec.decode(row.data)
    try:
        return 0, info.cls(key).init()
    except Exception as exc:
        raise failed(info.name, exc, "init") from exc


def fold(info: EntityInfo, key: str, row: Stored, log: Iterable[StoredEvent]) -> Any:
    """The state of a stored event-sourced entity: its usable snapshot, folded with ``log``.

    ``log`` holds at least the events after the snapshot (earlier ones are skipped). Raises as
    ``rebuild`` does.
    """
    after, state = _start(info, key, row)
    entity: EventSourced = info.cls(key)  # type: ignore[assignment]
    for stored in log:
        if stored.seq > row.version:
            break
        if stored.seq > after:
            if stored.seq != after + 1:
                raise _damaged(info, key, after, row)
            state = _apply(info, entity, decode_event(info, key, stored), state, stored.seq)
            after = stored.seq
    if after != row.version:
        raise _damaged(info, key, after, row)
    return state


def _damaged(info: EntityInfo, key: str, after: int, row: Stored) -> Unavailable:
    return Unavailable(
        f"the log of {info.name}:{key!r:.60} has no event {after + 1} (its row is at "
        f"{row.version}): the storage is damaged"
    )


async def rebuild(engine: Engine, resident: Resident, row: Stored | None) -> Stored | None:
    """The stored row of an event-sourced entity, with ``data`` its state at ``version``.

    Starts from the snapshot if this version of the type wrote it (an older one's is ignored:
    the events are folded from the start, upgraded), then folds the events after it, read a
    page at a time.

    Raises ``EntityBroken`` (``apply`` raised), ``IncompatibleVersion``, ``SerializationError``,
    ``ActivationFailed`` (``init`` or ``upgrade_event`` raised), ``Unavailable`` (the log could
    not be read, or misses events).
    """
    if row is None:
        return None
    info, key = resident.info, resident.key
    after, state = _start(info, key, row)
    if after == row.version:
        return Stored(row.version, info.version, row.data, row.snapshot)
    entity: EventSourced = info.cls(key)  # type: ignore[assignment]
    backend = engine.backend
    while after < row.version:
        page = await backend.read_events(info.name, key, after=after, limit=_REBUILD_PAGE)
        if not page or page[0].seq != after + 1:
            raise _damaged(info, key, after, row)
        for stored in page:
            if stored.seq > row.version:
                break
            state = _apply(info, entity, decode_event(info, key, stored), state, stored.seq)
            after = stored.seq
    return Stored(row.version, info.version, info.codec.encode(state), row.snapshot)
