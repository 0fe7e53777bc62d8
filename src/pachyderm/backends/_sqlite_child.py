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
from .._errors import PachydermError
from ._base import Write
from ._sqlite_jobs import COMMIT, PRUNE, Channel, Job, Loop, Outcome
from ._sqlite_schema import Database, FileLock
from ._sqlite_writer import Stats, Writer

__all__ = [
    "DETACH",
    "HEADER",
    "MAX_FRAME",
    "STATS",
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


# A group, decoded whole; and, if that fails, with each argument left undecoded, to be decoded
# alone, so that a bad one fails alone.
_WRITES: Final = cast(Any, tuple)[Write, ...]
_WHOLE: Final = msgspec.msgpack.Decoder(
    cast(Any, list)[cast(Any, tuple)[int, int, _WRITES | float]]
)
_GROUP: Final = msgspec.msgpack.Decoder(list[tuple[int, int, msgspec.Raw]])
_ARGUMENTS: Final[dict[int, msgspec.msgpack.Decoder[Any]]] = {
    COMMIT: msgspec.msgpack.Decoder(_WRITES),
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
    """An error as it travels: the name of its nearest class of the error tree (or
    ``TypeError``, a value the writer cannot store), and its text."""
    if error is None:
        return None
    plain_type_error = isinstance(error, TypeError) and not isinstance(error, PachydermError)
    return ["TypeError" if plain_type_error else _errors.name_of(error), str(error)]


def error_of(body: list[str]) -> BaseException:
    """The error a body stands for (``Unavailable`` for a name it does not know)."""
    name, text = body
    return TypeError(text) if name == "TypeError" else _errors.named(name, text)


# -- the child ------------------------------------------------------------------------------


class _Writer(Writer):
    """The writer thread's code, in the child: it keeps each job's outcome for the reply.

    A job's future stands in for its index in the group, and it has no loop.
    """

    def __init__(self, db: Database, stats: Stats) -> None:
        super().__init__(db, cast(Channel, None), cast(FileLock, None), stats)
        self.outcomes: list[list[Any]] = []

    def answer(self, job: Job, result: object, error: BaseException | None) -> None:
        self.outcomes.append([job[2], result, error_body(error)])

    def deliver(self, outcomes: list[tuple[Loop, Outcome]]) -> None:
        self.outcomes.extend([index, result, error_body(e)] for _, (index, result, e) in outcomes)

    def take_outcomes(self) -> list[list[Any]]:
        outcomes, self.outcomes = self.outcomes, []
        return outcomes


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
    writer = _Writer(db, stats)
    try:
        conn = writer.connect()
    except BaseException as e:  # the parent raises it
        send(out, _ENCODE.encode([error_body(e), None, __file__]))
        return
    send(out, _ENCODE.encode([None, writer.counts, __file__]))
    try:
        while (frame := receive(0)) is not None:
            if frame == DETACH:
                break
            outcomes = _run(writer, conn, frame)
            reply = [outcomes, writer.counts, [getattr(stats, name) for name in STATS]]
            for name in STATS:
                setattr(stats, name, 0)
            send(out, _ENCODE.encode(reply))
        else:
            return  # the parent is gone
    finally:
        conn.close()
    send(out, DETACH)


def _run(writer: _Writer, conn: Any, frame: bytes) -> list[Any] | None:
    """Run one group; its outcomes, or None if the frame could not be read at all.

    The group is decoded whole; if that fails, job by job, and a job that does not decode fails
    alone with ``TypeError``.
    """
    try:
        jobs = [_job(kind, arg, index) for kind, index, arg in _WHOLE.decode(frame)]
    except (msgspec.DecodeError, msgspec.ValidationError):
        try:
            group = _GROUP.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):  # pragma: no cover - a bug
            return None
        jobs = []
        for kind, index, raw in group:
            try:
                jobs.append(_job(kind, _ARGUMENTS[kind].decode(raw), index))
            except (KeyError, msgspec.DecodeError, msgspec.ValidationError) as e:
                error = TypeError(f"commit() got a value SQLite cannot store: {e}")
                writer.answer(_job(kind, None, index), None, error)
    if jobs:
        writer.run(conn, jobs)
    return writer.take_outcomes()


def _job(kind: int, arg: object, index: int) -> Job:
    """A job of the child: its future stands in for its index in the group; it has no loop."""
    return cast(Job, (kind, arg, index, None))
