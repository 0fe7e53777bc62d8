"""``explore``: run a small scenario under every delivery order, and collect the final worlds.

Stateless model checking, as the original library's ``Simulation.exhaust``: each run starts a fresh
``Simulation``, calls ``setup(sim)``, and runs it to rest, delivering one message (or call) at a
time. Where several (sender, receiver) pairs have something to deliver, that is a *choice point*:
the run takes the option its schedule says. After the run the explorer backtracks (depth first) to
the deepest choice point with an option not yet tried, and replays from the start with that
prefix. Choice points beyond ``max_depth`` always take their first option, so the search is
complete up to that depth; ``max_runs`` bounds it in any case (``Exploration.complete`` says
whether every schedule within the depth was run). ``sample=True`` draws ``max_runs`` random
schedules from the seed instead.

Per-pair FIFO is kept in every schedule: it is a promise of the runtime, not a choice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._entity import Entity
from .._errors import InvalidOptions
from ._network import Faults
from ._simulation import Simulation

__all__ = ["Exploration", "FinalWorld", "Schedule", "explore"]


@dataclass(frozen=True, slots=True)
class Schedule:
    """One run: the option taken at each choice point, and the deliveries in the order made."""

    choices: tuple[int, ...]
    deliveries: tuple[str, ...]


@dataclass(slots=True)
class FinalWorld(Mapping[Any, Any]):
    """A distinct final world: every stored state, and the schedules that ended in it.

    A mapping from ``(type name, key)`` (or ``(EntityType, key)``) to the entity's final state.
    """

    states: dict[tuple[str, str], Any]
    schedules: list[Schedule] = field(default_factory=list)

    def __getitem__(self, ref: Any) -> Any:
        kind, key = ref
        name = kind if isinstance(kind, str) else getattr(kind, "name", kind)
        return self.states[(name, key)]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)

    def __hash__(self) -> int:  # a Mapping is not hashable; a FinalWorld is compared by identity
        return id(self)


@dataclass(slots=True)
class Exploration:
    """What ``explore`` found.

    Attributes:
        worlds: the distinct final worlds, in the order first reached.
        runs: how many schedules were run.
        complete: True if every schedule within ``max_depth`` was run (never with sampling).
        max_choice_points: the most choice points one run met.
        seconds: wall-clock time the exploration took.
    """

    worlds: list[FinalWorld]
    runs: int
    complete: bool
    max_choice_points: int
    seconds: float


class _Schedule:
    """A chooser that replays a prefix, then takes option 0 (or a random one), recording all."""

    def __init__(self, prefix: list[int], rng: random.Random | None) -> None:
        self.prefix = prefix
        self.rng = rng
        self.choices: list[int] = []
        self.widths: list[int] = []

    def choose(self, n: int) -> int:
        i = len(self.choices)
        if i < len(self.prefix):
            choice = min(self.prefix[i], n - 1)
        elif self.rng is not None:
            choice = self.rng.randrange(n)
        else:
            choice = 0
        self.choices.append(choice)
        self.widths.append(n)
        return choice


def explore(
    setup: Callable[[Simulation], object],
    *,
    entities: Iterable[type[Entity]],
    max_depth: int = 20,
    max_runs: int = 1000,
    sample: bool = False,
    seed: int = 0,
    faults: Faults | None = None,
    check: Callable[[Simulation], object] | None = None,
    **options: Any,
) -> Exploration:
    """Run ``setup``'s scenario under every delivery order (or ``max_runs`` sampled ones).

    Args:
        setup: called with a fresh ``Simulation`` at the start of each run; it submits calls
            (``sim.submit``) or makes activations. The run then goes on until the world rests.
        entities: the entity types.
        max_depth: choice points beyond this depth take their first option.
        max_runs: the most runs.
        sample: draw random schedules (from ``seed``) instead of enumerating them.
        seed: the simulations' seed (faults, and sampled schedules).
        faults: faults drawn in every run (``Faults``), none by default.
        check: called with the simulation after each run, for assertions on its history.
        options: world options.

    Returns:
        An ``Exploration``: each distinct final world with the schedules that reached it.
    """
    if not callable(setup):
        raise InvalidOptions(f"setup is a function of the simulation; got {setup!r:.60}")
    for name, value in (("max_depth", max_depth), ("max_runs", max_runs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidOptions(f"{name} is an int >= 1; got {value!r}")
    entities = tuple(entities)
    started = time.perf_counter()
    worlds: dict[tuple[tuple[str, str, bytes], ...], FinalWorld] = {}
    prefix: list[int] | None = []
    runs = deepest = 0
    sampler = random.Random(seed) if sample else None
    while prefix is not None and runs < max_runs:
        schedule = _Schedule(prefix, sampler)
        with Simulation(entities, seed=seed, faults=faults, chooser=schedule, **options) as sim:
            setup(sim)
            sim.run()
            if check is not None:
                check(sim)
            fingerprint = _fingerprint(sim)
            world = worlds.get(fingerprint)
            if world is None:
                world = worlds[fingerprint] = FinalWorld(sim.states())
            world.schedules.append(Schedule(tuple(schedule.choices), tuple(sim.network.log or ())))
        runs += 1
        deepest = max(deepest, len(schedule.choices))
        if not sample:
            prefix = _next_prefix(schedule, max_depth)
    return Exploration(
        worlds=list(worlds.values()),
        runs=runs,
        complete=prefix is None,
        max_choice_points=deepest,
        seconds=time.perf_counter() - started,
    )


def _next_prefix(schedule: _Schedule, max_depth: int) -> list[int] | None:
    """The next schedule depth first: bump the deepest choice that has an option left."""
    choices, widths = schedule.choices, schedule.widths
    for j in range(min(len(choices), max_depth) - 1, -1, -1):
        if choices[j] + 1 < widths[j]:
            return [*choices[:j], choices[j] + 1]
    return None


def _fingerprint(sim: Simulation) -> tuple[tuple[str, str, bytes], ...]:
    """The stored bytes of every entity: equal bytes, equal worlds."""
    space = sim.backend._spaces.get(sim.world.name)
    if space is None:
        return ()
    return tuple(
        (type_name, key, row.data)
        for type_name in sorted(space.rows)
        for key, row in sorted(space.rows[type_name].items())
    )
