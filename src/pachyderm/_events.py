"""The event stream of an event-sourced entity: the durable log, then live events, never a gap.

A reader registers an ``EventChannel`` first, then reads the log from its position, page by
page, until a page comes back short; from then on it reads what commits push to its channel.
Everything committed after the registration is pushed, and everything before it is in the log,
so nothing falls between the two (an event seen twice is dropped by its seq). A channel holds at
most ``capacity`` events: a reader too slow for the stream does not lose any, its channel is
emptied and marked ``behind``, and it reads the log again from its position. So memory stays
bounded and the stream never skips.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from ._core._follow import EventChannel
from ._eventsourced import decode_event
from .backends._base import StoredEvent, Write

if TYPE_CHECKING:
    from ._entity import EntityInfo
    from ._world import World

__all__ = ["EventChannel", "EventStream", "push_events"]

#: Events read from the log per page.
_PAGE: Final = 1000


def push_events(channels: dict[EventChannel, None], write: Write) -> None:
    """Push a committed event write's events to an entity's stream readers, in seq order."""
    events = write.events
    assert events
    for offset, data in enumerate(events):
        event = StoredEvent(write.expected + offset + 1, write.type_version, data)
        for channel in channels:
            channel.push(event)


class EventStream:
    """An async iterator of ``(seq, event)`` of one event-sourced entity, from ``since`` on.

    Every event after ``since`` in seq order, first from the durable log, then live as they
    commit; it never skips and never repeats. A reader slower than the entity reads from the log
    again instead of losing events. ``position`` is the seq of the last event yielded: a new
    stream with ``since=position`` resumes exactly there (after a restart too).

    Leaving the ``async for`` loop, ``aclose()`` or the end of ``async with`` stops it; the
    iteration ends when the world closes.
    """

    __slots__ = ("__weakref__", "_channel", "_info", "_key", "_log", "_page", "_world", "position")

    def __init__(self, world: World, info: EntityInfo, key: str, since: int) -> None:
        self._world = world
        self._info = info
        self._key = key
        self.position = since
        self._channel: EventChannel | None = None
        self._page: deque[StoredEvent] = deque()
        self._log = True  # read the log before the channel

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> tuple[int, Any]:
        """Return the next ``(seq, event)``.

        Raises ``IncompatibleVersion`` or ``SerializationError`` for an event this code cannot
        read (the position stays before it). Cancellation while waiting loses nothing: the next
        call returns the same next event.
        """
        channel = self._channel
        if channel is None:
            channel = self._channel = self._world._subscribe_events(self._info, self._key)
        while True:
            page = self._page
            while page and page[0].seq <= self.position:
                page.popleft()
            if page:
                return self._take(page)
            if channel.behind:
                channel.behind = False
                self._log = True
            if not self._log:
                items = channel.items
                while items and items[0].seq <= self.position:
                    items.popleft()
                if items:
                    if items[0].seq == self.position + 1:
                        return self._take(items)
                    self._log = True  # a gap (it registered late): the log has them
                    items.clear()
            if channel.closed:
                self._stop()
                raise StopAsyncIteration
            if self._log:
                got = await self._world.backend.read_events(
                    self._info.name, self._key, after=self.position, limit=_PAGE
                )
                page.extend(got)
                if len(got) < _PAGE:
                    self._log = False
                continue
            await channel.wait()

    def _take(self, queue: deque[StoredEvent]) -> tuple[int, Any]:
        event = decode_event(self._info, self._key, queue[0])  # raises: nothing is consumed
        stored = queue.popleft()
        self.position = stored.seq
        return stored.seq, event

    def _stop(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            self._world._unsubscribe_events((self._info.name, self._key), channel)
            channel.close()

    async def aclose(self) -> None:
        """Stop reading. Idempotent."""
        self._stop()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a finaliser must never raise
            self._stop()
