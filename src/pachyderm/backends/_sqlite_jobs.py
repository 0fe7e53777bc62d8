"""The SQLite backend's threads: jobs from the event loop, and the loop every thread runs.

The writer runs ``COMMIT`` and ``PRUNE`` jobs; the reader ``LOAD``, ``RECEIPT``, ``LIST``, ``DUE``
(a page of the outbox), ``EXISTS`` (whether outbox rows still wait) and ``EVENTS`` (a page of an
entity's event log); both run ``STOP``.

A *job* is a request and where to answer it: ``(kind, argument, future, loop)``. The event loop
queues jobs on a ``Channel``; a ``Worker`` thread (the writer or the reader) takes every queued job
at once, runs them on its own connection, and answers each future on its own loop.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

from .._errors import Unavailable

__all__ = [
    "ABANDON",
    "COMMIT",
    "DUE",
    "EVENTS",
    "EXISTS",
    "LIST",
    "LOAD",
    "PRUNE",
    "RECEIPT",
    "STOP",
    "Channel",
    "Collector",
    "Job",
    "Loop",
    "Outcome",
    "Worker",
    "answer",
    "deliver_all",
]

# The kinds of jobs.
COMMIT: Final = 0
PRUNE: Final = 1
LOAD: Final = 2
RECEIPT: Final = 3
LIST: Final = 4
STOP: Final = 5
DUE: Final = 6
EXISTS: Final = 7
EVENTS: Final = 8

Loop = asyncio.AbstractEventLoop
_Future = asyncio.Future[Any]
#: (kind, argument, future, loop): a request and where to answer it.
Job = tuple[int, Any, _Future, Loop]
#: (future, result, error): an answer, ready to be set on its loop.
Outcome = tuple[_Future, object, BaseException | None]
#: A stop that nobody waits for (a failed open, a backend collected without ``aclose``).
ABANDON: Final = cast("Job", (STOP, None, None, None))


def _settle(outcomes: list[Outcome]) -> None:
    """On the event loop: answer the waiting callers (cancelled ones no longer listen)."""
    for future, result, error in outcomes:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _deliver(loop: Loop, outcomes: list[Outcome]) -> None:
    """From a thread: hand outcomes to their loop; a closed loop has nobody left to answer."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, outcomes)


def deliver_all(outcomes: Iterable[tuple[Loop, Outcome]]) -> None:
    """From a thread: hand outcomes to their loops, one hand-over per loop."""
    by_loop: dict[Loop, list[Outcome]] = {}
    for loop, outcome in outcomes:
        by_loop.setdefault(loop, []).append(outcome)
    for loop, some in by_loop.items():
        _deliver(loop, some)


def answer(job: Job, result: object, error: BaseException | None) -> None:
    """From a thread: answer one job's waiter, if it has one."""
    if job is not ABANDON:
        _deliver(job[3], [(job[2], result, error)])


class Collector(abc.ABC):
    """Jobs from the event loop, coalesced per loop iteration.

    ``submit`` (on the loop) collects the jobs of the current iteration and hands them over in
    one piece at the next one (``hand_over``), so that the writer or reader sees a whole burst
    of calls at once. A job from another event loop is not coalesced (``foreign``).

    Mutable state: ``collected`` (changed on the loop only).
    """

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.collected: list[Job] = []

    def request(self, kind: int, arg: object, *, now: bool = False) -> _Future:
        """On any running loop: queue a job (at once if ``now``) and return its future."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = (kind, arg, future, loop)
        if loop is not self.loop:
            self.foreign(job, now)
        elif now:
            self.put_now(job)
        else:
            self.submit(job)
        return future

    def submit(self, job: Job) -> None:
        """Queue a job from the event loop (handed over at the next loop iteration)."""
        if not self.collected:
            self.loop.call_soon(self.flush)
        self.collected.append(job)

    def flush(self) -> None:
        jobs = self.collected
        if jobs:
            self.collected = []
            self.hand_over(jobs)

    def put_now(self, job: Job) -> None:
        """Queue a job at once, after the jobs collected so far."""
        self.flush()
        self.hand_over([job])

    @abc.abstractmethod
    def hand_over(self, jobs: list[Job]) -> None:
        """On the loop: pass jobs on, in order."""

    @abc.abstractmethod
    def foreign(self, job: Job, now: bool) -> None:
        """From another event loop's thread: pass one job on."""


class Channel(Collector):
    """Jobs from the event loop to one thread (the reader, or the writer thread).

    The thread wakes up once per burst of calls (and does not fight the loop for the GIL while
    the burst is still coming in).

    Mutable state: ``collected`` and ``queued`` (changed on the loop only), ``taken`` (changed
    by the thread only); ``queue`` is thread-safe.
    """

    def __init__(self, loop: Loop) -> None:
        super().__init__(loop)
        self.queue: queue.SimpleQueue[list[Job]] = queue.SimpleQueue()
        self.queued = 0
        self.taken = 0

    def hand_over(self, jobs: list[Job]) -> None:
        self.queued += len(jobs)
        self.queue.put(jobs)

    def foreign(self, job: Job, now: bool) -> None:
        self.queued += 1
        self.queue.put([job])

    def drain(self) -> list[Job]:
        """On the thread: wait for jobs, then take every job already queued."""
        jobs = self.queue.get()
        get = self.queue.get_nowait
        with contextlib.suppress(queue.Empty):
            while True:
                jobs += get()
        self.taken += len(jobs)
        return jobs

    def pending(self) -> int:
        """How many jobs are collected or queued, not yet taken by the thread."""
        return max(0, len(self.collected) + self.queued - self.taken)


class Worker(abc.ABC):
    """A thread with one connection of its own, running the jobs of one channel until a stop.

    Every job it takes is answered once: run, refused (queued after a stop) or failed (a bug).
    Subclasses say how to connect, how to run a drain's jobs, and what to release at the end.

    Mutable state: ``thread`` (set on the loop by ``start``); the connection lives in the
    thread's frame only.
    """

    #: The thread's name, before the file's path.
    role: str

    def __init__(self, path: str, channel: Channel) -> None:
        self.path = path
        self.channel = channel
        self.thread: threading.Thread | None = None

    def start(self, loop: Loop) -> _Future:
        """Start the thread; the returned future is set once its connection is ready (or not)."""
        ready: _Future = loop.create_future()
        thread = threading.Thread(
            target=self.main, args=(ready, loop), name=f"{self.role}:{self.path}", daemon=True
        )
        thread.start()
        self.thread = thread
        return ready

    @abc.abstractmethod
    def connect(self) -> sqlite3.Connection:
        """Open and configure this thread's connection (raises ``Unavailable`` or the like)."""

    @abc.abstractmethod
    def run(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        """Run and answer the jobs of one drain, in order (none of them is a stop)."""

    @abc.abstractmethod
    def release(self) -> None:
        """At the end of the thread, before anyone is told it stopped: free what it holds."""

    def main(self, ready: _Future, loop: Loop) -> None:
        stops: list[Job] = []
        failure: BaseException | None = None
        try:
            try:
                conn = self.connect()
            except BaseException as e:
                failure = e
                return
            _deliver(loop, [(ready, None, None)])
            try:
                while not stops:
                    work: list[Job] = []
                    for job in self.channel.drain():
                        if stops:  # queued after a stop: the backend is closed
                            answer(
                                job,
                                None,
                                Unavailable(f"the SQLite backend is closed ({self.path})"),
                            )
                        elif job[0] == STOP:
                            stops.append(job)
                        else:
                            work.append(job)
                    if work:
                        self.guarded(self.run, conn, work)
            finally:
                conn.close()
        finally:
            # Answer only once released (the writer's lock), so that the caller may reopen at once.
            self.release()
            if failure is not None:
                _deliver(loop, [(ready, None, failure)])
            for job in stops:
                answer(job, None, None)

    def guarded(
        self,
        run: Callable[[sqlite3.Connection, list[Job]], None],
        conn: sqlite3.Connection,
        jobs: list[Job],
    ) -> None:
        """Run jobs; a bug must fail these jobs, never kill the thread (the others would hang)."""
        try:
            run(conn, jobs)
        except Exception as e:  # pragma: no cover - a bug in the SQLite backend
            for job in jobs:
                self.answer(job, None, Unavailable(f"internal error of the SQLite backend: {e!r}"))

    # How a run's jobs are answered: on their loops (the writer process answers its parent).

    def answer(self, job: Job, result: object, error: BaseException | None) -> None:
        answer(job, result, error)

    def deliver(self, outcomes: list[tuple[Loop, Outcome]]) -> None:
        deliver_all(outcomes)
