"""A resident entity: the in-memory record of one entity this node serves (sans-I/O data)."""

from __future__ import annotations

import asyncio
from typing import Any

from .._entity import EntityInfo
from ..backends._base import Envelope, EnvelopeId

__all__ = ["LOADING", "READY", "STALE", "Call", "Resident"]

# Resident phases.
LOADING = 0  # its row is being read; calls wait in the mailbox
READY = 1  # `version`/`data` are the latest committed state
STALE = 2  # the cache is not trusted (lost a commit, or an indeterminate one): reload first


class Call:
    """One caller's message: queued in a mailbox, then run, then answered after its commit.

    ``future`` is the caller's, resolved once, after the output gate. Once run, ``version`` is the
    version it produced (``None``: it failed and the state did not change), ``data`` that state's
    bytes, and ``result`` the reply value or the exception to raise.
    """

    __slots__ = (
        "data",
        "delivery",
        "effects",
        "events",
        "future",
        "idempotency_key",
        "message",
        "result",
        "version",
    )

    def __init__(
        self, message: Any, future: asyncio.Future[Any], idempotency_key: str | None
    ) -> None:
        self.message = message
        self.future = future
        self.idempotency_key = idempotency_key
        self.version: int | None = None
        # The outbox row this call applies (a message from an entity or a timer), else None.
        self.delivery: Envelope | None = None
        # Once run: its effects, in order (outbox rows, and names of timers it cancels).
        self.effects: tuple[Envelope | str, ...] | None = None
        # Once run by an event-sourced entity: its encoded events (None: none).
        self.events: tuple[bytes, ...] | None = None
        # `data` and `result` are set when it runs, before anything reads them.
        self.data: bytes | None
        self.result: Any


class Resident:
    """One entity held in memory.

    Mutable state, changed only by the world's runner, loader and commit completion, all on the
    event loop: ``phase``, ``version``/``data`` (latest committed), ``tip_*`` (the state the next
    activation runs on: committed plus ``inflight`` plus ``pending``), ``mailbox``, ``inflight``
    (calls in the write being committed), ``pending`` (calls run since), ``scheduled``, ``busy``
    (an async handler is running), ``queued`` (calls accepted and not yet answered), ``error``
    (why the entity cannot run, e.g. a newer stored version), ``used`` (clock time of last use).
    """

    __slots__ = (
        "busy",
        "data",
        "deliveries",
        "error",
        "fx",
        "hot",
        "idempotent",
        "inflight",
        "info",
        "key",
        "loaded",
        "mailbox",
        "pending",
        "phase",
        "queued",
        "recheck",
        "ref",
        "running",
        "scheduled",
        "tip_data",
        "tip_obj",
        "tip_version",
        "used",
        "version",
    )

    def __init__(self, info: EntityInfo, key: str, now: float) -> None:
        self.info = info
        self.key = key
        self.ref = (info.name, key)
        self.phase = LOADING
        self.version = 0
        self.data = b""
        self.tip_version = 0
        self.tip_data = b""
        # The decoded tip when its type is immutable (so it can be shared), else None.
        self.tip_obj: Any = None
        # Lists, not deques: an empty deque costs 760 bytes, and the runner takes a whole turn's
        # worth of calls at once with one slice.
        self.mailbox: list[Call] | None = None
        self.inflight: list[Call] | None = None
        self.pending: list[Call] | None = None
        self.scheduled = False
        self.busy = False
        # The call an async handler is running, and its task (None until it starts). Cleared
        # when that run is undone (a lost write; the call is put back in its place), and then
        # `busy` stays True until the task has ended, its result dropped.
        self.running: tuple[Call, asyncio.Task[Any] | None] | None = None
        self.queued = 0
        # Some pending call applies an outbox row or has effects: its write carries an outbox.
        self.fx = False
        # Ids of the outbox rows delivered here and not yet applied (a duplicate is dropped):
        # None, one id (the common case, without a set), or a set of two or more.
        self.deliveries: EnvelopeId | set[EnvelopeId] | None = None
        # Calls that apply outbox rows were put back after a lost write: check the rows first.
        self.recheck = False
        self.error: BaseException | None = None
        self.used = now
        # Used since the passivation hand last passed (a second chance before passivation).
        self.hot = False
        # Futures of callers waiting for this resident to be loaded (for read and follow).
        self.loaded: list[asyncio.Future[None]] | None = None
        # idempotency key -> the call that carries it, while it is unanswered, and a future
        # that tells other callers with the same key its outcome, (committed, value or error).
        self.idempotent: dict[str, tuple[Call, asyncio.Future[tuple[bool, Any]]]] | None = None

    def quiescent(self) -> bool:
        """True when nothing is queued, running or committing: it may be passivated."""
        return (
            self.queued == 0
            and not self.busy
            and self.inflight is None
            and self.pending is None
            and self.phase != LOADING
            and not self.mailbox
        )
