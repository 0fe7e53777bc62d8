"""A node of a cluster: membership, partition leases, self-fencing and hand-off.

Each process running ``World(Postgres(dsn), listen=..., secret=...)`` is a node. Every
``lease / 5`` seconds (a *tick*) it refreshes its row in the ``nodes`` table, reads the live
members, computes the fair share of every node (``fair_share``: the same answer on every node),
extends the leases it holds (``Postgres.renew``, one statement), then claims the partitions of
its share that are free or expired (``Postgres.claim``, one statement, which may wait for a
lease row that an old owner's commit still locks). The database's clock decides leases; the
node's own deadline is on its monotonic clock: it counts a lease from *before* the renewal was
sent and stops serving ``lease / 5`` before that lease would expire (the margin), so it stops
before anyone may take over, even if its renewals stop getting through. Correctness never rests
on that: every commit carries the partition's ``Fence`` and loses unless the lease is still
this node's at that epoch, checked in the commit's transaction.

Partitions of its own that the fair share gives to another node are handed off: calls for them
wait (``moving``), the entities drain (queued calls run and commit), they leave memory, and the
lease is released (epoch + 1) for the new owner to claim at once (it is woken over the
transport). A node that stops cleanly leaves the ``nodes`` table first, then hands everything
off. A partition just claimed is *recovering* until the outbox rows addressed to it are read
(so that messages committed before the move are delivered before newer ones).

Mutable state, on the event loop only: ``held``, ``moving``, ``recovering``, ``valid_until``,
``owners``, ``members``, ``fences``, the tick task and the stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import socket
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Final

from ._core._partitions import fair_share, partition_of
from ._errors import InvalidOptions, PachydermError, Unavailable
from ._router import Moved, Router
from ._transport import Server
from .backends._base import Fence

if TYPE_CHECKING:
    from ._world import World
    from .backends._postgres import Postgres

__all__ = ["Node", "parse_listen"]

log = logging.getLogger("pachyderm.cluster")

#: How long a hand-off waits for the partition's entities to finish their queued calls.
_DRAIN: Final = 5.0
#: Every this many ticks, a node deletes the rows of nodes silent for ``_FORGET_AFTER`` s.
_FORGET_EVERY: Final = 300
_FORGET_AFTER: Final = 3600.0


def parse_listen(listen: object) -> tuple[str, int]:
    """``"host:port"`` (port 0: any free one) -> ``(host, port)``; ``InvalidOptions`` if bad."""
    if not isinstance(listen, str) or ":" not in listen:
        raise InvalidOptions(f'listen is "host:port" (e.g. "127.0.0.1:0"); got {listen!r}')
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidOptions(f'listen is "host:port" (e.g. "127.0.0.1:0"); got {listen!r}')
    return host, int(port)


class Node:
    """The cluster side of one world (see the module docstring)."""

    def __init__(
        self,
        world: World,
        backend: Postgres,
        *,
        listen: str,
        secret: str | bytes,
        node_id: str | None,
    ) -> None:
        self.world = world
        self.engine = world._engine
        self.backend = backend
        self.clock = self.engine.clock
        self.host, self.port = parse_listen(listen)
        if node_id is None:
            node_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        if not isinstance(node_id, str) or not 0 < len(node_id.encode()) <= 200:
            raise InvalidOptions(f"a node id is a str of 1-200 bytes; got {node_id!r}")
        self.id = node_id
        self.lease = world.options.lease
        self.every = self.lease / 5
        self.margin = self.lease / 5
        self.count = world.options.partitions
        self.types = {info.name: info.version for info in world._registry}
        self.held: dict[int, int] = {}  # partition -> epoch: ours (serving, moving or recovering)
        self.fences: dict[int, Fence] = {}
        self.moving: set[int] = set()
        self.recovering: set[int] = set()
        self.valid_until = -math.inf  # monotonic: our leases are good until then
        self.owners: dict[int, tuple[str | None, int]] = {}  # from the last read of the leases
        self.members: dict[str, tuple[str, dict[str, int]]] = {}  # id -> (address, types)
        self.address = ""
        self.leaving = False
        self.server = Server(secret, self._serve)
        self.router = Router(self, secret)
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._handoffs: set[asyncio.Task[None]] = set()  # hand-offs and recoveries running
        self._refreshed = -math.inf
        self._lost: dict[int, list[asyncio.Future[None]]] = {}
        self.stats = {"ticks": 0, "claimed": 0, "released": 0, "lost": 0, "self_fenced": 0}

    # ------------------------------------------------------------------ ownership (no I/O)

    def partition(self, type_name: str, key: str) -> int:
        return partition_of(type_name, key, self.count)

    def live(self) -> bool:
        """Our leases are still good by our own clock (with the margin)."""
        return self.clock.monotonic() < self.valid_until

    def serving(self, p: int) -> bool:
        """Calls for partition ``p`` run here now."""
        return (
            p in self.held
            and p not in self.moving
            and p not in self.recovering
            and self.clock.monotonic() < self.valid_until
        )

    def fence_of(self, type_name: str, key: str) -> Fence | None:
        """The fence a write of this entity needs, or None if it must not be written here."""
        p = partition_of(type_name, key, self.count)
        if p not in self.held or self.clock.monotonic() >= self.valid_until:
            return None
        return self.fences[p]

    def still_holds(self, fence: Fence) -> bool:
        return self.held.get(fence.partition) == fence.epoch and self.live()

    def lease_gone(self, fence: Fence) -> None:
        """The database refused a write of ours for this lease: the partition is not ours."""
        if self.held.get(fence.partition) == fence.epoch:
            self.stats["lost"] += 1
            log.warning("node %s lost partition %s (a write was fenced)", self.id, fence.partition)
            self._lose([fence.partition])

    def owner_of(self, p: int) -> str | None:
        """The node that holds ``p`` by the last read of the leases (None: nobody, or expired)."""
        owner = self.owners.get(p)
        return None if owner is None else owner[0]

    def lost_signal(self, p: int) -> asyncio.Future[None]:
        """A future set when partition ``p`` stops being served here."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._lost.setdefault(p, [])
        waiting[:] = [f for f in waiting if not f.done()]  # relays cancel theirs when they move
        waiting.append(future)
        return future

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        """Listen, join, and claim a first share (returns after the first tick).

        Raises ``InvalidOptions`` when the world's partition count differs from the cluster's,
        ``Unavailable`` when the database cannot be reached.
        """
        size = await self.backend.cluster_size(self.count)
        if size != self.count:
            raise InvalidOptions(
                f"the cluster of this world has {size} partitions; this node says "
                f"{self.count} (the partitions option must match the first node's)"
            )
        host, port = await self.server.start(self.host, self.port)
        self.address = f"{host}:{port}"
        self._wake = asyncio.Event()
        await self.tick()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        await self.router.wake_others()  # they hand our share off now, not at their next tick

    async def stop(self) -> None:
        """Leave: drop out of the membership, hand every partition off, close the connections.

        Calls accepted before are answered first (the hand-off drains them). Cancellation
        leaves the leases to expire (others take over after ``lease``).
        """
        self.leaving = True  # the loop goes on renewing what is not handed off yet
        with contextlib.suppress(PachydermError):
            await self.backend.leave(self.id)
        for task in list(self._handoffs):
            with contextlib.suppress(BaseException):
                await task
        if self.held:
            await self._handoff(list(self.held))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self.router.close()
        await self.server.close()

    def wake(self) -> None:
        """Tick now (a hint from another node: a partition was released, or a node joined)."""
        if self._wake is not None:
            self._wake.set()

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.every)
            self._wake.clear()
            try:
                await self.tick()
            except PachydermError as exc:
                log.warning("node %s could not renew its leases: %s", self.id, exc)
            except Exception:  # a bug: keep the node's loop alive, say so loudly
                log.exception("node %s: the cluster loop failed", self.id)
            if self.held and not self.live():
                self.stats["self_fenced"] += 1
                log.error("node %s stops serving its partitions: its leases ran out", self.id)
                self._lose(list(self.held))

    async def tick(self) -> None:
        """One round: membership, then renew what we hold, then claim the rest of our share.

        Each statement is bounded by ``lease / 5`` (at least 1 s): a slow database makes the
        tick fail (the node self-fences if that lasts), never hang. A leaving node only renews
        (its partitions are being handed off).
        """
        self.stats["ticks"] += 1
        backend = self.backend
        bound = max(self.every, 1.0)
        before = set(self.members)
        if not self.leaving:
            types = json.dumps(self.types, sort_keys=True)
            await backend.join(self.id, self.address, types, timeout=bound)
            members = await backend.members(self.lease, timeout=bound)
            self.members = {id: (address, _types(raw)) for id, address, raw in members}
            await self.router.forget_peers(set(self.members))
        share = set() if self.leaving else set(self._share())
        # Renew first, on its own: a claim may wait for a lease row that a paused owner's
        # commit still locks (until the database ends that transaction), and our own leases
        # must not wait with it.
        sent = self.clock.monotonic()
        held = dict(self.held)
        got = await backend.renew(self.id, held, self.lease, timeout=bound) if held else {}
        self.valid_until = sent + self.lease - self.margin
        want = sorted(share - set(self.held))
        taken: dict[int, int] = {}
        if want:
            with contextlib.suppress(Unavailable):  # (a row still locked: at the next tick)
                taken = await backend.claim(self.id, want, self.lease, timeout=bound)
        lost = [p for p, epoch in held.items() if got.get(p) != epoch and self.held.get(p) == epoch]
        if lost:
            self.stats["lost"] += len(lost)
            log.warning("node %s lost partitions %s", self.id, _ranges(lost))
            self._lose(lost)
        new = sorted(p for p in taken if p not in self.held)
        for p in new:
            self.held[p] = taken[p]
            self.fences[p] = Fence(self.id, p, taken[p])
            self.recovering.add(p)
        if self.leaving:
            return
        self.router.expire_sessions(self.clock.monotonic())
        await self.refresh(force=True)
        if new:  # read their stored rows, on the side: the next ticks must not wait for it
            self.stats["claimed"] += len(new)
            self._spawn(self._recover(new))
        give = [p for p in self.held if p not in share and p not in self.moving]
        if give:
            self._spawn(self._handoff(give))
        if set(self.members) != before:  # a sender may have died before forwarding
            self.engine.dispatcher.sweep_soon()
        if self.stats["ticks"] % _FORGET_EVERY == 1:  # the rows of nodes long dead go
            await backend.forget_nodes(max(_FORGET_AFTER, 10 * self.lease))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._handoffs.add(task)
        task.add_done_callback(self._handoffs.discard)

    def _share(self) -> list[int]:
        """Our fair share among the members that can run every entity type in the cluster.

        A node that lacks a type some member has never takes partitions (it only forwards),
        unless no member has them all (then every member takes its share).
        """
        names: set[str] = set().union(*(set(t) for _, t in self.members.values()))
        able = [id for id, (_, types) in self.members.items() if names <= set(types)]
        if not able:
            able = list(self.members)
        if self.id not in self.members:
            return []
        return fair_share(able, self.count).get(self.id, [])

    async def refresh(self, *, force: bool = False) -> None:
        """Read who owns every partition (for routing), at most every 50 ms unless forced."""
        now = self.clock.monotonic()
        if not force and now - self._refreshed < 0.05:
            return
        self._refreshed = now
        rows = await self.backend.leases()
        self.owners = {p: (owner if left > 0 else None, epoch) for p, owner, epoch, left in rows}

    async def _recover(self, parts: list[int]) -> None:
        """Read the outbox rows addressed to just-claimed partitions, then serve them."""
        wanted = set(parts)
        dispatcher = self.engine.dispatcher
        try:
            await dispatcher.recover_partitions(lambda ref: self.partition(*ref) in wanted)
        finally:
            for p in parts:
                self.recovering.discard(p)
            for p in parts:  # what arrived meanwhile goes after what was stored before
                for envelope in self.router.early.pop(p, ()):
                    dispatcher.deliver(envelope)

    # ------------------------------------------------------------------ losing and handing off

    def _lose(self, parts: Iterable[int]) -> None:
        """These partitions are no longer ours (lease gone): forget their entities at once."""
        parts = set(parts)
        for p in parts:
            self.held.pop(p, None)
            self.fences.pop(p, None)
            self.moving.discard(p)
            self.recovering.discard(p)
        self._evict(parts, Moved("the entity's partition moved to another node"))

    def _evict(self, parts: set[int], error: PachydermError) -> None:
        engine = self.engine
        for ref, resident in list(engine.residents.items()):
            if self.partition(*ref) in parts:
                engine.disown(resident, error)
        for ref in list(engine.channels):
            if self.partition(*ref) in parts:
                for channel in engine.channels.pop(ref):
                    channel.close()
        engine.dispatcher.move_out(lambda ref: self.partition(*ref) in parts)
        for p in parts:
            for future in self._lost.pop(p, ()):
                if not future.done():
                    future.set_result(None)

    async def _handoff(self, parts: list[int]) -> None:
        """Drain, then release ``parts`` (epoch + 1), then wake their next owners."""
        parts = [p for p in parts if p in self.held]
        if not parts:
            return
        self.moving.update(parts)
        wanted = set(parts)
        engine = self.engine
        deadline = self.clock.monotonic() + _DRAIN
        while self.clock.monotonic() < deadline and any(  # noqa: ASYNC110 - a bounded drain
            not r.quiescent()
            for ref, r in engine.residents.items()
            if self.partition(*ref) in wanted
        ):
            await asyncio.sleep(0.005)
        held = {p: self.held[p] for p in parts if p in self.held}
        for p in held:
            self.held.pop(p, None)
            self.fences.pop(p, None)
            self.moving.discard(p)
        self._evict(set(held), Moved("the entity's partition is moving to another node"))
        try:
            released = await self.backend.release(self.id, held)
        except PachydermError as exc:
            log.warning("node %s could not release %s: %s", self.id, _ranges(held), exc)
            return
        self.stats["released"] += len(released)
        with contextlib.suppress(PachydermError):
            await self.refresh(force=True)
        await self.router.wake_others()

    # ------------------------------------------------------------------ serving peers

    async def _serve(self, kind: str, body: Any) -> Any:
        return await self.router.serve(kind, body)

    def status(self) -> dict[str, object]:
        """What ``pachyderm status`` shows of this node."""
        residents: dict[int, int] = {}
        for ref in self.engine.residents:
            p = self.partition(*ref)
            residents[p] = residents.get(p, 0) + 1
        return {
            "node": self.id,
            "address": self.address,
            "types": self.types,
            "partitions": {str(p): epoch for p, epoch in sorted(self.held.items())},
            "moving": sorted(self.moving),
            "resident": {str(p): n for p, n in sorted(residents.items())},
            "lease_left": max(0.0, self.valid_until - self.clock.monotonic()),
            "stats": dict(self.stats),
        }


def _types(raw: str) -> dict[str, int]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _ranges(parts: Iterable[int]) -> str:
    return ",".join(str(p) for p in sorted(parts))
