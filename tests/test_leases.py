"""Partition leases with epochs, in PostgreSQL's time, and fenced commits (the cluster's base).

The node runtime that uses them (membership loop, self-fencing, forwarding) comes with the
rest of the cluster; these tests drive the backend's rows directly, as two nodes would.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg  # type: ignore[import-untyped]
import pytest

import pachyderm
from pachyderm._core._partitions import fair_share, partition_of
from pachyderm.backends import Fence, Postgres, Write

from .conftest import PostgresSchemas


def test_partition_of_is_stable_and_spread() -> None:
    # Stable across processes and versions: these values are a promise (data is placed by them).
    assert partition_of("app.Counter", "my_counter", 256) == partition_of(
        "app.Counter", "my_counter", 256
    )
    assert [partition_of("T", f"k{i}", 256) for i in range(5)] == [
        partition_of("T", f"k{i}", 256) for i in range(5)
    ]
    assert partition_of("T", "k0", 256) == 62  # fixed: a change of hash would move every entity
    spread = Counter(partition_of("T", f"k{i}", 16) for i in range(16_000))
    assert len(spread) == 16
    assert max(spread.values()) < 1.2 * 1000


def test_fair_share_is_balanced_deterministic_and_moves_little() -> None:
    three = fair_share(["n1", "n2", "n3"], 256)
    assert sorted(len(ps) for ps in three.values()) == [85, 85, 86]
    assert sorted(p for ps in three.values() for p in ps) == list(range(256))
    assert fair_share(["n3", "n1", "n2", "n1"], 256) == three  # order and repeats do not matter
    four = fair_share(["n1", "n2", "n3", "n4"], 256)
    assert sorted(len(ps) for ps in four.values()) == [64, 64, 64, 64]
    moved = sum(len(set(three[n]) - set(four[n])) for n in three)
    assert moved <= 80  # about the newcomer's share (64), not a reshuffle of 256
    assert fair_share([], 8) == {}


async def _opened(postgres: PostgresSchemas, same_as: Postgres | None = None) -> Postgres:
    backend = postgres.new() if same_as is None else postgres.reopen(same_as)
    assert isinstance(backend, Postgres)
    await backend.open("default")
    return backend


async def test_membership_and_the_cluster_size(postgres: PostgresSchemas) -> None:
    one = await _opened(postgres)
    two = await _opened(postgres, one)
    try:
        assert await one.cluster_size(16) == 16
        assert await two.cluster_size(32) == 16  # the first node's word holds
        await one.join("n1", "127.0.0.1:7001", "T:1")
        await two.join("n2", "127.0.0.1:7002", "T:1")
        assert await one.members(60) == [
            ("n1", "127.0.0.1:7001", "T:1"),
            ("n2", "127.0.0.1:7002", "T:1"),
        ]
        await two.leave("n2")
        await one.heartbeat("n1")
        assert [m[0] for m in await two.members(60)] == ["n1"]
        await two.join("n3", "127.0.0.1:7003", "T:1")
        assert await one.forget_nodes(60) == []  # nobody that old
        await asyncio.sleep(0.05)
        await one.heartbeat("n1")
        assert await one.forget_nodes(0.04) == ["n3"]  # silent longer than that: forgotten
        count, rows = await two.nodes()
        assert count == 16
        assert [r[0] for r in rows] == ["n1"]
        with pytest.raises(pachyderm.InvalidOptions):
            await one.cluster_size(0)
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_lease_is_held_once_and_expires_in_database_time(
    postgres: PostgresSchemas,
) -> None:
    n1 = await _opened(postgres)
    n2 = await _opened(postgres, n1)
    try:
        assert await n1.claim("n1", [0, 1, 2], lease=0.5) == {0: 1, 1: 1, 2: 1}
        assert await n2.claim("n2", [1, 2, 3], lease=0.5) == {3: 1}  # 1 and 2 are held
        assert await n1.claim("n1", [0], lease=0.5) == {0: 1}  # one's own: extended, same epoch
        assert await n1.renew("n1", {0: 1, 1: 1, 3: 1}, lease=0.5) == {0: 1, 1: 1}  # 3 is not its
        # Fenced writes: n1 may write in partition 0 at epoch 1; n2 may not, nor at a wrong epoch.
        ok = Write("T", "a", 0, 1, 1, b"a", fence=Fence("n1", 0, 1))
        stale = Write("T", "b", 0, 1, 1, b"b", fence=Fence("n1", 0, 2))
        foreign = Write("T", "c", 0, 1, 1, b"c", fence=Fence("n2", 0, 1))
        assert await n1.commit([ok, stale, foreign]) == [True, False, False]
        await asyncio.sleep(0.7)  # n1 is paused past its lease (SIGSTOP, say)
        zombie = Write("T", "a", 1, 2, 1, b"late", fence=Fence("n1", 0, 1))
        assert await n1.commit([zombie]) == [False]  # expired: refused, even before a takeover
        assert await n1.renew("n1", {0: 1}, lease=0.5) == {}  # too late to renew
        assert await n2.claim("n2", [0], lease=5) == {0: 2}  # the takeover: epoch + 1
        assert await n1.commit([zombie]) == [False]
        newer = Write("T", "a", 1, 2, 1, b"new", fence=Fence("n2", 0, 2))
        assert await n2.commit([newer]) == [True]
        (row,) = await n1.load_many([("T", "a")])
        assert row is not None
        assert (row.version, row.data) == (2, b"new")
        # A graceful hand-off: released with epoch + 1, claimable at once by the other node.
        assert await n2.release("n2", {0: 2, 3: 1}) == [0, 3]
        assert await n1.claim("n1", [0], lease=5) == {0: 4}
        leases = {p: (owner, epoch) for p, owner, epoch, _ in await n1.leases()}
        assert leases[0] == ("n1", 4)
        assert leases[3] == (None, 2)
    finally:
        await n1.aclose()
        await n2.aclose()


async def test_a_takeover_waits_for_a_commit_in_flight(postgres: PostgresSchemas) -> None:
    """The commit holds its lease row share-locked: the new owner's claim comes after it."""
    n1 = await _opened(postgres)
    n2 = await _opened(postgres, n1)
    conn = await asyncpg.connect(postgres.server.dsn)
    try:
        assert await n1.claim("n1", [7], lease=0.3) == {7: 1}
        schema = n1.schema
        transaction = conn.transaction()
        await transaction.start()
        # What a fenced commit's transaction does first (the `fences` statement).
        rows = await conn.fetch(
            f"SELECT p FROM {schema}.partitions WHERE world = 'default' AND p = 7"
            " AND owner = 'n1' AND epoch = 1 AND lease_until > now() FOR SHARE"
        )
        assert len(rows) == 1
        await asyncio.sleep(0.4)  # the lease expires while the commit is in flight
        claim = asyncio.create_task(n2.claim("n2", [7], lease=5))
        await asyncio.sleep(0.3)
        assert not claim.done()  # blocked behind the commit's lock
        await transaction.commit()
        assert await asyncio.wait_for(claim, 10) == {7: 2}
    finally:
        await conn.close()
        await n1.aclose()
        await n2.aclose()
