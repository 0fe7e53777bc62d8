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
    from ._core._resident import Resident
    from ._engine import Engine

__all__ = ["evict_over_limit", "sweep"]

_EVICT_STEPS: Final = 64


def _passivate(engine: Engine, resident: Resident) -> None:
    """The quiescent ``resident`` leaves memory."""
    del engine.residents[resident.ref]
    engine.stats["passivated"] += 1


def evict_over_limit(engine: Engine) -> None:
    """Passivate idle entities, least recently used first (CLOCK), until under the limit.

    The hand moves at most `_EVICT_STEPS` places per new resident, so a burst of busy
    entities (which cannot leave) costs O(1) per call; the limit is then exceeded until they
    are idle, by at most the number of entities with calls in progress.
    """
    order, residents = engine.order, engine.residents
    excess = len(residents) - engine.options.max_resident
    if excess <= 0:
        return
    for _ in range(min(_EVICT_STEPS, len(order))):
        resident = order.popleft()
        if residents.get(resident.ref) is not resident:
            continue  # already gone: drop its place
        if resident.hot:
            resident.hot = False
        elif resident.quiescent():
            _passivate(engine, resident)
            excess -= 1
            if excess <= 0:
                return
            continue
        order.append(resident)


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
        for _ in range(len(order)):  # one full turn of the hand
            resident = order.popleft()
            if residents.get(resident.ref) is not resident:
                continue
            if resident.used <= cutoff and resident.quiescent():
                _passivate(engine, resident)
                continue
            order.append(resident)
        if now >= next_prune:
            next_prune = now + min(options.receipt_ttl / 10, 3600.0)
            with contextlib.suppress(PachydermError):
                await engine.backend.prune_receipts(clock.wall() - options.receipt_ttl)
