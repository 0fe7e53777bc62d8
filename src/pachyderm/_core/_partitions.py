"""Partitions: which partition an entity is in, and which node should own each (sans-I/O).

Partitions, not entities, are the unit of ownership in a cluster. ``partition_of`` is a stable
hash (BLAKE2b of the type name and key; never Python's ``hash()``, which changes with every
process), so every node, of every version, puts an entity in the same partition.
``fair_share`` assigns partitions to the live nodes, each about ``count / len(nodes)``, by
rendezvous hashing with bounded load: a partition goes to the node that scores it highest among
those not full yet, so that a node joining or leaving moves little more than its share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final

__all__ = ["DEFAULT_PARTITIONS", "fair_share", "partition_of"]

#: The number of partitions of a world unless its first node says otherwise.
DEFAULT_PARTITIONS: Final = 256


def _score(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def partition_of(type_name: str, key: str, count: int) -> int:
    """The partition (``0 <= p < count``) of the entity ``(type_name, key)``: stable forever."""
    return _score(f"{type_name}\x00{key}") % count


def fair_share(nodes: Iterable[str], count: int) -> dict[str, list[int]]:
    """Each node's partitions: ``count // n`` or one more each, the same on every node.

    Deterministic for a set of node ids (their order does not matter).
    """
    members = sorted(set(nodes))
    out: dict[str, list[int]] = {node: [] for node in members}
    if not members:
        return out
    base, extra = divmod(count, len(members))
    topped = 0  # nodes that hold base + 1 (at most `extra` of them)
    for p in range(count):
        ranked = sorted(members, key=lambda node: _score(f"{node}\x00{p}"), reverse=True)
        for node in ranked:
            held = len(out[node])
            if held < base or (held == base and topped < extra):
                topped += held == base
                out[node].append(p)
                break
    return out
