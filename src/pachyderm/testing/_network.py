"""The simulated network between senders and receivers: where a simulation chooses and injects.

Every message the world's dispatcher would put in a mailbox (sends, self-sends, due timers) and
every call a test submits goes through here instead, into a FIFO queue per (sender, receiver)
pair. When the event loop has nothing else to do, the simulation asks ``step()`` to deliver:

- in *rounds* (the default): everything deliverable, pairs interleaved in an order drawn from the
  seed (a random merge: each pair stays in order, because per-pair FIFO is a promise);
- one at a time (``explore``): the chooser picks which pair's head goes next.

Faults act here too, drawn from the seed or armed on demand: a message delivered twice (the copy
goes to the back of its pair's queue), a pair held back for a while (the others overtake it).
Nothing here decides whether a message is applied: the real dispatcher and engine do, as in
production.

Mutable state, on the simulation's loop only: ``arrived``, ``pairs``, ``not_before``, ``armed``,
``delivered``, ``log``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import InvalidOptions
from ..backends._base import Envelope

if TYPE_CHECKING:
    from ._loop import VirtualLoop

__all__ = ["Chooser", "ClientCall", "Faults", "Network", "Pair"]

#: ``(sender type, sender key, receiver type, receiver key)``; a test's calls come from the
#: sender ``("client", name)``.
Pair = tuple[str, str, str, str]


@dataclass(frozen=True, kw_only=True, slots=True)
class Faults:
    """How often each fault is injected: probabilities drawn from the simulation's seed.

    Attributes:
        duplicate: that a delivered message (or due timer) is delivered a second time, later.
        delay: that a pair's next delivery is held back by up to ``max_delay`` virtual seconds,
            so that other pairs overtake it (its own messages stay in order).
        max_delay: the longest hold, in virtual seconds.
        crash_before_commit: that a commit fails before anything is written; its callers see
            ``Indeterminate``.
        crash_after_commit: that a commit is written and then fails before the reply; its
            callers see ``Indeterminate`` although it committed.
    """

    duplicate: float = 0.0
    delay: float = 0.0
    max_delay: float = 1.0
    crash_before_commit: float = 0.0
    crash_after_commit: float = 0.0

    def __post_init__(self) -> None:
        for name in ("duplicate", "delay", "crash_before_commit", "crash_after_commit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise InvalidOptions(f"Faults.{name} is a probability in [0, 1]; got {value!r}")
        value = self.max_delay
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
            raise InvalidOptions(f"Faults.max_delay is seconds > 0; got {value!r}")

    def __bool__(self) -> bool:
        return any((self.duplicate, self.delay, self.crash_before_commit, self.crash_after_commit))


class Chooser(Protocol):
    """Picks one of ``n`` options (``0 <= choice < n``) at a choice point."""

    def choose(self, n: int) -> int: ...


class ClientCall:
    """A call a test submitted: delivered like a message, then run by ``World.activate``."""

    __slots__ = ("idempotency_key", "message", "pair", "ref", "reply", "timeout", "to_key")

    def __init__(
        self,
        ref: tuple[type, str],
        message: Any,
        idempotency_key: str | None,
        timeout: float | None,
        reply: Any,
    ) -> None:
        self.ref = ref
        self.message = message
        self.idempotency_key = idempotency_key
        self.timeout = timeout
        self.reply = reply  # the test's `Pending`
        self.pair: Pair = ("client", "", "", "")  # set when submitted
        self.to_key = ""  # the receiver's key, as an envelope has it (set when submitted)


Item = Envelope | ClientCall


class Network:
    """The pairs' queues and the delivery policy: see the module docstring."""

    def __init__(
        self,
        loop: VirtualLoop,
        rng: random.Random,
        faults: Faults,
        *,
        deliver: Callable[[Envelope], object],
        call: Callable[[ClientCall], None],
        note: Callable[[str], None],
        chooser: Chooser | None = None,
    ) -> None:
        self.loop = loop
        self.rng = rng
        self.faults = faults
        self.deliver = deliver  # the real dispatcher's `deliver` (changes on restart)
        self.call = call
        self.note = note  # records an injected fault
        self.chooser = chooser
        # What arrived since the last step, in arrival order; the pairs' queues are made of it
        # when a step needs them (faults, explore), and keep what a fault held back.
        self.arrived: list[Item] = []
        self.pairs: dict[Pair, deque[Item]] = {}
        self.not_before: dict[Pair, float] = {}
        self.delivered = 0
        #: Descriptions of the deliveries, in order, when the chooser wants them (else None).
        self.log: list[str] | None = [] if chooser is not None else None
        # One-shot faults armed by the test: (kind, receiver or None, seconds).
        self.armed: list[tuple[str, tuple[str, str] | None, float]] = []

    # ------------------------------------------------------------------ in

    def accept(self, envelope: Envelope) -> None:
        """The dispatcher hands over a message (in place of putting it in the mailbox)."""
        self.arrived.append(envelope)

    def submit(self, client: str, to: tuple[str, str], call: ClientCall) -> None:
        call.pair = ("client", client, *to)
        call.to_key = to[1]
        self.arrived.append(call)

    def _queue(self, pair: Pair, item: Item) -> None:
        queue = self.pairs.get(pair)
        if queue is None:
            self.pairs[pair] = deque((item,))
        else:
            queue.append(item)

    def _sort(self) -> None:
        """Move what arrived into the pairs' queues, in arrival order."""
        arrived, self.arrived = self.arrived, []
        for item in arrived:
            self._queue(_pair(item), item)

    def empty(self) -> bool:
        return not (self.arrived or self.pairs)

    def pending(self) -> int:
        return len(self.arrived) + sum(len(q) for q in self.pairs.values())

    def drop_messages(self) -> list[ClientCall]:
        """A crash: messages in flight are gone (storage still has them); return the calls."""
        self._sort()
        calls = [i for q in self.pairs.values() for i in q if isinstance(i, ClientCall)]
        self.pairs.clear()
        self.not_before.clear()
        return calls

    # ------------------------------------------------------------------ out

    def step(self) -> bool:
        """Deliver what the policy says now; return True if anything was delivered."""
        if not self.pairs:
            if not self.arrived:
                return False
            if self.chooser is None and not (self.faults or self.armed) and self.log is None:
                self._merge()
                return True
        self._sort()
        now = self.loop.now
        not_before = self.not_before
        ready = [p for p in self.pairs if not_before.get(p, 0.0) <= now]
        if not ready:
            return False
        if self.chooser is not None:
            # One at a time, the explorer's choice (a choice point only if there is a choice).
            pair = ready[self.chooser.choose(len(ready))] if len(ready) > 1 else ready[0]
            return self._pop(pair, now)
        # A round: every deliverable item, in a random merge of the pairs.
        budget = sum(len(self.pairs[p]) for p in ready)
        sent = False
        random = self.rng.random
        while ready and budget > 0:
            i = int(random() * len(ready))
            pair = ready[i]
            delivered = self._pop(pair, now)
            sent = sent or delivered
            budget -= 1
            if pair not in self.pairs or not_before.get(pair, 0.0) > now:
                ready[i] = ready[-1]
                ready.pop()
        return sent

    def _merge(self) -> None:
        """A round with no fault to draw, straight from the arrivals: a uniform random merge.

        Each item gets a random key, the keys of one pair are handed out in its arrival order
        (sorted), and the items go out by key: every interleaving that keeps each pair's order
        is as likely. Delivering adds nothing to ``arrived`` (it fills mailboxes), so the round
        is exactly what had arrived.
        """
        items, self.arrived = self.arrived, []
        random = self.rng.random
        keys = [random() for _ in items]
        # A pair can repeat only where a receiver's key does: those are found first, by the key
        # alone (a str, whose hash is kept), and pairs are made for their items only.
        first: dict[str, int] = {}
        shared: set[str] | None = None
        for i, item in enumerate(items):
            to_key = item.to_key
            if first.setdefault(to_key, i) != i:
                if shared is None:
                    shared = set()
                shared.add(to_key)
        if shared:
            by_pair: dict[Pair, list[int]] = {}
            for i, item in enumerate(items):
                if item.to_key in shared:
                    by_pair.setdefault(_pair(item), []).append(i)
            for indexes in by_pair.values():
                if len(indexes) > 1:
                    for i, key in zip(indexes, sorted(keys[i] for i in indexes), strict=True):
                        keys[i] = key
        deliver, call = self.deliver, self.call
        for i in sorted(range(len(items)), key=keys.__getitem__):
            item = items[i]
            if type(item) is ClientCall:
                call(item)
            else:
                deliver(item)  # type: ignore[arg-type]
        self.delivered += len(items)

    def _pop(self, pair: Pair, now: float) -> bool:
        queue = self.pairs[pair]
        item = queue[0]
        chaos = self.faults or self.armed
        if chaos:
            hold = self._hold(pair, item)
            if hold > 0.0:
                self.not_before[pair] = now + hold
                self.loop.call_at(now + hold, _nothing)  # time jumps there if nothing else runs
                return False
        queue.popleft()
        if not queue:
            del self.pairs[pair]
            if chaos:
                self.not_before.pop(pair, None)
        self.delivered += 1
        if self.log is not None:
            self.log.append(_describe(pair, item))
        if type(item) is ClientCall:
            self.call(item)
            return True
        if chaos and self._twice(pair, item):  # type: ignore[arg-type]
            self._queue(pair, item)  # the copy arrives later, behind the pair's newer ones
        self.deliver(item)  # type: ignore[arg-type]
        return True

    def _hold(self, pair: Pair, item: Item) -> float:
        if self.not_before.pop(pair, None) is not None:
            return 0.0  # it was held already: it goes now
        seconds = self._armed("delay", (pair[2], pair[3]))
        if seconds is None and self.faults.delay and self.rng.random() < self.faults.delay:
            seconds = self.rng.uniform(0.0, self.faults.max_delay)
        if not seconds:
            return 0.0
        self.note(f"delayed {seconds:.3f} s: {_describe(pair, item)}")
        return seconds

    def _twice(self, pair: Pair, envelope: Envelope) -> bool:
        twice = self._armed("duplicate", (pair[2], pair[3])) is not None or bool(
            self.faults.duplicate and self.rng.random() < self.faults.duplicate
        )
        if twice:
            self.note(f"duplicated: {_describe(pair, envelope)}")
        return twice

    def _armed(self, kind: str, to: tuple[str, str]) -> float | None:
        for i, (k, target, seconds) in enumerate(self.armed):
            if k == kind and (target is None or target == to):
                del self.armed[i]
                return seconds
        return None


def _pair(item: Item) -> Pair:
    if type(item) is ClientCall:
        return item.pair
    return (item.sender_type, item.sender_key, item.to_type, item.to_key)  # type: ignore[union-attr]


def _describe(pair: Pair, item: Item) -> str:
    st, sk, rt, rk = pair
    what = (
        f"call {item.message!r:.60}"
        if isinstance(item, ClientCall)
        else (f"timer {item.id}" if item.due else f"message {item.id}")
    )
    return f"{st}:{sk!r} -> {rt}:{rk!r}, {what}"


def _nothing() -> None:
    pass
