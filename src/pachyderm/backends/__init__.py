"""Backends: where a world's entities are stored.

- ``Memory()``: one process, not durable; for tests and the REPL.
- ``SQLite(path)``: one machine, durable.
- ``open(url)``: ``memory://`` or ``sqlite:///path`` (``sqlite:///./app.db`` for a relative path).
"""

from __future__ import annotations

from ._base import Backend as Backend
from ._base import Consume as Consume
from ._base import Envelope as Envelope
from ._base import EnvelopeId as EnvelopeId
from ._base import Outbox as Outbox
from ._base import Receipt as Receipt
from ._base import Stored as Stored
from ._base import Write as Write
from ._memory import Memory as Memory
from ._sqlite import SQLite as SQLite
from ._url import open as open

__all__ = [
    "Backend",
    "Consume",
    "Envelope",
    "EnvelopeId",
    "Memory",
    "Outbox",
    "Receipt",
    "SQLite",
    "Stored",
    "Write",
    "open",
]
