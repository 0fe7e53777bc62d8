"""History tools: export an event-sourced entity's history as JSON lines, replay and check it.

The file format (``format`` 1), one JSON object per line, UTF-8, in this order:

1. the header: ``{"pachyderm": "history", "format": 1, "type": NAME, "key": KEY, "world": WORLD,
   "type_version": V}``, where ``NAME`` is the type's stored name and ``V`` the ``version`` of
   the code that exported it;
2. one line per event, seqs contiguous from 1: ``{"seq": N, "type_version": W, "event": EVENT}``.
   ``W`` is the type version that wrote the event; ``EVENT`` is the event as this code reads it
   (passed through ``upgrade_event`` if ``W < V``, so every event has the shape of version ``V``);
3. right after the event line of its seq, if the entity has a snapshot written by version ``V``:
   ``{"snapshot": N, "state": STATE}``, the state stored at seq ``N`` (not one folded by export);
4. the last line: ``{"state": STATE, "seq": N}``, the entity's state after its last event ``N``.

Values are written by ``msgspec.json``: bytes become base64 text, datetimes ISO 8601 text, and
tuples become arrays. JSON has no tuples, so a replay from a file gives ``apply`` lists where it
had tuples (unless ``event_type`` declares them), and compares states as JSON values: two states
agree when their JSON is the same, with object keys and sets taken in sorted order.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

from ._entity import Entity, EntityInfo, EventSourced, _check_type, validate_key
from ._errors import (
    EntityBroken,
    IncompatibleVersion,
    InvalidOptions,
    SerializationError,
    Unavailable,
)
from ._eventsourced import decode_event
from .backends._base import Stored

if TYPE_CHECKING:
    from ._world import World

__all__ = ["FORMAT", "Replay", "check", "export", "read_header", "replay"]

#: The version of the file format this code writes and reads.
FORMAT: Final = 1
#: Events read from the log per page (export and check hold at most one page).
_PAGE: Final = 1000
#: Characters of a state shown in a reason.
_SHOW: Final = 200


class _Writer(Protocol):
    def write(self, text: str, /) -> object: ...


@dataclass(frozen=True, slots=True)
class Replay:
    """The outcome of ``replay`` or ``check``.

    ``ok``: every comparison agreed. ``events``: how many events were read and folded (on a
    divergence, up to the diverging one). ``diverged_at``: the seq of the first event after which
    the two folds, or the fold and the stored state, differ (0: ``init()`` itself; ``None`` when
    ``ok``). ``reason``: a sentence that says what was compared, or what differed at which event.
    ``state``: the state of the first fold, where it stopped (before the event whose ``apply``
    raised in it).
    """

    ok: bool
    events: int
    diverged_at: int | None
    reason: str
    state: Any


class _Header(msgspec.Struct, forbid_unknown_fields=True):
    pachyderm: str
    format: int
    type: str
    key: str
    world: str
    type_version: int


class _Line(msgspec.Struct, forbid_unknown_fields=True):
    """Any line after the header; which fields it has says what it is."""

    seq: int | None = None
    type_version: int | None = None
    event: msgspec.Raw = msgspec.Raw()
    snapshot: int | None = None
    state: msgspec.Raw = msgspec.Raw()


# ---------------------------------------------------------------------- export


async def export(
    world: World, ref: tuple[type[Entity], Any], out: _Writer | str | os.PathLike[str]
) -> int:
    """Write the history of an event-sourced entity to ``out``; return how many events it has.

    ``out`` is a text file object (anything with ``write(str)``), or a path to create or
    overwrite. The format is the module's (see ``docs/events.md``): a header line, one line per
    event, the stored snapshot's line after the event of its seq, and the final state's line.

    The history is a consistent cut: the committed state at some seq ``N`` (what ``world.read``
    returns) and the events 1..N; events committed during the export are left out. The events are
    read from the durable log a page at a time and written as they are read, so memory stays
    bounded whatever the length of the log. Writes are done in a thread, one per page. Nothing is
    written to the world. A path is closed (flushed, not fsynced) when this returns; a file object
    is neither flushed nor closed.

    Cancellation, or an error, leaves ``out`` with a part of the history and no final line, which
    ``replay`` refuses.

    Raises:
        InvalidKey, UnknownEntityType: a bad ref, before any I/O.
        InvalidOptions: the type is not event-sourced; ``out`` is neither a path nor a text
            file, or the path cannot be opened for writing (the ``OSError`` is the cause).
        SerializationError: an event or a state cannot be written as JSON.
        Unavailable: the log cannot be read, or misses events.
        IncompatibleVersion: the entity was stored by a newer version of its type.
        EntityBroken: ``apply`` raises on the stored events, so there is no state to export
            (``check`` names the event).
    """
    info, key = _event_sourced(world, ref)
    if not isinstance(out, str | os.PathLike) and not callable(getattr(out, "write", None)):
        raise InvalidOptions(f"out is a path or a text file (with write(str)); got {out!r:.80}")
    version, state = await _current(world, ref)
    snapshot_seq, snapshot_state = await _snapshot(world, info, key, version)
    if not isinstance(out, str | os.PathLike):
        return await _export(world, info, key, version, state, snapshot_seq, snapshot_state, out)
    try:
        file = await asyncio.to_thread(open, out, "w", encoding="utf-8", newline="\n")
    except OSError as exc:
        raise InvalidOptions(f"cannot write the history to {out!r:.200}: {exc}") from exc
    try:
        return await _export(world, info, key, version, state, snapshot_seq, snapshot_state, file)
    finally:
        file.close()


async def _export(
    world: World,
    info: EntityInfo,
    key: str,
    version: int,
    state: Any,
    snapshot_seq: int,
    snapshot_state: Any,
    out: _Writer,
) -> int:
    header = {
        "pachyderm": "history",
        "format": FORMAT,
        "type": info.name,
        "key": key,
        "world": world.name,
        "type_version": info.version,
    }
    lines = [msgspec.json.encode(header).decode()]
    after = 0
    while after < version:
        page = await _page(world, info, key, after, version)
        for stored in page:
            event = decode_event(info, key, stored)
            line = {"seq": stored.seq, "type_version": stored.type_version, "event": event}
            lines.append(_json(line, f"event {stored.seq} of {info.name}:{key!r:.60}"))
            if stored.seq == snapshot_seq:
                line = {"snapshot": snapshot_seq, "state": snapshot_state}
                lines.append(_json(line, f"the snapshot at seq {snapshot_seq}"))
        after = page[-1].seq
        await asyncio.to_thread(out.write, "".join(f"{line}\n" for line in lines))
        lines = []
    lines.append(_json({"state": state, "seq": version}, f"the state at seq {version}"))
    await asyncio.to_thread(out.write, "".join(f"{line}\n" for line in lines))
    return version


def _json(value: object, what: str) -> str:
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"{what} cannot be written as JSON: {exc}") from exc


# ---------------------------------------------------------------------- replay


def replay(
    entity_type: type[EventSourced],
    lines: Iterable[str | bytes] | str | os.PathLike[str],
    *,
    key: str | None = None,
) -> Replay:
    """Fold an exported history with this code's ``init()`` and ``apply()``, twice; check it.

    ``lines`` is a path (a ``str`` is always a path) or an iterable of the file's lines (an open
    text file, a list of str); blank lines are skipped. ``key`` is the ``self.key`` the entity is
    made with (default: the header's). Pure: no world, no I/O besides reading a path.

    The events are decoded from JSON with the type's ``event_type`` (builtin values without
    one), and folded by two independent runs of ``init()`` and ``apply()`` from seq 1; each state
    is compared as JSON with the other run's after every event, which catches an ``apply`` that
    reads the time, a random number or a counter, or mutates shared state. The fold is also
    compared with the file's snapshot at its seq and with its final state. It stops at the first
    difference, or at an ``apply`` that raises: that is a ``Replay`` with ``ok`` false, not an
    exception. Lines are read one at a time: memory stays bounded.

    Raises:
        InvalidOptions: ``entity_type`` is not event-sourced; the path cannot be opened (the
            ``OSError`` is the cause); the file is not a history of that
            type, is truncated, or has lines out of place (seqs not contiguous from 1, a snapshot
            after a later event, anything after the final line).
        SerializationError: a line is not JSON, or an event does not fit ``event_type``.
        IncompatibleVersion: the file was exported by another version of the type (export it
            again with this code: export upgrades the events).
        InvalidKey: a bad ``key``.
    """
    info = _info(entity_type)
    if isinstance(lines, bytes | bytearray):
        raise InvalidOptions("replay takes a path or an iterable of lines, not bytes")
    if isinstance(lines, str | os.PathLike):
        try:
            file = open(lines, encoding="utf-8")  # noqa: SIM115  # closed below
        except OSError as exc:
            raise InvalidOptions(f"cannot read the history {lines!r:.200}: {exc}") from exc
        with file:
            return _replay(info, file, key)
    return _replay(info, lines, key)


def read_header(text: str | bytes) -> _Header:
    """Parse the first line of a history (any type). Raises as ``replay`` does."""
    if not text.strip():
        raise InvalidOptions("the history has no header line (is the file empty?)")
    try:
        raw = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise SerializationError(f"line 1 is not JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("pachyderm") != "history":
        raise InvalidOptions(f"line 1 is not the header of a pachyderm history: {text!r:.100}")
    if raw.get("format") != FORMAT:
        raise InvalidOptions(
            f"the history is in format {raw.get('format')!r}; this code reads format {FORMAT}"
        )
    try:
        return msgspec.convert(raw, _Header)
    except msgspec.ValidationError as exc:
        raise InvalidOptions(f"line 1 is not a valid history header: {exc}") from None


def _replay(info: EntityInfo, lines: Iterable[str | bytes], key: str | None) -> Replay:
    if isinstance(lines, str) or not isinstance(lines, Iterable):
        raise InvalidOptions(f"replay takes a path or an iterable of lines; got {lines!r:.80}")
    numbered = _numbered(lines)
    first = next(numbered, None)
    if first is None:
        raise InvalidOptions("the history is empty: it has no header line")
    header = read_header(first[1])
    if header.type != info.name:
        raise InvalidOptions(f"the history is of the type {header.type!r}, not {info.name!r}")
    if header.type_version != info.version:
        raise IncompatibleVersion(
            f"the history was exported by version {header.type_version} of {info.name}; this "
            f"code is version {info.version}: export it again with this code"
        )
    key = validate_key(header.key) if key is None else info.normalise_key(key)
    folds = _Folds(info, key)
    diverged = folds.start()
    if diverged is not None:
        return diverged
    pending: dict[int, bytes] = {}  # snapshot lines read before their event: seq -> state
    final = False
    for number, text in numbered:
        if final:
            raise InvalidOptions(f"line {number}: the history goes on after its final state line")
        line = _line(number, text)
        if line.event:
            if line.seq != folds.seq + 1 or line.type_version is None:
                raise InvalidOptions(
                    f"line {number}: event {line.seq} after event {folds.seq}: the seqs of a "
                    "history are contiguous from 1"
                )
            decode = functools.partial(_file_event, info, bytes(line.event), line.seq, number)
            diverged = folds.step(line.seq, decode)
            expected = pending.pop(folds.seq, None)
            if diverged is None and expected is not None:
                diverged = folds.compare(expected, f"the snapshot at seq {folds.seq}")
        elif line.snapshot is not None:
            seq = line.snapshot
            if seq < max(folds.seq, 1) or seq in pending:
                raise InvalidOptions(
                    f"line {number}: a snapshot at seq {seq} after event {folds.seq}: a snapshot "
                    "line comes before the event after its seq, once"
                )
            if seq == folds.seq:
                diverged = folds.compare(
                    _file_state(info, line.state), f"the snapshot at seq {seq}"
                )
            else:
                pending[seq] = _file_state(info, line.state)
        else:
            if pending:
                raise InvalidOptions(
                    f"line {number}: the history ends at event {folds.seq}, before its snapshot "
                    f"at seq {min(pending)}"
                )
            if line.seq != folds.seq:
                raise InvalidOptions(
                    f"line {number}: the final state is at seq {line.seq}, but the history has "
                    f"{folds.seq} events"
                )
            diverged = folds.compare(_file_state(info, line.state), "the final state")
            final = True
        if diverged is not None:
            return diverged
    if not final:
        raise InvalidOptions(
            f"the history is truncated after event {folds.seq}: it has no final state line"
        )
    return folds.ok()


def _numbered(lines: Iterable[str | bytes]) -> Iterator[tuple[int, str | bytes]]:
    for number, text in enumerate(lines, 1):
        if not isinstance(text, str | bytes):
            raise InvalidOptions(f"line {number} is a {type(text).__qualname__}, not str")
        if text.strip():
            yield number, text


def _line(number: int, text: str | bytes) -> _Line:
    try:
        line = msgspec.json.decode(text, type=_Line)
    except msgspec.ValidationError as exc:
        raise InvalidOptions(f"line {number} is not a history line: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SerializationError(f"line {number} is not JSON: {exc}") from None
    event = bool(line.event) and line.seq is not None and line.snapshot is None
    snapshot = line.snapshot is not None and bool(line.state) and line.seq is None
    final = bool(line.state) and line.seq is not None and line.snapshot is None
    if [event, snapshot, final].count(True) != 1 or (line.type_version is not None) != event:
        raise InvalidOptions(
            f"line {number} is neither an event, a snapshot nor a final state line: {text!r:.100}"
        )
    return line


def _file_event(info: EntityInfo, raw: bytes, seq: int, number: int) -> Any:
    event_type = getattr(info.cls, "event_type", None)
    try:
        if event_type is None:
            return msgspec.json.decode(raw)
        return msgspec.json.decode(raw, type=event_type)
    except (msgspec.DecodeError, TypeError, ValueError) as exc:
        raise SerializationError(
            f"line {number}: event {seq} cannot be read as {event_type or 'JSON'!r}: {exc}"
        ) from None


def _file_state(info: EntityInfo, raw: msgspec.Raw) -> bytes:
    """The comparable form of a state line's state: with the declared type when it fits."""
    state_type = info.cls.state_type
    value: Any = None
    if state_type is not None:
        try:
            value = msgspec.json.decode(raw, type=state_type)
        except (msgspec.DecodeError, TypeError, ValueError):
            state_type = None  # it differs from the fold: compare it as plain JSON
    if state_type is None:
        try:
            value = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise SerializationError(f"a state of the history is not JSON: {exc}") from None
    return _comparable(value, "a state of the history")


# ---------------------------------------------------------------------- check


async def check(world: World, ref: tuple[type[Entity], Any]) -> Replay:
    """``replay``, on the stored log: fold its events from seq 1 twice and compare.

    The states of the two folds are compared after every event, the fold with the stored
    snapshot at its seq (if this version of the type wrote it), and with what ``world.read``
    returns at the end. An entity the world cannot load because ``apply`` raises
    (``EntityBroken``) is folded all the same, so the result names the event. As for ``export``
    the check is of a consistent cut (events committed meanwhile are not folded), the log is read
    a page at a time (memory stays bounded), and nothing is written. Cancellation stops it, with
    nothing changed.

    Raises:
        InvalidKey, UnknownEntityType: a bad ref, before any I/O.
        InvalidOptions: the type is not event-sourced.
        SerializationError: a state cannot be compared as JSON (for example a pickled one).
        Unavailable, IncompatibleVersion: as for ``export``.
    """
    info, key = _event_sourced(world, ref)
    broken: EntityBroken | None = None
    try:
        version, state = await _current(world, ref)
    except EntityBroken as exc:
        broken, state = exc, None
        row = await _row(world, info, key)
        version = 0 if row is None else row.version
    snapshot_seq, snapshot_state = await _snapshot(world, info, key, version)
    folds = _Folds(info, key)
    diverged = folds.start()
    while diverged is None and folds.seq < version:
        page = await _page(world, info, key, folds.seq, version)
        for stored in page:
            diverged = folds.step(stored.seq, functools.partial(decode_event, info, key, stored))
            if diverged is None and stored.seq == snapshot_seq:
                expected = _comparable(snapshot_state, "the stored snapshot")
                diverged = folds.compare(expected, f"the stored snapshot at seq {snapshot_seq}")
            if diverged is not None:
                break
    if diverged is None and broken is not None:
        return folds.diverged(
            f"event {version}: the world cannot load the entity ({broken}), yet two folds of its "
            "events here did not raise: apply is not deterministic"
        )
    if diverged is None:
        diverged = folds.compare(_comparable(state, "the state"), "the state the world reads")
    return diverged or folds.ok()


# ---------------------------------------------------------------------- the two folds


class _Folds:
    """Two independent folds of one entity's events, compared after every event.

    Mutable state: ``seq`` (the last event folded), ``states`` and ``current`` (the comparable
    form of the states at ``seq``), ``checked`` (what the fold was compared with).
    """

    __slots__ = ("checked", "current", "entities", "info", "key", "seq", "states")

    def __init__(self, info: EntityInfo, key: str) -> None:
        self.info = info
        self.key = key
        self.entities: tuple[EventSourced, ...] = tuple(info.cls(key) for _ in range(2))  # type: ignore[misc]
        self.states: list[Any] = [None, None]
        self.current = b""
        self.seq = 0
        self.checked: list[str] = []

    def start(self) -> Replay | None:
        """Run ``init()`` twice; a divergence at seq 0 if it raises or is not deterministic."""
        forms = []
        for index, entity in enumerate(self.entities):
            try:
                self.states[index] = entity.init()
            except Exception as exc:
                return self.diverged(f"init() raised {type(exc).__name__}: {exc}")
            forms.append(_comparable(self.states[index], "the init() state"))
        return self._agree(forms, "init() is not deterministic: two calls give")

    def step(self, seq: int, decode: Callable[[], Any]) -> Replay | None:
        """Fold event ``seq`` (``decode()`` gives a fresh copy of it) into both states."""
        self.seq = seq
        forms = []
        for index, entity in enumerate(self.entities):
            event = decode()
            try:
                state = entity.apply(event, self.states[index])
            except Exception as exc:
                only = " in the second fold only: apply is not deterministic" if index else ""
                return self.diverged(f"event {seq}: apply raised {type(exc).__name__}{only}: {exc}")
            self.states[index] = state
            # Right after this fold's apply, before the other's: shared mutable state shows.
            forms.append(_comparable(state, f"the state after event {seq}"))
        return self._agree(
            forms, f"event {seq}: apply is not deterministic: two folds of the same events give"
        )

    def _agree(self, forms: list[Any], what: str) -> Replay | None:
        """The two folds' states must be equal: then it is the current one, else they diverged."""
        if forms[0] != forms[1]:
            return self.diverged(f"{what} {_show(forms[0])} and {_show(forms[1])}")
        self.current = forms[0]
        return None

    def compare(self, expected: bytes, what: str) -> Replay | None:
        """Compare the fold at ``seq`` with a stored state (in comparable form)."""
        if expected == self.current:
            self.checked.append(what)
            return None
        return self.diverged(
            f"event {self.seq}: the folded state is not {what}: folded {_show(self.current)}, "
            f"stored {_show(expected)}"
        )

    def ok(self) -> Replay:
        reason = (
            f"{self.seq} events of {self.info.name}:{self.key!r:.60} folded twice: the two folds "
            "agree after every event"
        )
        if self.checked:
            reason += ", and with " + " and ".join(self.checked)
        return Replay(True, self.seq, None, reason, self.states[0])

    def diverged(self, reason: str) -> Replay:
        return Replay(False, self.seq, self.seq, reason, self.states[0])


def _comparable(value: object, what: str) -> bytes:
    """A state as canonical JSON: object keys and sets sorted, tuples as arrays."""
    try:
        return msgspec.json.encode(msgspec.to_builtins(value, str_keys=True, order="deterministic"))
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"{what} cannot be compared as JSON: {exc}") from exc


def _show(form: bytes) -> str:
    text = form.decode()
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


# ---------------------------------------------------------------------- shared


def _info(entity_type: object) -> EntityInfo:
    info = EntityInfo(_check_type(entity_type))
    if info.events is None:
        raise InvalidOptions(f"{info.name} is not event-sourced: it has no history of events")
    return info


def _event_sourced(world: World, ref: tuple[type[Entity], Any]) -> tuple[EntityInfo, str]:
    info, key = world._registry.resolve(ref)
    if info.events is None:
        raise InvalidOptions(f"{info.name} is not event-sourced: it has no history of events")
    return info, key


async def _current(world: World, ref: tuple[type[Entity], Any]) -> tuple[int, Any]:
    """The committed ``(seq, state)`` of an entity, as one atomic read."""
    async with world.follow(ref, versions=True) as follower:
        async for version, state in follower:
            return version, state
    raise Unavailable("the world closed while reading the entity")


async def _row(world: World, info: EntityInfo, key: str) -> Stored | None:
    rows: list[Stored | None] = await world.backend.load_many([(info.name, key)])
    return rows[0]


async def _snapshot(world: World, info: EntityInfo, key: str, upto: int) -> tuple[int, Any]:
    """The stored snapshot ``(seq, state)`` if this version wrote one at ``upto`` or before.

    ``(0, None)`` when there is none (an older version's snapshot is not used, as in a load).
    """
    row = await _row(world, info, key)
    if row is None or not row.snapshot or row.snapshot > upto or row.type_version != info.version:
        return 0, None
    return row.snapshot, info.codec.decode(row.data)


async def _page(world: World, info: EntityInfo, key: str, after: int, upto: int) -> list[Any]:
    """The events after ``after``, up to ``upto``, a page at most, checked to be contiguous."""
    page = await world.backend.read_events(
        info.name, key, after=after, limit=min(_PAGE, upto - after)
    )
    page = [stored for stored in page if stored.seq <= upto]
    if not page or any(stored.seq != after + i for i, stored in enumerate(page, 1)):
        raise Unavailable(
            f"the log of {info.name}:{key!r:.60} has no event {after + 1} (its state is at "
            f"{upto}): the storage is damaged"
        )
    return page
