"""The cluster in one process: several nodes (worlds) on one PostgreSQL world.

Routing from any node, followers and event streams that move with their partitions, messages
and timers across nodes, hand-off when nodes join and leave, partitions without an owner,
types and versions across nodes, and the node-to-node connection's defences.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

import pachyderm
from pachyderm import Update, after, backends, send
from pachyderm._cluster import Node
from pachyderm._transport import Peer
from pachyderm.testing import PostgresServer

SECRET = "a cluster secret for the tests"
LEASE = 1.0
_schemas = itertools.count(1)


class Counter(pachyderm.Entity):
    name = "Counter"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> int:
        return state + 1


class CounterV2(Counter):
    name = "Counter"
    version = 2

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> int:
        return state + 100

    def upgrade(self, state: Any, from_version: int) -> int:
        return int(state) * 10


class Ledger(pachyderm.Entity):
    name = "Ledger"

    def init(self) -> list[Any]:
        return []

    def activate(self, message: Any, state: list[Any]) -> list[Any]:
        return [*state, message]


class Sender(pachyderm.Entity):
    """``[key, n]``: ``n`` numbered messages to ``Ledger(key)``; ``["later", key]``: a timer."""

    name = "Sender"

    def init(self) -> int:
        return 0

    def activate(self, message: Any, state: int) -> Any:
        if message[0] == "later":
            return Update(state + 1, after(0.2, "ding", to=(Ledger, message[1])))
        key, count = message
        return Update(state + 1, *(send((Ledger, key), [self.key, i]) for i in range(count)))


class Account(pachyderm.EventSourced):
    name = "Account"

    def init(self) -> int:
        return 0

    def handle(self, command: Any, state: int) -> list[Any]:
        return [command]

    def apply(self, event: Any, state: int) -> int:
        return state + int(event)


ALL = [Counter, Ledger, Sender, Account]


class Cluster:
    """Nodes of one world on a fresh schema; closes them all at the end."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.schema = f"cl{next(_schemas)}"
        self.worlds: list[pachyderm.World] = []

    async def node(
        self, name: str, entities: list[type[pachyderm.Entity]] | None = None, **options: Any
    ) -> pachyderm.World:
        world = pachyderm.World(
            backends.Postgres(self.server.dsn, schema=self.schema, max_size=4),
            entities=ALL if entities is None else entities,
            listen="127.0.0.1:0",
            secret=options.pop("secret", SECRET),
            node_id=name,
            lease=options.pop("lease", LEASE),
            partitions=16,
            **options,
        )
        await world.start()
        self.worlds.append(world)
        return world

    async def pair(self) -> tuple[pachyderm.World, pachyderm.World]:
        """Nodes "a" and "b", once they serve every partition between them."""
        a = await self.node("a")
        b = await self.node("b")
        await self.settle(2)
        return a, b

    async def alone(self) -> tuple[pachyderm.World, str, int]:
        """Node "a" alone, serving every partition, and the host and port it listens on."""
        a = await self.node("a")
        await self.settle(1)
        host, _, port = node_of(a).address.rpartition(":")
        return a, host, int(port)

    async def close(self) -> None:
        for world in reversed(self.worlds):
            await world.aclose()

    async def settle(self, count: int, timeout: float = 10.0) -> None:
        """Wait until every partition is served, by ``count`` nodes."""

        def done() -> bool:
            live = [w for w in self.worlds if not w._closed]
            held = [set(w._node.held) for w in live if w._node is not None]
            return (
                len(held) == count
                and all(held)
                and sorted(p for h in held for p in h) == list(range(16))
                and all(any(w._node.serving(p) for w in live if w._node) for p in range(16))
            )

        await until(done, timeout)


def node_of(world: pachyderm.World) -> Node:
    """The cluster node of a world that listens."""
    assert world._node is not None
    return world._node


async def until(predicate: Callable[[], Any], seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():  # a condition with no event
            await asyncio.sleep(0.01)


@pytest.fixture
async def cluster(postgres_server: PostgresServer) -> AsyncIterator[Cluster]:
    made = Cluster(postgres_server)
    try:
        yield made
    finally:
        try:
            await asyncio.wait_for(made.close(), 60)
        except TimeoutError:  # a node that cannot stop: say where every task waits
            for task in asyncio.all_tasks():
                task.print_stack(limit=8)
            raise


def owner(cluster: Cluster, ref: tuple[type[pachyderm.Entity], str]) -> pachyderm.World:
    for world in cluster.worlds:
        node = world._node
        assert node is not None
        if not world._closed and node.serving(node.partition(ref[0].name, ref[1])):
            return world
    raise AssertionError(f"nobody serves {ref}")


def keys_on(world: pachyderm.World, count: int) -> list[str]:
    """``count`` keys whose partitions ``world`` serves."""
    node = world._node
    assert node is not None
    found = (f"k{i}" for i in itertools.count() if node.serving(node.partition("Counter", f"k{i}")))
    return list(itertools.islice(found, count))


async def test_calls_work_from_every_node(cluster: Cluster) -> None:
    a, b = await cluster.pair()
    for i in range(20):
        world = (a, b)[i % 2]
        assert await world.activate((Counter, f"k{i % 5}"), "inc") == i // 5 + 1
    for world in (a, b):
        assert [await world.read((Counter, f"k{i}")) for i in range(5)] == [4] * 5
    forwarded = a.statistics()["cluster"]["router"]["forwarded"]  # type: ignore[index]
    assert forwarded > 0  # some of a's calls went to b's partitions
    # Each entity ran on one node only: the owner of its partition.
    assert sorted(len(w._engine.residents) for w in (a, b)) != [5, 5]


async def test_a_follower_on_another_node_sees_every_version_in_order(cluster: Cluster) -> None:
    a, b = await cluster.pair()
    key = keys_on(a, 1)[0]
    seen: list[tuple[int, int]] = []

    async def follow() -> None:
        async for version, state in b.follow((Counter, key), versions=True):
            seen.append((version, state))
            if version == 300:
                return

    task = asyncio.create_task(follow())
    await until(lambda: seen)
    for _ in range(60):  # bursts of 5 versions; those between two polls wait in its session
        await asyncio.gather(*(a.activate((Counter, key), "inc") for _ in range(5)))
    await asyncio.wait_for(task, 20)
    assert seen == [(v, v) for v in range(0, 301)]  # every version, once, in order


async def test_followers_move_with_their_partition_without_gaps_or_repeats(
    cluster: Cluster,
) -> None:
    a = await cluster.node("a")
    await cluster.settle(1)
    keys = [f"k{i}" for i in range(8)]
    seen: dict[str, list[int]] = {k: [] for k in keys}
    skipped: dict[str, int] = {}

    async def follow(key: str) -> None:
        follower = a.follow((Counter, key), versions=True)
        async for version, _ in follower:
            seen[key].append(version)
            if version == 30:
                skipped[key] = follower.skipped
                return

    tasks = [asyncio.create_task(follow(k)) for k in keys]
    await until(lambda: all(seen.values()))
    for round in range(30):
        if round == 10:
            await cluster.node("b")  # half of the partitions move to b, under load
        if round == 20:
            await cluster.node("c")
        await asyncio.gather(*(a.activate((Counter, k), "inc") for k in keys))
        await asyncio.sleep(0.02)
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    for key in keys:
        versions = seen[key]
        assert versions == sorted(set(versions)), versions  # never twice, never backwards
        assert versions[-1] == 30
        # Every version is there, or counted as skipped: nothing is skipped silently.
        assert len(versions) - 1 + skipped[key] == 30 - versions[0]


async def test_an_event_stream_on_another_node_reads_every_event(cluster: Cluster) -> None:
    a, b = await cluster.pair()
    key = next(k for k in keys_on(a, 5))
    got: list[tuple[int, Any]] = []

    async def read() -> None:
        async for seq, event in b.events((Account, key)):
            got.append((seq, event))
            if seq == 20:
                return

    task = asyncio.create_task(read())
    for i in range(1, 21):
        await (a, b)[i % 2].activate((Account, key), i)
    await asyncio.wait_for(task, 15)
    assert got == [(i, i) for i in range(1, 21)]
    assert await b.read((Account, key)) == sum(range(1, 21))
    assert await b.append((Account, key), 5, expected=20) == sum(range(1, 21)) + 5


async def test_messages_and_timers_cross_nodes_and_apply_once(cluster: Cluster) -> None:
    a, b = await cluster.pair()
    # Senders on a's partitions, ledgers on b's, and the other way around.
    na, nb = node_of(a), node_of(b)
    senders = [k for k in (f"s{i}" for i in range(200)) if na.serving(na.partition("Sender", k))]
    ledgers = [k for k in (f"l{i}" for i in range(200)) if nb.serving(nb.partition("Ledger", k))]
    for sender in senders[:5]:
        await a.activate((Sender, sender), [ledgers[0], 20])
    await a.activate((Sender, senders[0]), ["later", ledgers[1]])

    async def ledger(key: str) -> list[Any]:
        return list(await a.read((Ledger, key)))

    async def complete() -> bool:
        return len(await ledger(ledgers[0])) == 100 and await ledger(ledgers[1]) == ["ding"]

    async with asyncio.timeout(15):
        while not await complete():
            await asyncio.sleep(0.05)
    entries = await ledger(ledgers[0])
    assert len(entries) == len({tuple(e) for e in entries}) == 100  # each once
    for sender in senders[:5]:  # in order per sender
        assert [i for s, i in entries if s == sender] == list(range(20))


async def test_a_node_that_leaves_hands_off_and_callers_see_no_error(cluster: Cluster) -> None:
    a, b = await cluster.pair()
    keys = [f"k{i}" for i in range(20)]
    errors: list[BaseException] = []
    counts = dict.fromkeys(keys, 0)
    stop = asyncio.Event()

    async def work(key: str) -> None:
        while not stop.is_set():
            try:
                counts[key] = await a.activate((Counter, key), "inc")
            except pachyderm.PachydermError as exc:
                errors.append(exc)

    tasks = [asyncio.create_task(work(k)) for k in keys]
    await asyncio.sleep(0.3)
    await b.aclose()  # cleanly: its partitions drain and move to a
    await cluster.settle(1)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*tasks)
    assert errors == []
    for key in keys:
        assert await a.read((Counter, key)) == counts[key] > 0


async def test_a_partition_without_a_serving_owner_gives_unavailable_at_the_deadline(
    cluster: Cluster,
) -> None:
    a = await cluster.node("a")
    await cluster.settle(1)
    node = a._node
    assert node is not None
    key = "k1"
    p = node.partition("Counter", key)
    # Another "node" (rows only) holds that partition, and never serves it.
    await a.backend.join("ghost", "127.0.0.1:1", "{}")  # type: ignore[attr-defined]
    epoch = node.held[p]
    node._lose([p])
    await a.backend.release("a", {p: epoch})  # type: ignore[attr-defined]
    assert await a.backend.claim("ghost", [p], 30.0)  # type: ignore[attr-defined]
    await node.refresh(force=True)
    with pytest.raises(pachyderm.Unavailable):
        await a.activate((Counter, key), "inc", timeout=0.5)
    assert await a.activate((Counter, "k2" if node.partition("Counter", "k2") != p else "k3"), 1)


async def test_a_node_without_a_type_takes_no_partitions(cluster: Cluster) -> None:
    a = await cluster.node("a")
    b = await cluster.node("b", entities=[Counter])  # lacks Ledger, Sender, Account
    await asyncio.sleep(3 * LEASE)
    assert b._node is not None
    assert not b._node.held
    assert await b.activate((Counter, "x"), "inc") == 1  # it forwards
    with pytest.raises(pachyderm.UnknownEntityType):
        await b.activate((Ledger, "y"), "no")
    assert await a.read((Counter, "x")) == 1


async def test_a_rolling_upgrade_from_version_1_to_2(cluster: Cluster) -> None:
    a = await cluster.node("a", entities=[Counter])
    b = await cluster.node("b", entities=[Counter])
    await cluster.settle(2)
    on_a, on_b = keys_on(a, 4), keys_on(b, 4)
    for key in on_a + on_b:
        await a.activate((Counter, key), "inc")  # version 1 everywhere: 1
    # b restarts with version 2 of the type; a still runs version 1.
    await b.aclose()
    b2 = await cluster.node("b2", entities=[CounterV2])
    await cluster.settle(2)
    v2_keys = [k for k in on_a + on_b if owner(cluster, (Counter, k)) is b2]
    v1_keys = [k for k in on_a + on_b if owner(cluster, (Counter, k)) is a]
    assert v2_keys
    assert v1_keys
    for key in v2_keys:  # served by b2, from either node: upgraded (1 -> 10), then + 100
        assert await a.activate((Counter, key), "inc") == 110
    for key in v1_keys:
        assert await b2.activate((CounterV2, key), "inc") == 2  # a runs it, as version 1
    # a leaves: b2 takes everything, upgrading the version-1 states it loads.
    await a.aclose()
    await cluster.settle(1)
    for key in v1_keys:
        assert await b2.read((CounterV2, key)) == 20
        assert await b2.activate((CounterV2, key), "inc") == 120  # now stored by version 2
    # A version-1 node never activates a state written by version 2.
    a1 = await cluster.node("a1", entities=[Counter])
    await cluster.settle(2)
    newer = [k for k in v1_keys + v2_keys if owner(cluster, (Counter, k)) is a1]
    assert newer
    for key in newer:
        with pytest.raises(pachyderm.IncompatibleVersion):
            await b2.activate((CounterV2, key), "inc")


async def test_a_bad_secret_or_a_bad_frame_is_refused_and_the_node_keeps_serving(
    cluster: Cluster,
) -> None:
    a, host, port = await cluster.alone()
    with pytest.raises(pachyderm.Unavailable):
        await Peer.connect(host, port, "not the cluster's secret!", "intruder")
    # Garbage, then a frame over the limit, on raw connections.
    for payload in (b"\x00\x00\x00\x05hello", (1 << 30).to_bytes(4, "big") + b"x" * 64):
        reader, writer = await asyncio.open_connection(host, port)
        await reader.readexactly(4)  # the server's hello frame header
        writer.write(payload)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 12) is not None  # it closes
        writer.close()
    # A peer that knows the secret but sends a malformed request gets an error answer.
    peer = await Peer.connect(host, port, SECRET, "tester")
    with pytest.raises(pachyderm.PachydermError):
        await peer.call("activate", ["Counter"])
    with pytest.raises(pachyderm.PachydermError):
        await peer.call("no such request", [])
    # An idempotency key that no backend can store, from a peer, is refused before any I/O.
    message = msgspec.msgpack.encode("inc")
    with pytest.raises(pachyderm.PachydermError, match="idempotency key"):
        await peer.call("activate", ["Counter", "nul", message, "a\x00b", 5.0])
    assert await a.read((Counter, "nul")) == 0
    await peer.close()
    assert await a.activate((Counter, "still"), "inc") == 1
    assert a._node.server.refused >= 3


async def test_cluster_options_are_checked(postgres_server: PostgresServer) -> None:
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(backends.Memory(), listen="127.0.0.1:0", secret=SECRET)
    pg = backends.Postgres(postgres_server.dsn, schema="clopts")
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(pg, listen="127.0.0.1:0")
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(pg, listen="127.0.0.1:0", secret="short")
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(pg, listen="nowhere", secret=SECRET)
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(pg, node_id="n1")
    with pytest.raises(pachyderm.InvalidOptions):
        pachyderm.World(pg, listen="127.0.0.1:0", secret=SECRET, lease=0)
    first = pachyderm.World(pg, listen="127.0.0.1:0", secret=SECRET, partitions=8)
    async with first:
        other = pachyderm.World(
            backends.Postgres(postgres_server.dsn, schema="clopts"),
            listen="127.0.0.1:0",
            secret=SECRET,
            partitions=16,
        )
        with pytest.raises(pachyderm.InvalidOptions, match="partitions"):
            await other.start()


async def test_pachyderm_status_shows_nodes_partitions_owners_and_residents(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pachyderm._cli import main

    a = await cluster.node("a")
    await cluster.node("b")
    await cluster.settle(2)
    for i in range(6):
        await a.activate((Counter, f"k{i}"), "inc")
    url = f"{cluster.server.dsn}?schema={cluster.schema}"
    monkeypatch.setenv("PACHYDERM_SECRET", SECRET)
    assert await asyncio.to_thread(main, ["status", "--db", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["partitions"] == 16
    assert [n["node"] for n in status["nodes"]] == ["a", "b"]
    owned = {n["node"]: set(n["partitions"]) for n in status["nodes"]}
    assert owned["a"] | owned["b"] == set(range(16))
    assert not owned["a"] & owned["b"]
    leases = {row["partition"]: row for row in status["leases"]}
    for node in ("a", "b"):
        for p in owned[node]:
            assert leases[p]["owner"] == node
            assert leases[p]["epoch"] >= 1
    residents = sum(int(n) for node in status["nodes"] for n in node["resident"].values())
    assert residents == 6
    monkeypatch.delenv("PACHYDERM_SECRET")
    assert await asyncio.to_thread(main, ["status", "--db", url]) == 0
    text = capsys.readouterr().out
    assert "world 'default': 16 partitions" in text
    assert "2 nodes:" in text
    assert "resident" not in text  # no secret: nothing asked of the nodes
    with pytest.raises(SystemExit):  # a usage error: status is for PostgreSQL
        main(["status", "--db", "memory://"])


async def crash(world: pachyderm.World) -> None:
    """Stop a node as a kill would: no hand-off, no release, no goodbye (its leases expire)."""
    node = world._node
    assert node is not None
    tasks = [node._task, *node._handoffs, *world._engine._tasks, *world._engine.commits]
    for task in tasks:
        if task is not None:
            task.cancel()
    await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
    await node.router.close()
    await node.server.close()
    world._closed = True
    world._serving = False
    await world.backend.aclose()


async def test_after_a_crash_the_outbox_and_timers_of_the_dead_node_go_on(
    cluster: Cluster,
) -> None:
    a, b = await cluster.pair()
    na = node_of(a)
    mine = [k for k in (f"x{i}" for i in range(300)) if na.serving(na.partition("Sender", k))]
    ledger = next(k for k in (f"y{i}" for i in range(300)) if na.serving(na.partition("Ledger", k)))
    later = next(k for k in (f"z{i}" for i in range(300)) if na.serving(na.partition("Ledger", k)))
    # Messages and a timer committed on a, for entities of a's partitions; then a dies
    # before (or while) delivering them.
    a._engine.dispatcher.closing = True  # it delivers nothing more: the rows stay in storage
    for sender in mine[:3]:
        await a.activate((Sender, sender), [ledger, 10])
    await a.activate((Sender, mine[0]), ["later", later])
    await crash(a)
    cluster.worlds.remove(a)
    await cluster.settle(1, timeout=10 * LEASE)

    async def complete() -> bool:
        return len(await b.read((Ledger, ledger))) == 30 and await b.read((Ledger, later)) == [
            "ding"
        ]

    async with asyncio.timeout(15):
        while not await complete():
            await asyncio.sleep(0.05)
    entries = await b.read((Ledger, ledger))
    for sender in mine[:3]:
        assert [i for s, i in entries if s == sender] == list(range(10))  # once each, in order


async def test_a_node_that_wrongly_believes_it_owns_a_partition_cannot_commit(
    cluster: Cluster,
) -> None:
    a, b = await cluster.pair()
    na, nb = node_of(a), node_of(b)
    key = keys_on(a, 1)[0]
    p = na.partition("Counter", key)
    assert await a.activate((Counter, key), "inc") == 1
    # a stops renewing (a pause), but its clock says its leases are good: the worst zombie.
    assert na._task is not None
    na._task.cancel()
    na.valid_until = float("inf")
    await a.backend.leave("a")  # type: ignore[attr-defined]

    def b_took_it() -> bool:
        return nb.serving(p)

    await until(b_took_it, 10 * LEASE)
    assert na.serving(p)  # a still believes it
    # a's write carries its old fence: the database refuses it, a learns that it lost the
    # partition, and the call goes to b, which commits on the stored state.
    assert await a.activate((Counter, key), "inc", timeout=5) == 2
    assert a.statistics()["fenced"] == 1
    assert not na.serving(p)
    assert await b.read((Counter, key)) == 2


async def test_a_closed_node_takes_no_calls(cluster: Cluster) -> None:
    a, b = await cluster.pair()
    key = keys_on(a, 1)[0]
    await b.aclose()
    with pytest.raises(pachyderm.Unavailable, match="not running"):
        await b.activate((Counter, key), "inc")  # not forwarded by a node that has left
    with pytest.raises(pachyderm.Unavailable):
        await b.read((Counter, key))
    assert await a.activate((Counter, key), "inc") == 1


async def test_event_streams_move_with_their_partition_and_never_skip(cluster: Cluster) -> None:
    a = await cluster.node("a")
    await cluster.settle(1)
    keys = [f"acct{i}" for i in range(6)]
    got: dict[str, list[int]] = {k: [] for k in keys}

    async def read(key: str) -> None:
        async for seq, _ in a.events((Account, key)):
            got[key].append(seq)
            if seq == 24:
                return

    tasks = [asyncio.create_task(read(k)) for k in keys]
    for round in range(24):
        if round == 8:
            await cluster.node("b")  # partitions move away from a, under load
        if round == 16:
            await cluster.node("c")
        await asyncio.gather(*(a.activate((Account, k), 1) for k in keys))
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for key in keys:
        assert got[key] == list(range(1, 25))  # every event once, in order, across the moves


async def test_a_remote_followers_session_keeps_the_versions_between_its_polls(
    cluster: Cluster,
) -> None:
    a, host, port = await cluster.alone()
    peer = await Peer.connect(host, port, SECRET, "a-remote-follower")
    try:
        first = await peer.call("follow", ["Counter", "s1", None, 1.0, "f/1"])
        assert [v for v, _ in first] == [0]
        for _ in range(5):  # while no poll is outstanding
            await a.activate((Counter, "s1"), "inc")
        again = await peer.call("follow", ["Counter", "s1", 0, 1.0, "f/1"])
        assert [v for v, _ in again] == [1, 2, 3, 4, 5]  # none conflated away
        # Another follower, without a session yet, starts from the current version.
        other = await peer.call("follow", ["Counter", "s1", 0, 1.0, "f/2"])
        assert [v for v, _ in other] == [5]
    finally:
        await peer.close()


async def test_remote_follower_sessions_expire_least_recently_polled_first(
    cluster: Cluster,
) -> None:
    a, host, port = await cluster.alone()
    peer = await Peer.connect(host, port, SECRET, "a-remote-follower")
    try:
        for sid in ("f/1", "f/2", "f/3"):
            await peer.call("follow", ["Counter", "s2", None, 0.01, sid])
        await peer.call("follow", ["Counter", "s2", 0, 0.01, "f/1"])  # f/1 polled again
        router = node_of(a).router
        sessions = router._sessions
        assert list(sessions) == ["f/2", "f/3", "f/1"]
        sessions["f/2"].used -= 1000.0  # f/2 stopped polling long ago
        router.expire_sessions(node_of(a).clock.monotonic())
        assert list(sessions) == ["f/3", "f/1"]
    finally:
        await peer.close()
