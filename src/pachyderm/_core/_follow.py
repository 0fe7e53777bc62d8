"""Follow logic: a bounded, conflating channel of committed versions (sans-I/O).

A channel holds the versions a follower has not read yet, oldest first, at most ``capacity`` of
them. When one more arrives and the buffer is full, the oldest is dropped: the follower skips ahead,
never backwards, and memory stays bounded. Versions pushed are strictly increasing, because the
runtime pushes them in commit order from one place.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Channel"]


class Channel:
    """The buffer between an entity's commits and one follower.

    Mutable state: ``_items``, ``_waiter``, ``skipped``, ``closed``, changed by ``push`` (called by
    the runtime after a commit) and ``pop_nowait``/``wait`` (called by the follower).
    """

    __slots__ = ("_items", "_waiter", "closed", "last", "skipped")

    def __init__(self, capacity: int) -> None:
        self._items: deque[tuple[int, bytes]] = deque(maxlen=capacity)
        self._waiter: asyncio.Future[None] | None = None
        #: The newest version pushed or given as the snapshot: nothing at or below it is pushed.
        self.last = -1
        #: How many versions were dropped because the follower was slow.
        self.skipped = 0
        self.closed = False

    def push(self, version: int, data: bytes) -> None:
        """Offer a committed version. Older or equal versions are ignored (no duplicates)."""
        if version <= self.last or self.closed:
            return
        self.last = version
        items = self._items
        if len(items) == items.maxlen:
            self.skipped += 1
        items.append((version, data))
        self._wake()

    def close(self) -> None:
        """End the stream: the follower reads what is buffered, then stops."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pop_nowait(self) -> tuple[int, bytes] | None:
        """Return the oldest unread version, or ``None`` if there is none yet."""
        return self._items.popleft() if self._items else None

    async def wait(self) -> None:
        """Wait until a version is buffered or the channel is closed.

        Cancellation stops the wait; nothing is consumed.
        """
        if self._items or self.closed:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
