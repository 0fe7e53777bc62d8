"""``pachyderm status``: the nodes of a cluster, its partitions, their owners and epochs.

Read from the database (the ``nodes`` and ``partitions`` rows of the world), then, when the
cluster's secret is in ``$PACHYDERM_SECRET`` (never on the command line, where ``ps`` shows
it), each live node is asked over the transport for its resident entities per partition.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from typing import Any, Final

from ._errors import InvalidOptions, PachydermError
from ._transport import Peer
from .backends._postgres import Postgres

__all__ = ["SECRET_VARIABLE", "gather", "render"]

SECRET_VARIABLE: Final = "PACHYDERM_SECRET"  # noqa: S105 - a variable name


async def gather(backend: Postgres, world: str) -> dict[str, Any]:
    """Everything ``status`` shows, as JSON-ready data. Opens and closes ``backend``."""
    if not isinstance(backend, Postgres):
        raise InvalidOptions(
            "status is for a cluster: its backend is PostgreSQL (--db postgresql://…)"
        )
    await backend.open(world)
    try:
        count, nodes = await backend.nodes()
        leases = await backend.leases()
    finally:
        await backend.aclose()
    owners: dict[str | None, list[tuple[int, int]]] = defaultdict(list)
    for p, owner, epoch, left in leases:
        owners[owner if left > 0 else None].append((p, epoch))
    out: dict[str, Any] = {
        "world": world,
        "partitions": count,
        "nodes": [],
        "unowned": sorted(p for p, _ in owners.get(None, []))
        + sorted(set(range(count or 0)) - {p for p, *_ in leases}),
        "leases": [
            {"partition": p, "owner": owner, "epoch": epoch, "lease_left": round(max(left, 0.0), 3)}
            for p, owner, epoch, left in leases
        ],
    }
    secret = os.environ.get(SECRET_VARIABLE)
    for node_id, address, types, age in nodes:
        entry: dict[str, Any] = {
            "node": node_id,
            "address": address,
            "heartbeat_age": round(age, 3),
            "types": _types(types),
            "partitions": sorted(p for p, _ in owners.get(node_id, [])),
        }
        if secret:
            entry["resident"] = await _ask(node_id, address, secret)
        out["nodes"].append(entry)
    return out


async def _ask(node_id: str, address: str, secret: str) -> Any:
    host, _, port = address.rpartition(":")
    try:
        peer = await Peer.connect(host, int(port), secret, "pachyderm-status", timeout=2.0)
    except (PachydermError, ValueError) as exc:
        return f"unreachable: {exc}"
    try:
        answer = await peer.call("status", [], timeout=5.0)
    except (PachydermError, TimeoutError) as exc:
        return f"no answer: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await peer.close()
    return answer.get("resident") if isinstance(answer, dict) else answer


def _types(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def render(status: dict[str, Any]) -> str:
    """The text form of ``gather``'s result."""
    lines = [f"world {status['world']!r}: {status['partitions'] or 0} partitions"]
    if status["partitions"] is None:
        return lines[0] + " (no node has joined this world's cluster)"
    lines.append(f"{len(status['nodes'])} nodes:")
    for node in status["nodes"]:
        types = (
            ", ".join(f"{k} v{v}" for k, v in node["types"].items())
            if isinstance(node["types"], dict)
            else node["types"]
        )
        lines.append(
            f"  {node['node']}  {node['address']}  heartbeat {node['heartbeat_age']:.1f} s ago  "
            f"{len(node['partitions'])} partitions  types: {types}"
        )
        resident = node.get("resident")
        if isinstance(resident, dict):
            total = sum(int(n) for n in resident.values())
            lines.append(f"    {total} resident entities in {len(resident)} partitions")
        elif resident is not None:
            lines.append(f"    {resident}")
    lines.append("partitions (partition: owner@epoch, lease left):")
    for row in status["leases"]:
        owner = row["owner"] if row["lease_left"] > 0 and row["owner"] else "-"
        lines.append(f"  {row['partition']:>5}: {owner}@{row['epoch']}  {row['lease_left']:.1f} s")
    if status["unowned"]:
        lines.append(f"unowned: {', '.join(map(str, status['unowned']))}")
    return "\n".join(lines)
