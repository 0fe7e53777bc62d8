"""Named crash points, for tests that kill a process at an exact moment (off by default).

The runtime calls ``point(name)`` at a few moments that matter to exactly-once delivery; the
names are listed in ``POINTS``. Nothing happens unless a test installs a ``hook`` (a callable
taking the name), typically in a child process that kills itself at the n-th passage of a point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

__all__ = ["POINTS", "hook", "point"]

#: The named points, in the order a message passes them.
POINTS: Final = (
    "commit-before-dispatch",  # a write with outbox rows committed; nothing delivered yet
    "delivered-before-commit",  # a message is in its receiver's mailbox, not yet applied
    "receiver-committed",  # the receiver's commit (which consumes the row) returned
)

hook: Callable[[str], None] | None = None


def point(name: str) -> None:
    """Call the installed hook with ``name`` (the caller checks ``hook is not None`` first)."""
    if hook is not None:
        hook(name)
