"""The dispatcher: delivers outbox rows (messages and due timers) to their receivers.

Nothing here decides whether a message is applied: the receiver's commit *consumes* the row (a
conditional delete in the receiver's transaction) or loses. So a duplicate delivery (a retry, a
scan that overlaps, a second node) can at worst run a handler whose write then loses; it can never
apply a message twice. What the dispatcher adds is liveness and order:

- **After the commit.** A committed write's sends are delivered at once, from memory; its timers
  go to the timer heap if they are due within the *horizon* (``timer_horizon`` seconds), else they
  wait in storage until a scan brings them in.
- **Order per pair.** Messages go into the receiver's mailbox in the order they were committed,
  and a mailbox runs in order. When a receiver cannot take a message now (its mailbox is full, or
  a delivery failed for a reason that is not the handler's: storage unavailable, a newer stored
  version, ...), that message and every later one for that receiver wait in its *held* queue, in
  order, and are retried with a backoff.
- **Bounded.** A held queue keeps at most ``10 * mailbox_size`` messages. Beyond that the
  receiver is *spilled*: its new messages (and due timers) stay in storage only. Once its held
  queue has drained, a *refill* scan reads the stored rows again, in outbox order, and delivers
  those not already on their way, then the messages that came while it ran (up to the cap; they
  may be behind its cursor). If more came, or the queue filled up again, another refill follows:
  the receiver leaves the spilled set only after a refill that left nothing in storage.
- **Start.** ``recover`` reads every row due within the horizon, in outbox order (so each sender's
  messages in the order it sent them), before the world serves any call: a message committed
  before a crash is delivered before any message sent after the restart.
- **Dead letters.** A delivered message whose handler fails (``ActivationFailed``, ``Rejected``,
  ...) is consumed as a dead letter: kept in storage, counted, logged, never delivered again.

Mutable state, on the event loop only: ``held``, ``spilled``/``_missed``/``_refill``, ``doubt``,
``_heap``/``_timers``/``_names`` (timers in memory), ``_until``, ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from . import _faults
from ._codec import UNTYPED
from ._core._resident import Call, Resident
from ._errors import PachydermError, UnknownEntityType
from .backends._base import Consume, Envelope, EnvelopeId, Write

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["SINK", "Dispatcher"]

log = logging.getLogger("pachyderm")

_SCAN_PAGE: Final = 1000
_FIRE_BATCH: Final = 1000
_FIRST_RETRY: Final = 0.01
_LAST_RETRY: Final = 5.0
_COUNTED: Final = 4096
_STALE_TIMERS: Final = 1024
_HELD_PER_MAILBOX: Final = 10
_new_call = Call.__new__


class _Sink:
    """The future of a delivery: the engine is the caller, and needs no answer."""

    __slots__ = ()

    # `bool()` is False: asked once per delivery run, without a Python frame.
    done = cancelled = staticmethod(bool)

    def set_result(self, result: object) -> None:
        pass

    def set_exception(self, error: BaseException) -> None:
        pass

    def add_done_callback(self, fn: object) -> None:
        pass


SINK: Final[Any] = _Sink()


def delivering(resident: Resident, id: EnvelopeId) -> bool:
    """Whether the row ``id`` was delivered to ``resident`` and is not applied yet."""
    deliveries = resident.deliveries
    if isinstance(deliveries, tuple):
        return deliveries == id
    return deliveries is not None and id in deliveries


class Dispatcher:
    """Delivers the outbox of one world: see the module docstring."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.clock = engine.clock
        self.horizon = engine.options.timer_horizon
        self._mailbox_size = engine.options.mailbox_size
        # receiver ref -> envelopes waiting, in order, for room in its mailbox (or a retry).
        self.held: dict[tuple[str, str], deque[Envelope]] = {}
        self._cap = _HELD_PER_MAILBOX * self._mailbox_size  # the most held per receiver
        # Receivers with messages in storage only (their held queue was full): see `_refill_all`.
        self.spilled: set[tuple[str, str]] = set()
        self._missed: set[tuple[str, str]] = set()  # spilled ones that left a message in storage
        # The receivers a refill is scanning for, with the messages that came meanwhile (None:
        # more than the cap came; they are left in storage, and the receiver stays spilled).
        self._coming: dict[tuple[str, str], list[Envelope] | None] = {}
        self._refill = False  # a refill is due (the timer loop runs it)
        self._attempts: dict[tuple[str, str], int] = {}
        self._retry_at: dict[tuple[str, str], Any] = {}
        # Timers due within the horizon: a heap by due time; `_timers` says which are live.
        # (due, arrival number, id): timers of one due time fire in the order they came (a scan
        # brings them in outbox order). Only atoms in these tuples, so that the garbage
        # collector stops tracking them: 100k timers then cost its full passes nothing.
        self._heap: list[tuple[float, int, EnvelopeId]] = []
        self._arrivals = itertools.count()
        self._timers: dict[EnvelopeId, Envelope] = {}
        self._names: dict[tuple[str, str, str], EnvelopeId] = {}
        self._until = -math.inf  # every row due up to here is in memory (or delivered)
        self._wake: asyncio.Future[None] | None = None
        self._wake_at = math.inf
        self.closing = False
        self.recovered = False
        self._undeliverable: set[str] = set()
        # Rows sent by writes whose outcome is unknown, by sender: dispatched after the sender's
        # reload if they exist (they do if the write committed), before it commits anything else.
        self.doubt: dict[tuple[str, str], list[Envelope]] = {}
        # Rows such writes consumed, by receiver, with each write's (expected, version):
        # counted after the receiver's reload if the write committed.
        self.doubt_consumed: dict[tuple[str, str], list[tuple[int, int, tuple[Consume, ...]]]] = {}
        # Dead letters and timers counted, newest last. An OrderedDict: dropping the oldest is
        # O(1) (a dict's first key is found by skipping every deleted entry before it).
        self._counted: OrderedDict[EnvelopeId, None] = OrderedDict()
        # In a cluster (set by its node): `remote(envelope)` takes a message that is not for
        # this node to run now (True); `mine(ref)` says whose rows a scan keeps.
        self.remote: Callable[[Envelope], bool] | None = None
        self.mine: Callable[[tuple[str, str]], bool] | None = None
        self._sweep = False
        self.stats = {"delivered": 0, "timers_fired": 0, "dead_letters": 0, "redelivered": 0}

    # ------------------------------------------------------------------ start and stop

    async def recover(self) -> None:
        """Before serving: read every row due within the horizon, in outbox order.

        Messages go to held queues (nothing runs them before this returns, so nothing sent later
        can overtake them); timers to the heap. Then the held queues are flushed.
        Cancellation: the world does not start; rows stay in storage.
        """
        await self._scan(self.clock.wall() + self.horizon, hold=True)
        self.recovered = True
        for ref in list(self.held):
            self._flush(ref)

    def stop(self) -> None:
        """Deliver nothing more: what is not delivered stays in storage for the next start."""
        self.closing = True
        for handle in self._retry_at.values():
            handle.cancel()
        self._retry_at.clear()
        self._set_wake()

    async def _scan(self, until: float, *, hold: bool = False) -> None:
        """Bring into memory the rows due in (``_until``, ``until``], page by page."""
        since = self._until
        self._until = until  # rows committed from now on with due <= until go to the heap
        # Keys after (since, "", ...): rows due after `since` (and a few due exactly then).
        after: tuple[float, str, str, int, int] | None = (
            None if since == -math.inf else (since, "", "", -1, -1)
        )
        while True:
            page = await self.engine.backend.due(until, after=after, limit=_SCAN_PAGE)
            mine = self.mine
            for envelope in page:
                if (envelope.due > since or (envelope.due == 0.0 and hold)) and (
                    mine is None or mine((envelope.to_type, envelope.to_key))
                ):
                    self._arrive(envelope, hold=hold)
            if len(page) < _SCAN_PAGE:
                return
            after = page[-1].key()

    async def recover_partitions(self, wanted: Callable[[tuple[str, str]], bool]) -> None:
        """A cluster node claimed partitions: read the rows due to their entities, in order.

        Like ``recover`` for those entities: every message, and the timers due up to what is
        in memory, held first and then flushed. Cancellation: the rows stay in storage.
        """
        after: tuple[float, str, str, int, int] | None = None
        until = max(self._until, 0.0)
        while True:
            page = await self.engine.backend.due(until, after=after, limit=_SCAN_PAGE)
            for envelope in page:
                if wanted((envelope.to_type, envelope.to_key)):
                    self._arrive(envelope, hold=True)
            if len(page) < _SCAN_PAGE:
                break
            after = page[-1].key()
        for ref in [ref for ref in self.held if wanted(ref)]:
            self._flush(ref)

    def move_out(self, moved: Callable[[tuple[str, str]], bool]) -> None:
        """Entities left this node (a cluster): their held messages go to the node's router."""
        if self.spilled:  # their new owner reads the rows they have in storage
            gone = {ref for ref in self.spilled if moved(ref)}
            self.spilled -= gone
            self._missed -= gone
        remote = self.remote
        for ref in [ref for ref in self.held if moved(ref)]:
            handle = self._retry_at.pop(ref, None)
            if handle is not None:
                handle.cancel()
            self._attempts.pop(ref, None)
            envelopes = self.held.pop(ref)
            if remote is not None:
                for envelope in envelopes:
                    remote(envelope)

    def sweep_soon(self) -> None:
        """Read the stored messages of this node's entities again, soon (a cluster changed)."""
        self._sweep = True
        self._set_wake()

    async def _sweep_messages(self) -> None:
        """Deliver the stored messages to this node's entities (a cluster: a sender may have
        died before forwarding them). Duplicates of delivered ones are dropped or lose."""
        mine = self.mine
        assert mine is not None
        after: tuple[float, str, str, int, int] | None = None
        while not self.closing:
            page = await self.engine.backend.due(0.0, after=after, limit=_SCAN_PAGE)
            for envelope in page:
                if envelope.due == 0.0 and mine((envelope.to_type, envelope.to_key)):
                    resident = self.engine.residents.get((envelope.to_type, envelope.to_key))
                    if resident is None or not delivering(resident, envelope.id):
                        self.deliver(envelope)
            if len(page) < _SCAN_PAGE:
                return
            after = page[-1].key()

    async def _refill_all(self) -> None:
        """Read again the stored rows of the spilled receivers whose held queue has drained.

        One scan of the waiting rows (messages, then timers already fired), in outbox order, so
        each sender's messages in the order it sent them: those not already on their way are
        delivered. Timers in the heap fire from there. Messages that come while the scan runs
        (up to the cap) are kept aside, then delivered after it, unless it found them: each is
        later than every message of its sender that the scan found, since a sender's rows are
        committed in order. A receiver leaves ``spilled`` if nothing of it was left in storage;
        else (its queue filled up again, or more than the cap came meanwhile) it is refilled
        again once its queue drains (at once if it has none). Cancellation or a storage error:
        the receivers stay spilled, and the next scan of the timer loop tries again.
        """
        targets = {ref for ref in self.spilled if ref not in self.held}
        if not targets:
            return
        self._missed -= targets  # from now on: what the scan may not see
        coming = self._coming
        for ref in targets:
            coming[ref] = []
        try:
            found = await self._scan_for(set(targets))
        finally:
            late = {ref: coming.pop(ref, None) for ref in targets}
        if self.closing:
            return
        for ref in targets:
            arrived = late[ref]
            if arrived is None or ref in self._missed:
                continue  # left in storage: another refill
            for envelope in arrived:
                if envelope.id not in found and not self._admit(envelope, ref):
                    break  # full again (and marked missed): the rest waits in storage
        for ref in targets:
            if ref in self._missed:
                self._missed.discard(ref)
                if ref not in self.held:
                    self._refill = True  # none held: it can take them now
            else:
                self.spilled.discard(ref)

    async def _scan_for(self, targets: set[tuple[str, str]]) -> set[EnvelopeId]:
        """The refill's scan: deliver the waiting rows of ``targets``; return the ids found.

        A target whose held queue fills up again is dropped from ``targets`` (and marked
        missed by ``deliver``): the rest of its rows wait for its next refill. The scan stops
        when no target is left, so a refill reads about as many rows as it can deliver, not
        the whole backlog: its pages start at twice what its targets can take, and double.
        """
        found: set[EnvelopeId] = set()
        mine, timers = self.mine, self._timers
        after: tuple[float, str, str, int, int] | None = None
        # Timers due up to `_until` are in the heap (skipped here) or fired already; fired ones
        # may be among those left in storage, whatever the wall clock says now (it may have
        # stepped back since they fired).
        until = max(self.clock.wall(), self._until)
        limit = min(_SCAN_PAGE, 2 * self._cap * len(targets))
        while targets and not self.closing:
            page = await self.engine.backend.due(until, after=after, limit=limit)
            for envelope in page:
                ref = (envelope.to_type, envelope.to_key)
                if ref not in targets or envelope.id in timers:
                    continue
                if mine is not None and not mine(ref):
                    continue
                found.add(envelope.id)
                if not self._admit(envelope, ref):
                    targets.discard(ref)  # full again: the rest waits for the next refill
                    if not targets:
                        break
            if len(page) < limit:
                break
            after = page[-1].key()
            limit = min(_SCAN_PAGE, 2 * limit)
        return found

    def _admit(self, envelope: Envelope, ref: tuple[str, str]) -> bool:
        """A refill's delivery to a spilled receiver, unless it is on its way already.

        False: its held queue is full again (``deliver`` marked it missed). The class's own
        ``deliver``, since a simulation's network stands in for the instance's.
        """
        resident = self.engine.residents.get(ref)
        if resident is not None and delivering(resident, envelope.id):
            return True
        return Dispatcher.deliver(self, envelope, refill=True)

    def _arrive(self, envelope: Envelope, *, hold: bool) -> None:
        if envelope.due == 0.0:
            if hold:
                self._hold(envelope)
            else:
                self.deliver(envelope)
        elif envelope.id not in self._timers:
            self._add_timer(envelope)

    # ------------------------------------------------------------------ after a commit

    def committed(self, resident: Resident, write: Write) -> None:
        """A write committed (the output gate): act on its outbox rows."""
        outbox = write.outbox
        assert outbox is not None
        if self._attempts:
            self._attempts.pop(resident.ref, None)  # its deliveries work (again)
        consumes = outbox.consumes
        if consumes:
            deliveries = resident.deliveries
            if isinstance(deliveries, tuple) and len(consumes) == 1:  # the common case
                if deliveries == consumes[0].id:
                    resident.deliveries = None
            elif deliveries is not None:
                self.forget(resident, [consume.id for consume in consumes])
            for consume in consumes:
                if consume.dead is not None or consume.timer:
                    self._applied(resident.ref, [consume])
        for name in outbox.cancels:
            self._drop_name((write.type_name, write.key, name))
        self.sent(outbox.sends)

    def _applied(self, receiver: tuple[str, str], consumes: Sequence[Consume]) -> None:
        """Count (and log, for dead letters) the rows a committed write consumed.

        Once each: after a commit of unknown outcome, a row found gone may have been applied by
        an earlier commit and counted then (a duplicate delivery's write); the last
        ``_COUNTED`` rows counted are remembered for that.
        """
        counted = self._counted
        for consume in consumes:
            if consume.id in counted:
                continue
            counted[consume.id] = None
            if len(counted) > _COUNTED:
                counted.popitem(last=False)
            if consume.dead is not None:
                self.stats["dead_letters"] += 1
                log.warning(
                    "dead letter: the message %s to %s:%r failed and will not be delivered "
                    "again: %s",
                    consume.id,
                    *receiver,
                    consume.dead,
                )
            elif consume.timer:
                self.stats["timers_fired"] += 1

    def sent(self, sends: Sequence[Envelope]) -> None:
        """These rows are committed: deliver the messages, keep the near timers."""
        for envelope in sends:
            if envelope.due == 0.0:
                self.deliver(envelope)
                continue
            if envelope.name is not None:
                self._drop_name((envelope.sender_type, envelope.sender_key, envelope.name))
            if envelope.due <= self._until:
                self._add_timer(envelope)

    # ------------------------------------------------------------------ delivering

    def deliver(self, envelope: Envelope, *, refill: bool = False) -> bool:
        """Put a message in its receiver's mailbox (or behind the ones it holds).

        Returns False if it stays in storage only: the receiver is spilled (a refill brings
        it in, in order; ``refill`` is that refill's delivery) or its held queue is full.
        """
        if self.closing:
            return True  # it stays in storage, for the next start
        if self.remote is not None and self.remote(envelope):
            return True  # another node's entity (a cluster): forwarded
        ref = (envelope.to_type, envelope.to_key)
        if self.spilled and not refill and ref in self.spilled:
            coming = self._coming.get(ref)
            if coming is not None and len(coming) < self._cap:
                coming.append(envelope)  # a refill scans for it: it goes after what it finds
            else:
                self._coming.pop(ref, None)
                self._missed.add(ref)
            return False
        if self.held:
            held = self.held.get(ref)
            if held is not None:
                if len(held) >= self._cap:
                    self._spill(ref)
                    return False
                held.append(envelope)
                return True
        engine = self.engine
        resident = engine.residents.get(ref)
        if resident is None:
            try:
                info = engine.registry.by_name(envelope.to_type)
            except UnknownEntityType:
                self._unknown(envelope)
                return True
            resident = engine.resident(info, envelope.to_key)
        else:
            resident.hot = True
        if resident.queued >= self._mailbox_size:
            self.held[ref] = deque((envelope,))
            return True
        self._enqueue(resident, envelope)
        return True

    def _enqueue(self, resident: Resident, envelope: Envelope) -> None:
        id = envelope.id
        deliveries = resident.deliveries
        if deliveries is None:
            resident.deliveries = id
        elif isinstance(deliveries, tuple):
            if deliveries == id:
                return  # delivered already, not applied yet: this copy adds nothing
            resident.deliveries = {deliveries, id}
        elif id in deliveries:
            return
        else:
            deliveries.add(id)
        call = _new_call(Call)
        call.message = UNTYPED.decode(envelope.data)  # the receiver's own copy
        call.future = SINK
        call.idempotency_key = None
        call.version = None
        call.delivery = envelope
        call.effects = call.events = None
        self.engine.post(resident, call)
        self.stats["delivered"] += 1
        if _faults.hook is not None:
            _faults.point("delivered-before-commit")

    def _hold(self, envelope: Envelope) -> None:
        ref = (envelope.to_type, envelope.to_key)
        held = self.held.get(ref)
        if held is None:
            self.held[ref] = deque((envelope,))
        elif ref in self.spilled or len(held) >= self._cap:
            self._spill(ref)
        else:
            held.append(envelope)

    def _spill(self, ref: tuple[str, str]) -> None:
        """``ref``'s held queue is full: its further messages stay in storage, for a refill."""
        self.spilled.add(ref)
        self._missed.add(ref)  # a message of it was left there: it is refilled again

    def flush(self, resident: Resident) -> None:
        """The receiver made room: move held messages into its mailbox, in order."""
        if resident.ref not in self._retry_at:
            self._flush(resident.ref)

    def _flush(self, ref: tuple[str, str]) -> None:
        self._retry_at.pop(ref, None)
        held = self.held.get(ref)
        if held is None or self.closing:
            return
        if self.mine is not None and not self.mine(ref):
            self.move_out(lambda r: r == ref)  # it left this node meanwhile
            return
        engine = self.engine
        try:
            info = engine.registry.by_name(ref[0])
        except UnknownEntityType:
            for envelope in self.held.pop(ref):
                self._unknown(envelope)
            return
        resident = engine.resident(info, ref[1])
        room = self._mailbox_size - resident.queued
        while held and room > 0:
            self._enqueue(resident, held.popleft())
            room -= 1
        if not held:
            del self.held[ref]
            self._drained(ref)

    def _drained(self, ref: tuple[str, str]) -> None:
        """``ref``'s held queue is gone: if it is spilled, bring in what waits in storage."""
        if ref in self.spilled:
            self._refill = True
            self._set_wake()

    def retry(self, resident: Resident, calls: list[Call]) -> None:
        """These deliveries could not be applied now (not the handler's fault): try again later.

        They go to the front of the receiver's held queue, in order, ahead of anything newer.
        """
        envelopes = [c.delivery for c in calls if c.delivery is not None]
        if not envelopes:
            return
        self.forget(resident, [e.id for e in envelopes])
        ref = resident.ref
        held = self.held.setdefault(ref, deque())
        held.extendleft(reversed(envelopes))
        self.stats["redelivered"] += len(envelopes)
        attempt = self._attempts.get(ref, 0)
        self._attempts[ref] = attempt + 1
        if ref not in self._retry_at and not self.closing:
            delay = min(_FIRST_RETRY * 2**attempt, _LAST_RETRY)
            self._retry_at[ref] = self.clock.call_later(delay, self._flush, ref)

    @staticmethod
    def forget(resident: Resident, ids: list[EnvelopeId]) -> None:
        """These rows are no longer delivered to ``resident`` (applied, gone or retried)."""
        deliveries = resident.deliveries
        if isinstance(deliveries, tuple):
            if deliveries in ids:
                resident.deliveries = None
        elif deliveries is not None:
            deliveries.difference_update(ids)
            if not deliveries:
                resident.deliveries = None

    def _unknown(self, envelope: Envelope) -> None:
        if envelope.to_type not in self._undeliverable:
            self._undeliverable.add(envelope.to_type)
            log.error(
                "messages to %r stay in the outbox: this world has no entity type of that name",
                envelope.to_type,
            )

    # ------------------------------------------------------------------ after a failure

    def take_back(self, resident: Resident, failed: list[Call]) -> None:
        """Deliveries among ``failed`` could not be applied (not the handler's fault).

        They, and every other delivery this resident holds (so that none overtakes them), go to
        the front of its held queue, in order, to be retried. ``failed`` keeps the others.
        """
        if not any(c.delivery is not None for c in failed):
            return
        mine = [c for c in failed if c.delivery is not None]
        failed[:] = [c for c in failed if c.delivery is None]
        for name in ("pending", "running", "mailbox"):
            if name == "running":  # an async handler runs one, after the pending ones
                running = resident.running
                if running is not None and running[0].delivery is not None:
                    resident.running = None  # its result will be dropped
                    if running[1] is not None:
                        running[1].cancel()
                    mine.append(running[0])
                continue
            calls = getattr(resident, name)
            if calls and any(c.delivery is not None for c in calls):
                mine += [c for c in calls if c.delivery is not None]
                rest = [c for c in calls if c.delivery is None]
                setattr(resident, name, rest or None)
        resident.queued -= len(mine)
        self.retry(resident, mine)

    def in_doubt(self, residents: list[Resident]) -> list[Resident]:
        """Those of ``residents`` (being loaded) that sent rows in a commit of unknown outcome."""
        if not (self.doubt or self.doubt_consumed):
            return []
        return [r for r in residents if r.ref in self.doubt or r.ref in self.doubt_consumed]

    async def resolve_doubt(self, residents: list[Resident], stored: dict[Any, int]) -> None:
        """After a commit of unknown outcome: dispatch the rows it sent, if it did commit.

        ``stored`` is each resident's version as just loaded. A sent row exists only if its
        write committed. A consumed row is gone if its write committed, or if it was gone
        already (a duplicate delivery, a cancelled timer): where the write moved the entity's
        version, the stored version says which (nothing else of the entity ran since); a write
        that only consumed rows is taken to have committed if they are gone. Those it applied
        are counted, and dead letters logged, as after any commit, and dropped from the held
        queue (they were taken back to be retried).
        """
        for resident in residents:
            ref = resident.ref
            sends = self.doubt.get(ref, [])
            writes = self.doubt_consumed.get(ref, [])
            consumed = [c for _, _, consumes in writes for c in consumes]
            alive = await self.engine.backend.exists(
                [e.id for e in sends] + [c.id for c in consumed]
            )
            self.doubt.pop(ref, None)
            self.doubt_consumed.pop(ref, None)
            split = len(sends)
            self.sent([e for e, ok in zip(sends, alive[:split], strict=True) if ok])
            found = dict(zip([c.id for c in consumed], alive[split:], strict=True))
            gone = [
                c
                for expected, version, consumes in writes
                if version == expected or stored.get(ref, 0) >= version
                for c in consumes
                if not found[c.id]
            ]
            self._applied(ref, gone)
            held = self.held.get(ref)
            if gone and held:  # taken back to be retried, and applied after all: drop them
                applied = {c.id for c in gone}
                kept = deque(e for e in held if e.id not in applied)
                if kept:
                    self.held[ref] = kept
                else:
                    del self.held[ref]
                    self._drained(ref)

    async def recheck(self, residents: list[Resident]) -> None:
        """Drop the deliveries whose outbox row is gone (applied or cancelled meanwhile).

        Called after a lost write, before its reruns: one ``exists`` for all their deliveries.
        """
        for resident in residents:
            resident.recheck = False
        waiting = [
            (resident, call)
            for resident in residents
            for call in resident.mailbox or ()
            if call.delivery is not None
        ]
        if not waiting:
            return
        alive = await self.engine.backend.exists([c.delivery.id for _, c in waiting])  # type: ignore[union-attr]
        gone = [(r, c) for (r, c), ok in zip(waiting, alive, strict=True) if not ok]
        for resident in dict.fromkeys(r for r, _ in gone):  # in order: deterministic
            drop = {id(c) for r, c in gone if r is resident}
            mailbox = resident.mailbox or []
            resident.mailbox = [c for c in mailbox if id(c) not in drop] or None
            resident.queued -= len(mailbox) - len(resident.mailbox or ())
            self.forget(resident, [c.delivery.id for r, c in gone if r is resident])  # type: ignore[union-attr]
        for resident in residents:
            if resident.ref in self.held:
                self.flush(resident)  # the dropped ones made room in its mailbox

    # ------------------------------------------------------------------ timers

    def _add_timer(self, envelope: Envelope) -> None:
        id = envelope.id
        self._timers[id] = envelope
        if envelope.name is not None:
            self._names[(envelope.sender_type, envelope.sender_key, envelope.name)] = id
        heap = self._heap
        heapq.heappush(heap, (envelope.due, next(self._arrivals), id))
        if len(heap) > 2 * len(self._timers) + _STALE_TIMERS:
            # Replaced and cancelled timers leave their entries behind until their due time:
            # drop them now, in place (`run` holds the list). At least half the heap is stale
            # here, so this costs O(1) per timer added.
            timers = self._timers
            heap[:] = [entry for entry in heap if entry[2] in timers]
            heapq.heapify(heap)
        if envelope.due < self._wake_at:
            self._set_wake()

    def _drop_name(self, name: tuple[str, str, str]) -> None:
        id = self._names.pop(name, None)
        if id is not None:
            self._timers.pop(id, None)

    def _set_wake(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def run(self) -> None:
        """The timer loop: fire due timers; every half horizon, bring the next rows in."""
        loop = asyncio.get_running_loop()
        next_scan = self.clock.wall() + self.horizon / 2
        heap, timers = self._heap, self._timers
        while not self.closing:
            now = self.clock.wall()
            if now >= next_scan or self._sweep:
                next_scan = now + self.horizon / 2
                sweep, self._sweep = self.mine is not None, False
                self._refill = self._refill or bool(self.spilled)  # one that failed, say
                with contextlib.suppress(PachydermError):  # storage away: try at the next one
                    await self._scan(now + self.horizon)
                    if sweep:
                        await self._sweep_messages()
                continue  # time moved while it scanned
            if self._refill:
                self._refill = False
                with contextlib.suppress(PachydermError):  # storage away: the next scan retries
                    await self._refill_all()
                continue
            fired = 0
            while heap and heap[0][0] <= now and fired < _FIRE_BATCH:
                envelope = timers.pop(heapq.heappop(heap)[2], None)
                if envelope is None:
                    continue  # cancelled or replaced
                if envelope.name is not None:
                    self._names.pop(
                        (envelope.sender_type, envelope.sender_key, envelope.name), None
                    )
                self.deliver(envelope)
                fired += 1
            if fired == _FIRE_BATCH:
                # More are due: let the runner apply these first (memory stays bounded).
                while self.engine.ready and not self.closing:  # noqa: ASYNC110 - one turn each
                    await asyncio.sleep(0)
                continue
            self._wake_at = min(next_scan, heap[0][0] if heap else math.inf)
            wake = self._wake = loop.create_future()
            handle = self.clock.call_later(max(0.0, self._wake_at - now), _set_done, wake)
            try:
                await wake
            finally:
                handle.cancel()
                self._wake_at = -math.inf

    def counts(self) -> dict[str, int]:
        return {
            "held": sum(len(h) for h in self.held.values()),
            "timers_in_memory": len(self._timers),
        }


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
