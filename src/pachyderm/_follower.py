"""The public follow iterator, over a core ``Channel``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._core._follow import Channel

if TYPE_CHECKING:
    from ._world import World

__all__ = ["Follower"]


class Follower:
    """An async iterator of an entity's committed states, in version order.

    The first item is the current state, then each newly committed one. With ``since=n`` and
    ``n`` the current version, the first item is the next commit; with any other ``n``, the
    current state (the versions between are not kept). A follower that reads slower than the
    entity commits skips ahead to newer versions, never backwards. With ``versions=True`` items
    are ``(version, state)``.

    Leaving the ``async for`` loop, ``aclose()`` or the end of ``async with`` unsubscribes.
    The iteration ends when the world closes.
    """

    __slots__ = ("__weakref__", "_channel", "_decode", "_key", "_since", "_versions", "_world")

    def __init__(
        self, world: World, key: tuple[str, str], since: int | None, versions: bool
    ) -> None:
        self._world = world
        self._key = key
        self._since = since
        self._versions = versions
        self._channel: Channel | None = None
        self._decode: Callable[[bytes], Any] | None = None

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> Any:
        """Return the next state.

        Cancellation while waiting loses nothing: the next call returns the same next version.
        """
        channel = self._channel
        if channel is None:
            channel, self._decode = await self._world._subscribe(self._key, self._since)
            self._channel = channel
        while True:
            item = channel.pop_nowait()
            if item is not None:
                version, data = item
                assert self._decode is not None
                state = self._decode(data)
                return (version, state) if self._versions else state
            if channel.closed:
                self._unsubscribe()
                raise StopAsyncIteration
            await channel.wait()

    @property
    def skipped(self) -> int:
        """How many versions this follower skipped because it read too slowly."""
        return 0 if self._channel is None else self._channel.skipped

    def _unsubscribe(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            self._world._unsubscribe(self._key, channel)
            channel.close()

    async def aclose(self) -> None:
        """Stop following. Idempotent."""
        self._unsubscribe()

    async def __aenter__(self) -> Follower:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._unsubscribe()

    def __del__(self) -> None:
        # Breaking out of `async for` drops the last reference: unsubscribe at once, no await.
        with contextlib.suppress(Exception):  # a finaliser must never raise
            self._unsubscribe()
