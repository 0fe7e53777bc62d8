"""The SQLite writer process's program, and the frames it and its parent exchange.

``main`` runs in the child (``_sqlite_process`` starts it). It reads one file's settings, opens
that file's writer (``_sqlite_writer.Writer``, the writer thread's own code), and then runs the
groups of jobs it reads, one frame each, until the parent detaches it; then it waits for another
file's settings, until its stdin ends. Its answers go to a pipe of their own (not its stdout,
where a module might print as the interpreter starts).

Frames: a 4-byte little-endian length, then MessagePack (msgspec); nothing is pickled.

- parent → child: the settings ``[path, world, synchronous statement, busy timeout, max pages]``;
  a group ``[[kind, index, argument], ...]`` (a commit's argument is its writes, a prune's the
  time before which receipts go); ``DETACH`` (MessagePack ``nil``) to close the file.
- child → parent: after the settings, ``[error, counts, module]`` (``error`` None if the file is
  open; ``module`` this file's path, so that a parent can tell that its child runs the same
  code); after a group, ``[outcomes, counts, counters]``, ``outcomes`` being ``[index, result,
  error]`` per job (or None when the frame itself could not be read); after ``DETACH``, the same.

Errors travel as ``[name of their class, text]``: a class of the error tree, or ``TypeError``.
A job whose argument is not what a writer takes (a state that is not bytes, say) fails alone with
``TypeError``, as with the writer thread; nothing a frame holds stops the child.
"""

from __future__ import annotations

import os
import signal
import struct
from typing import Any, Final, cast

import msgspec

from .. import _errors
from .._errors import PachydermError, Unavailable
from ._sqlite_jobs import COMMIT, PRUNE, Channel, Job, Loop, Outcome
from ._sqlite_schema import Database, FileLock
from ._sqlite_writer import Stats, Writer

__all__ = [
    "DETACH",
    "HEADER",
    "MAX_FRAME",
    "STATS",
    "WireWrite",
    "error_body",
    "error_of",
    "main",
    "receive",
    "send",
]

HEADER: Final = struct.Struct("<I")
#: The largest frame the header can say.
MAX_FRAME: Final = 2**32 - 1
#: The frame that detaches a child from its file, and its answer.
DETACH: Final = b"\xc0"
#: The writer's counters, in the order the child sends them.
STATS: Final = (
    "transactions",
    "failed_transactions",
    "commits",
    "writes",
    "events",
    "conflicts",
    "largest_group",
)
_ENCODE: Final = msgspec.msgpack.Encoder()


# What the child decodes a group's writes into: Structs with the fields of `_base`'s dataclasses,
# which the writer reads the same way (by attribute), decoded in a third of the time and with no
# `Envelope.__post_init__` call (``id`` travels). An unknown field is an error: a field added to
# a dataclass must be added here too (a test compares them).
class WireReceipt(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    id: str
    version: int
    result: bytes
    at: float


class WireEnvelope(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    sender_type: str
    sender_key: str
    version: int
    index: int
    to_type: str
    to_key: str
    due: float
    name: str | None
    data: bytes
    id: tuple[str, str, int, int]


class WireConsume(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    id: tuple[str, str, int, int]
    dead: str | None = None
    timer: bool = False


class WireOutbox(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    sends: tuple[WireEnvelope, ...] = ()
    cancels: tuple[str, ...] = ()
    consumes: tuple[WireConsume, ...] = ()


class WireFence(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    node: str
    partition: int
    epoch: int


class WireWrite(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    type_name: str
    key: str
    expected: int
    version: int
    type_version: int
    data: bytes
    receipts: tuple[WireReceipt, ...] = ()
    outbox: WireOutbox | None = None
    events: tuple[bytes, ...] | None = None
    snapshot: bool = False
    fence: WireFence | None = None
    fenced: bool = False


# A group, decoded whole; and, if that fails, with each argument left undecoded, to be decoded
# alone, so that a bad one fails alone.
_WHOLE: Final = msgspec.msgpack.Decoder(list[tuple[int, int, tuple[WireWrite, ...] | float]])
_GROUP: Final = msgspec.msgpack.Decoder(list[tuple[int, int, msgspec.Raw]])
_ARGUMENTS: Final[dict[int, msgspec.msgpack.Decoder[Any]]] = {
    COMMIT: msgspec.msgpack.Decoder(tuple[WireWrite, ...]),
    PRUNE: msgspec.msgpack.Decoder(float),
}


# -- frames ---------------------------------------------------------------------------------


def send(fd: int, payload: bytes) -> None:
    """Write one frame whole (blocking)."""
    view = memoryview(HEADER.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        part = os.read(fd, min(n, 1 << 20))
        if not part:
            return None
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def receive(fd: int) -> bytes | None:
    """The next frame (blocking), or None at the end of the stream (the other end closed)."""
    header = _read_exactly(fd, HEADER.size)
    if header is None:
        return None
    return _read_exactly(fd, HEADER.unpack(header)[0])


def error_body(error: BaseException | None) -> list[str] | None:
    """An error as it travels: the name of its nearest class of the error tree, and its text."""
    if error is None:
        return None
    if isinstance(error, PachydermError):
        name = next(c.__name__ for c in type(error).__mro__ if hasattr(_errors, c.__name__))
    else:
        name = "TypeError" if isinstance(error, TypeError) else "Unavailable"
    return [name, str(error)]


def error_of(body: list[str]) -> BaseException:
    """The error a body stands for (``Unavailable`` for a name it does not know)."""
    name, text = body
    if name == "TypeError":
        return TypeError(text)
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, PachydermError):
        return cls(text)
    return Unavailable(text)


# -- the child ------------------------------------------------------------------------------


class _Answers:
    """What ``Writer`` takes for a loop, in the child: it keeps the outcomes for the reply."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def call_soon_threadsafe(self, _settle: object, outcomes: list[Outcome]) -> None:
        self.outcomes.extend(outcomes)


def main(out: int) -> None:
    """The child's program: serve files, one after the other, until stdin ends.

    ``out`` is the descriptor of the answers' own pipe; stray output goes to stderr.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.dup2(2, 1)
    try:
        while (settings := receive(0)) is not None:
            _serve(out, msgspec.msgpack.decode(settings))
    except BrokenPipeError:  # the parent died before our answer: nobody is left to tell
        pass


def _serve(out: int, settings: list[Any]) -> None:
    """Open one file's writer and run its groups until detached (or stdin ends)."""
    path, world, synchronous_sql, busy_timeout, max_pages = settings
    db = Database(
        path,
        world,
        synchronous_sql=synchronous_sql,
        busy_timeout=busy_timeout,
        max_pages=max_pages,
        on_connect=None,
    )
    stats = Stats()
    writer = Writer(db, cast(Channel, None), cast(FileLock, None), stats)
    try:
        conn = writer.connect()
    except BaseException as e:  # the parent raises it
        send(out, _ENCODE.encode([error_body(e), None, __file__]))
        return
    send(out, _ENCODE.encode([None, writer.counts, __file__]))
    sink = _Answers()
    try:
        while (frame := receive(0)) is not None:
            if frame == DETACH:
                break
            outcomes = _run(writer, conn, frame, sink)
            reply = [outcomes, writer.counts, [getattr(stats, name) for name in STATS]]
            for name in STATS:
                setattr(stats, name, 0)
            send(out, _ENCODE.encode(reply))
        else:
            return  # the parent is gone
    finally:
        conn.close()
    send(out, DETACH)


def _run(writer: Writer, conn: Any, frame: bytes, sink: _Answers) -> list[Any] | None:
    """Run one group; its outcomes, or None if the frame could not be read at all."""
    loop = cast(Loop, sink)
    jobs: list[Job] = []
    refused: list[Any] = []
    try:
        whole = _WHOLE.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    else:
        jobs = [(kind, arg, cast(Any, index), loop) for kind, index, arg in whole]
        writer.run(conn, jobs)
        outcomes = [[index, result, error_body(error)] for index, result, error in sink.outcomes]
        sink.outcomes = []
        return outcomes
    try:
        group = _GROUP.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):  # pragma: no cover - a parent's bug
        return None
    for kind, index, raw in group:
        decoder = _ARGUMENTS.get(kind)
        try:
            if decoder is None:
                raise msgspec.ValidationError(f"no job of kind {kind!r}")
            arg = decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            error = TypeError(f"commit() got a value SQLite cannot store: {e}")
            refused.append([index, None, error_body(error)])
            continue
        jobs.append((kind, arg, cast(Any, index), loop))
    if jobs:
        writer.run(conn, jobs)
    outcomes = [[index, result, error_body(error)] for index, result, error in sink.outcomes]
    sink.outcomes = []
    return outcomes + refused
