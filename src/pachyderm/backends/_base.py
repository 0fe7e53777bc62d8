"""The backend interface: the only place where the runtime touches storage.

Rows are ``msgspec.Struct``s that the garbage collector does not track (``gc=False``: their fields
are numbers, strings, bytes and other rows, so they can be in no cycle). Treat them as immutable
(``Stored``, which Memory hands out as it keeps it, and ``Fence`` are frozen; the others are
not, since a backend that checks fences sets ``Write.fenced``). The world makes a new ``Write``
for every commit and never changes it afterwards, so a backend may keep the ones it is given. A
load makes up to a thousand ``Stored`` at once and a turn as many writes, and each tracked object
made counts toward the next young collection, which at a million entities walks the young objects
out of cache. Rows are also ``array_like``: they encode as MessagePack arrays in field order,
which is how the SQLite writer process gets them, in a fifth of the time a dataclass took.

A backend is small on purpose. It stores, per world, one row per entity (its version, the version
of its type that wrote it, and its encoded state), receipts (ids of idempotent calls) and the
*outbox* (messages and timers that committed activations produced and that are not applied yet),
and it commits batches of *conditional* writes.

Written for implementors: the memory backend (``_memory.py``) is the reference and the shortest;
``pachyderm.testing.check_backend`` is the contract every backend must pass.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

import msgspec

__all__ = [
    "Backend",
    "Consume",
    "Envelope",
    "EnvelopeId",
    "Fence",
    "Outbox",
    "Receipt",
    "Stored",
    "StoredEvent",
    "Write",
]


class Stored(msgspec.Struct, array_like=True, gc=False, forbid_unknown_fields=True, frozen=True):
    """An entity's row as stored: ``version`` >= 1 counts its committed activations.

    For an event-sourced entity ``version`` is the seq of its last event, and ``snapshot`` the
    seq of the state stored in ``data`` (0: none yet, ``data`` is empty; ``type_version`` is
    then meaningless); ``snapshot`` is ``None`` for the row of a state entity.
    """

    version: int
    type_version: int
    data: bytes
    snapshot: int | None = None


class StoredEvent(msgspec.Struct, array_like=True, gc=False, forbid_unknown_fields=True):
    """One event of an entity's log: its ``seq`` (from 1), the type version that wrote it."""

    seq: int
    type_version: int
    data: bytes


class Receipt(msgspec.Struct, array_like=True, gc=False, forbid_unknown_fields=True):
    """The record of one idempotent call, committed with the write that answered it.

    ``id`` is unique per entity; ``version`` is the entity version it produced; ``result`` the
    encoded reply; ``at`` the world clock's time of the commit (for expiry).
    """

    id: str
    version: int
    result: bytes
    at: float


#: An outbox row's id: ``(sender_type, sender_key, sender_version, index)``. The sender's version
#: and the effect's index in its activation make it unique forever (a version commits once).
EnvelopeId = tuple[str, str, int, int]


class Envelope(msgspec.Struct, array_like=True, gc=False, forbid_unknown_fields=True):
    """One outbox row: a message to deliver, at once (``due == 0.0``) or at a wall-clock time.

    ``name`` (timers only) is unique per sender: storing a row with the name of a stored row of
    the same sender replaces it. Rows are ordered by ``key()``: due time, then sender, then the
    sender's version and index, so the messages of one sender come out in the order it sent them.

    ``id`` is always made from the first four fields, by ``__post_init__`` (also after a decode,
    or ``msgspec.structs.replace``): one given is ignored.
    """

    sender_type: str
    sender_key: str
    version: int
    index: int
    to_type: str
    to_key: str
    due: float
    name: str | None
    data: bytes
    #: ``(sender_type, sender_key, version, index)``, made once (it is read several times per
    #: message on the way).
    id: EnvelopeId = ("", "", 0, 0)

    def __post_init__(self) -> None:
        self.id = (self.sender_type, self.sender_key, self.version, self.index)

    def key(self) -> tuple[float, str, str, int, int]:
        """The row's place in the outbox order (what ``Backend.due`` pages by)."""
        return (self.due, self.sender_type, self.sender_key, self.version, self.index)


class Consume(msgspec.Struct, array_like=True, gc=False, forbid_unknown_fields=True):
    """A delivered outbox row that a write applies: it is deleted, or kept as a dead letter.

    ``dead`` is ``None`` when the message was applied, else why its handler failed: the row
    is then kept, marked dead (never delivered again, counted in ``statistics()``).
    ``timer`` says which counter the row belongs to (``due != 0.0``).
    """

    id: EnvelopeId
    dead: str | None = None
    timer: bool = False


class Outbox(msgspec.Struct, array_like=True, gc=False, forbid_unknown_fields=True):
    """What a write does to the outbox, in this order, in the write's transaction.

    1. ``consumes``: a condition, like ``expected``: every row must still be stored and not dead,
       else the whole write loses. That is how a message is applied at most once: the row is the
       token, and the receiver's commit takes it.
    2. ``cancels``: delete the writer's own timers with these names (if any).
    3. ``sends``: store these rows (a named one first deletes the sender's row of that name).
    """

    sends: tuple[Envelope, ...] = ()
    cancels: tuple[str, ...] = ()
    consumes: tuple[Consume, ...] = ()


class Fence(msgspec.Struct, array_like=True, gc=False, forbid_unknown_fields=True, frozen=True):
    """The partition lease a write needs (the cluster): ``node`` holds ``partition`` at ``epoch``.

    A fenced write also loses unless that lease is still the partition's, held by ``node`` at
    ``epoch``, and not expired by the backend's clock, checked in the same statement as the
    version: a node paused past its lease, or one whose partition moved on, cannot commit.
    Backends of one process (Memory, SQLite) have no partitions and get no fences.
    """

    node: str
    partition: int
    epoch: int


class Write(msgspec.Struct, array_like=True, gc=False, forbid_unknown_fields=True):
    """One conditional write: applied only if the stored version is still ``expected``.

    ``expected`` is 0 for an entity never stored. ``version`` > ``expected``: one write may carry
    several coalesced activations; ``version == expected`` leaves the entity's row as it is (and
    stores none for ``expected == 0``) but is still conditional on it, for a write that only
    consumes outbox rows. ``receipts`` and ``outbox`` are applied in the same transaction, or not
    at all.

    An *event write* (``events`` not empty, of an event-sourced entity) appends ``events`` to the
    entity's log as seqs ``expected + 1`` .. ``version`` (so ``len(events) == version -
    expected``), each stored with ``type_version``. It also loses if any event of the entity with
    a seq above ``expected`` is stored: the unique ``(type, key, seq)`` is the fence. The row gets
    ``version``; with ``snapshot`` it also stores ``data`` as the state at ``version`` (its
    snapshot, with ``type_version``), else it keeps the snapshot it had (none for a new row). The
    writes of one entity are all event writes (or checks) or all state writes: its type decides,
    and mixing them is not defined.

    A write with a ``fence`` (a cluster) also loses unless that partition lease holds; a backend
    that checks fences sets ``fenced`` on a write that lost for that reason, so that its node
    learns from the database itself that the lease is gone.
    """

    type_name: str
    key: str
    expected: int
    version: int
    type_version: int
    data: bytes
    receipts: tuple[Receipt, ...] = ()
    outbox: Outbox | None = None
    events: tuple[bytes, ...] | None = None
    snapshot: bool = False
    fence: Fence | None = None
    fenced: bool = False


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
    #: Whether the stored bytes come back over a network (a database server): then no entity
    #: type may store its states with pickle (``World`` refuses it), since whoever can write to
    #: the database could make this process run code.
    networked: ClassVar[bool] = False
    #: The world's ``max_batch`` when its options leave it unset: the most entity writes one
    #: ``commit`` call gets. Smaller turns cost the event loop a little more per activation; a
    #: backend that commits off the event loop's core (SQLite's writer process) prefers them, so
    #: that the callers of one commit run their next activations while the next one is written.
    max_batch: ClassVar[int] = 1000

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
    async def read_events(
        self, type_name: str, key: str, *, after: int = 0, limit: int = 1000
    ) -> list[StoredEvent]:
        """Return up to ``limit`` events of an entity's log with ``seq > after``, in seq order.

        Only committed events; an entity without events (or never stored) has an empty log.
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

    @abc.abstractmethod
    async def due(
        self,
        until: float,
        *,
        after: tuple[float, str, str, int, int] | None = None,
        limit: int = 1000,
    ) -> list[Envelope]:
        """Return up to ``limit`` outbox rows, not dead, with ``due <= until``, in ``key()`` order.

        Only rows whose ``key()`` is greater than ``after`` (when given): the key of the last row
        of the previous page. Rows committed while paging may or may not appear on its next
        pages; a call whose ``after`` is not the last key of the page before is a new scan, which
        sees every row committed before it. Fewer than ``limit`` rows means that no more match:
        the world's scans stop at the first short page.
        """

    @abc.abstractmethod
    async def exists(self, ids: Sequence[EnvelopeId]) -> list[bool]:
        """For each id, whether that outbox row is stored and not dead (committed data only)."""

    @abc.abstractmethod
    def outbox_counts(self) -> dict[str, int]:
        """Rows in the outbox now: ``{"messages": ..., "timers": ..., "dead": ...}``.

        ``messages`` and ``timers`` count rows waiting to be applied (``due == 0.0`` or not);
        ``dead``, dead letters. Answered from memory (no I/O); exact after every commit.
        """

    def statistics(self) -> dict[str, object]:
        """Return counters describing the backend's work so far (for humans and dashboards)."""
        return {}
