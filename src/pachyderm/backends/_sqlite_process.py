"""The SQLite backend's writer process: the writer's transactions, off the event loop's core.

The writer (``_sqlite_writer.Writer``) runs in a child process of its own, whose program is
``_sqlite_child.main``. Its transactions then run on the second core while the event loop runs
the next activations. (In one process they only took turns: sqlite3 takes the GIL back after
every row it writes, and waits for it while the event loop runs Python.)

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
- **Children are kept for the next open.** ``stop`` detaches the child from its file (it
  closes its connection, which checkpoints, and says so) and keeps it, idle, for the next open
  of this process (at most ``IDLE_CHILDREN``): a new child costs an interpreter's start, about a
  tenth of a second, where a reused one costs a connection. A child exits at the end of its
  stdin: when its parent ends it, or exits, or dies. It ignores ``SIGINT`` and runs in a session
  of its own: a ``Ctrl-C`` reaches the parent, which then closes it. It is started isolated
  (``python -I``: no current folder, no ``PYTHON*`` variables) with the parent's ``sys.path``,
  and says which module it runs, so that it runs this very code.
- **A child that dies** fails the groups it did not answer: ``Indeterminate`` for a commit whose
  frame it got whole (it may have committed it), and a group whose frame it did not get whole is
  sent again, to the next child, which the next group starts.
- **The file lock** is the parent's alone; an abandoned link (``abandon``: a cancelled
  ``aclose``, a backend never closed) releases it only once its child has exited. A parent
  killed by SIGKILL leaves a child that finishes the groups already in its pipe (at most
  ``IN_FLIGHT``), then sees the end of its input and exits; until then SQLite's own lock holds
  its writes against a new process's writer, which waits for it (``busy_timeout``). A process
  forked from the parent forgets the children.
- **Answers** come on a pipe of their own, not the child's stdout (where a module might print
  as the interpreter starts).

When a write is durable: when its group's ``COMMIT`` returned in the child, which only then
answers; the caller is answered after that. Cancellation: cancelling the caller does not
withdraw a write already queued here or sent to the child: it may still commit.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import json
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from typing import IO, Any, Final, cast

import msgspec

from .._errors import Indeterminate, InvalidKey, TooLarge, Unavailable
from . import _sqlite_child, _sqlite_schema
from ._sqlite_child import DETACH, HEADER, MAX_FRAME, STATS, error_of, receive, send
from ._sqlite_jobs import COMMIT, Collector, Job, Loop, answer
from ._sqlite_schema import Database
from ._sqlite_writer import Stats

__all__ = ["GROUP_WRITES", "IDLE_CHILDREN", "IN_FLIGHT", "Link", "start_child"]

#: The most writes in one group (one transaction in the child), unless one request has more.
GROUP_WRITES: Final = 512
#: The most groups in the child at once: one committing, the next one waiting to be read.
IN_FLIGHT: Final = 2
#: The most idle children this process keeps for its next opens.
IDLE_CHILDREN: Final = 2
#: Seconds a child may take to exit once its input ended (it finishes its groups) before it
#: is killed.
_EXIT_WAIT: Final = 60.0

_ENCODE: Final = msgspec.msgpack.Encoder()
_PATH_VARIABLE: Final = "_PACHYDERM_SQLITE_SYS_PATH"
_ANSWERS_VARIABLE: Final = "_PACHYDERM_SQLITE_ANSWERS"
_PROGRAM: Final = (
    "import json, os, sys; "
    f"sys.path[:] = json.loads(os.environ.pop({_PATH_VARIABLE!r})); "
    "from pachyderm.backends._sqlite_child import main; "
    f"main(int(os.environ.pop({_ANSWERS_VARIABLE!r})))"
)


# -- the children ---------------------------------------------------------------------------


class _Child:
    """A running child: its process, its pipes, and whether it died.

    Its answers come on a pipe of their own (``answers``), not its stdout, so that nothing a
    module prints as the interpreter starts can pass for a frame.
    """

    def __init__(self, proc: subprocess.Popen[bytes], answers: int) -> None:
        self.proc = proc
        self.stdin = cast(IO[bytes], proc.stdin)  # a pipe (`take`)
        self.stdout = os.fdopen(answers, "rb", buffering=0)
        self.to_child = self.stdin.fileno()
        self.from_child = answers
        self.dead = False
        self.forked = False  # this process is a fork of the child's parent
        _children.add(self)

    @classmethod
    def take(cls, path: str) -> _Child:
        """An idle child of this process, or a new one (blocking)."""
        with _idle_lock:
            while _idle:
                child = _idle.pop()
                if child.proc.poll() is None:
                    return child
                child.end()
        env = dict(os.environ)
        env[_PATH_VARIABLE] = json.dumps([p or os.getcwd() for p in sys.path])
        answers, theirs = os.pipe()
        env[_ANSWERS_VARIABLE] = str(theirs)
        try:
            # Under the file locks' lock: a lock released while the child is between its fork
            # and its exec would stay held by the child's copy of the descriptor until the exec.
            with _sqlite_schema.held_lock:
                proc = subprocess.Popen(  # noqa: S603 - our own program, by this Python
                    [sys.executable, "-I", "-c", _PROGRAM],
                    stdin=subprocess.PIPE,
                    pass_fds=(theirs,),
                    start_new_session=True,
                    env=env,
                )
        except OSError as e:
            os.close(answers)
            raise Unavailable(f"cannot start the SQLite writer process ({path}): {e}") from e
        finally:
            os.close(theirs)
        return cls(proc, answers)

    def exchange(self, payload: bytes) -> Any:
        """Send a frame and wait for the answer (blocking), decoded; None if it died (``dead``)."""
        try:
            send(self.to_child, payload)
        except OSError:
            self.dead = True
            return None
        frame = receive(self.from_child)
        if frame is None:
            self.dead = True
            return None
        return msgspec.msgpack.decode(frame)

    def close(self) -> None:
        """Detach the child from its file (blocking), and keep it idle or end it."""
        if not self.dead:
            self.exchange(DETACH)  # answered with the same frame, once its connection closed
        if self.dead:
            self.end()
        else:
            self.keep()

    def keep(self) -> None:
        """Keep this child (detached) for a later open, or end it if enough are kept."""
        with _idle_lock:
            if len(_idle) < IDLE_CHILDREN and not self.forked:
                _idle.append(self)
                return
        self.end()

    def end(self) -> None:
        """End the child's input, and wait for it to exit (blocking; killed if it will not)."""
        with contextlib.suppress(OSError):
            self.stdin.close()
        if not self.forked:
            try:
                self.proc.wait(_EXIT_WAIT)
            except subprocess.TimeoutExpired:  # pragma: no cover - a child stuck in SQLite
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self.stdout.close()


# Idle children, detached from any file, for the next opens of this process; and every child.
_idle: list[_Child] = []
_idle_lock = threading.Lock()
_children: weakref.WeakSet[_Child] = weakref.WeakSet()


@atexit.register
def _end_idle() -> None:
    """At exit: end the idle children (they would end anyway, with their input)."""
    with _idle_lock:
        idle = _idle[:]
        _idle.clear()
    for child in idle:
        child.end()


def _forget_children() -> None:
    """In a forked process: the children are its parent's; close its copies of their pipes.

    The locks are made again: the thread that held one at the fork is not in this process.
    """
    global _idle_lock
    _idle_lock = threading.Lock()
    _sqlite_schema.held_lock = threading.Lock()
    _idle.clear()
    for child in list(_children):
        child.forked = child.dead = True
        for pipe in (child.stdin, child.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


os.register_at_fork(after_in_child=_forget_children)


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
    error, counts, module = ready
    if module != _sqlite_child.__file__:
        child.end()
        raise Unavailable(
            f"the SQLite writer process runs {module}, not {_sqlite_child.__file__}: its "
            "sys.path finds another Pachyderm"
        )
    if error is not None:  # the file is refused; the child waits for another
        child.keep()
        raise error_of(error)
    return child, counts


# -- the link -------------------------------------------------------------------------------


class Link(Collector):
    """The event loop's side of the writer process: group commit over two pipes.

    The jobs of one loop iteration come together (``Collector``), then wait in ``queue``.

    Mutable state, on the owner loop only: ``collected`` (this iteration's jobs), ``queue``,
    ``sent`` (the groups in the child, oldest first), ``out`` (what is left to write of the
    last frame), ``inbox`` (what was read of the next answer), ``child`` (None while none
    serves), ``starting`` (a new child is on its way), ``alone`` (how many jobs at the head of
    the queue go one group each: their group was too large for a frame), ``counts`` (replaced,
    never changed in place, before a group's callers are answered), ``closed`` (no new jobs),
    ``abandoned`` (nothing more is sent), ``waiters`` (``stop`` waiting for the queue to drain)
    and the shared ``stats``.
    """

    def __init__(self, db: Database, stats: Stats, loop: Loop) -> None:
        super().__init__(loop)
        self.db = db
        self.path = db.path
        self.stats = stats
        self.counts: dict[str, int] = {"messages": 0, "timers": 0, "dead": 0}
        self.child: _Child | None = None
        self.queue: collections.deque[Job] = collections.deque()
        self.sent: collections.deque[list[Job]] = collections.deque()
        self.out: bytes | memoryview = b""
        self.inbox = bytearray()
        self.starting = False
        self.alone = 0
        self.on_end: Callable[[], None] | None = None
        self.closed = False
        self.abandoned = False
        self.waiters: list[asyncio.Future[None]] = []

    # -- start and stop -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start (or take) the child and attach its pipes to the loop.

        Cancelled: the child, once it is ready, is detached and kept idle (or ended).
        """
        child, counts = await _started(self.db)
        self.attach(child, counts)

    def attach(self, child: _Child, counts: dict[str, int]) -> None:
        self.child = child
        self.counts = counts
        os.set_blocking(child.to_child, False)
        self.loop.add_reader(child.from_child, self.readable)

    def detach(self) -> _Child | None:
        """Take the child off the loop (its input blocking again, for ``_Child.close``)."""
        child, self.child = self.child, None
        if child is not None:
            self.loop.remove_reader(child.from_child)
            if not child.stdin.closed:  # (closed: its number may be another file's by now)
                self.loop.remove_writer(child.to_child)
                os.set_blocking(child.to_child, True)
        self.out = b""
        self.inbox.clear()
        return child

    async def stop(self) -> None:
        """Run every job queued so far, then detach the child (it closes its connection).

        Jobs that come after get ``Unavailable``. From another event loop: the owner loop does
        it, if it still runs; if it does not, the child is ended and the jobs still queued fail.
        Cancelled while waiting: the child is ended without waiting, as by ``abandon``.
        """
        if asyncio.get_running_loop() is not self.loop:
            if self.loop.is_running():
                future = asyncio.run_coroutine_threadsafe(self.stop(), self.loop)
                await asyncio.wrap_future(future)
            else:
                self.give_up()
                child = self.detach()  # (on a closed loop, its readers are gone already)
                self.fail_sent(torn=bool(self.out))
                if child is not None:
                    await asyncio.to_thread(child.end)
            return
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

    def abandon(self, on_end: Callable[[], None] | None = None) -> None:
        """Send nothing more, and end the child without waiting (a failed open, a cancelled
        stop, a backend never closed). From any thread: it is done on the owner loop if that
        runs; the child finishes the groups it has, and their callers are still answered.
        ``on_end`` runs once no child of this link can write any more (from any thread)."""
        self.on_end = on_end
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self.loop and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: done here
                self.loop.call_soon_threadsafe(self.abandon_now)
                return
        self.abandon_now()

    def abandon_now(self) -> None:
        self.give_up()
        child = self.child
        if child is None:
            if not self.starting:  # (a new child on its way is closed when it comes)
                self.ended()
            return
        if not child.stdin.closed:
            self.loop.remove_writer(child.to_child)  # a torn frame stays torn: never run
            with contextlib.suppress(OSError):
                child.stdin.close()  # it ends once it has answered what it has
        if self.loop.is_closed():  # nobody will read its end: reap it here
            self.child = None
            self.fail_sent(torn=bool(self.out))
            self.reap(child)

    def reap(self, child: _Child) -> None:
        """Wait for the child to exit without blocking the loop, then say so (``on_end``)."""

        def end() -> None:
            child.end()
            self.ended()

        threading.Thread(target=end, name="pachyderm-sqlite-reaper", daemon=True).start()

    def ended(self) -> None:
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()

    def give_up(self) -> None:
        """Refuse new jobs and fail the queued ones: nothing more goes to a child."""
        self.closed = self.abandoned = True
        self.alone = 0
        self.queue.extend(self.collected)
        self.collected = []
        while self.queue:
            job = self.queue.popleft()
            answer(job, None, Unavailable(f"the SQLite backend is closed ({self.path})"))

    # -- requests -----------------------------------------------------------------------------

    def hand_over(self, jobs: list[Job]) -> None:
        if self.closed:
            for job in jobs:
                answer(job, None, Unavailable(f"the SQLite backend is closed ({self.path})"))
            return
        self.queue.extend(jobs)
        self.pump()

    def foreign(self, job: Job, now: bool) -> None:
        try:  # the owner loop queues it
            self.loop.call_soon_threadsafe(self.put_now if now else self.submit, job)
        except RuntimeError:  # the owner loop is closed
            job[2].set_exception(Unavailable(f"the SQLite backend is closed ({self.path})"))

    def pending(self) -> int:
        return len(self.collected) + len(self.queue) + sum(map(len, self.sent))

    # -- the pipes ----------------------------------------------------------------------------

    def pump(self) -> None:
        """Send the next groups, up to ``IN_FLIGHT`` in the child (start one if none serves).

        A new frame waits until the last one is written whole.
        """
        if self.abandoned:
            self.give_up()
        sent = self.sent
        while len(sent) < IN_FLIGHT and self.queue and not self.starting and not self.out:
            child = self.child
            if child is None or child.dead:
                self.restart()
                break
            group = self.take()
            try:
                payload, jobs = _encode(group)
                if len(payload) > MAX_FRAME:
                    self.too_large(jobs)
                    continue
                frame = HEADER.pack(len(payload)) + payload
            except Exception as e:  # pragma: no cover - a bug here must not lose the jobs
                for job in group:
                    answer(job, None, Unavailable(f"internal error of the SQLite backend: {e!r}"))
                continue
            if jobs:
                sent.append(jobs)
                self.write(child, frame)
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
        if self.alone:
            self.alone -= 1
            return group
        if first[0] != COMMIT:
            return group
        size = len(first[1])
        while queue and queue[0][0] == COMMIT and size + len(queue[0][1]) <= GROUP_WRITES:
            job = queue.popleft()
            group.append(job)
            size += len(job[1])
        return group

    def too_large(self, jobs: list[Job]) -> None:
        """A group over the frame's limit: its jobs go again one by one; one alone fails."""
        if len(jobs) == 1:
            answer(jobs[0], None, TooLarge(f"a commit is over the writer's frame ({self.path})"))
            return
        self.queue.extendleft(reversed(jobs))
        self.alone = len(jobs)

    def write(self, child: _Child, data: bytes | memoryview) -> None:
        try:
            written = os.write(child.to_child, data)
        except BlockingIOError:
            written = 0
        except OSError:  # the child is gone: its answers so far, then the end, come to `readable`
            self.out = data
            self.loop.remove_writer(child.to_child)
            return
        self.out = memoryview(data)[written:]  # (a slice of bytes would copy the rest each time)
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
        while len(inbox) >= HEADER.size:
            (size,) = HEADER.unpack_from(inbox)
            if len(inbox) < HEADER.size + size:
                break
            frame = bytes(inbox[HEADER.size : HEADER.size + size])
            del inbox[: HEADER.size + size]
            self.answered(msgspec.msgpack.decode(frame))
        self.pump()

    def answered(self, reply: Any) -> None:
        """The child answered its oldest group: count, and answer that group's callers."""
        sent = self.sent.popleft()
        outcomes, counts, stats = reply
        s = self.stats
        for name, value in zip(STATS, stats, strict=True):
            if name == "largest_group":
                s.largest_group = max(s.largest_group, value)
            else:
                setattr(s, name, getattr(s, name) + value)
        self.counts = counts
        if outcomes is None:  # pragma: no cover - the child could not read the frame (a bug)
            outcomes = [
                [
                    i,
                    None,
                    ["Unavailable", f"the SQLite writer could not read a group ({self.path})"],
                ]
                for i in range(len(sent))
            ]
        # Through `answer`, that is the loop's next iteration, even on the owner loop: answered
        # at once, a group's callers ran before the loop read the next group's answer, and the
        # ping-pong of issue 3 lost a fifth of its rate (the two processes overlapped less).
        for index, result, body in outcomes:
            answer(sent[index], result, None if body is None else error_of(body))

    def died(self, child: _Child) -> None:
        """The child is gone: fail the groups it got whole; send a torn one again, later."""
        child.dead = True
        torn = bool(self.out)  # the last frame was not written whole: the child never ran it
        self.detach()
        self.fail_sent(torn)
        with contextlib.suppress(OSError):
            child.stdin.close()
        if self.abandoned:
            self.reap(child)
        else:
            self.loop.run_in_executor(None, child.end)  # reap it without blocking the loop
        self.pump()

    def fail_sent(self, torn: bool) -> None:
        """The groups in a child that is gone: a torn one (never run) back to the queue's head,
        the others ``Indeterminate`` (they may have committed)."""
        groups = list(self.sent)
        self.sent.clear()
        if torn and groups:
            self.queue.extendleft(reversed(groups.pop()))
        for group in groups:
            for job in group:
                if job[0] == COMMIT:
                    error: BaseException = Indeterminate(
                        f"the SQLite writer process died during a commit ({self.path}): "
                        "the outcome is unknown"
                    )
                else:
                    error = Unavailable(
                        f"the SQLite writer process died during a prune ({self.path}): "
                        "it may or may not have pruned"
                    )
                answer(job, None, error)
        if self.abandoned:
            self.give_up()  # the torn one too: nothing more is sent

    def restart(self) -> None:
        """Start a new child for the queued jobs (in a thread)."""
        self.starting = True
        task = self.loop.create_task(self.restarted())
        _restarts.add(task)
        task.add_done_callback(_restarts.discard)

    async def restarted(self) -> None:
        """Attach the new child, or fail the queued jobs if none could start."""
        try:
            child, counts = await _started(self.db)
        except BaseException as e:
            self.starting = False
            self.alone = 0
            while self.queue:
                job = self.queue.popleft()
                answer(job, None, Unavailable(f"the SQLite writer process died: {e}"))
            self.pump()
            if self.abandoned:
                self.ended()
            if not isinstance(e, Exception):
                raise
            return
        self.starting = False
        if self.abandoned:
            await asyncio.to_thread(child.close)
            self.ended()
        else:
            self.attach(child, counts)
        self.pump()


async def _started(db: Database) -> tuple[_Child, dict[str, int]]:
    """``start_child`` in a thread. Cancelled: the child, once ready, is detached and kept."""
    future = asyncio.get_running_loop().run_in_executor(None, start_child, db)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_release_unclaimed)
        raise


def _release_unclaimed(future: asyncio.Future[tuple[_Child, dict[str, int]]]) -> None:
    """The child a cancelled start made: nobody takes it, so it is detached (in a thread)."""
    if future.cancelled() or future.exception() is not None:
        return
    child, _ = future.result()
    threading.Thread(target=child.close, name="pachyderm-sqlite-reaper", daemon=True).start()


# Restarts in progress (a task must be referenced until it ends).
_restarts: set[asyncio.Task[None]] = set()


def _encode(group: list[Job]) -> tuple[bytes, list[Job]]:
    """The group as a frame, and the jobs in it: all, unless some hold values no frame can.

    Those are answered here with the error the writer would give.
    """
    try:
        return _ENCODE.encode([(kind, i, arg) for i, (kind, arg, _, _) in enumerate(group)]), group
    except (TypeError, ValueError, OverflowError):
        sent = []
        for job in group:
            error = _encode_error(job)
            if error is None:
                sent.append(job)
            else:
                answer(job, None, error)
        return _ENCODE.encode([(kind, i, arg) for i, (kind, arg, _, _) in enumerate(sent)]), sent


def _encode_error(job: Job) -> BaseException | None:
    """None if the job can be sent; if not, the error its caller gets (as the writer's)."""
    try:
        _ENCODE.encode(job[1])
    except UnicodeEncodeError as e:
        return InvalidKey(f"a type name, key, receipt id or outbox text is not valid Unicode: {e}")
    except OverflowError as e:
        return TooLarge(f"a value is over SQLite's limits: {e}")
    except (TypeError, ValueError) as e:
        return TypeError(f"commit() got a value SQLite cannot store: {e!r}")
    return None
