"""The engine under a world: residents, the loader, the runner, commits (and ``_passivation``).

The life of an activation: ``World.activate`` checks the ref (no I/O) and puts a ``Call`` in the
entity's bounded mailbox. The *loader* reads entities that are not resident, in batches. The
*runner* takes entities with mail, runs their handlers on the tip state (pure: a fresh decoded state
per run), encodes the results and sends one conditional ``Write`` per entity to the backend, many
entities per commit. Only when the backend says a write committed (the output gate) are callers
answered and followers told. While an entity's write is in flight its next messages run on the
uncommitted tip and are committed together in its next write (write coalescing); if a write loses,
everything run on top of it is run again on the reloaded state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from . import _faults
from ._clock import Clock
from ._core._follow import Channel, EventChannel
from ._core._resident import LOADING, READY, STALE, Call, Resident
from ._dispatch import SINK, Dispatcher
from ._entity import EntityInfo, Registry, Update
from ._errors import (
    EXPECTED,
    Indeterminate,
    PachydermError,
    SerializationError,
    Timeout,
    TooLarge,
    Unavailable,
    failed,
)
from ._events import push_events
from ._eventsourced import event_write, run_events
from ._loader import load_loop
from ._options import WorldOptions
from ._outbox import effects_of, faults_after_commit, outbox_of
from ._passivation import evict_over_limit, sweep
from .backends._base import Backend, Fence, Receipt, Write

__all__ = ["Engine"]


def _moved() -> PachydermError:
    from ._router import Moved

    return Moved("the entity's partition moved to another node")


class Engine:
    """Runs the entities of one world on one backend.

    Mutable state, touched only on the event loop: ``residents`` and ``order`` (the CLOCK
    hand), ``ready`` (entities with work for the runner), ``to_load``, ``channels`` (followers
    by entity), ``commits`` (commit tasks in flight), ``stats``.
    """

    def __init__(
        self, backend: Backend, options: WorldOptions, clock: Clock, registry: Registry
    ) -> None:
        self.backend = backend
        self.options = options
        self.clock = clock
        self.registry = registry
        self.residents: dict[tuple[str, str], Resident] = {}
        # The CLOCK hand of passivation: every resident once, oldest first. An access only sets
        # `resident.hot` (no reordering on the hot path); the hand gives hot ones a second chance.
        self.order: deque[Resident] = deque()
        # Followers by entity; a dict used as an ordered set, so that they are told in the order
        # they subscribed (a set of objects would order them by address: runs would not replay).
        self.channels: dict[tuple[str, str], dict[Channel, None]] = {}
        # Readers of the event streams of event-sourced entities, the same way.
        self.event_channels: dict[tuple[str, str], dict[EventChannel, None]] = {}
        self.commits: set[asyncio.Task[None]] = set()
        self.stats = {
            "activations": 0,
            "failures": 0,
            "commits": 0,
            "writes": 0,
            "conflicts": 0,
            "loads": 0,
            "passivated": 0,
            "fenced": 0,  # writes refused because this node's partition lease was gone
        }
        self.ready: deque[Resident] = deque()
        self.to_load: dict[tuple[str, str], Resident] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.run_waiter: asyncio.Future[None] | None = None
        self.load_waiter: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # Read on every activation: copied out of the options once.
        self._turn_budget = options.turn_budget
        self._max_state_bytes = options.max_state_bytes
        self.dispatcher = Dispatcher(self)
        #: Told of every answered or applied call: ``observer(resident, calls, error)``, with
        #: ``error`` None once they committed (or failed with nothing to commit), else the
        #: commit's error. None outside a simulation (``pachyderm.testing`` records history).
        self.observer: Callable[[Resident, list[Call], PachydermError | None], None] | None = None
        #: In a cluster (set by its node): the partition lease a write of an entity needs, or
        #: None if this node must not write it; and whether a lease is still this node's.
        self.fence_of: Callable[[str, str], Fence | None] | None = None
        self.still_holds: Callable[[Fence], bool] | None = None
        self.lease_gone: Callable[[Fence], None] | None = None

    def start(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        for coro in (self._run(), load_loop(self), sweep(self), self.dispatcher.run()):
            self._tasks.append(loop.create_task(coro))

    def busy(self) -> bool:
        """True while any accepted call is unanswered or any commit is in flight."""
        if self.commits:
            return True
        return any(not r.quiescent() for r in self.residents.values())

    async def stop(self) -> None:
        """Finish accepted work (bounded by the tasks being alive), then stop the tasks.

        Messages not yet delivered stay in the outbox (storage) for the next start, so that a
        pair of entities messaging each other forever does not keep the world from closing.
        """
        self.dispatcher.stop()
        # Polled, and only at shutdown: an event would cost the hot path a check per answer.
        while self.busy() and not all(t.done() for t in self._tasks):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for table in (self.channels, self.event_channels):
            for readers in table.values():
                for reader in readers:
                    reader.close()
            table.clear()

    # ------------------------------------------------------------------ residents and loading

    def resident(self, info: EntityInfo, key: str) -> Resident:
        """Return the resident entity, creating it (and asking for its load) if needed."""
        resident = self.residents.get((info.name, key))
        if resident is not None:
            resident.hot = True
            return resident
        return self.new_resident(info, key)

    def new_resident(self, info: EntityInfo, key: str) -> Resident:
        """Make the resident entity of a ref that has none, and ask for its load.

        The miss path of ``activate``: it runs once per call on an entity not in memory.
        """
        resident = Resident(info, key, self.clock.monotonic())
        residents = self.residents
        residents[resident.ref] = resident  # its ref is the key: one tuple per resident
        self.order.append(resident)
        self._request_load(resident)
        if len(residents) > self.options.max_resident:
            evict_over_limit(self)
        return resident

    def _request_load(self, resident: Resident) -> None:
        resident.phase = LOADING
        self.to_load[resident.ref] = resident
        waiter = self.load_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def loaded(self, info: EntityInfo, key: str) -> Resident:
        """Return the resident entity once its committed state is known.

        Raises the entity's error (``IncompatibleVersion``, ...) if it cannot be used here.
        """
        assert self.loop is not None
        while True:
            resident = self.resident(info, key)
            if resident.phase == READY:
                if resident.error is not None:
                    raise resident.error
                return resident
            future: asyncio.Future[None] = self.loop.create_future()
            if resident.loaded is None:
                resident.loaded = []
            resident.loaded.append(future)
            await future

    # ------------------------------------------------------------------ running

    def post(self, resident: Resident, call: Call) -> None:
        """Queue an accepted call in the mailbox; the runner takes it on its next turn.

        ``World._post`` does the same inline (the hot path of ``activate``); change both together.
        """
        mailbox = resident.mailbox
        if mailbox is None:
            resident.mailbox = [call]
        else:
            mailbox.append(call)
        resident.queued += 1
        if resident.phase == READY:
            self.schedule(resident)

    def schedule(self, resident: Resident) -> None:
        if resident.scheduled:
            return
        resident.scheduled = True
        ready = self.ready
        if not ready:  # the runner waits only when nothing is ready
            waiter = self.run_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        ready.append(resident)

    async def _run(self) -> None:
        """The runner: executes ready entities and sends their writes, turn after turn.

        One pass over every ready entity per event loop iteration; the work for one entity is
        inlined here because this loop runs once per entity per turn.
        """
        assert self.loop is not None
        ready = self.ready
        max_batch = self.options.max_batch or self.backend.max_batch
        budget = self._turn_budget
        run_batch = self._run_batch
        fence_of = self.fence_of
        while True:
            if not ready:
                self.run_waiter = self.loop.create_future()
                await self.run_waiter
                continue
            writes: list[Write] = []
            owners: list[Resident] = []
            ran = 0  # activations run this turn, counted once per turn
            # At most `max_batch` entities per turn: their write goes to the backend, which can
            # start committing while the next turn runs (a pipeline, not one big batch per wave).
            for _ in range(min(len(ready), max_batch)):
                resident = ready.popleft()
                resident.scheduled = False
                if resident.phase != READY or resident.busy:
                    continue
                mailbox = resident.mailbox
                if mailbox:
                    if len(mailbox) <= budget:
                        batch, resident.mailbox = mailbox, None
                    else:
                        batch = mailbox[:budget]
                        del mailbox[:budget]
                        self.schedule(resident)  # used its turn budget: back of the line
                    try:
                        if resident.info.events is None:
                            ran += run_batch(resident, batch)
                        else:
                            run_events(self, resident, batch)
                    except Exception as exc:  # an engine bug: fail these calls, keep serving
                        self._crash(resident, exc, batch)
                        continue
                if resident.inflight is not None or not resident.pending:
                    continue  # its write goes when the one in flight is answered
                pending = resident.pending
                resident.pending = None
                if resident.fx:
                    resident.fx = False
                    outbox = outbox_of(pending)
                else:
                    outbox = None
                if resident.tip_version == resident.version and outbox is None:
                    if self.observer is not None:
                        self.observer(resident, pending, None)
                    for call in pending:  # only failures: nothing to commit or wait for
                        self.answer(resident, call, call.result)
                    self._made_room(resident)
                    continue
                info = resident.info
                if fence_of is None:
                    fence = None  # one machine: no partitions
                else:
                    fence = fence_of(info.name, resident.key)
                    if fence is None:  # its partition is not (or no longer) this node's
                        resident.pending = pending
                        self.disown(resident, _moved())
                        continue
                resident.inflight = pending
                # A new `Write` each time: made in C with its fields at once, it costs less than
                # setting the fields of a reused one (a Struct's attributes are not the
                # interpreter's specialized slots), and the garbage collector does not track it.
                write = Write(
                    info.name,
                    resident.key,
                    resident.version,
                    resident.tip_version,
                    info.version,
                    resident.tip_data,
                    self._receipts(pending) if resident.idempotent else (),
                    outbox,
                    None,
                    False,
                    fence,
                )
                if info.events is not None:
                    event_write(write, info, pending)
                writes.append(write)
                owners.append(resident)
            self.stats["activations"] += ran
            if writes:
                self._send(writes, owners)
            # Let callers run and fill the mailboxes before the next turn.
            await asyncio.sleep(0)

    def _receipts(self, calls: list[Call]) -> tuple[Receipt, ...]:
        """The receipts of the idempotent calls among ``calls``, to commit with their write."""
        now = self.clock.wall()
        return tuple(
            Receipt(c.idempotency_key, c.version, c.data, now)
            for c in calls
            if c.idempotency_key is not None and c.version is not None and c.data is not None
        )

    def _run_batch(self, resident: Resident, batch: list[Call]) -> int:
        """Run calls of one entity on its tip state; each lands in ``pending`` with its result.

        Returns how many ran to a new state (the runner counts them in ``stats``).

        A plain (``def``) handler runs to completion here: it cannot be interrupted, so keep it
        short; ``activation_timeout`` bounds ``async def`` handlers (see ``_finish_async``).
        """
        info = resident.info
        if resident.error is not None:  # it cannot run here (e.g. a newer stored version)
            self.refuse_batch(resident, batch)
            return 0
        decode = info.codec.decode
        encode_scalar = info.encode_scalar
        cls = info.cls
        key = resident.key
        # The batch list itself becomes the pending list (the common case), unless calls are
        # pending already or one of the batch is skipped.
        pending = resident.pending
        # Written back to the resident at the end; kept in locals for speed.
        first = tip = resident.tip_version
        tip_data, tip_obj = resident.tip_data, resident.tip_obj
        for call in batch:
            if call.future.done():  # timed out or cancelled while queued: nothing happens
                self.skip(resident, call)
                if pending is None:
                    pending = batch[: batch.index(call)]
                continue
            entity = cls.__new__(cls)
            entity.key = key
            try:
                # A fresh state per run: a handler that mutates and then raises leaks nothing.
                new = entity.activate(
                    call.message, tip_obj if tip_obj is not None else decode(tip_data)
                )
                if info.is_async:
                    index = batch.index(call)
                    if pending is None:
                        pending = batch[:index]
                    resident.pending = pending
                    self._run_async(resident, call, new, batch[index + 1 :])
                    break
                if type(new) is Update:
                    effects = effects_of(self, resident, new.effects, tip + 1)
                    new = new.state
                else:
                    effects = None
                if type(new) in info.shareable:
                    # An immutable scalar: no copy, and none of the codec's preparation.
                    try:
                        data = encode_scalar(new)
                    except OverflowError as exc:  # an int beyond 64 bits
                        raise SerializationError(f"cannot encode {new!r:.40}: {exc}") from exc
                    value = obj = new
                else:
                    data, value = self._encode(info, new)
                    obj = None
                if len(data) > self._max_state_bytes:
                    raise TooLarge(
                        f"the new state is {len(data)} bytes; "
                        f"max_state_bytes is {self._max_state_bytes}"
                    )
            except EXPECTED as exc:
                call.result = exc
                if call.delivery is not None:
                    resident.fx = True
            except Exception as exc:
                call.result = failed(info.name, exc)
                if call.delivery is not None:
                    resident.fx = True
            else:
                tip += 1
                call.version = tip
                call.data = tip_data = data
                call.result = value
                tip_obj = obj
                if effects is not None or call.delivery is not None:
                    call.effects = effects
                    resident.fx = True
            if pending is not None:
                pending.append(call)
        # None, never an empty list, when nothing is pending: else the entity never looks idle.
        resident.pending = batch if pending is None else (pending or None)
        resident.tip_version, resident.tip_data, resident.tip_obj = tip, tip_data, tip_obj
        return tip - first

    def refuse_batch(self, resident: Resident, batch: list[Call]) -> None:
        batch = list(batch)
        self.dispatcher.take_back(resident, batch)  # they wait for a node that can apply them
        for call in batch:
            if call.future.done():
                self.skip(resident, call)
            else:
                call.result = resident.error
                if resident.pending is None:
                    resident.pending = []
                resident.pending.append(call)

    @staticmethod
    def _encode(info: EntityInfo, new: Any) -> tuple[bytes, Any]:
        """Return the bytes of a new state, and a fresh copy of it for the caller.

        Decoding what was encoded also checks it against a declared ``state_type``.
        """
        data = info.codec.encode(new)
        return data, info.codec.decode(data)

    def _result(self, resident: Resident, call: Call, new: Any) -> None:
        """Encode an async handler's result on top of the tip (raises if it cannot be stored)."""
        effects = None
        if type(new) is Update:
            effects = effects_of(self, resident, new.effects, resident.tip_version + 1)
            new = new.state
        data, call.result = self._encode(resident.info, new)
        if len(data) > self._max_state_bytes:
            raise TooLarge(
                f"the new state is {len(data)} bytes; max_state_bytes is {self._max_state_bytes}"
            )
        resident.tip_obj = None
        call.version = resident.tip_version = resident.tip_version + 1
        call.data = resident.tip_data = data
        if effects is not None or call.delivery is not None:
            call.effects = effects
            resident.fx = True
        self.stats["activations"] += 1

    def _run_async(self, resident: Resident, call: Call, coro: Any, rest: list[Call]) -> None:
        """Run an ``async def`` handler as its own task; the entity waits for it (one at a time)."""
        assert self.loop is not None
        if rest:  # the calls after it wait their turn, at the front of the mailbox
            resident.mailbox = rest + (resident.mailbox or [])
        resident.busy = True
        resident.running = (call, None)
        self.loop.create_task(self._finish_async(resident, call, coro))

    async def _finish_async(self, resident: Resident, call: Call, coro: Any) -> None:
        timeout = self.options.activation_timeout
        if resident.running is None or resident.running[0] is not call:
            coro.close()  # undone before it started: it was put back in its place
            resident.busy = False
            self.schedule(resident)
            return
        task = asyncio.ensure_future(coro)
        resident.running = (call, task)
        # A caller that gives up (timeout or cancellation) stops the handler as well.
        call.future.add_done_callback(lambda _: task.cancel())
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = None if timeout is None else self.clock.call_later(timeout, expire)
        try:
            await asyncio.wait({task})
            if resident.running is None or resident.running[0] is not call:
                # The state it ran on was undone meanwhile (a lost write): the call is back in
                # its place, to run again; this run's result is dropped.
                resident.busy = False
                self.schedule(resident)
                return
            resident.running = None
            if expired:
                call.result = Timeout(f"the handler ran longer than {timeout} s; it was cancelled")
            elif task.cancelled() or call.future.done():
                # Withdrawn, or answered Timeout while the handler was finishing: its caller
                # was told it did not happen, so it does not.
                call.result = Timeout("the call was withdrawn while its handler ran")
            elif (error := task.exception()) is not None:
                raise error  # the handler's own (a Timeout it raised is ActivationFailed too)
            else:
                self._result(resident, call, task.result())
        except EXPECTED as exc:
            call.result = exc
        except Exception as exc:
            call.result = failed(resident.info.name, exc)
        finally:
            if timer is not None:
                timer.cancel()
        if call.delivery is not None:
            resident.fx = True
        resident.busy = False
        if resident.pending is None:
            resident.pending = []
        resident.pending.append(call)
        self.schedule(resident)

    def _crash(self, resident: Resident, exc: Exception, batch: list[Call]) -> None:
        """An engine bug hit while running ``batch``: fail its calls, keep the committed state."""
        error = Unavailable(f"internal error while running {resident.info.name}: {exc!r}")
        error.__cause__ = exc
        failed = [*(resident.pending or ()), *batch]
        resident.pending = None
        self.dispatcher.take_back(resident, failed)
        for call in failed:
            if call.idempotency_key is not None:
                self._forget(resident, call, error)
            if not call.future.done():
                call.future.set_exception(error)
        # Recount from what is still queued or committing: the failed calls are all answered.
        resident.queued = len(resident.mailbox or ()) + len(resident.inflight or ())
        # The tip goes back to the last state committed or in flight (never behind it).
        resident.tip_version, resident.tip_data, resident.tip_obj = (
            resident.version,
            resident.data,
            None,
        )
        for call in resident.inflight or ():
            if call.version is not None and call.data is not None:
                resident.tip_version, resident.tip_data = call.version, call.data

    def _send(self, writes: list[Write], owners: list[Resident]) -> None:
        assert self.loop is not None
        task = self.loop.create_task(self._commit(writes, owners))
        self.commits.add(task)
        task.add_done_callback(self.commits.discard)

    async def _commit(self, writes: list[Write], owners: list[Resident]) -> None:
        """Commit a batch, then (output gate) answer callers and tell followers."""
        self.stats["commits"] += 1
        self.stats["writes"] += len(writes)
        try:
            outcome: Sequence[bool] = await self.backend.commit(writes)
        except Indeterminate as exc:
            dispatcher = self.dispatcher
            for write, resident in zip(writes, owners, strict=True):
                outbox = write.outbox
                if outbox is not None:
                    if outbox.sends:
                        dispatcher.doubt.setdefault(resident.ref, []).extend(outbox.sends)
                    if outbox.consumes:
                        consumed = dispatcher.doubt_consumed.setdefault(resident.ref, [])
                        consumed.append((write.expected, write.version, outbox.consumes))
                self._lost(resident, exc, reload=True)
            return
        except PachydermError as exc:
            for resident in owners:
                self._lost(resident, exc, reload=False)
            return
        except Exception as exc:
            # Not one of ours: nobody can say whether it committed.
            doubt = Indeterminate(f"the backend failed during a commit: {exc!r}")
            doubt.__cause__ = exc
            for resident in owners:
                self._lost(resident, doubt, reload=True)
            return
        now = self.clock.monotonic()
        channels = self.channels
        event_channels = self.event_channels
        schedule = self.schedule
        dispatcher = self.dispatcher
        held = dispatcher.held
        observer = self.observer
        if _faults.hook is not None:
            faults_after_commit(writes, outcome)
        for write, resident, won in zip(writes, owners, outcome, strict=True):
            if not won:
                fence = write.fence
                if fence is not None and (write.fenced or not self.still_holds(fence)):  # type: ignore[misc]
                    self.stats["fenced"] += 1
                    if write.fenced and self.lease_gone is not None:
                        self.lease_gone(fence)  # the database says so: stop serving it now
                    self.disown(resident, _moved(), lost=True)  # fenced: the partition moved
                    continue
                self.stats["conflicts"] += 1
                self._rerun(resident)
                continue
            inflight: list[Call] = resident.inflight  # type: ignore[assignment]
            resident.inflight = None
            if write.version != write.expected:
                resident.version = write.version
                resident.data = write.data
            resident.used = now
            if observer is not None:
                observer(resident, inflight, None)
            if write.outbox is not None:
                dispatcher.committed(resident, write)
            if channels and resident.ref in channels:
                self._notify(channels[resident.ref], inflight)
            if write.events and event_channels and resident.ref in event_channels:
                push_events(event_channels[resident.ref], write)
            # The output gate opens here, after the commit (an inlined `_answer` per call).
            resident.queued -= len(inflight)
            for call in inflight:
                future = call.future
                if future is SINK:  # a delivery: nobody waits for an answer
                    if isinstance(call.result, BaseException):
                        self.stats["failures"] += 1  # a dead letter
                    continue
                if call.idempotency_key is not None:
                    self._forget(resident, call, call.result)
                if not future.done():
                    result = call.result
                    if isinstance(result, BaseException):
                        self.stats["failures"] += 1
                        future.set_exception(result)
                    else:
                        future.set_result(result)
            if resident.pending or resident.mailbox:
                schedule(resident)
            if held and resident.ref in held:
                dispatcher.flush(resident)

    @staticmethod
    def _notify(channels: dict[Channel, None], calls: list[Call]) -> None:
        """Push the committed versions of ``calls`` to an entity's followers, in order."""
        for call in calls:
            version = call.version
            if version is not None:
                data = call.data
                assert data is not None
                for channel in channels:
                    channel.push(version, data)

    def _rerun(self, resident: Resident) -> None:
        """The write lost (or the cache is doubtful): run everything on top of it again."""
        calls = (resident.inflight or []) + (resident.pending or [])
        running = resident.running
        if running is not None:  # an async handler runs on the undone tip: it runs again
            resident.running = None
            calls.append(running[0])
            if running[1] is not None:
                running[1].cancel()
        for call in calls:
            call.version = call.data = call.result = call.effects = call.events = None
            if call.delivery is not None:
                resident.recheck = True
        resident.inflight = resident.pending = None
        resident.fx = False
        resident.mailbox = calls + (resident.mailbox or [])
        resident.phase = STALE
        self._request_load(resident)

    def _lost(self, resident: Resident, exc: PachydermError, *, reload: bool) -> None:
        """Nothing of the write committed (or we do not know): fail its calls, rerun the rest."""
        inflight, resident.inflight = resident.inflight or [], None
        if self.observer is not None and inflight:
            self.observer(resident, inflight, exc)
        self.dispatcher.take_back(resident, inflight)
        for call in inflight:
            self.answer(resident, call, exc)
        if reload or resident.pending or resident.running is not None:
            self._rerun(resident)
        else:
            resident.tip_version, resident.tip_data = resident.version, resident.data
            resident.tip_obj = None
        self._made_room(resident)

    def _made_room(self, resident: Resident) -> None:
        """Calls were answered without a commit: messages held for room may go in now."""
        held = self.dispatcher.held
        if held and resident.ref in held:
            self.dispatcher.flush(resident)

    def answer(self, resident: Resident, call: Call, result: Any) -> None:
        resident.queued -= 1
        if call.idempotency_key is not None:
            self._forget(resident, call, result)
        future = call.future
        if future.done():
            return
        if isinstance(result, BaseException):
            self.stats["failures"] += 1
            future.set_exception(result)
        else:
            future.set_result(result)

    @staticmethod
    def _forget(resident: Resident, call: Call, result: Any) -> None:
        """The call is answered: a retry with its idempotency key now finds the receipt.

        Callers waiting with the same key learn the outcome: ``(True, value)`` if it committed,
        ``(False, error)`` if not (then one of them runs it).
        """
        idempotent = resident.idempotent
        if idempotent is not None:
            entry = idempotent.get(call.idempotency_key)  # type: ignore[arg-type]
            if entry is not None and entry[0] is call:
                del idempotent[call.idempotency_key]  # type: ignore[arg-type]
                if not entry[1].done():
                    entry[1].set_result((not isinstance(result, BaseException), result))
            if not idempotent:
                resident.idempotent = None

    def expire(self, resident: Resident, call: Call) -> None:
        """A call's deadline passed: withdraw it if it is still queued, stop it if it runs."""
        if call.future.done():
            return
        mailbox = resident.mailbox
        if mailbox is not None and call in mailbox:
            mailbox.remove(call)
            self.answer(resident, call, Timeout("the deadline passed before the call ran"))
            self._made_room(resident)
        elif resident.busy and call.version is None:
            call.future.set_exception(Timeout("the deadline passed while the handler ran"))

    def disown(self, resident: Resident, error: PachydermError, *, lost: bool = False) -> None:
        """The entity's partition is no longer this node's: fail what waits, forget the entity.

        Nothing of the failed calls committed. A write in flight answers its own callers when
        it returns (it is fenced: it commits only if the lease was still ours), unless
        ``lost`` (it returned and lost: its calls fail too). Deliveries go back to the held
        queues, from where the node forwards them to the new owner.
        """
        calls = [*(resident.pending or ()), *(resident.mailbox or ())]
        if lost and resident.inflight is not None:
            calls = [*resident.inflight, *calls]
            resident.inflight = None
        resident.pending = resident.mailbox = None
        resident.fx = False
        self.dispatcher.take_back(resident, calls)
        for call in calls:
            self.answer(resident, call, error)
        resident.tip_version, resident.tip_data = resident.version, resident.data
        resident.tip_obj = None
        if self.residents.get(resident.ref) is resident:
            del self.residents[resident.ref]
        self.to_load.pop(resident.ref, None)
        self._made_room(resident)

    def skip(self, resident: Resident, call: Call) -> None:
        """Drop a queued call whose caller no longer waits: it never runs.

        For ``withdraw``, and for the runner when a lost write put back a call whose caller
        gave up while it was out of the mailbox (running or committing). Callers waiting on its
        idempotency key hear that it was withdrawn (one of them runs it).
        """
        resident.queued -= 1
        if call.idempotency_key is not None:
            self._forget(resident, call, Unavailable("the call was withdrawn"))
        self._made_room(resident)

    def withdraw(self, resident: Resident, call: Call) -> None:
        """The caller gave up: a still-queued message is removed and never runs."""
        mailbox = resident.mailbox
        if mailbox is not None and call in mailbox:
            mailbox.remove(call)
            self.skip(resident, call)
