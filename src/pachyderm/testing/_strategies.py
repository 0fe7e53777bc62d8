"""A Hypothesis strategy of simulation schedules (Hypothesis is imported only when it is used)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ._network import Faults

__all__ = ["ScheduleDraw", "schedules"]


@dataclass(frozen=True, slots=True)
class ScheduleDraw:
    """A random schedule: a seed and the faults drawn with it. ``Simulation(**draw.kwargs)``.

    ``seed`` is an int, or (``schedules(shrink=True)``) a ``random.Random`` that Hypothesis
    controls.
    """

    seed: int | random.Random
    faults: Faults

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"seed": self.seed, "faults": self.faults}


def schedules(
    *, faults: Faults | None = None, max_seed: int = 2**32 - 1, shrink: bool = False
) -> Any:
    """A Hypothesis strategy of ``ScheduleDraw``: a seed, and faults (``faults``, or drawn).

    Hypothesis shrinks a failing draw towards seed 0 and fewer faults, so the report shows the
    simplest schedule that fails, and its seed replays it anywhere. With ``shrink=True`` the
    seed is a ``random.Random`` drawn by Hypothesis (``st.randoms()``): every choice of the run
    (each delivery order, each fault) is then one of Hypothesis's draws, which it shrinks one by
    one, and replays from its database. Use it as ``@given(draw=schedules())`` with
    ``Simulation(entities, **draw.kwargs)``.
    """
    from hypothesis import strategies as st

    probability = st.sampled_from((0.0, 0.05, 0.2))
    fault_plans = (
        st.just(faults)
        if faults is not None
        else st.builds(
            Faults,
            duplicate=probability,
            delay=probability,
            crash_before_commit=st.sampled_from((0.0, 0.02)),
            crash_after_commit=st.sampled_from((0.0, 0.02)),
        )
    )
    seeds = st.randoms(use_true_random=False) if shrink else st.integers(0, max_seed)
    return st.builds(ScheduleDraw, seed=seeds, faults=fault_plans)
