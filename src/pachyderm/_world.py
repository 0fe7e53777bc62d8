"""The world: the public face of the runtime, one per process (see ``_engine`` for the inside)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

from ._clock import CLOCK_METHODS, Clock, SystemClock, is_clock
from ._cluster import Node
from ._codec import PickleCodec
from ._core._follow import Channel, EventChannel
from ._core._resident import READY, Call, Resident
from ._engine import Engine
from ._entity import MAX_KEY_BYTES, Entity, EntityInfo, Registry, check_call
from ._errors import InvalidOptions, Overloaded, Unavailable
from ._events import EventStream
from ._eventsourced import Append
from ._follower import Follower
from ._options import WorldOptions
from .backends._base import Backend

__all__ = ["World", "WorldOptions"]

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\Z")
_new_call = Call.__new__


class World:
    """A world of entities on one backend: an async context manager, one per process.

    Args:
        backend: where entities are stored; required (there is no default backend).
        entities: the entity types this world may activate.
        name: the world's name; it namespaces everything in the backend.
        options: a ``WorldOptions``; keyword ``**overrides`` replace some of its fields.
        clock: the time source (the simulation injects a virtual one).
        listen: ``"host:port"`` (port 0: any free one): make this world a node of the cluster
            of its name, on a backend shared by the nodes (``Postgres``); see docs/cluster.md.
        secret: the cluster's secret (at least 16 bytes), which every node of it knows:
            node-to-node connections prove it both ways. Required with ``listen``.
        node_id: this node's id in the cluster (default: host name, pid and a random part).

    Raises:
        InvalidOptions: a bad name or option. UnknownEntityType: a bad entity type.
    """

    # Mutable state, touched only on the event loop: the lifecycle flags (`_open`, `_closed`,
    # `_serving`), and through `_engine` its residents, ready queue and followers (see Engine);
    # `_residents` and `_ready` are the engine's own objects, held here for the hot path.

    def __init__(
        self,
        backend: Backend,
        *,
        entities: Iterable[type[Entity]] = (),
        name: str = "default",
        options: WorldOptions | None = None,
        clock: Clock | None = None,
        listen: str | None = None,
        secret: str | bytes | None = None,
        node_id: str | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(backend, Backend):
            raise InvalidOptions(
                f"World needs a backend (pachyderm.backends.Memory(), .SQLite(path), ...); "
                f"got {backend!r:.80}"
            )
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidOptions(
                f"a world name is 1-100 characters of letters, digits, '_', '.', '-'; got {name!r}"
            )
        if clock is not None and not is_clock(clock):
            raise InvalidOptions(
                f"a clock is a pachyderm.Clock, with {', '.join(CLOCK_METHODS)}; got {clock!r:.80}"
            )
        self.backend = backend
        self.name = name
        self.options = WorldOptions.build(options, overrides)
        self._registry = Registry(entities)
        # A networked backend reads states over the network; a cluster node also gets states
        # from other nodes over its transport. Pickle is never used on bytes from the network.
        if backend.networked or listen is not None:
            pickled = [info.name for info in self._registry if isinstance(info.codec, PickleCodec)]
            if pickled:
                where = "a cluster node" if listen is not None else type(backend).__name__
                raise InvalidOptions(
                    f"{where} reads states over the network, and pickle is never "
                    f"used on bytes from the network: {', '.join(pickled)} set pickle = True "
                    "(declare a state_type instead)"
                )
        self._engine = Engine(
            backend,
            self.options,
            clock if clock is not None else SystemClock(),
            self._registry,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._closed = False
        self._serving = False  # open and not closed: the one flag the hot path reads
        self._types = self._registry.by_class
        self._mailbox_size = self.options.mailbox_size
        self._clock = self._engine.clock
        self._residents = self._engine.residents
        self._ready = self._engine.ready
        self._call_timeout = self.options.call_timeout
        self._node: Node | None = None
        if listen is not None or secret is not None:
            if getattr(backend, "claim", None) is None:
                raise InvalidOptions(
                    f"a cluster needs a backend its nodes share (backends.Postgres); "
                    f"{type(backend).__name__} is for one process"
                )
            if listen is None or secret is None:
                raise InvalidOptions("a cluster node needs both listen= and secret=")
            self._node = Node(self, backend, listen=listen, secret=secret, node_id=node_id)  # type: ignore[arg-type]
        elif node_id is not None:
            raise InvalidOptions("node_id= is for a cluster node (with listen= and secret=)")

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> World:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the backend and start serving. ``async with World(...)`` calls it.

        Raises:
            StorageLocked: another process holds the storage. Unavailable: it cannot be opened.
        """
        if self._open or self._closed:
            raise InvalidOptions("a world starts once")
        self._loop = asyncio.get_running_loop()
        await self.backend.open(self.name)
        self._open = True
        self._engine.start()
        node = self._node
        if node is not None:
            engine, router = self._engine, node.router
            engine.fence_of, engine.still_holds = node.fence_of, node.still_holds
            engine.lease_gone = node.lease_gone
            engine.dispatcher.remote = router.route_delivery
            engine.dispatcher.mine = lambda ref: node.partition(*ref) in node.held
        try:
            # Messages committed before a stop or a crash go first (see Dispatcher.recover).
            await self._engine.dispatcher.recover()
            if node is not None:
                await node.start()  # joins, claims a first share (and reads its rows)
        except BaseException:
            await self.aclose()
            raise
        self._serving = True

    async def aclose(self) -> None:
        """Stop: refuse new calls, finish the accepted ones, end followers, close the backend.

        Every activation acknowledged before (or during) this call is durable when it returns.
        Cancelling it leaves the world closed to new calls, with the backend possibly still open.
        """
        if self._closed:
            return
        self._closed = True
        self._serving = False
        if not self._open:
            return
        if self._node is not None:
            await self._node.stop()  # hands its partitions off (their calls drain first)
        await self._engine.stop()
        self._open = False
        await self.backend.aclose()

    def _check_open(self) -> None:
        if not self._open or self._closed:
            raise Unavailable("the world is not running (use `async with World(...)`)")

    # ------------------------------------------------------------------ public calls

    async def activate(
        self,
        ref: tuple[type[Entity], Any],
        message: Any,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run one activation of the entity ``ref`` on its latest state; return the new state.

        The entity is created (``init()``) if it was never activated. When this returns, the new
        state is durable (to the backend's level) and followers are being told.

        Args:
            ref: ``(EntityType, key)``.
            message: passed to ``activate(message, state)`` as it is (not copied).
            idempotency_key: if a call with this key already committed (within
                ``receipt_ttl``), return its result instead of running again.
            timeout: seconds to wait for the handler to finish (default ``call_timeout``).

        Returns:
            The committed new state.

        Raises:
            InvalidKey, UnknownEntityType: a bad ref, before any I/O.
            InvalidOptions: an ``idempotency_key`` that is not 1-256 characters without NUL or
                lone surrogates, or a ``timeout`` that is not finite and > 0; nothing queued.
            Overloaded: the mailbox is full; nothing was queued.
            ActivationFailed: the handler raised; the state is unchanged.
            Rejected: the handler refused the message; the state is unchanged.
            SerializationError, TooLarge: the new state cannot be stored; unchanged.
            Timeout: the deadline passed before the handler finished; nothing committed.
            Unavailable: the backend could not commit; nothing committed; safe to retry.
            Indeterminate: the commit's outcome is unknown; retry with the idempotency key.
            IncompatibleVersion: the stored state is from a newer version of the type.

        Cancellation: if the message has not started running it is withdrawn and nothing happens;
        if it is running or committing it may still commit, and the result is dropped.

        In a cluster the call runs on the node that owns the entity's partition (forwarded
        there, the message as MessagePack); while no node serves it, the call waits until its
        deadline (``timeout``, else ``call_timeout``, else three leases and at least 10 s),
        then raises ``Unavailable``. A forwarded call whose connection is lost raises
        ``Indeterminate``, or is sent again if it has an ``idempotency_key``. A cancelled
        forwarded call may still run on the owner.
        """
        # The hot path: every step below is inlined on purpose (this runs once per activation).
        info = None
        if type(ref) is tuple:
            try:
                cls, key = ref
                info = self._types.get(cls)
            except (TypeError, ValueError):  # not a pair, or an unhashable type
                pass  # `resolve` names the error
        if (
            info is None
            or info.custom_key
            or type(key) is not str
            or not key.isascii()  # ASCII: no surrogate, and length in chars = in bytes
            or not key
            or len(key) > MAX_KEY_BYTES
            or "\x00" in key
        ):
            info, key = self._registry.resolve(ref)
        if (
            idempotency_key is not None
            or timeout is not None
            or self._call_timeout is not None
            or self._node is not None
        ):
            if idempotency_key is not None or timeout is not None:
                check_call(idempotency_key, timeout)
            if self._node is not None:
                if not self._serving:
                    self._check_open()
                return await self._node.router.activate(
                    info, key, message, idempotency_key, timeout
                )
            return await self._activate(info, key, message, idempotency_key, timeout)
        # The commonest call, without the frame of `_activate` (whose first lines these are).
        if not self._serving:
            self._check_open()
        future: asyncio.Future[Any] = self._loop.create_future()  # type: ignore[union-attr]
        resident, call = self._post(info, key, message, None, future)
        try:
            return await future
        except asyncio.CancelledError:
            self._engine.withdraw(resident, call)
            raise

    async def _activate(
        self,
        info: EntityInfo,
        key: str,
        message: Any,
        idempotency_key: str | None,
        timeout: float | None,
    ) -> Any:
        """``activate`` of a checked ref, here (in a cluster: the router calls it)."""
        if not self._serving:
            self._check_open()
        if idempotency_key is not None:
            done, value = await self._idempotent_result(info, key, idempotency_key)
            if done:
                return value
        loop: asyncio.AbstractEventLoop = self._loop  # type: ignore[assignment]  # set when open
        future: asyncio.Future[Any] = loop.create_future()
        resident, call = self._post(info, key, message, idempotency_key, future)
        engine = self._engine
        if timeout is None:
            timeout = self._call_timeout
            if timeout is None:
                try:
                    return await future
                except asyncio.CancelledError:
                    engine.withdraw(resident, call)
                    raise
        handle = self._clock.call_later(timeout, engine.expire, resident, call)
        try:
            return await future
        except asyncio.CancelledError:
            engine.withdraw(resident, call)
            raise
        finally:
            handle.cancel()

    def _post(
        self,
        info: EntityInfo,
        key: str,
        message: Any,
        idempotency_key: str | None,
        future: asyncio.Future[Any],
    ) -> tuple[Resident, Call]:
        """Queue a checked call in its entity's mailbox: the half of ``activate`` with no await.

        ``future`` gets the answer, after the commit. Raises ``Overloaded`` (nothing queued).
        The simulation posts its calls here too.
        """
        resident = self._residents.get((info.name, key))
        if resident is None:
            resident = self._engine.new_resident(info, key)
        else:
            resident.hot = True
        if resident.queued >= self._mailbox_size:
            raise Overloaded(
                f"the mailbox of {info.name}:{key!r:.60} is full "
                f"({self._mailbox_size} calls waiting)"
            )
        # `Call(message, future, idempotency_key)`, without the cost of a Python __init__ frame.
        call = _new_call(Call)
        call.message = message
        call.future = future
        call.idempotency_key = idempotency_key
        call.version = None
        call.delivery = call.effects = call.events = None
        if idempotency_key is not None:
            if resident.idempotent is None:
                resident.idempotent = {}
            resident.idempotent[idempotency_key] = (call, future.get_loop().create_future())
        # Inlined `engine.post(resident, call)` (the hot path).
        mailbox = resident.mailbox
        if mailbox is None:
            resident.mailbox = [call]
        else:
            mailbox.append(call)
        resident.queued += 1
        if not resident.scheduled and resident.phase == READY:
            # Inlined `engine.schedule`: the runner takes it on its next turn.
            resident.scheduled = True
            ready = self._ready
            if not ready:  # only then can the runner be waiting
                waiter = self._engine.run_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            ready.append(resident)
        return resident, call

    async def read(self, ref: tuple[type[Entity], Any]) -> Any:
        """Return the entity's latest committed state, or ``init()`` if it was never activated.

        Runs no activation and writes nothing. Cancellation has no effect on the entity. In a
        cluster it reads at the owner of the entity's partition (the state it has committed).

        Raises:
            InvalidKey, UnknownEntityType: a bad ref. Unavailable: the backend cannot be read
            (in a cluster: no node served the partition within three leases, at least 10 s).
            IncompatibleVersion, SerializationError: the stored state cannot be used here.
        """
        info, key = self._registry.resolve(ref)
        self._check_open()
        if self._node is not None:
            return await self._node.router.read(info, key)
        resident = await self._engine.loaded(info, key)
        return info.codec.decode(resident.data)

    def follow(
        self, ref: tuple[type[Entity], Any], *, since: int | None = None, versions: bool = False
    ) -> Follower:
        """Return an async iterator of the entity's states: the current one, then each new one.

        Args:
            ref: ``(EntityType, key)``; checked now, before any I/O.
            since: start after this version: if it is the current version, the next committed
                one is the first item; otherwise (versions between are not kept, or ``since`` is
                beyond what is stored) the current one is
                given instead).
            versions: yield ``(version, state)`` pairs instead of states.

        The subscription is registered atomically with the first state, so no version is missed
        or repeated between them. See ``Follower`` for slow readers and unsubscribing. In a
        cluster it follows the entity wherever its partition is served, and resumes after a
        move from its last version (versions it could not see are counted in ``skipped``).
        """
        info, key = self._registry.resolve(ref)
        self._check_open()
        if since is not None and (type(since) is not int or since < 0):
            raise InvalidOptions(f"since is a version (an int >= 0); got {since!r}")
        return Follower(self, (info.name, key), since, bool(versions))

    def events(self, ref: tuple[type[Entity], Any], *, since: int = 0) -> EventStream:
        """Return an async iterator of ``(seq, event)`` of an event-sourced entity.

        Every event after ``since`` (a seq; 0: from the first), from the durable log, then live
        ones as they commit, in seq order: it never skips or repeats, however slowly it is read.
        Events written by an older ``version`` of the type come through ``upgrade_event``.

        Raises:
            InvalidKey, UnknownEntityType: a bad ref, before any I/O.
            InvalidOptions: the type is not event-sourced, or a bad ``since``.
        """
        info, key = self._registry.resolve(ref)
        self._check_open()
        if info.events is None:
            raise InvalidOptions(f"{info.name} is not event-sourced: use follow() for its states")
        if type(since) is not int or since < 0:
            raise InvalidOptions(f"since is a seq (an int >= 0); got {since!r}")
        return EventStream(self, info, key, since)

    async def append(
        self,
        ref: tuple[type[Entity], Any],
        *events: Any,
        expected: int = 0,
        timeout: float | None = None,
    ) -> Any:
        """Append ``events`` to an event-sourced entity without a command; return the new state.

        The append is conditional: the entity must have exactly ``expected`` events (default 0:
        an entity never initialised, which always accepts its creation event without a creation
        command). The events are folded by ``apply`` and committed atomically, like those of a
        command; when this returns they are durable.

        Raises:
            InvalidOptions: the type is not event-sourced, no events, or a bad ``expected``.
            Rejected: the entity does not have ``expected`` events; nothing was appended.
            EntityBroken: ``apply`` raised; nothing was appended.
            and the errors of ``activate``.

        Cancellation: as for ``activate``.
        """
        info, _ = self._registry.resolve(ref)
        if info.events is None:
            raise InvalidOptions(f"{info.name} is not event-sourced: use activate()")
        if not events:
            raise InvalidOptions("append() takes at least one event")
        if type(expected) is not int or expected < 0:
            raise InvalidOptions(f"expected is a seq (an int >= 0); got {expected!r}")
        return await self.activate(ref, Append(events, expected), timeout=timeout)

    async def list(
        self, entity_type: type[Entity], *, prefix: str = "", page_size: int = 1000
    ) -> AsyncIterator[str]:
        """Yield the keys of the stored entities of a type, in code point order, page by page.

        Runs no activation. Keys committed while listing may or may not appear.
        """
        info = self._registry.info(entity_type)
        if not isinstance(prefix, str):
            raise InvalidOptions(f"prefix is a str; got {type(prefix).__qualname__}")
        if type(page_size) is not int or page_size < 1:
            raise InvalidOptions(f"page_size is an int >= 1; got {page_size!r}")
        self._check_open()
        after: str | None = None
        while True:
            keys = await self.backend.list_keys(
                info.name, prefix=prefix, after=after, limit=page_size
            )
            for key in keys:
                yield key
            if len(keys) < page_size:
                return
            after = keys[-1]

    def statistics(self) -> dict[str, object]:
        """Return counters: activations, commits, conflicts, resident entities, followers, ...

        ``outbox`` counts the rows in storage: ``messages`` and ``timers`` waiting to be applied,
        and ``dead`` letters; ``delivered``, ``timers_fired``, ``dead_letters`` and
        ``redelivered`` count this world's work since it started; ``held`` counts messages
        waiting in memory for room in their receiver's mailbox.
        """
        engine = self._engine
        return {
            **engine.stats,
            **engine.dispatcher.stats,
            **engine.dispatcher.counts(),
            "resident": len(engine.residents),
            "followers": sum(len(c) for c in engine.channels.values()),
            "event_readers": sum(len(c) for c in engine.event_channels.values()),
            "commits_in_flight": len(engine.commits),
            "outbox": self.backend.outbox_counts() if self._open else {},
            "backend": self.backend.statistics(),
            **(
                {}
                if self._node is None
                else {"cluster": {**self._node.status(), "router": self._node.router.stats}}
            ),
        }

    # ------------------------------------------------------------------ idempotency

    async def _idempotent_result(
        self, info: EntityInfo, key: str, idempotency_key: str
    ) -> tuple[bool, Any]:
        while True:
            resident = self._engine.residents.get((info.name, key))
            entry = (
                None
                if resident is None or resident.idempotent is None
                else resident.idempotent.get(idempotency_key)
            )
            if entry is not None:
                # The same key is already running here: share its outcome (shielded, so that
                # our cancellation does not touch it).
                committed, value = await asyncio.shield(entry[1])
                if committed:
                    return True, value
                continue  # it did not commit (and is forgotten): run this one
            seen = (resident, None if resident is None else resident.version)
            receipt = await self.backend.receipt(info.name, key, idempotency_key)
            # A receipt older than `receipt_ttl` is forgotten at once, whether or not the
            # periodic prune has removed it yet: the call runs again.
            if receipt is not None and receipt.at >= self._clock.wall() - self.options.receipt_ttl:
                return True, info.codec.decode(receipt.result)
            resident = self._engine.residents.get((info.name, key))
            if seen != (resident, None if resident is None else resident.version):
                continue  # it committed meanwhile: that commit may carry this key's receipt
            if (
                resident is None
                or not resident.idempotent
                or (idempotency_key not in resident.idempotent)
            ):
                return False, None  # no receipt, none running: this call runs it

    # ------------------------------------------------------------------ following

    async def _subscribe(self, ref: tuple[str, str], since: int | None) -> tuple[Channel, Any]:
        if self._node is not None:
            info = self._registry.by_name(ref[0])
            self._check_open()
            return self._node.router.follow_channel(info, ref[1], since), info.codec.decode
        return await self._subscribe_local(ref, since)

    async def _subscribe_local(
        self, ref: tuple[str, str], since: int | None
    ) -> tuple[Channel, Any]:
        """Subscribe to an entity served here (in a cluster: for the router's relays)."""
        info = self._registry.by_name(ref[0])
        self._check_open()
        resident = await self._engine.loaded(info, ref[1])
        # No await from here on: the snapshot and the registration are one atomic step.
        channel = Channel(self.options.follower_buffer)
        if since == resident.version:
            channel.last = since  # up to date: the next item is the next commit
        else:
            # Older (the versions between are not kept) or newer than stored (the storage was
            # replaced): the current state, so the follower is never stuck or silent.
            channel.push(resident.version, resident.data)
        self._engine.channels.setdefault(ref, {})[channel] = None
        return channel, info.codec.decode

    def _subscribe_events(self, info: EntityInfo, key: str) -> EventChannel:
        self._check_open()
        if self._node is not None:
            return self._node.router.event_channel(info, key)
        channel = EventChannel(self.options.follower_buffer * 16)
        self._engine.event_channels.setdefault((info.name, key), {})[channel] = None
        return channel

    def _unsubscribe_events(self, ref: tuple[str, str], channel: EventChannel) -> None:
        if self._node is not None:
            self._node.router.unsubscribe(channel)
        _drop(self._engine.event_channels, ref, channel)

    def _unsubscribe(self, ref: tuple[str, str], channel: Channel) -> None:
        if self._node is not None:
            self._node.router.unsubscribe(channel)
        self._unsubscribe_local(ref, channel)

    def _unsubscribe_local(self, ref: tuple[str, str], channel: Channel) -> None:
        _drop(self._engine.channels, ref, channel)


def _drop(
    table: dict[tuple[str, str], dict[Any, None]], ref: tuple[str, str], channel: Any
) -> None:
    """Remove a reader's channel from an entity's (and the entity, when it was the last)."""
    channels = table.get(ref)
    if channels is not None:
        channels.pop(channel, None)
        if not channels:
            del table[ref]
