"""History tools for event-sourced entities: export a history as JSON lines, replay, check.

``export(world, ref, out)`` writes an entity's events and states to a file; ``replay(type,
lines)`` folds such a file twice with this code's ``apply`` and says where it diverges, if
anywhere; ``check(world, ref)`` does the same on the stored log. See ``docs/events.md``.
"""

from __future__ import annotations

from ._history import Replay as Replay
from ._history import check as check
from ._history import export as export
from ._history import replay as replay

__all__ = ["Replay", "check", "export", "replay"]
