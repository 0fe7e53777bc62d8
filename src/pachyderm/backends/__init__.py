"""Backends: where a world's entities are stored.

- ``Memory()``: one process, not durable; for tests and the REPL.
- ``SQLite(path)``: one machine, durable.
- ``Postgres(dsn)``: many machines, durable (``pip install pachyderm[postgres]``).
- ``open(url)``: ``memory://``, ``sqlite:///path`` (``sqlite:///./app.db`` for a relative path)
  or ``postgresql://user@host/database``.
"""

from __future__ import annotations

from ._base import Backend as Backend
from ._base import Consume as Consume
from ._base import Envelope as Envelope
from ._base import EnvelopeId as EnvelopeId
from ._base import Fence as Fence
from ._base import Outbox as Outbox
from ._base import Receipt as Receipt
from ._base import Stored as Stored
from ._base import StoredEvent as StoredEvent
from ._base import Write as Write
from ._memory import Memory as Memory
from ._postgres import Postgres as Postgres
from ._sqlite import SQLite as SQLite
from ._url import open as open

__all__ = [
    "Backend",
    "Consume",
    "Envelope",
    "EnvelopeId",
    "Fence",
    "Memory",
    "Outbox",
    "Postgres",
    "Receipt",
    "SQLite",
    "Stored",
    "StoredEvent",
    "Write",
    "open",
]
