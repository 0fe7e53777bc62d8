"""World options, grouped in one frozen object and checked once."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from ._errors import InvalidOptions

__all__ = ["WorldOptions"]


@dataclass(frozen=True, kw_only=True, slots=True)
class WorldOptions:
    """The tunables of a world. Every field is keyword-only and checked when the world is made.

    Attributes:
        mailbox_size: calls accepted per entity and not yet answered; one more gets ``Overloaded``.
        activation_timeout: seconds one ``async def`` handler run may take (``None``: no bound);
            it is cancelled at the bound. A plain handler cannot be interrupted and is not timed.
        call_timeout: default ``timeout`` of ``activate`` (``None``: wait as long as it takes).
        max_state_bytes: the largest encoded state accepted (``TooLarge`` beyond).
        idle_after: seconds after which an entity with nothing to do leaves memory.
        max_resident: the most entities held in memory; beyond it the least recently used idle
            ones leave first (entities with calls in progress cannot leave: a burst of more
            busy entities than this exceeds it until they are idle).
        follower_buffer: versions buffered per follower; a slower follower skips ahead.
        receipt_ttl: seconds an idempotency key is remembered after its commit.
        turn_budget: messages one entity may run before others get their turn (fairness).
        max_batch: the most entities the runner takes in one turn, so the most entity writes
            sent to the backend in one commit (``None``: the backend's ``max_batch``, 500 for
            ``SQLite`` and 1000 for the others).
        max_effects: the most effects (sends, timers, cancels) one activation may return
            (``TooManyEffects`` beyond).
        max_message_bytes: the largest encoded message a send or a timer may carry
            (``TooLarge`` beyond).
        timer_horizon: seconds of timers held in memory: timers due within it wait in a heap,
            later ones in storage only, brought in by a scan every half horizon.
        lease: (a cluster) seconds a node's partition leases last, in the database's time. A
            node renews them every ``lease / 5`` seconds and stops serving them ``lease / 5``
            before they would expire unrenewed; after a crash its partitions are taken over
            within about ``lease + lease / 5`` seconds (the takeover bound; docs/cluster.md).
        partitions: (a cluster) the number of partitions of the world, fixed by its first node.
    """

    mailbox_size: int = 1000
    activation_timeout: float | None = 30.0
    call_timeout: float | None = None
    max_state_bytes: int = 1 << 20
    idle_after: float = 60.0
    max_resident: int = 100_000
    follower_buffer: int = 64
    receipt_ttl: float = 24 * 3600.0
    turn_budget: int = 128
    max_batch: int | None = None
    max_effects: int = 100
    max_message_bytes: int = 256 * 1024
    timer_horizon: float = 60.0
    lease: float = 5.0
    partitions: int = 256

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            optional = f.name in ("activation_timeout", "call_timeout", "max_batch")
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidOptions(f"{f.name} must be a number; got {value!r}")
            if f.type in ("int", "int | None") and not isinstance(value, int):
                raise InvalidOptions(f"{f.name} must be an int; got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise InvalidOptions(f"{f.name} must be finite and > 0; got {value!r}")

    @classmethod
    def build(cls, base: WorldOptions | None, overrides: dict[str, object]) -> WorldOptions:
        """Return ``base`` (or the defaults) with ``overrides`` applied; refuse unknown names."""
        if base is not None and not isinstance(base, WorldOptions):
            raise InvalidOptions(f"options is a pachyderm.WorldOptions; got {base!r:.80}")
        if not overrides:
            return base if base is not None else _defaults()
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidOptions(f"unknown world options: {', '.join(unknown)}")
        base = base if base is not None else cls()
        try:
            return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]
        except TypeError as exc:
            raise InvalidOptions(str(exc)) from exc


@functools.cache
def _defaults() -> WorldOptions:
    """The default options, checked once (they are frozen: one object serves every world)."""
    return WorldOptions()
