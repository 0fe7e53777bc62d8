"""Passivation: idle entities leave memory (and old idempotency receipts are pruned).

Two ways out, both through the engine's CLOCK hand (``Engine.order``, every resident once,
oldest first; an access only sets ``resident.hot``): ``evict_over_limit`` when there are more
residents than ``max_resident``, and the periodic ``sweep`` of those idle for ``idle_after``.
Only quiescent residents leave (nothing queued, running or committing); they are loaded again on
their next use, and their followers do not notice.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final

from ._errors import PachydermError

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["evict_over_limit", "sweep"]

_EVICT_STEPS: Final = 64
_EVICT_SLACK: Final = 64


def evict_over_limit(engine: Engine) -> None:
    """Passivate idle entities, least recently used first (CLOCK), until under the limit.

    Called when there are more residents than ``max_resident``. It passivates a few more than
    the excess (``max_resident // 256``, at most 64) so that the next misses find room without
    moving the hand: the hand's work is then done once per few dozen misses, in one loop.

    The hand moves at most `_EVICT_STEPS` places per entity it may passivate, so a burst of busy
    entities (which cannot leave) costs O(1) per call; the limit is then exceeded until they
    are idle, by at most the number of entities with calls in progress.
    """
    order, residents = engine.order, engine.residents
    limit = engine.options.max_resident
    excess = len(residents) - limit
    if excess <= 0:
        return
    excess += min(limit >> 8, _EVICT_SLACK)
    popleft, append = order.popleft, order.append
    passivated = 0
    for _ in range(min(_EVICT_STEPS * excess, len(order))):
        resident = popleft()
        if residents.get(resident.ref) is not resident:
            continue  # already gone: drop its place
        if resident.hot:
            resident.hot = False
        elif resident.quiescent():
            del residents[resident.ref]  # it leaves memory (counted once, below)
            passivated += 1
            if passivated >= excess:
                break
            continue
        append(resident)
    engine.stats["passivated"] += passivated


async def sweep(engine: Engine) -> None:
    """Passivate idle entities and expire old idempotency receipts, periodically (a task).

    Cancellation stops it between two turns of the hand; nothing is half done.
    """
    options, clock = engine.options, engine.clock
    interval = max(min(options.idle_after / 2, 60.0), 0.01)
    next_prune = 0.0
    order, residents = engine.order, engine.residents
    while True:
        await clock.sleep(interval)
        now = clock.monotonic()
        cutoff = now - options.idle_after
        passivated = 0
        for _ in range(len(order)):  # one full turn of the hand
            resident = order.popleft()
            if residents.get(resident.ref) is not resident:
                continue
            if resident.used <= cutoff and resident.quiescent():
                del residents[resident.ref]  # it leaves memory (counted once, below)
                passivated += 1
                continue
            order.append(resident)
        engine.stats["passivated"] += passivated
        if now >= next_prune:
            next_prune = now + min(options.receipt_ttl / 10, 3600.0)
            with contextlib.suppress(PachydermError):
                await engine.backend.prune_receipts(clock.wall() - options.receipt_ttl)
