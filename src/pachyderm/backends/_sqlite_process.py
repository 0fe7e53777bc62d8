"""The SQLite backend's writer process: the writer's transactions, off the event loop's core.

The writer (``_sqlite_writer.Writer``) runs in a child process of its own, started by ``open``
with this module's ``main``. Its transactions then run on the second core while the event loop
runs the next activations. (In one process they only took turns: sqlite3 takes the GIL back
after every row it writes, and waits for it while the event loop runs Python.)

- **The parent's side, ``Link``**, is driven by the event loop that opened the backend, with no
  thread: ``request`` collects the jobs of one loop iteration and queues them at the next; the
  queue is cut into *groups* (consecutive commit requests of at most ``GROUP_WRITES`` writes in
  all, or one larger request, or one prune); a group is one frame, and one transaction in the
  child. At most ``IN_FLIGHT`` groups are in the child at once: one committing, the next one
  already written to its pipe, so that the child never waits for the event loop to notice an
  answer. The answer of a group (read when the pipe is readable) answers its callers, on their
  own loops. The cap on a group is what lets the two processes overlap: while one group
  commits, the callers of the one before run their next activations (hence also the world's
  turns of 500 entities on SQLite, ``SQLite.max_batch``).
- **The child** reads a frame of jobs from its stdin, runs them with ``Writer.run`` (so group
  commit, the fast and slow paths, and the retries alone are the writer thread's code), and
  writes one frame back on its stdout: each job's result or error, the outbox counts, and the
  counters. It ignores ``SIGINT`` and runs in its own session: a ``Ctrl-C`` reaches the parent,
  which then closes it.
- **Frames** are a 4-byte length and MessagePack (msgspec): writes are dataclasses of builtin
  values; nothing is pickled either way. Errors travel as the name of their class (one of the
  error tree's, or ``TypeError``) and their text.
- **Children are kept for the next open.** ``aclose`` detaches the child from its file (it
  closes its connection, which checkpoints, and says so) and keeps it, idle, for the next open
  of this process (at most ``IDLE_CHILDREN``): a new child costs an interpreter's start, about a
  tenth of a second, where a reused one costs a connection. A child exits at the end of its
  stdin: when its parent ends it, or exits, or dies.
- **A child that dies** fails the groups it did not answer: ``Indeterminate`` for a commit whose
  frame was written whole (it may have committed), ``Unavailable`` otherwise. The next group
  gets a new child.
- **The file lock** is the parent's alone. A parent killed by SIGKILL leaves a child that
  finishes the transaction it is in, then sees the end of its input and exits; until then
  SQLite's own lock holds that transaction's writes against a new process's writer, which waits
  for it (``busy_timeout``).

When a write is durable: when its group's ``COMMIT`` returned in the child, which only then
answers; the caller is answered after that. Cancellation: cancelling the caller does not
withdraw a write already queued here or sent to the child: it may still commit.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import os
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any, Final, cast

import msgspec

from .. import _errors
from .._errors import Indeterminate, InvalidKey, PachydermError, TooLarge, Unavailable
from ._sqlite_jobs import COMMIT, Channel, Job, Loop, Outcome, answer
from ._sqlite_schema import Database, FileLock
from ._sqlite_writer import Stats, Writer

__all__ = ["GROUP_WRITES", "IDLE_CHILDREN", "Link", "start_child"]

#: The most writes in one group (one transaction in the child), unless one request has more.
GROUP_WRITES: Final = 512
#: The most groups in the child at once: one committing, the next one waiting to be read.
IN_FLIGHT: Final = 2
#: The most idle children this process keeps for its next opens.
IDLE_CHILDREN: Final = 2
#: The frame that detaches a child from its file (MessagePack ``nil``).
_DETACH: Final = b"\xc0"

_HEADER: Final = struct.Struct("<I")
_ENCODE: Final = msgspec.msgpack.Encoder()


# What the child decodes a group's writes into: Structs with the fields of `_base`'s dataclasses,
# which the writer reads the same way (by attribute), decoded in about half the time and with no
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


#: A group: ``[kind, index in the group, argument]`` per job.
_JOBS: Final = msgspec.msgpack.Decoder(list[tuple[int, int, tuple[WireWrite, ...] | float]])
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
        """Send a frame and wait for the child's answer, decoded; None if it died (``dead``)."""
        try:
            _send(self.to_child, payload)
        except OSError:
            self.dead = True
            return None
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


def start_child(db: Database) -> tuple[_Child, dict[str, int]]:
    """Take a child, hand it the file's settings, wait until it is ready (blocking).

    Return it with the world's outbox counts. A reused child that died since gives way to a new
    one (once). Raises ``Unavailable`` (or the error the child met opening the file).
    """
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
    return child, ready[1]


class Link:
    """The event loop's side of the writer process: group commit over two pipes.

    Driven by the event loop that opened the backend (no thread, so nothing here waits for the
    GIL): ``request`` collects the jobs of one loop iteration and queues them at the next; one
    group at a time is in the child; its answer (read when the pipe is readable) answers the
    group's callers and sends the next group. Jobs from other event loops come through
    ``call_soon_threadsafe`` and are answered on their own loops.

    Mutable state, on the owner loop only: ``collected``, ``queue``, ``sent`` (the group in the
    child), ``out`` (what is left to write of its frame), ``inbox`` (what was read of the next
    answer), ``child`` (None while none serves), ``starting`` (a new child is on its way),
    ``counts`` (replaced, never changed in place, before a group's callers are answered),
    ``closed``, ``waiters`` (``stop`` waiting for the queue to drain) and the shared ``stats``.
    """

    def __init__(self, db: Database, stats: Stats, loop: Loop) -> None:
        self.db = db
        self.path = db.path
        self.stats = stats
        self.loop = loop
        self.counts: dict[str, int] = {"messages": 0, "timers": 0, "dead": 0}
        self.child: _Child | None = None
        self.collected: list[Job] = []
        self.queue: collections.deque[Job] = collections.deque()
        self.sent: collections.deque[list[Job]] = collections.deque()
        self.out = b""
        self.inbox = bytearray()
        self.starting = False
        self.closed = False
        self.waiters: list[asyncio.Future[None]] = []

    # -- start and stop (on the owner loop, but ``abandon``) --------------------------------

    async def start(self) -> None:
        """Start (or take) the child and attach its pipes to the loop."""
        child, counts = await asyncio.to_thread(start_child, self.db)
        self.attach(child, counts)

    def attach(self, child: _Child, counts: dict[str, int]) -> None:
        self.child = child
        self.counts = counts
        os.set_blocking(child.to_child, False)
        self.loop.add_reader(child.from_child, self.readable)

    def detach(self) -> _Child | None:
        """Take the child off the loop (its pipes blocking again, for ``_Child.close``)."""
        child, self.child = self.child, None
        if child is not None:
            self.loop.remove_reader(child.from_child)
            self.loop.remove_writer(child.to_child)
            if not child.stdin.closed:
                os.set_blocking(child.to_child, True)
        self.out = b""
        self.inbox.clear()
        return child

    async def stop(self) -> None:
        """Run every job queued so far, then detach the child (it closes its connection).

        Jobs that come after get ``Unavailable``. Cancelled while waiting: the child is ended
        without waiting, as by ``abandon``.
        """
        self.flush()
        self.closed = True
        try:
            while self.busy():
                waiter: asyncio.Future[None] = self.loop.create_future()
                self.waiters.append(waiter)
                await waiter
        except BaseException:
            self.abandon()
            raise
        child = self.detach()
        if child is not None:
            await asyncio.to_thread(child.close)

    def busy(self) -> bool:
        return bool(self.queue or self.sent or self.starting)

    def abandon(self) -> None:
        """End the child without waiting (a failed open, a cancelled stop, a backend lost).

        May run outside the loop (a finalizer): it only closes the child's input, so that the
        child finishes what it is doing and exits; the loop, if it still runs, sees the end.
        """
        self.closed = True
        child = self.child
        if child is not None and not child.stdin.closed:
            with contextlib.suppress(OSError):
                child.stdin.close()

    # -- requests ---------------------------------------------------------------------------

    def request(self, kind: int, arg: object, *, now: bool = False) -> asyncio.Future[Any]:
        """On any running loop: queue a job (at once if ``now``) and return its future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        job: Job = (kind, arg, future, loop)
        if loop is self.loop:
            self.submit(job, now)
        else:
            try:
                self.loop.call_soon_threadsafe(self.submit, job, now)
            except RuntimeError:  # the owner loop is closed
                future.set_exception(Unavailable(f"the SQLite backend is closed ({self.path})"))
        return future

    def submit(self, job: Job, now: bool) -> None:
        if self.closed:
            answer(job, None, Unavailable(f"the SQLite backend is closed ({self.path})"))
            return
        if now:
            self.flush()
            self.queue.append(job)
            self.pump()
            return
        if not self.collected:
            self.loop.call_soon(self.flush)
        self.collected.append(job)

    def flush(self) -> None:
        if self.collected:
            self.queue.extend(self.collected)
            self.collected = []
            self.pump()

    def pending(self) -> int:
        return len(self.collected) + len(self.queue) + sum(map(len, self.sent))

    # -- the pipes ----------------------------------------------------------------------------

    def pump(self) -> None:
        """Send the next groups, up to ``IN_FLIGHT`` in the child (start one if none serves).

        A new frame waits until the last one is written whole.
        """
        sent = self.sent
        while len(sent) < IN_FLIGHT and self.queue and not self.starting and not self.out:
            child = self.child
            if child is None or child.dead:
                self.restart()
                return
            group = self.take()
            payload, jobs = _encode(group)
            if len(jobs) < len(group):
                kept = {id(job) for job in jobs}
                for job in group:
                    if id(job) not in kept:  # refused by the encoder: a bad value of its own
                        answer(job, None, _encode_error(job)[1])
                if not jobs:
                    continue
            sent.append(jobs)
            self.write(child, _HEADER.pack(len(payload)) + payload)
        if self.waiters and not self.busy():
            for waiter in self.waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self.waiters = []

    def take(self) -> list[Job]:
        """The next group: a prune alone, or commits of ``GROUP_WRITES`` writes at most (or one)."""
        queue = self.queue
        first = queue.popleft()
        group = [first]
        if first[0] != COMMIT:
            return group
        size = len(first[1])
        while queue and queue[0][0] == COMMIT and size + len(queue[0][1]) <= GROUP_WRITES:
            job = queue.popleft()
            group.append(job)
            size += len(job[1])
        return group

    def write(self, child: _Child, data: bytes) -> None:
        try:
            written = os.write(child.to_child, data)
        except BlockingIOError:
            written = 0
        except OSError:  # the child is gone
            self.out = data
            self.died(child)
            return
        self.out = data[written:]
        if self.out:
            self.loop.add_writer(child.to_child, self.writable, child)
        else:
            self.loop.remove_writer(child.to_child)

    def writable(self, child: _Child) -> None:
        if child is self.child and self.out:
            self.write(child, self.out)
            if not self.out:
                self.pump()

    def readable(self) -> None:
        child = self.child
        if child is None:
            return
        try:
            chunk = os.read(child.from_child, 1 << 20)
        except OSError:
            chunk = b""
        if not chunk:
            self.died(child)
            return
        inbox = self.inbox
        inbox += chunk
        while len(inbox) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(inbox)
            if len(inbox) < _HEADER.size + size:
                break
            frame = bytes(inbox[_HEADER.size : _HEADER.size + size])
            del inbox[: _HEADER.size + size]
            self.answered(msgspec.msgpack.decode(frame))
        self.pump()

    def answered(self, reply: Any) -> None:
        """The child answered the group in it: count, and answer its callers."""
        sent = self.sent.popleft()
        outcomes, counts, stats = reply
        s = self.stats
        for name, value in zip(_STATS, stats, strict=True):
            if name == "largest_group":
                s.largest_group = max(s.largest_group, value)
            else:
                setattr(s, name, getattr(s, name) + value)
        self.counts = counts
        for index, result, error_body in outcomes:
            job = sent[index]
            answer(job, result, None if error_body is None else _error_of(error_body))

    def died(self, child: _Child) -> None:
        """The child is gone: fail the group in it; the next group gets a new child."""
        child.dead = True
        torn = bool(self.out)  # the last frame was not written whole: the child never ran it
        self.detach()
        groups = list(self.sent)
        self.sent.clear()
        for i, group in enumerate(groups):
            whole = not (torn and i == len(groups) - 1)
            for job in group:
                answer(job, None, _lost(job, whole, self.path))
        with contextlib.suppress(OSError):
            child.stdin.close()
        self.loop.run_in_executor(None, child.end)  # reap it without blocking the loop
        self.pump()

    def restart(self) -> None:
        """Start a new child for the queued jobs (in a thread); fail them if none can start."""
        self.starting = True
        task = self.loop.create_task(self.restarted())
        _restarts.add(task)
        task.add_done_callback(_restarts.discard)

    async def restarted(self) -> None:
        try:
            child, counts = await asyncio.to_thread(start_child, self.db)
        except (PachydermError, OSError) as e:
            self.starting = False
            while self.queue:
                job = self.queue.popleft()
                answer(job, None, Unavailable(f"the SQLite writer process died: {e}"))
            self.pump()
            return
        self.starting = False
        if self.closed and not self.queue:
            await asyncio.to_thread(child.close)
        else:
            self.attach(child, counts)
        self.pump()


# Restarts in progress (a task must be referenced until it ends).
_restarts: set[asyncio.Task[None]] = set()


def _lost(job: Job, whole: bool, path: str) -> BaseException:
    """The error of a job whose child died before it answered (``whole``: its frame was sent)."""
    if job[0] == COMMIT and whole:
        return Indeterminate(
            f"the SQLite writer process died during a commit ({path}): the outcome is unknown"
        )
    return Unavailable(f"the SQLite writer process died, nothing was written ({path})")


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
