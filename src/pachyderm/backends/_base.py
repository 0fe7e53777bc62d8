"""The backend interface: the only place where the runtime touches storage.

Rows are plain slotted dataclasses (not frozen: creating a frozen one costs three times as much,
and one is made per activation); treat them as immutable.

A backend is small on purpose. It stores, per world, one row per entity (its version, the version
of its type that wrote it, and its encoded state) and receipts (ids of idempotent calls and, later,
of applied messages), and it commits batches of *conditional* writes.

Written for implementors: the memory backend (``_memory.py``) is the reference and the shortest;
``pachyderm.testing.check_backend`` is the contract every backend must pass.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["Backend", "Receipt", "Stored", "Write"]


@dataclass(slots=True)
class Stored:
    """An entity's row as stored: ``version`` >= 1 counts its committed activations."""

    version: int
    type_version: int
    data: bytes


@dataclass(slots=True)
class Receipt:
    """The record of one idempotent call, committed with the write that answered it.

    ``id`` is unique per entity; ``version`` is the entity version it produced; ``result`` the
    encoded reply; ``at`` the world clock's time of the commit (for expiry).
    """

    id: str
    version: int
    result: bytes
    at: float


@dataclass(slots=True)
class Write:
    """One conditional write: applied only if the stored version is still ``expected``.

    ``expected`` is 0 for an entity never stored. ``version`` > ``expected``: one write may carry
    several coalesced activations. ``receipts`` are stored in the same transaction, or not at all.
    """

    type_name: str
    key: str
    expected: int
    version: int
    type_version: int
    data: bytes
    receipts: tuple[Receipt, ...] = ()


class Backend(abc.ABC):
    """Storage for one world at a time.

    Every method may raise ``Unavailable`` (nothing happened, a retry is safe); ``commit`` may also
    raise ``Indeterminate`` (the transaction's outcome is unknown). Methods are called from the
    world's event loop; a backend does its blocking I/O elsewhere (a thread, a socket).
    """

    #: The scope of the guarantees, in words: "one process", "one machine", "many machines".
    scope: ClassVar[str]
    #: Whether committed state survives the process.
    durable: ClassVar[bool]

    @abc.abstractmethod
    async def open(self, world: str) -> None:
        """Open the storage for the world named ``world``; create what is missing.

        Raises:
            StorageLocked: another process holds the storage.
            Unavailable: the storage cannot be opened.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the storage. Every commit that returned before this call is durable."""

    @abc.abstractmethod
    async def load_many(self, refs: Sequence[tuple[str, str]]) -> list[Stored | None]:
        """Return the stored rows of ``(type_name, key)`` refs, in order (``None``: never stored).

        Only committed data is returned.
        """

    @abc.abstractmethod
    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        """Apply, in one transaction, each write whose ``expected`` version is still stored.

        Returns one flag per write: ``True`` committed, ``False`` lost (the stored version was
        not ``expected``; nothing of that write was applied). At most one write per entity.
        When this returns, the committed writes are durable (to the backend's documented level).

        Raises:
            Unavailable: nothing was committed (for example the disk is full).
            Indeterminate: the outcome is unknown.
        """

    @abc.abstractmethod
    async def receipt(self, type_name: str, key: str, id: str) -> Receipt | None:
        """Return the receipt of ``id`` for that entity, if it is stored."""

    @abc.abstractmethod
    async def prune_receipts(self, before: float) -> int:
        """Delete receipts whose ``at`` is before ``before``; return how many."""

    @abc.abstractmethod
    async def list_keys(
        self, type_name: str, *, prefix: str = "", after: str | None = None, limit: int = 1000
    ) -> list[str]:
        """Return up to ``limit`` stored keys of a type, in ascending code point order.

        Only keys starting with ``prefix`` and greater than ``after`` (when given).
        """

    def statistics(self) -> dict[str, object]:
        """Return counters describing the backend's work so far (for humans and dashboards)."""
        return {}
