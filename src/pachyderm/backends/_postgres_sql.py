"""The PostgreSQL backend's tables and statements (``{s}`` is the schema, a checked identifier).

Every table is keyed by world first: several worlds share one schema without touching each other,
and several schemas (``Postgres(dsn, schema=...)``) share one database. Text key columns use the
``"C"`` collation, so that keys compare and sort by code point, as Python strings do. Values are
only ever bound parameters; the schema's name is the one identifier put into the text, checked
against ``SCHEMA_NAME`` first.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["SCHEMA_NAME", "SCHEMA_VERSION", "TABLES", "sql"]

#: The version of the tables' layout, stored in ``{schema}.meta`` as ``schema_version``.
SCHEMA_VERSION: Final = 1
#: What a schema's name may be (a plain lower-case identifier, never quoted differently).
SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")

_T: Final = 'text COLLATE "C" NOT NULL'

#: The tables and indexes of version 1, created in one transaction by ``migrate``.
TABLES: Final = (
    # ``snapshot`` is NULL for a state entity's row; for an event-sourced entity it is the seq of
    # the state in ``state`` (0: none yet, ``state`` is empty).
    f"CREATE TABLE IF NOT EXISTS {{s}}.entities (world {_T}, type {_T}, key {_T},"
    " version bigint NOT NULL, type_version integer NOT NULL, state bytea NOT NULL,"
    " snapshot bigint NULL, PRIMARY KEY (world, type, key))",
    f"CREATE TABLE IF NOT EXISTS {{s}}.receipts (world {_T}, type {_T}, key {_T}, id {_T},"
    " version bigint NOT NULL, result bytea NOT NULL, at double precision NOT NULL,"
    " PRIMARY KEY (world, type, key, id))",
    "CREATE INDEX IF NOT EXISTS receipts_by_time ON {s}.receipts (world, at)",
    # The outbox: a row waits (``dead`` NULL) until a receiver's write consumes it; a dead letter
    # keeps its row with ``dead`` set.
    f"CREATE TABLE IF NOT EXISTS {{s}}.outbox (world {_T}, sender_type {_T}, sender_key {_T},"
    f" version bigint NOT NULL, idx integer NOT NULL, to_type {_T}, to_key {_T},"
    ' due double precision NOT NULL, name text COLLATE "C" NULL, message bytea NOT NULL,'
    " dead text NULL, PRIMARY KEY (world, sender_type, sender_key, version, idx))",
    "CREATE INDEX IF NOT EXISTS outbox_timers_by_due"
    " ON {s}.outbox (world, due, sender_type, sender_key, version, idx)"
    " WHERE dead IS NULL AND due > 0",
    "CREATE UNIQUE INDEX IF NOT EXISTS outbox_by_name"
    " ON {s}.outbox (world, sender_type, sender_key, name) WHERE name IS NOT NULL AND dead IS NULL",
    # The cluster: its size, its members, and one lease row per partition (owner, epoch, and
    # the lease's end in the database's time).
    f"CREATE TABLE IF NOT EXISTS {{s}}.clusters (world {_T} PRIMARY KEY,"
    " partitions integer NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {{s}}.nodes (world {_T}, id {_T}, address text NOT NULL,"
    " types text NOT NULL, heartbeat timestamptz NOT NULL, PRIMARY KEY (world, id))",
    f"CREATE TABLE IF NOT EXISTS {{s}}.partitions (world {_T}, p integer NOT NULL,"
    ' owner text COLLATE "C" NULL, epoch bigint NOT NULL, lease_until timestamptz NOT NULL,'
    " PRIMARY KEY (world, p))",
    # The logs of event-sourced entities; the primary key is the fence.
    f"CREATE TABLE IF NOT EXISTS {{s}}.events (world {_T}, type {_T}, key {_T},"
    " seq bigint NOT NULL, type_version integer NOT NULL, event bytea NOT NULL,"
    " PRIMARY KEY (world, type, key, seq))",
)

_STATEMENTS: Final = {
    "meta": "CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL)",
    "lock_meta": "LOCK TABLE {s}.meta IN SHARE ROW EXCLUSIVE MODE",
    "version": "SELECT value FROM {s}.meta WHERE key = 'schema_version'",
    "set_version": (
        "INSERT INTO {s}.meta (key, value) VALUES ('schema_version', $1) ON CONFLICT (key)"
        " DO UPDATE SET value = excluded.value"
    ),
    "load": (
        "SELECT e.type, e.key, e.version, e.type_version, e.state, e.snapshot FROM {s}.entities e"
        " JOIN unnest($2::text[], $3::text[]) AS u(type, key)"
        ' ON e.world = $1 AND e.type = u.type COLLATE "C" AND e.key = u.key COLLATE "C"'
    ),
    # The conditional writes of a batch, one statement each (group commit). `keep`: an event
    # write without a snapshot keeps the row's state, type version and snapshot.
    "update": (
        "UPDATE {s}.entities AS e SET version = u.version,"
        " type_version = CASE WHEN u.keep THEN e.type_version ELSE u.type_version END,"
        " state = CASE WHEN u.keep THEN e.state ELSE u.state END,"
        " snapshot = CASE WHEN u.keep THEN e.snapshot ELSE u.snapshot END"
        " FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::integer[],"
        " $7::bytea[], $8::bigint[], $9::boolean[])"
        " AS u(type, key, expected, version, type_version, state, snapshot, keep)"
        ' WHERE e.world = $1 AND e.type = u.type COLLATE "C" AND e.key = u.key COLLATE "C"'
        " AND e.version = u.expected RETURNING e.type, e.key"
    ),
    "insert": (
        "INSERT INTO {s}.entities (world, type, key, version, type_version, state, snapshot)"
        " SELECT $1, u.* FROM unnest($2::text[], $3::text[], $4::bigint[], $5::integer[],"
        " $6::bytea[], $7::bigint[]) AS u ON CONFLICT DO NOTHING RETURNING type, key"
    ),
    # A check (a write that keeps its row) locks the row it read, so that it stays as read.
    "check": (
        "SELECT e.type, e.key, e.version FROM {s}.entities e"
        " JOIN unnest($2::text[], $3::text[]) AS u(type, key)"
        ' ON e.world = $1 AND e.type = u.type COLLATE "C" AND e.key = u.key COLLATE "C"'
        " FOR UPDATE OF e"
    ),
    "append": (
        "INSERT INTO {s}.events (world, type, key, seq, type_version, event)"
        " SELECT $1, u.* FROM unnest($2::text[], $3::text[], $4::bigint[], $5::integer[],"
        " $6::bytea[]) AS u ON CONFLICT DO NOTHING"
    ),
    "fenced": (
        "SELECT 1 FROM {s}.events WHERE world = $1 AND type = $2 AND key = $3 AND seq > $4 LIMIT 1"
    ),
    "consume": (
        "DELETE FROM {s}.outbox AS o USING unnest($2::text[], $3::text[], $4::bigint[],"
        " $5::integer[]) AS u(sender_type, sender_key, version, idx)"
        ' WHERE o.world = $1 AND o.sender_type = u.sender_type COLLATE "C"'
        ' AND o.sender_key = u.sender_key COLLATE "C" AND o.version = u.version'
        " AND o.idx = u.idx AND o.dead IS NULL RETURNING o.due"
    ),
    "bury": (
        "UPDATE {s}.outbox AS o SET dead = u.dead FROM unnest($2::text[], $3::text[],"
        " $4::bigint[], $5::integer[], $6::text[]) AS u(sender_type, sender_key, version, idx,"
        ' dead) WHERE o.world = $1 AND o.sender_type = u.sender_type COLLATE "C"'
        ' AND o.sender_key = u.sender_key COLLATE "C" AND o.version = u.version'
        " AND o.idx = u.idx AND o.dead IS NULL RETURNING o.due"
    ),
    # Cancels, and the rows that named sends replace: only timers have names.
    "cancel": (
        "DELETE FROM {s}.outbox AS o USING unnest($2::text[], $3::text[], $4::text[])"
        " AS u(sender_type, sender_key, name)"
        ' WHERE o.world = $1 AND o.sender_type = u.sender_type COLLATE "C"'
        ' AND o.sender_key = u.sender_key COLLATE "C" AND o.name = u.name COLLATE "C"'
        " AND o.dead IS NULL RETURNING o.due"
    ),
    "send": (
        "INSERT INTO {s}.outbox (world, sender_type, sender_key, version, idx, to_type, to_key,"
        " due, name, message) SELECT $1, u.* FROM unnest($2::text[], $3::text[], $4::bigint[],"
        " $5::integer[], $6::text[], $7::text[], $8::double precision[], $9::text[],"
        " $10::bytea[]) AS u"
    ),
    "put_receipts": (
        "INSERT INTO {s}.receipts (world, type, key, id, version, result, at)"
        " SELECT $1, u.* FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[],"
        " $6::bytea[], $7::double precision[]) AS u"
        " ON CONFLICT (world, type, key, id) DO UPDATE SET version = excluded.version,"
        " result = excluded.result, at = excluded.at"
    ),
    "receipt": (
        "SELECT version, result, at FROM {s}.receipts WHERE world = $1 AND type = $2"
        " AND key = $3 AND id = $4"
    ),
    "prune": "DELETE FROM {s}.receipts WHERE world = $1 AND at < $2",
    "list_from": (
        "SELECT key FROM {s}.entities WHERE world = $1 AND type = $2 AND key >= $3"
        " ORDER BY key LIMIT $4"
    ),
    "list_above": (
        "SELECT key FROM {s}.entities WHERE world = $1 AND type = $2 AND key > $3"
        " ORDER BY key LIMIT $4"
    ),
    "list_range": (
        "SELECT key FROM {s}.entities WHERE world = $1 AND type = $2 AND key >= $3"
        " AND key < $4 ORDER BY key LIMIT $5"
    ),
    "list_range_above": (
        "SELECT key FROM {s}.entities WHERE world = $1 AND type = $2 AND key > $3"
        " AND key < $4 ORDER BY key LIMIT $5"
    ),
    "messages": (
        "SELECT sender_type, sender_key, version, idx, to_type, to_key, due, name, message"
        " FROM {s}.outbox WHERE world = $1 AND due = 0 AND dead IS NULL"
        " AND (sender_type, sender_key, version, idx) > ($2, $3, $4, $5)"
        " ORDER BY sender_type, sender_key, version, idx LIMIT $6"
    ),
    "timers": (
        "SELECT sender_type, sender_key, version, idx, to_type, to_key, due, name, message"
        " FROM {s}.outbox WHERE world = $1 AND due > 0 AND dead IS NULL AND due <= $2"
        " AND (due, sender_type, sender_key, version, idx) > ($3, $4, $5, $6, $7)"
        " ORDER BY due, sender_type, sender_key, version, idx LIMIT $8"
    ),
    "exists": (
        "SELECT o.sender_type, o.sender_key, o.version, o.idx FROM {s}.outbox o"
        " JOIN unnest($2::text[], $3::text[], $4::bigint[], $5::integer[])"
        " AS u(sender_type, sender_key, version, idx)"
        ' ON o.world = $1 AND o.sender_type = u.sender_type COLLATE "C"'
        ' AND o.sender_key = u.sender_key COLLATE "C" AND o.version = u.version'
        " AND o.idx = u.idx AND o.dead IS NULL"
    ),
    "count_outbox": (
        "SELECT dead IS NOT NULL, due != 0, count(*) FROM {s}.outbox WHERE world = $1 GROUP BY 1, 2"
    ),
    # A fenced write's lease, checked and share-locked in its transaction: a takeover (which
    # updates the row) waits until the commit is over, so no two owners ever commit at once.
    "fences": (
        "SELECT pt.p, pt.owner, pt.epoch FROM {s}.partitions pt"
        " JOIN unnest($2::integer[], $3::text[], $4::bigint[]) AS u(p, owner, epoch)"
        ' ON pt.world = $1 AND pt.p = u.p AND pt.owner = u.owner COLLATE "C"'
        " AND pt.epoch = u.epoch AND pt.lease_until > now() ORDER BY pt.p FOR SHARE OF pt"
    ),
    "cluster": (
        "WITH made AS (INSERT INTO {s}.clusters (world, partitions) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING RETURNING partitions)"
        " SELECT partitions FROM made UNION ALL"
        " SELECT partitions FROM {s}.clusters WHERE world = $1"
    ),
    "join": (
        "INSERT INTO {s}.nodes (world, id, address, types, heartbeat)"
        " VALUES ($1, $2, $3, $4, now()) ON CONFLICT (world, id) DO UPDATE SET"
        " address = excluded.address, types = excluded.types, heartbeat = now()"
    ),
    "heartbeat": "UPDATE {s}.nodes SET heartbeat = now() WHERE world = $1 AND id = $2",
    "leave": "DELETE FROM {s}.nodes WHERE world = $1 AND id = $2",
    "forget_nodes": (
        "DELETE FROM {s}.nodes WHERE world = $1"
        " AND heartbeat < now() - make_interval(secs => $2) RETURNING id"
    ),
    "members": (
        "SELECT id, address, types FROM {s}.nodes WHERE world = $1"
        " AND heartbeat > now() - make_interval(secs => $2) ORDER BY id"
    ),
    # Claim: a free partition (epoch 1), an expired or released one (epoch + 1), or extend one's
    # own live lease (same epoch).
    "claim": (
        "INSERT INTO {s}.partitions AS pt (world, p, owner, epoch, lease_until)"
        " SELECT $1, u.p, $2, 1, now() + make_interval(secs => $4)"
        " FROM unnest($3::integer[]) AS u(p)"
        " ON CONFLICT (world, p) DO UPDATE SET owner = excluded.owner,"
        " epoch = CASE WHEN pt.owner = excluded.owner AND pt.lease_until > now() THEN pt.epoch"
        " ELSE pt.epoch + 1 END, lease_until = excluded.lease_until"
        " WHERE pt.owner IS NULL OR pt.lease_until <= now() OR pt.owner = excluded.owner"
        " RETURNING pt.p, pt.epoch"
    ),
    "renew": (
        "UPDATE {s}.partitions AS pt SET lease_until = now() + make_interval(secs => $3)"
        " FROM unnest($4::integer[], $5::bigint[]) AS u(p, epoch)"
        " WHERE pt.world = $1 AND pt.p = u.p AND pt.owner = $2 AND pt.epoch = u.epoch"
        " AND pt.lease_until > now() RETURNING pt.p, pt.epoch"
    ),
    "release": (
        "UPDATE {s}.partitions AS pt SET owner = NULL, epoch = pt.epoch + 1, lease_until = now()"
        " FROM unnest($3::integer[], $4::bigint[]) AS u(p, epoch)"
        " WHERE pt.world = $1 AND pt.p = u.p AND pt.owner = $2 AND pt.epoch = u.epoch"
        " RETURNING pt.p"
    ),
    "nodes": (
        "SELECT id, address, types, extract(epoch FROM now() - heartbeat)::double precision"
        " FROM {s}.nodes WHERE world = $1 ORDER BY id"
    ),
    "cluster_of": "SELECT partitions FROM {s}.clusters WHERE world = $1",
    "leases": (
        "SELECT p, owner, epoch, extract(epoch FROM lease_until - now())::double precision"
        " FROM {s}.partitions WHERE world = $1 ORDER BY p"
    ),
    "events": (
        "SELECT seq, type_version, event FROM {s}.events WHERE world = $1 AND type = $2"
        " AND key = $3 AND seq > $4 ORDER BY seq LIMIT $5"
    ),
}


def sql(schema: str) -> dict[str, str]:
    """The statements for ``schema`` (already checked against ``SCHEMA_NAME``)."""
    if not SCHEMA_NAME.match(schema):  # pragma: no cover - checked by the constructor
        raise ValueError(f"bad schema name {schema!r}")
    return {name: text.replace("{s}", schema) for name, text in _STATEMENTS.items()}
