"""A sharded username registrar, from the original Pachyderm README.

Usernames are registered by ``UsernameRegistration`` entities, one per first two letters: "bob"
is registered by ``(UsernameRegistration, "bo")``, so writes spread over many entities and never
wait for one big registry. A registration confirms to the ``User`` entity by a message (applied
exactly once, after the registration commits). Reads do not touch the writers: a
``UsernameCache`` follows the shards it was asked about and answers "is this name taken?" from
memory, kept up to date by the follow stream.

Run it with ``python examples/usernames.py``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any

import pachyderm
from pachyderm import Update, send


class UsernameRegistration(pachyderm.Entity):
    """The usernames starting with its key (two letters). State: ``{username: user_key}``."""

    name = "UsernameRegistration"

    @classmethod
    def key(cls, raw: object) -> str:
        if not (isinstance(raw, str) and len(raw) == 2 and raw.isalpha() and raw.islower()):
            raise pachyderm.InvalidKey(f"a shard is two lower-case letters; got {raw!r}")
        return raw

    def init(self) -> dict[str, str]:
        return {}

    def activate(self, message: Any, state: dict[str, str]) -> Any:
        kind, username, user_key = message
        if kind != "register":
            raise pachyderm.Rejected(f"unknown message {kind!r}")
        if not username.startswith(self.key):
            raise pachyderm.Rejected(f"{username!r} belongs to shard {shard(username)!r}")
        owner = state.get(username)
        if owner == user_key:
            return state  # registered already, to the same user
        if owner is not None:
            raise pachyderm.Rejected(f"{username!r} is taken")
        state[username] = user_key
        return Update(state, send((User, user_key), ("username", username)))


class User(pachyderm.Entity):
    """A user. State: ``{"usernames": [...]}``, confirmed by the registrar's messages."""

    name = "User"

    def init(self) -> dict[str, list[str]]:
        return {"usernames": []}

    def activate(self, message: Any, state: dict[str, list[str]]) -> Any:
        kind, username = message
        if kind == "username" and username not in state["usernames"]:
            state["usernames"].append(username)
        return state


def shard(username: str) -> str:
    """The key of the registrar of ``username``: its first two letters."""
    if not (isinstance(username, str) and len(username) >= 2 and username[:2].isalpha()):
        raise pachyderm.InvalidKey(f"a username starts with two letters; got {username!r}")
    return username[:2].lower()


async def register(world: pachyderm.World, username: str, user_key: str) -> None:
    """Register ``username`` for ``(User, user_key)``; ``Rejected`` if it is taken."""
    username = username.lower()
    await world.activate((UsernameRegistration, shard(username)), ("register", username, user_key))


class UsernameCache:
    """Answers "is this name taken?" from followed shards: no activation, no writer touched.

    The first question about a shard starts following it (its current state comes first), so
    the answer is never older than what was committed when the question was asked; later
    answers come from memory. ``close()`` stops the followers.
    """

    def __init__(self, world: pachyderm.World) -> None:
        self.world = world
        self._shards: dict[str, dict[str, str]] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def taken(self, username: str) -> bool:
        username = username.lower()
        key = shard(username)
        if key not in self._ready:
            self._ready[key] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._follow(key)))
        await self._ready[key].wait()
        return username in self._shards[key]

    async def until_taken(self, username: str) -> None:
        """Wait until the cache sees ``username`` taken (the follow stream brings it in)."""
        username = username.lower()
        key = shard(username)
        await self.taken(username)  # follows the shard, if it did not yet
        event = self._changed.setdefault(key, asyncio.Event())
        while True:
            event.clear()
            if username in self._shards[key]:
                return
            await event.wait()

    async def _follow(self, key: str) -> None:
        async for state in self.world.follow((UsernameRegistration, key)):
            self._shards[key] = state
            self._ready[key].set()
            if key in self._changed:
                self._changed[key].set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def main(path: str) -> None:
    entities = [UsernameRegistration, User]
    async with pachyderm.World(pachyderm.backends.SQLite(path), entities=entities) as w:
        await register(w, "bob", "32123132112")
        await register(w, "bonnie", "42")
        try:
            await register(w, "Bob", "42")
        except pachyderm.Rejected as e:
            print("refused:", e)
        cache = UsernameCache(w)
        before = w.statistics()["activations"]
        print("bob taken:", await cache.taken("bob"), "| boris taken:", await cache.taken("boris"))
        assert w.statistics()["activations"] == before  # the cache ran no activation
        await register(w, "boris", "7")
        await cache.until_taken("boris")
        print("boris taken:", await cache.taken("boris"))
        await cache.close()
        async for user in w.follow((User, "7")):  # the registrar's confirmation, a message
            if user["usernames"]:
                break
        print("user 7:", user, "| user 32123132112:", await w.read((User, "32123132112")))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(main(os.path.join(folder, "usernames.db")))
