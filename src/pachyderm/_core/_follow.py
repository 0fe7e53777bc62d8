"""Follow logic: a bounded, conflating channel of committed versions, and one of events (sans-I/O).

A channel holds the versions a follower has not read yet, oldest first, at most ``capacity`` of
them. When one more arrives and the buffer is full, the oldest is dropped: the follower skips ahead,
never backwards, and memory stays bounded. Versions pushed are strictly increasing, because the
runtime pushes them in commit order from one place.
"""

from __future__ import annotations

import asyncio
from collections import deque

from ..backends._base import StoredEvent

__all__ = ["Channel", "EventChannel"]


class _Signal:
    """What both channels share: a reader that waits, woken by a push or by ``close``."""

    __slots__ = ("_waiter", "closed")

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def close(self) -> None:
        """End the stream: the reader reads what is buffered, then stops."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, ready: bool) -> None:
        """Wait until woken, unless ``ready``. Cancellation stops the wait; nothing is consumed."""
        if ready or self.closed:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class Channel(_Signal):
    """The buffer between an entity's commits and one follower.

    Mutable state: ``_items``, ``_waiter``, ``skipped``, ``closed``, changed by ``push`` (called by
    the runtime after a commit) and ``pop_nowait``/``wait`` (called by the follower).
    """

    __slots__ = ("_items", "last", "skipped")

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self._items: deque[tuple[int, bytes]] = deque(maxlen=capacity)
        #: The newest version pushed or given as the snapshot: nothing at or below it is pushed.
        self.last = -1
        #: How many versions were dropped because the follower was slow.
        self.skipped = 0

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

    def pop_nowait(self) -> tuple[int, bytes] | None:
        """Return the oldest unread version, or ``None`` if there is none yet."""
        return self._items.popleft() if self._items else None

    async def wait(self) -> None:
        """Wait until a version is buffered or the channel is closed.

        Cancellation stops the wait; nothing is consumed.
        """
        await self._wait(bool(self._items))


class EventChannel(_Signal):
    """The buffer between an entity's commits and one event-stream reader.

    At most ``capacity`` events: one more empties it and sets ``behind`` (its reader reads the
    log again: nothing is lost, and memory stays bounded). Mutable state: ``items``, ``behind``,
    ``closed`` and the waiter, changed by ``push`` (after a commit) and by the reader.
    """

    __slots__ = ("behind", "capacity", "items")

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.items: deque[StoredEvent] = deque()
        self.capacity = capacity
        #: Events were dropped from the buffer: the reader must read the log again.
        self.behind = False

    def push(self, event: StoredEvent) -> None:
        if self.closed:
            return
        if len(self.items) >= self.capacity:
            self.items.clear()  # the reader catches up from the log: nothing is lost
            self.behind = True
        elif not self.behind:
            self.items.append(event)
        self._wake()

    async def wait(self) -> None:
        """Wait until something is pushed or the channel closes. Cancellation consumes nothing."""
        await self._wait(bool(self.items) or self.behind)
