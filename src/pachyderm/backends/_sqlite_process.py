"""The SQLite backend's writer process: the writer's transactions, off the event loop's GIL.

The writer (``_sqlite_writer.Writer``) runs in a child process of its own, started by ``open``
running this module's ``main``. Its
transactions then run on the second core while the event loop runs the next activations: in one
process, sqlite3 takes the GIL back after each row it writes, so the writer thread and the event
loop only ever took turns.

- **The parent** runs a thread, ``ProcessWriter``, in the writer thread's place: it drains the
  writer's channel as before, cuts the jobs into *groups* (consecutive commit requests of at most
  ``GROUP_WRITES`` writes in all, or one request, or one prune), sends a group, waits for its
  answer, and answers the callers on their loops. A group is one transaction in the child. The
  cap is what lets the two processes overlap: while one group commits, the callers of the one
  before run their next activations.
- **The child** reads a frame of jobs from its stdin, runs them with ``Writer.run`` (so group
  commit, the fast and slow paths, and the retries alone are the writer thread's code), and
  writes one frame back on its stdout: each job's result or error, the outbox counts, and the
  counters. It stops at the end of its stdin: when the parent closes it, or dies. It ignores the
  terminal's signals (its own session): a ``Ctrl-C`` reaches the parent, which then closes.
- **Frames** are a 4-byte length and MessagePack (msgspec): writes are dataclasses of builtin
  values; nothing is pickled either way. Errors travel as the name of their class (one of the
  error tree's, or ``TypeError``) and their text.
- **Children are kept for the next open.** ``aclose`` detaches the child from its file (it
  closes its connection, which checkpoints, and says so) and keeps it, idle, for the next open
  of this process (at most ``IDLE_CHILDREN``): a new child costs an interpreter's start, about a
  tenth of a second, where a reused one costs a connection. An idle child exits with its parent.
- **The file lock** is the parent's alone. A parent killed by SIGKILL leaves a child that
  finishes the transaction it is in, then sees the end of its input and exits; until then
  SQLite's own lock holds that transaction's writes against a new process's writer, which waits
  for it (``busy_timeout``).

When a write is durable: when its group's ``COMMIT`` returned in the child, which then answers;
the parent answers the caller after that. If the child dies, a group it did not answer gets
``Indeterminate`` (its transaction may have committed), and every later request ``Unavailable``.
Cancellation: as with the writer thread, a write handed to the child is not withdrawn.
"""

from __future__ import annotations

import atexit
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final, cast

import msgspec

from .. import _errors
from .._errors import Indeterminate, InvalidKey, PachydermError, TooLarge, Unavailable
from ._base import Write
from ._sqlite_jobs import COMMIT, Channel, Job, Loop, Outcome, Worker, answer, deliver_all
from ._sqlite_schema import Database, FileLock
from ._sqlite_writer import Stats, Writer

__all__ = ["GROUP_WRITES", "IDLE_CHILDREN", "ProcessWriter"]

#: The most writes in one group (one transaction in the child), unless one request has more.
GROUP_WRITES: Final = 512
#: The most idle children this process keeps for its next opens.
IDLE_CHILDREN: Final = 2
#: The frame that detaches a child from its file (MessagePack ``nil``).
_DETACH: Final = b"\xc0"

_HEADER: Final = struct.Struct("<I")
_ENCODE: Final = msgspec.msgpack.Encoder()
#: A group: ``[kind, index in the group, argument]`` per job.
_JOBS: Final = msgspec.msgpack.Decoder(list[tuple[int, int, tuple[Write, ...] | float]])
_STATS: Final = (
    "transactions",
    "failed_transactions",
    "commits",
    "writes",
    "events",
    "conflicts",
    "largest_group",
)
_PACKAGE_ROOT: Final = str(Path(__file__).resolve().parents[2])


# -- frames ---------------------------------------------------------------------------------


def _send(fd: int, payload: bytes) -> None:
    view = memoryview(_HEADER.pack(len(payload)) + payload)
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


def _receive(fd: int) -> bytes | None:
    """The next frame, or None at the end of the stream (the other end closed or died)."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    return _read_exactly(fd, _HEADER.unpack(header)[0])


def _error_body(error: BaseException | None) -> list[str] | None:
    if error is None:
        return None
    if isinstance(error, PachydermError):
        name = next(c.__name__ for c in type(error).__mro__ if hasattr(_errors, c.__name__))
    else:
        name = "TypeError" if isinstance(error, TypeError) else "Unavailable"
    return [name, str(error)]


def _error_of(body: list[str]) -> BaseException:
    name, text = body
    if name == "TypeError":
        return TypeError(text)
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, PachydermError):
        return cls(text)
    return Unavailable(text)  # pragma: no cover - the child only sends the names above


# -- the parent -----------------------------------------------------------------------------


class _Child:
    """A running child: its pipes, and whether it died (what ``Worker`` calls a connection)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.stdin = cast(IO[bytes], proc.stdin)  # both are pipes (`take`)
        self.stdout = cast(IO[bytes], proc.stdout)
        self.to_child = self.stdin.fileno()
        self.from_child = self.stdout.fileno()
        self.dead = False
        self.received = False

    @classmethod
    def take(cls, path: str) -> _Child:
        """An idle child of this process, or a new one."""
        with _idle_lock:
            while _idle:
                child = _idle.pop()
                if child.proc.poll() is None:
                    return child
                child.end()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT, env.get("PYTHONPATH"))))
        try:
            proc = subprocess.Popen(  # noqa: S603 - our own module, by this Python
                [sys.executable, "-c", f"from {__name__} import main; main()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
                env=env,
            )
        except OSError as e:
            raise Unavailable(f"cannot start the SQLite writer process ({path}): {e}") from e
        return cls(proc)

    def exchange(self, payload: bytes) -> Any:
        """Send a frame and return the child's answer, decoded; None if it died (``dead``).

        ``received`` says whether the child may have read the frame before it died.
        """
        self.received = False
        try:
            _send(self.to_child, payload)
        except OSError:
            self.dead = True
            return None
        self.received = True
        frame = _receive(self.from_child)
        if frame is None:
            self.dead = True
            return None
        return msgspec.msgpack.decode(frame)

    def close(self) -> None:
        """Detach the child from its file (its connection closed), and keep it idle or end it."""
        if not self.dead:
            self.exchange(_DETACH)  # answered with the same frame, once its connection closed
        if not self.dead:
            self.keep()
        else:
            self.end()

    def keep(self) -> None:
        """Keep this child (detached) for a later open, or end it if enough are kept."""
        with _idle_lock:
            if len(_idle) < IDLE_CHILDREN:
                _idle.append(self)
                return
        self.end()

    def end(self) -> None:
        """End the child's input, and wait for it to finish its last transaction and exit."""
        self.stdin.close()
        self.proc.wait()
        self.stdout.close()


# Idle children, detached from any file, for the next opens of this process.
_idle: list[_Child] = []
_idle_lock = threading.Lock()


@atexit.register
def _end_idle() -> None:
    """At exit: end the idle children (they would end anyway, with their input)."""
    with _idle_lock:
        idle = _idle[:]
        _idle.clear()
    for child in idle:
        child.end()


class ProcessWriter(Worker):
    """The writer thread's stand-in: hands the jobs to the writer process, and its answers back.

    It is its own connection for ``Worker`` (``close`` detaches the child). A child that died is
    replaced by a new one for the next group.

    Mutable state: ``child`` (this thread only, once started), ``counts`` (replaced, never
    changed in place, before the callers of a group are answered; read by the event loop), the
    shared ``stats`` (this thread only).
    """

    role = "pachyderm-sqlite-writer"

    def __init__(self, db: Database, channel: Channel, lock: FileLock, stats: Stats) -> None:
        super().__init__(db.path, channel)
        self.db = db
        self.lock = lock
        self.stats = stats
        self.counts: dict[str, int] = {"messages": 0, "timers": 0, "dead": 0}
        self.child: _Child | None = None

    def connect(self) -> Any:
        self.child = self.start_child()
        return self

    def close(self) -> None:
        """Detach the child from the file (it closes its connection); keep it idle or end it."""
        child, self.child = self.child, None
        if child is not None:
            child.close()

    def release(self) -> None:
        self.lock.release()  # the child has closed its connection (``close``)

    def start_child(self) -> _Child:
        """Take a child, hand it the file's settings, and wait until it is ready.

        A reused child that died since gives way to a new one (once). Raises ``Unavailable``
        (or the error the child met opening the file).
        """
        db = self.db
        settings = _ENCODE.encode(
            [db.path, db.world, db.synchronous_sql, db.busy_timeout, db.max_pages]
        )
        for _ in range(2):
            child = _Child.take(db.path)
            ready = child.exchange(settings)
            if not child.dead:
                break
            child.end()
        if child.dead:
            raise Unavailable(
                f"the SQLite writer process exited as it started ({db.path}, exit code "
                f"{child.proc.returncode}; its standard error says why)"
            )
        if ready[0] is not None:  # the file is refused; the child waits for another
            child.keep()
            raise _error_of(ready[0])
        self.counts = ready[1]
        return child

    def run(self, conn: Any, jobs: list[Job]) -> None:
        for group in _groups(jobs):
            self.send(group)

    def send(self, group: list[Job]) -> None:
        """Run one group in the child and answer its callers (each once)."""
        payload, sent = _encode(group)
        if len(sent) < len(group):
            kept = {id(job) for job in sent}
            for job in group:
                if id(job) not in kept:  # refused by the encoder: a bad value of that request
                    answer(job, None, _encode_error(job)[1])
            if not sent:
                return
        child = self.child
        if child is None or child.dead:  # the last one died: a new one for what comes next
            self.child = None
            if child is not None:
                child.end()
            try:
                child = self.child = self.start_child()
            except (PachydermError, OSError) as e:
                for job in sent:
                    answer(job, None, Unavailable(f"the SQLite writer process died: {e}"))
                return
        reply = child.exchange(payload)
        if child.dead:
            for job in sent:
                answer(job, None, self.lost(job, child))
            return
        outcomes, counts, stats = reply
        s = self.stats
        for name, value in zip(_STATS, stats, strict=True):
            if name == "largest_group":
                s.largest_group = max(s.largest_group, value)
            else:
                setattr(s, name, getattr(s, name) + value)
        self.counts = counts
        answers: list[tuple[Loop, Outcome]] = []
        for index, result, error_body in outcomes:
            job = sent[index]
            failure = None if error_body is None else _error_of(error_body)
            answers.append((job[3], (job[2], result, failure)))
        deliver_all(answers)

    def lost(self, job: Job, child: _Child) -> BaseException:
        """The error of a job whose child died before it answered."""
        if job[0] == COMMIT and child.received:
            return Indeterminate(
                f"the SQLite writer process died during a commit ({self.path}): "
                "the outcome is unknown"
            )
        return Unavailable(f"the SQLite writer process died, nothing was written ({self.path})")


def _groups(jobs: list[Job]) -> Iterator[list[Job]]:
    """Consecutive commit requests up to ``GROUP_WRITES`` writes (at least one); a prune alone."""
    group: list[Job] = []
    size = 0
    for job in jobs:
        if job[0] != COMMIT:
            if group:
                yield group
                group, size = [], 0
            yield [job]
            continue
        if group and size + len(job[1]) > GROUP_WRITES:
            yield group
            group, size = [], 0
        group.append(job)
        size += len(job[1])
    if group:
        yield group


def _encode(group: list[Job]) -> tuple[bytes, list[Job]]:
    """The group as a frame, and its jobs in it: all, unless some hold values no frame can."""
    try:
        return _ENCODE.encode([(kind, i, arg) for i, (kind, arg, _, _) in enumerate(group)]), group
    except (TypeError, ValueError, OverflowError):
        sent = [job for job in group if _encode_error(job)[0]]
        return _ENCODE.encode([(kind, i, arg) for i, (kind, arg, _, _) in enumerate(sent)]), sent


def _encode_error(job: Job) -> tuple[bool, BaseException | None]:
    """Whether one job can be sent; if not, the error its caller gets (as the writer's)."""
    try:
        _ENCODE.encode(job[1])
    except UnicodeEncodeError as e:
        return False, InvalidKey(
            f"a type name, key, receipt id or outbox text is not valid Unicode: {e}"
        )
    except OverflowError as e:
        return False, TooLarge(f"a value is over SQLite's limits: {e}")
    except (TypeError, ValueError) as e:
        return False, TypeError(f"commit() got a value SQLite cannot store: {e!r}")
    return True, None


# -- the child ------------------------------------------------------------------------------


class _Answers:
    """What ``Writer`` takes for a loop, in the child: it keeps the outcomes for the reply."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def call_soon_threadsafe(self, _settle: object, outcomes: list[Outcome]) -> None:
        self.outcomes.extend(outcomes)


def main() -> None:
    """The child's program: run groups from stdin until it ends; answer each on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.dup(1)  # the replies' own descriptor; stray output goes to stderr
    os.dup2(2, 1)
    try:
        while (settings := _receive(0)) is not None:
            _serve(out, msgspec.msgpack.decode(settings))
    except BrokenPipeError:  # the parent died before our answer: nobody is left to tell
        pass


def _serve(out: int, settings: list[Any]) -> None:
    """Open one file's writer and run its groups, until detached; answer each frame on ``out``."""
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
        _send(out, _ENCODE.encode([_error_body(e), None]))
        return
    _send(out, _ENCODE.encode([None, writer.counts]))
    sink = _Answers()
    loop = cast(Loop, sink)
    try:
        while (frame := _receive(0)) is not None:
            if frame == _DETACH:
                break
            jobs: list[Job] = [
                (kind, arg, cast(Any, index), loop) for kind, index, arg in _JOBS.decode(frame)
            ]
            writer.run(conn, jobs)
            outcomes = [
                (index, result, _error_body(error)) for index, result, error in sink.outcomes
            ]
            sink.outcomes = []
            reply = [outcomes, writer.counts, [getattr(stats, name) for name in _STATS]]
            for name in _STATS:
                setattr(stats, name, 0)
            _send(out, _ENCODE.encode(reply))
        else:
            return  # the parent is gone
    finally:
        conn.close()
    _send(out, _DETACH)
