"""A Hypothesis strategy of simulation schedules (Hypothesis is imported only when it is used)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._network import Faults

__all__ = ["ScheduleDraw", "schedules"]


@dataclass(frozen=True, slots=True)
class ScheduleDraw:
    """A random schedule: a seed and the faults drawn with it. ``Simulation(**draw.kwargs)``."""

    seed: int
    faults: Faults

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"seed": self.seed, "faults": self.faults}


def schedules(*, faults: Faults | None = None, max_seed: int = 2**32 - 1) -> Any:
    """A Hypothesis strategy of ``ScheduleDraw``: a seed, and faults (``faults``, or drawn).

    Hypothesis shrinks a failing draw towards seed 0 and fewer faults, so the report shows the
    simplest schedule that fails. Use it as ``@given(schedules())`` with
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
    return st.builds(ScheduleDraw, seed=st.integers(0, max_seed), faults=fault_plans)
