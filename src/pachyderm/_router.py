"""Routing in a cluster: calls go to the owner of their entity's partition, wherever it is.

``activate``, ``append``, ``read``, ``follow`` and ``events`` work on every node. A call whose
partition this node serves runs here; otherwise it is forwarded to the owner over the transport
(``_transport``: authenticated, bounded, pipelined msgspec frames). When the partition has no
serving owner (it is moving, or its owner died and the lease has not expired yet), the call
waits and retries, with a backoff, until its deadline (its ``timeout``, else the world's
``call_timeout``, else ``3 * lease`` and at least 10 s), then raises ``Unavailable``. A
forwarded ``activate`` whose connection drops before the answer may have committed there: it
raises ``Indeterminate``, or is retried when it carries an idempotency key (the retry then
returns the first one's result).

Messages and results cross the network as MessagePack (like ``send`` messages): a forwarded
message arrives as builtin values (tuples become lists), states and events as the bytes their
type's codec made. An ``ActivationFailed`` from another node carries the handler's error as
text, not its ``__cause__``.

Followers and event streams are *relays*: a task that subscribes where the partition is
served, locally or by long polls at the owner (which keeps a remote follower's subscription
between its polls: a session), resumes from the last version (or seq) after a move, and never
yields a version twice or out of order; versions committed while it moved are counted in
``Follower.skipped``. Outbox messages to entities of other nodes' partitions are forwarded
in order per receiver, retried until an owner takes them (the row stays in storage meanwhile:
a new owner reads it when it claims the partition, and owners sweep the outbox periodically).

Mutable state, on the event loop: ``peers``, ``relays``, ``outgoing`` (envelopes to forward,
per receiver), ``early`` (deliveries for partitions still recovering).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from ._codec import UNTYPED
from ._core._follow import Channel, EventChannel
from ._entity import MAX_KEY_BYTES, EntityInfo, check_call
from ._errors import (
    Indeterminate,
    InvalidOptions,
    PachydermError,
    SerializationError,
    Timeout,
    Unavailable,
)
from ._eventsourced import Append
from ._transport import ConnectionLost, NoAnswer, Peer
from .backends._base import Envelope

if TYPE_CHECKING:
    from ._cluster import Node

__all__ = ["Moved", "Router"]

log = logging.getLogger("pachyderm.cluster")

#: Seconds a long poll (follow, events) waits at the owner before answering "nothing new".
_POLL: Final = 10.0
#: Remote followers' sessions kept per node (beyond, the oldest ends; its follower resumes).
_MAX_SESSIONS: Final = 10_000
#: Envelopes waiting to be forwarded per receiver; beyond, they wait in storage for a sweep.
_MAX_OUTGOING: Final = 10_000
_FIRST_DELAY: Final = 0.01
_LAST_DELAY: Final = 0.25


def _str(value: object, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_KEY_BYTES or "\x00" in value:
        raise InvalidOptions(f"a malformed {what} from a peer")
    return value


def _int(value: object, what: str, *, none: bool = False) -> int | None:
    if value is None and none:
        return None
    if type(value) is not int or value < -1:
        raise InvalidOptions(f"a malformed {what} from a peer")
    return value


def _body(body: object, size: int) -> list[Any]:
    if not isinstance(body, list) or len(body) != size:
        raise InvalidOptions("a malformed request from a peer")
    return body


_FIELDS: Final = ("sender_type", "sender_key", "version", "index", "to_type", "to_key", "due")


def _wire(envelope: Envelope) -> list[Any]:
    return [*(getattr(envelope, f) for f in _FIELDS), envelope.name, envelope.data]


def _unwire(raw: object) -> Envelope:
    f = _body(raw, 9)
    if not (
        all(type(f[i]) is str for i in (0, 1, 4, 5))
        and type(f[2]) is int
        and type(f[3]) is int
        and type(f[6]) is float
        and (f[7] is None or type(f[7]) is str)
        and type(f[8]) is bytes
    ):
        raise InvalidOptions("a malformed outbox row from a peer")
    return Envelope(*f)


class _Session:
    """A remote follower's subscription here, kept between its long polls."""

    __slots__ = ("busy", "channel", "last", "ref", "used")

    def __init__(self, ref: tuple[str, str], channel: Channel, last: int | None, used: float):
        self.ref = ref
        self.channel = channel
        self.last = last  # the last version given to it (its next poll says it saw it)
        self.used = used
        self.busy = False


class Moved(Unavailable):
    """This node does not (or no longer) serve the entity's partition: route the call again."""


class Router:
    """Routes one node's calls (see the module docstring)."""

    def __init__(self, node: Node, secret: str | bytes) -> None:
        self.node = node
        self.world = node.world
        self.engine = node.engine
        self.secret = secret
        self.patience = max(3 * node.lease, 10.0)
        self.peers: dict[str, Peer] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.relays: dict[object, asyncio.Task[None]] = {}
        self.outgoing: dict[tuple[str, str], deque[Envelope]] = {}
        self._senders: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._retiring: set[asyncio.Task[None]] = set()  # connections closing when answered
        self.early: dict[int, list[Envelope]] = {}
        # Remote followers polling here, least recently polled first (an OrderedDict: its first
        # key is O(1), and a poll moves its session to the end).
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._session_ids = itertools.count(1)
        self.closed = False
        self.stats = {"forwarded": 0, "served": 0, "retries": 0}
        self._handlers: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "activate": self._serve_activate,
            "append": self._serve_append,
            "read": self._serve_read,
            "follow": self._serve_follow,
            "events": self._serve_events,
            "deliver": self._serve_deliver,
            "wake": self._serve_wake,
            "status": self._serve_status,
        }

    # ------------------------------------------------------------------ peers

    async def peer(self, node_id: str) -> Peer:
        """The connection to ``node_id`` (made once, and again after it closed)."""
        peer = self.peers.get(node_id)
        if peer is not None and not peer.closed:
            return peer
        lock = self._locks.setdefault(node_id, asyncio.Lock())
        async with lock:
            peer = self.peers.get(node_id)
            if peer is not None and not peer.closed:
                return peer
            member = self.node.members.get(node_id)
            if member is None:
                raise Unavailable(f"node {node_id} is not a live member")
            host, _, port = member[0].rpartition(":")
            peer = await Peer.connect(host, int(port), self.secret, self.node.id, timeout=2.0)
            self.peers[node_id] = peer
            return peer

    async def forget_peers(self, members: set[str]) -> None:
        """Retire the connections to nodes that are no longer members: nothing new is sent
        there, and each closes once its calls in flight are answered (a node that left may
        still be draining the calls it took)."""
        for node_id in [n for n in self.peers if n not in members]:
            task = asyncio.get_running_loop().create_task(self.peers.pop(node_id).retire())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            self._locks.pop(node_id, None)

    async def close(self) -> None:
        self.closed = True
        for sid in list(self._sessions):
            self._end_session(sid)
        tasks = [*self.relays.values(), *self._senders.values(), *self._retiring]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for channel in list(self.relays):
            channel.close()  # type: ignore[attr-defined]
        self.relays.clear()
        for peer in list(self.peers.values()):
            await peer.close()
        self.peers.clear()

    async def wake_others(self) -> None:
        """Tell the other members to tick now (a partition was released)."""
        for node_id in list(self.node.members):
            if node_id != self.node.id:
                with contextlib.suppress(PachydermError):
                    await (await self.peer(node_id)).call("wake", [], timeout=1.0)

    # ------------------------------------------------------------------ calls

    def _deadline(self, timeout: float | None) -> float:
        if timeout is None:
            timeout = self.world.options.call_timeout
        return self.node.clock.monotonic() + (self.patience if timeout is None else timeout)

    async def _routed(
        self,
        p: int,
        deadline: float,
        local: Callable[[float], Awaitable[Any]],
        kind: str,
        body: list[Any],
        *,
        retry_lost: bool = True,
    ) -> tuple[bool, Any]:
        """Run ``local`` here, or ``kind`` at the owner, until one answers or the deadline.

        Returns ``(True, value)`` from ``local`` or ``(False, answer)`` from a peer.
        ``retry_lost``: a request whose connection dropped may be sent again (else
        ``Indeterminate``).
        """
        node = self.node
        clock = node.clock
        delay = _FIRST_DELAY
        last: PachydermError | None = None
        while True:
            left = deadline - clock.monotonic()
            if left <= 0:
                raise Unavailable(
                    f"no node served partition {p} before the deadline"
                    + ("" if last is None else f" (last: {last})")
                )
            if node.serving(p):
                try:
                    return True, await local(left)
                except Unavailable as exc:
                    if not isinstance(exc, Moved):
                        raise
                    last = exc
            else:
                owner = node.owner_of(p)
                if owner is not None and owner != node.id and owner in node.members:
                    try:
                        peer = await self.peer(owner)
                    except Unavailable as exc:
                        last = exc
                    else:
                        self.stats["forwarded"] += 1
                        try:
                            # A margin over the owner's own deadline: its answer comes first.
                            answer = await peer.call(kind, body, timeout=left + 1.0)
                        except NoAnswer:
                            if not retry_lost:
                                raise Indeterminate(
                                    f"no answer from {owner} in time: the call may have run"
                                ) from None
                            last = Timeout(f"no answer from {owner}")
                        except ConnectionLost as exc:
                            if not retry_lost:
                                raise Indeterminate(
                                    f"the connection to {owner} closed during the call: it "
                                    "may have run (retry with an idempotency key)"
                                ) from exc
                            last = exc
                        except Unavailable as exc:  # refused there: not its partition (now)
                            last = exc
                        else:
                            return False, answer
            self.stats["retries"] += 1
            await asyncio.sleep(min(delay, max(0.0, deadline - clock.monotonic())))
            delay = min(delay * 2, _LAST_DELAY)
            with contextlib.suppress(PachydermError):
                await node.refresh()

    async def activate(
        self,
        info: EntityInfo,
        key: str,
        message: Any,
        idempotency_key: str | None,
        timeout: float | None,
    ) -> Any:
        """``World.activate`` in a cluster."""
        node = self.node
        p = node.partition(info.name, key)
        activate = self.world._activate
        if node.serving(p):  # the common case, without the loop
            try:
                return await activate(info, key, message, idempotency_key, timeout)
            except Moved:
                pass
        if type(message) is Append:
            codec = info.events
            assert codec is not None
            kind = "append"
            body: list[Any] = [
                info.name,
                key,
                [codec.encode(e) for e in message.events],
                message.expected,
            ]
        else:
            kind = "activate"
            try:
                data = UNTYPED.encode(message)
            except SerializationError as exc:
                raise SerializationError(
                    f"a call forwarded to another node carries its message as MessagePack: {exc}"
                ) from exc
            body = [info.name, key, data, idempotency_key]
        deadline = self._deadline(timeout)
        body.append(max(0.001, deadline - node.clock.monotonic()))  # the owner's timeout

        async def local(left: float) -> Any:
            return await activate(info, key, message, idempotency_key, left)

        here, value = await self._routed(
            p, deadline, local, kind, body, retry_lost=idempotency_key is not None
        )
        return value if here else info.codec.decode(value)

    async def read(self, info: EntityInfo, key: str) -> Any:
        """``World.read`` in a cluster: the owner's committed state."""
        p = self.node.partition(info.name, key)

        async def local(_: float) -> Any:
            return (await self.engine.loaded(info, key)).data

        _, data = await self._routed(p, self._deadline(None), local, "read", [info.name, key])
        return info.codec.decode(data)

    # ------------------------------------------------------------------ relays

    async def _poll(self, p: int, kind: str, body: list[Any]) -> Any:
        """One long poll at the owner of partition ``p``; ``Unavailable`` if none answered."""
        _, answer = await self._routed(p, self._deadline(None), _never, kind, body)
        return answer

    def follow_channel(self, info: EntityInfo, key: str, since: int | None) -> Channel:
        """A channel fed by a relay from wherever the entity's partition is served."""
        out = Channel(self.world.options.follower_buffer)
        task = asyncio.get_running_loop().create_task(self._follow(info, key, since, out))
        self.relays[out] = task
        return out

    def event_channel(self, info: EntityInfo, key: str) -> EventChannel:
        """An event channel told of new events wherever the entity's partition is served."""
        out = EventChannel(self.world.options.follower_buffer * 16)
        task = asyncio.get_running_loop().create_task(self._events(info, key, out))
        self.relays[out] = task
        return out

    def unsubscribe(self, channel: object) -> None:
        task = self.relays.pop(channel, None)
        if task is not None:
            task.cancel()

    async def _follow(self, info: EntityInfo, key: str, since: int | None, out: Channel) -> None:
        node, world = self.node, self.world
        ref = (info.name, key)
        p = node.partition(*ref)
        last = since  # None: start with the current state
        started = False
        session = f"{node.id}/{next(self._session_ids)}"  # its subscription at the owner
        delay = _FIRST_DELAY
        try:
            while not out.closed and not self.closed:
                if node.serving(p):
                    lost = node.lost_signal(p)
                    try:
                        channel, _ = await world._subscribe_local(ref, last)
                    except Unavailable:
                        lost.cancel()
                        delay = await _backoff(delay)
                        continue
                    try:
                        while not out.closed:
                            item = channel.pop_nowait()
                            if item is not None:
                                last = _relay_push(out, item, last, started)
                                started = True
                                continue
                            if channel.closed or lost.done():
                                break
                            await channel.wait()
                    finally:
                        world._unsubscribe_local(ref, channel)
                        lost.cancel()
                    continue
                try:
                    items = await self._poll(p, "follow", [*ref, last, _POLL, session])
                except Unavailable:
                    delay = await _backoff(delay)
                    continue
                delay = _FIRST_DELAY
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, list) and len(item) == 2:
                        last = _relay_push(out, (item[0], item[1]), last, started)
                        started = True
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("a follower relay of %s:%r failed", *ref)
        finally:
            out.close()

    async def _events(self, info: EntityInfo, key: str, out: EventChannel) -> None:
        node, engine = self.node, self.engine
        ref = (info.name, key)
        p = node.partition(*ref)
        known = -1
        delay = _FIRST_DELAY
        try:
            while not out.closed and not self.closed:
                if node.serving(p):
                    lost = node.lost_signal(p)
                    engine.event_channels.setdefault(ref, {})[out] = None
                    out.behind = True  # committed elsewhere before: read the log again
                    out._wake()
                    try:
                        while not out.closed and not lost.done():
                            await asyncio.wait({lost}, timeout=1.0)
                    finally:
                        lost.cancel()
                        readers = engine.event_channels.get(ref)
                        if readers is not None:
                            readers.pop(out, None)
                            if not readers:
                                del engine.event_channels[ref]
                    continue
                try:
                    version = await self._poll(p, "events", [*ref, known, _POLL])
                except Unavailable:
                    delay = await _backoff(delay)
                    continue
                delay = _FIRST_DELAY
                if type(version) is int and version > known:
                    known = version
                    out.behind = True  # the stream reads the new events from the log
                    out._wake()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("an event relay of %s:%r failed", *ref)
        finally:
            out.close()

    # ------------------------------------------------------------------ deliveries

    def route_delivery(self, envelope: Envelope) -> bool:
        """The dispatcher's hook: True if the message is not for this node to run now."""
        node = self.node
        ref = (envelope.to_type, envelope.to_key)
        p = node.partition(*ref)
        if p in node.recovering:
            self.early.setdefault(p, []).append(envelope)
            return True
        if node.serving(p):
            return False
        self.forward(ref, [envelope])
        return True

    def forward(self, ref: tuple[str, str], envelopes: list[Envelope]) -> None:
        """Queue messages for the owner of ``ref``'s partition, in order."""
        if self.closed:
            return  # they stay in storage
        queue = self.outgoing.setdefault(ref, deque())
        room = _MAX_OUTGOING - len(queue)
        queue.extend(envelopes[: max(room, 0)])  # the rest waits in storage for a sweep
        if ref not in self._senders:
            task = asyncio.get_running_loop().create_task(self._send(ref, queue))
            self._senders[ref] = task

    async def _send(self, ref: tuple[str, str], queue: deque[Envelope]) -> None:
        node = self.node
        p = node.partition(*ref)
        delay = _FIRST_DELAY
        try:
            while queue and not self.closed:
                if node.serving(p) or p in node.recovering:  # it came back here
                    batch = list(queue)
                    queue.clear()
                    for envelope in batch:
                        self.engine.dispatcher.deliver(envelope)
                    break
                owner = node.owner_of(p)
                if owner is not None and owner != node.id and owner in node.members:
                    batch = list(queue)[:256]
                    try:
                        peer = await self.peer(owner)
                        await peer.call("deliver", [_wire(e) for e in batch], timeout=10.0)
                    except PachydermError:
                        pass
                    else:
                        for _ in batch:
                            queue.popleft()
                        delay = _FIRST_DELAY
                        continue
                delay = await _backoff(delay)
                with contextlib.suppress(PachydermError):
                    await node.refresh()
        finally:
            self._senders.pop(ref, None)
            if not queue:
                self.outgoing.pop(ref, None)

    # ------------------------------------------------------------------ serving peers

    async def serve(self, kind: str, body: Any) -> Any:
        handler = self._handlers.get(kind)
        if handler is None:
            raise InvalidOptions(f"unknown request {kind!r:.40}")
        self.stats["served"] += 1
        return await handler(body)

    def _mine(self, type_name: object, key: object) -> tuple[EntityInfo, str]:
        info = self.world._registry.by_name(_str(type_name, "type name"))
        key = _str(key, "key")
        if not self.node.serving(self.node.partition(info.name, key)):
            raise Moved(f"{self.node.id} does not serve {info.name}:{key!r:.40} now")
        return info, key

    @staticmethod
    def _timeout(value: object) -> float:
        if type(value) is not float or not 0 < value <= 86_400:
            raise InvalidOptions("a malformed timeout from a peer")
        return value

    async def _serve_activate(self, body: Any) -> bytes:
        type_name, key, data, idempotency_key, timeout = _body(body, 5)
        info, key = self._mine(type_name, key)
        if type(data) is not bytes or not (idempotency_key is None or type(idempotency_key) is str):
            raise InvalidOptions("a malformed activate from a peer")
        check_call(idempotency_key, None)  # the origin checked it; this one came over the network
        message = UNTYPED.decode(data)
        result = await self.world._activate(
            info, key, message, idempotency_key, self._timeout(timeout)
        )
        return info.codec.encode(result)

    async def _serve_append(self, body: Any) -> bytes:
        type_name, key, events, expected, timeout = _body(body, 5)
        info, key = self._mine(type_name, key)
        codec = info.events
        if codec is None or not isinstance(events, list) or not events:
            raise InvalidOptions("a malformed append from a peer")
        if not all(type(e) is bytes for e in events) or type(expected) is not int:
            raise InvalidOptions("a malformed append from a peer")
        message = Append(tuple(codec.decode(e) for e in events), expected)
        result = await self.world._activate(info, key, message, None, self._timeout(timeout))
        return info.codec.encode(result)

    async def _serve_read(self, body: Any) -> bytes:
        info, key = self._mine(*_body(body, 2))
        return (await self.engine.loaded(info, key)).data

    async def _serve_follow(self, body: Any) -> list[list[Any]]:
        """A long poll of a remote follower: the versions after ``after``, or none in ``wait``.

        The follower's subscription stays here between its polls (its *session*), so that it
        misses nothing it polls for in time (up to ``follower_buffer`` versions between two
        polls, as a local follower); a session not polled for ``3 * _POLL`` seconds ends.
        """
        type_name, key, after, wait, sid = _body(body, 5)
        info, key = self._mine(type_name, key)
        since = _int(after, "version", none=True)
        if type(sid) is not str or not 0 < len(sid) <= 300:
            raise InvalidOptions("a malformed follow session from a peer")
        ref = (info.name, key)
        now = self.node.clock.monotonic()
        self.expire_sessions(now)
        session = self._sessions.get(sid)
        if session is None or session.ref != ref or session.last != since or session.busy:
            self._end_session(sid)
            channel, _ = await self.world._subscribe_local(ref, since)
            session = self._sessions[sid] = _Session(ref, channel, since, now)
            if len(self._sessions) > _MAX_SESSIONS:
                self._end_session(next(iter(self._sessions)))  # the oldest
        channel = session.channel
        session.busy = True
        session.used = now
        self._sessions.move_to_end(sid)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.wait(), min(self._timeout(wait), _POLL))
        finally:
            session.busy = False
        items: list[list[Any]] = []
        while (item := channel.pop_nowait()) is not None:
            items.append([item[0], item[1]])
        if not items and channel.closed:
            if self._sessions.get(sid) is session:  # (not one that replaced it meanwhile)
                self._end_session(sid)
            raise Moved("the partition moved")
        if items:
            session.last = items[-1][0]
        session.used = self.node.clock.monotonic()
        if self._sessions.get(sid) is session:
            self._sessions.move_to_end(sid)  # least recently polled first: expiry stops early
        return items

    def _end_session(self, sid: str) -> None:
        session = self._sessions.pop(sid, None)
        if session is not None:
            self.world._unsubscribe_local(session.ref, session.channel)
            session.channel.close()

    def expire_sessions(self, now: float) -> None:
        """End the follow sessions of remote followers that stopped polling.

        Sessions are kept least recently polled first, so this looks at the expired ones and
        one more, not at every session (it runs on every poll)."""
        sessions = self._sessions
        stale = now - 3 * _POLL
        while sessions:
            sid, session = next(iter(sessions.items()))
            if session.busy or session.used >= stale:
                return
            self._end_session(sid)

    async def _serve_events(self, body: Any) -> int:
        type_name, key, after, wait = _body(body, 4)
        info, key = self._mine(type_name, key)
        known = _int(after, "seq")
        resident = await self.engine.loaded(info, key)
        if resident.version > known:  # type: ignore[operator]
            return resident.version
        ref = (info.name, key)
        channel = EventChannel(1)
        self.engine.event_channels.setdefault(ref, {})[channel] = None
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.wait(), min(self._timeout(wait), _POLL))
        finally:
            readers = self.engine.event_channels.get(ref)
            if readers is not None:
                readers.pop(channel, None)
                if not readers:
                    del self.engine.event_channels[ref]
        return (await self.engine.loaded(info, key)).version

    async def _serve_deliver(self, body: Any) -> bool:
        if not isinstance(body, list) or not body or len(body) > 1024:
            raise InvalidOptions("a malformed delivery from a peer")
        envelopes = [_unwire(raw) for raw in body]
        node = self.node
        for envelope in envelopes:
            p = node.partition(envelope.to_type, envelope.to_key)
            if not (node.serving(p) or p in node.recovering):
                raise Unavailable(f"{node.id} does not serve partition {p} now")
        dispatcher = self.engine.dispatcher
        for envelope in envelopes:
            dispatcher.deliver(envelope)
        return True

    async def _serve_wake(self, body: Any) -> bool:
        self.node.wake()
        return True

    async def _serve_status(self, body: Any) -> dict[str, object]:
        return {**self.node.status(), "router": dict(self.stats)}


async def _backoff(delay: float) -> float:
    """Wait ``delay`` seconds; return the next wait (doubled, at most 1 s)."""
    await asyncio.sleep(delay)
    return min(delay * 2, 1.0)


async def _never(_: float) -> Any:  # pragma: no cover - follow and events route themselves
    raise Unavailable("routed locally")


def _relay_push(out: Channel, item: tuple[int, bytes], last: int | None, started: bool) -> int:
    """Push one version to a relayed follower: never twice, never backwards; count skips."""
    version, data = item
    if last is not None and version <= last and started:
        return last
    if started and last is not None and version > last + 1:
        out.skipped += version - last - 1  # versions committed while it moved: conflated
    out.push(version, data)
    return version
