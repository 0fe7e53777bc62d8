"""The error tree: one root, one noun per thing that went wrong.

Each class says when it happens and whether a retry is safe.
"""

from __future__ import annotations

__all__ = [
    "ActivationFailed",
    "EntityBroken",
    "IncompatibleVersion",
    "Indeterminate",
    "InvalidKey",
    "InvalidOptions",
    "Overloaded",
    "PachydermError",
    "Rejected",
    "SerializationError",
    "StorageLocked",
    "Timeout",
    "TooLarge",
    "TooManyEffects",
    "Unavailable",
    "UnknownEntityType",
]


class PachydermError(Exception):
    """The root of every error Pachyderm raises on purpose."""


class ActivationFailed(PachydermError):
    """The handler raised.

    ``__cause__`` is the handler's exception.
    The entity's state is unchanged and nothing was committed.
    Retrying runs the handler again on the latest state.
    """


class EntityBroken(PachydermError):
    """An event-sourced entity's ``apply`` raised: its events cannot be folded by this code.

    ``__cause__`` is the exception of ``apply``. Nothing was appended or overwritten; every call
    to the entity gets this error (messages to it wait in the outbox) until it is loaded again
    by fixed code (after a restart, or once it has been idle long enough to leave memory).
    """


class Rejected(PachydermError):
    """The handler refused the message on purpose.

    A handler raises it (or a subclass) to say "no" without it counting as a bug.
    The state is unchanged; the caller gets this exception as it was raised.
    """


class InvalidKey(PachydermError, ValueError):
    """A key is not a valid entity key.

    Raised before any I/O: nothing happened. Retrying the same key fails again.
    """


class InvalidOptions(PachydermError, ValueError):
    """An option or argument is out of its documented range.

    Raised before anything is started or written. Retrying unchanged fails again.
    """


class UnknownEntityType(PachydermError, LookupError):
    """The entity type is not registered with this world (or its name is invalid).

    Raised before any I/O. Register the type in ``World(entities=[...])``.
    """


class SerializationError(PachydermError):
    """A state or message cannot be encoded or decoded by the entity type's codec.

    For a new state: the activation fails, nothing was committed, the previous state stays.
    For a stored state: the stored bytes do not match the declared type; nothing is overwritten.
    """


class TooLarge(PachydermError):
    """A state, message or batch is over its documented size limit.

    Nothing was committed. Retrying the same input fails again.
    """


class Timeout(PachydermError, TimeoutError):
    """The deadline passed before the handler finished.

    Nothing was committed for this call (the message was withdrawn or its result discarded);
    the entity stays usable. A retry is safe.
    """


class TooManyEffects(TooLarge):
    """An activation returned more effects than ``max_effects``. Nothing was committed."""


class Overloaded(PachydermError):
    """A bounded queue is full (for example the entity's mailbox).

    Raised at once, before the message is queued: nothing happened. Retry later, with backoff.
    """


class Unavailable(PachydermError):
    """The backend (or the cluster) cannot be reached or cannot write right now.

    Nothing was committed: the transaction was rolled back. A retry is safe.
    Examples: the disk is full, the database is down, the world is closed.
    """


class StorageLocked(Unavailable):
    """The storage is held by another process (for example a SQLite file already open).

    Raised when the world starts; nothing was read or written.
    """


class Indeterminate(PachydermError):
    """The commit may or may not have happened (for example the connection was lost during COMMIT).

    The cached state was dropped, and nothing was emitted to followers or effects.
    Retry with the same idempotency key to learn the outcome without running twice.
    """


class IncompatibleVersion(PachydermError):
    """The stored state was written by a newer ``version`` of the entity type than this code.

    Nothing was activated and nothing was written. Deploy the newer code.
    """


#: The errors a handler's call ends with as they are: a refusal (``Rejected``), and the named
#: errors of bad input that the handler's effects (``send``, ``after``, ``cancel``) or its new
#: state raise. Any other exception of a handler becomes ``ActivationFailed`` (see ``failed``),
#: a ``Timeout`` it raises itself too: only the runtime says that a deadline passed.
EXPECTED: tuple[type[PachydermError], ...] = (
    SerializationError,
    TooLarge,
    Rejected,
    InvalidKey,
    UnknownEntityType,
    InvalidOptions,
)


def failed(type_name: str, exc: Exception, method: str = "activate") -> ActivationFailed:
    """The ``ActivationFailed`` for an exception a user's method raised (its ``__cause__``)."""
    if isinstance(exc, ActivationFailed):
        return exc
    error = ActivationFailed(f"{type_name}.{method} raised {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def name_of(exc: BaseException) -> str:
    """The name of the nearest class of the tree above ``exc``, to send it to another process;
    ``"Unavailable"`` for an exception that is not one of ours (a failure of the sender)."""
    if isinstance(exc, PachydermError):
        return next(c.__name__ for c in type(exc).__mro__ if c.__name__ in _BY_NAME)
    return "Unavailable"


def named(name: str, text: str) -> PachydermError:
    """The error of the tree ``name`` names, with ``text`` (``Unavailable`` for a name it is
    not)."""
    return _BY_NAME.get(name, Unavailable)(text)


#: The classes of the tree, by name (what ``name_of`` sends and ``named`` rebuilds).
_BY_NAME: dict[str, type[PachydermError]] = {
    name: cls
    for name in __all__
    if isinstance(cls := globals()[name], type) and issubclass(cls, PachydermError)
}
