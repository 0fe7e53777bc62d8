"""The cluster under failure, with nodes in child processes on our own PostgreSQL.

Each node runs a counter workload and prints every acknowledged result; the checks then read
the stored states: every acknowledged increment is there, and no value was acknowledged twice
(no fork: two commits on one version).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import msgspec
import pytest

from pachyderm import backends
from pachyderm._core._partitions import partition_of
from pachyderm.testing import PostgresServer

from ._nodes import NodeProcess, check_history, wait_until

LEASE = 1.0
KEYS = 12
PARTITIONS = 32  # as _cluster_node sets

_schemas = iter(range(1, 1000))


@pytest.fixture
def schema() -> str:
    return f"failover{next(_schemas)}"


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.kill()


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _backend(dsn: str, schema: str) -> backends.Postgres:
    backend = backends.Postgres(dsn, schema=schema)
    await backend.open("default")
    return backend


def owners(dsn: str, schema: str) -> dict[int, str | None]:
    async def read() -> dict[int, str | None]:
        backend = await _backend(dsn, schema)
        try:
            return {p: owner for p, owner, _, left in await backend.leases() if left > 0}
        finally:
            await backend.aclose()

    return _run(read())


def stored(dsn: str, schema: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        backend = await _backend(dsn, schema)
        try:
            refs = [("Counter", f"k{i}") for i in range(KEYS)]
            got = await backend.load_many(refs)
            return {
                ref[1]: msgspec.msgpack.decode(s.data)
                for ref, s in zip(refs, got, strict=True)
                if s
            }
        finally:
            await backend.aclose()

    return _run(read())


def keys_of(owner_by_partition: dict[int, str | None], node_id: str) -> list[str]:
    return [
        f"k{i}"
        for i in range(KEYS)
        if owner_by_partition.get(partition_of("Counter", f"k{i}", PARTITIONS)) == node_id
    ]


def balanced(server: PostgresServer, schema: str, count: int) -> bool:
    held = owners(server.dsn, schema)
    return len(held) == PARTITIONS and len(set(held.values())) == count


def start(nodes: list[NodeProcess], server: PostgresServer, schema: str, count: int) -> None:
    """Start ``count`` nodes running the workload; return when they share every partition."""
    for i in range(count):
        nodes.append(NodeProcess(server.dsn, schema, f"n{i}", lease=LEASE, keys=KEYS))
    for node in nodes:
        node.wait_ready()
    assert wait_until(lambda: balanced(server, schema, count), 20)
    time.sleep(0.5)


def test_sigkill_of_an_owner_loses_nothing_and_its_entities_come_back(
    postgres_server: PostgresServer, schema: str, nodes: list[NodeProcess]
) -> None:
    start(nodes, postgres_server, schema, 3)
    victim = nodes[1]
    theirs = keys_of(owners(postgres_server.dsn, schema), victim.node_id)
    assert theirs, "the victim owns none of the keys"
    victim.kill()
    after = time.time() + 0.05  # answers it sent before it died may still be arriving
    survivors = [nodes[0], nodes[2]]

    def served_again() -> bool:
        late = {key for node in survivors for key, _, t in node.acks() if t > after}
        return set(theirs) <= late

    assert wait_until(served_again, 10 * LEASE), "the dead node's entities were not taken over"
    time.sleep(0.5)
    for node in survivors:
        node.stop()
    acked = check_history(nodes, stored(postgres_server.dsn, schema))
    assert set(acked) == {f"k{i}" for i in range(KEYS)}
    # The dead node's partitions belong to the survivors now.
    assert set(owners(postgres_server.dsn, schema).values()) <= {"n0", "n2", None}


def test_a_node_paused_past_its_lease_cannot_commit_when_it_resumes(
    postgres_server: PostgresServer, schema: str, nodes: list[NodeProcess]
) -> None:
    start(nodes, postgres_server, schema, 3)
    zombie = nodes[1]
    theirs = keys_of(owners(postgres_server.dsn, schema), zombie.node_id)
    zombie.signal(signal.SIGSTOP)
    paused = time.time()
    time.sleep(4 * LEASE)  # well past its lease: the others took its partitions over
    taken = owners(postgres_server.dsn, schema)
    assert zombie.node_id not in taken.values()
    before = len(zombie.acks())
    zombie.signal(signal.SIGCONT)
    time.sleep(2 * LEASE)
    for node in nodes:
        node.stop()
    acked = check_history(nodes, stored(postgres_server.dsn, schema))
    assert set(acked) >= set(theirs)
    # It resumed as a node again: its later acknowledgements were real commits (the checks
    # above), made through the new owners or on partitions it claimed back.
    assert len(zombie.acks()) >= before
    late = [t for _, _, t in zombie.acks() if t > paused]
    assert late, "the resumed node never served again"
    # On waking it found its leases gone: by its own clock (self-fenced) or by the database's.
    stats = zombie.closed_stats()
    assert stats["self_fenced"] + stats["lost"] >= 1, stats


def test_a_clean_shutdown_hands_off_without_errors(
    postgres_server: PostgresServer, schema: str, nodes: list[NodeProcess]
) -> None:
    start(nodes, postgres_server, schema, 2)
    leaving = nodes[1]
    left = time.time()
    leaving.stop()
    assert [w for w in leaving.lines if w[0] == "closed"]
    time.sleep(1.5)
    nodes[0].stop()
    errors = [w for w in nodes[0].lines if w[0] == "err" and float(w[3]) > left]
    assert errors == [], errors[:5]
    acked = check_history(nodes, stored(postgres_server.dsn, schema))
    assert set(acked) == {f"k{i}" for i in range(KEYS)}


def test_postgres_restarted_under_load_the_nodes_recover(
    postgres_server: PostgresServer, schema: str, nodes: list[NodeProcess]
) -> None:
    start(nodes, postgres_server, schema, 2)
    restarted = time.time()
    postgres_server.restart()
    time.sleep(0.5)

    def serving() -> bool:
        late = {key for node in nodes for key, _, t in node.acks() if t > restarted + 0.5}
        return len(late) == KEYS

    assert wait_until(serving, 30), [(n.node_id, n.lines[-3:], n.stderr[-1500:]) for n in nodes]
    for node in nodes:
        node.stop()
    check_history(nodes, stored(postgres_server.dsn, schema))
