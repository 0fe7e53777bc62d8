"""Entity types, refs and keys: what a user writes, and how it is checked before any I/O."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from ._codec import IMMUTABLE, UNTYPED, Codec, codec_for
from ._errors import InvalidKey, InvalidOptions, UnknownEntityType

__all__ = [
    "MAX_IDEMPOTENCY_KEY",
    "MAX_KEY_BYTES",
    "Entity",
    "EventSourced",
    "EntityInfo",
    "Registry",
    "Update",
    "check_call",
    "validate_key",
]

#: The longest key accepted, in UTF-8 bytes.
MAX_KEY_BYTES: Final = 1024
#: The longest entity type name accepted, in characters.
MAX_NAME_CHARS: Final = 200
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


class Entity:
    """The base class of an entity type.

    Subclass it and write ``activate(self, message, state)``, which returns the new state
    (or an ``Update``). ``init(self)`` returns the first state; the default is ``None``.

    Class attributes:
        name: the stable type name that is stored (default ``module.qualname``).
            Set it before moving or renaming the class, or the stored entities are not found.
        version: the version of the state's shape (default 1); see ``upgrade``.
        state_type: a type msgspec understands (a dataclass, a ``msgspec.Struct``, ...);
            states are validated against it. ``None`` (default) stores builtin values.
        pickle: ``True`` stores states with pickle (trusted local storage only). Default ``False``.

    ``self.key`` is the entity's key; nothing else lives on ``self`` between activations:
    a new instance is made for every activation.

    An optional classmethod ``key(raw) -> str`` validates or normalises raw keys (raise
    ``InvalidKey`` to refuse one); its result is checked again by the rules for every key.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    state_type: ClassVar[Any] = None
    pickle: ClassVar[bool] = False

    # No __slots__: `self.key` (the instance's key) and the optional classmethod `key(raw)` share a
    # name, which works because an instance attribute shadows a classmethod.
    key: str

    def __init__(self, key: str) -> None:
        self.key = key

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = f"{cls.__module__}.{cls.__qualname__}"

    def init(self) -> Any:
        """Return the state of an entity that was never activated (default ``None``)."""
        return None

    def activate(self, message: Any, state: Any) -> Any:
        """Return the new state (or an ``Update``) for ``message`` applied to ``state``.

        Must be pure: the same message and state give the same result, with no I/O.
        It may run more than once for one message (after a commit conflict); only one run commits.
        Raise ``pachyderm.Rejected`` to refuse the message, any other exception for a failure:
        in both cases the state is unchanged.
        """
        raise NotImplementedError(f"{type(self).__qualname__}.activate is not written")

    def upgrade(self, state: Any, from_version: int) -> Any:
        """Return ``state``, stored by ``from_version`` of this type, in the current shape.

        ``state`` is decoded without the declared ``state_type`` (plain dicts and lists).
        The default returns it unchanged.
        """
        return state


class EventSourced(Entity):
    """The base class of an event-sourced entity type: it stores events, not states.

    Write ``handle(self, command, state)``, which decides: it returns a list of events (or an
    ``Update`` of a list of events and effects), or raises to refuse the command (nothing is
    appended). Write ``apply(self, event, state)``, which folds one event into the state: pure,
    deterministic, and it must not fail. The state is ``init()`` folded with every event.

    Class attributes, besides those of ``Entity`` (``name``, ``version``, ``state_type``):
        event_type: a type msgspec understands, that events are validated against
            (``None``, the default: builtin values, as for states).
        snapshot_every: the state is stored with the events every this many events (default
            100), so that loading folds at most that many; ``None`` never snapshots.

    Events carry the type's ``version``; an event written by an older version is passed through
    ``upgrade_event`` when it is read. See ``docs/events.md``.
    """

    event_type: ClassVar[Any] = None
    snapshot_every: ClassVar[int | None] = 100

    def handle(self, command: Any, state: Any) -> Any:
        """Return the events ``command`` produces on ``state`` (a list, or an ``Update``).

        Must be pure, like ``Entity.activate``: it may run more than once for one command (after
        a commit conflict); only one run commits. An empty list appends nothing and returns the
        current state. Effects need at least one event (they are consequences of facts).
        Raise ``pachyderm.Rejected`` to refuse the command, any other exception for a failure.
        """
        raise NotImplementedError(f"{type(self).__qualname__}.handle is not written")

    def apply(self, event: Any, state: Any) -> Any:
        """Return ``state`` with ``event`` applied. Pure, deterministic, must not raise.

        If it raises, the entity is broken (``EntityBroken`` for every call) until the code is
        fixed; nothing stored is changed.
        """
        raise NotImplementedError(f"{type(self).__qualname__}.apply is not written")

    def upgrade_event(self, event: Any, from_version: int) -> Any:
        """Return ``event``, written by ``from_version`` of this type, in the current shape.

        ``event`` is decoded without the declared ``event_type`` (plain dicts and lists).
        The default returns it unchanged.
        """
        return event

    def activate(self, message: Any, state: Any) -> Any:  # pragma: no cover - never called
        raise TypeError("an event-sourced entity is run by handle() and apply()")


@dataclass(slots=True, init=False)
class Update:
    """A new state plus effects, committed atomically with it. Treat it as immutable.

    (Not a frozen dataclass: one is made per activation that has effects, and a frozen one
    costs two ``object.__setattr__`` calls to make.)
    """

    state: Any
    effects: tuple[object, ...]

    def __init__(self, state: Any, *effects: object) -> None:
        self.state = state
        self.effects = effects


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid key, else raise ``InvalidKey``.

    A key is a non-empty ``str`` of at most ``MAX_KEY_BYTES`` UTF-8 bytes, with no NUL and no lone
    surrogate. ``bool``, ``None``, numbers and containers are refused: a key has one spelling.
    """
    if type(key) is not str:
        if isinstance(key, str):  # a str subclass: keep only the text
            key = str.__str__(key)
        else:
            raise InvalidKey(f"a key is a str, not {type(key).__qualname__}: {key!r:.80}")
    assert isinstance(key, str)
    if not key:
        raise InvalidKey("a key cannot be empty")
    if "\x00" in key:
        raise InvalidKey("a key cannot contain NUL")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidKey(f"a key is at most {MAX_KEY_BYTES} bytes of UTF-8; got {len(key)} chars")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey("a key cannot contain a lone surrogate") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"a key is at most {MAX_KEY_BYTES} bytes of UTF-8; got {size}")
    return key


MAX_IDEMPOTENCY_KEY: Final = 256


def check_call(idempotency_key: object, timeout: object) -> None:
    """Refuse a bad ``idempotency_key`` or ``timeout`` of a call, before anything is queued.

    A key is a ``str`` of 1 to ``MAX_IDEMPOTENCY_KEY`` characters with no NUL and no lone
    surrogate (every backend stores it as text); a timeout is seconds, finite and > 0.
    Raises ``InvalidOptions``.
    """
    if idempotency_key is not None:
        if not isinstance(idempotency_key, str) or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidOptions(
                f"an idempotency key is a str of 1-{MAX_IDEMPOTENCY_KEY} characters; "
                f"got {idempotency_key!r:.80}"
            )
        try:
            validate_key(idempotency_key)  # a key's own rules: not empty, no NUL, no surrogate
        except InvalidKey as exc:
            raise InvalidOptions(f"a bad idempotency key: {exc}") from None
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise InvalidOptions(f"a call's timeout is seconds, finite and > 0; got {timeout!r:.80}")


class EntityInfo:
    """What the runtime knows of one registered entity type."""

    __slots__ = (
        "cls",
        "codec",
        "custom_key",
        "encode_scalar",
        "event_shareable",
        "events",
        "is_async",
        "name",
        "shareable",
        "snapshot_every",
        "version",
    )

    def __init__(self, cls: type[Entity]) -> None:
        self.cls = cls
        self.name: str = cls.name
        self.version: int = cls.version
        self.codec: Codec = codec_for(cls.state_type, use_pickle=bool(cls.pickle))
        self.custom_key = callable(getattr(cls, "key", None))
        self.is_async = inspect.iscoroutinefunction(cls.activate)
        # Immutable results are shared, not copied, unless a declared type must validate them.
        untyped = self.codec is UNTYPED
        self.shareable: frozenset[type] = IMMUTABLE if untyped else frozenset()
        # msgspec's own encoder: for the `shareable` scalars, which need no preparation.
        self.encode_scalar = UNTYPED.raw_encode
        # The codec of events, for an event-sourced type; None for a state entity type.
        self.events: Codec | None = None
        self.snapshot_every = 0
        # The event types that are stored as they are and shared uncopied (untyped scalars).
        self.event_shareable: frozenset[type] = frozenset()
        if issubclass(cls, EventSourced):
            self.events = codec_for(cls.event_type, use_pickle=False)
            self.snapshot_every = cls.snapshot_every or 0
            self.event_shareable = IMMUTABLE if self.events is UNTYPED else frozenset()

    def normalise_key(self, raw: object) -> str:
        if not self.custom_key:
            return validate_key(raw)
        try:
            key = self.cls.key(raw)  # type: ignore[operator]
        except InvalidKey:
            raise
        except Exception as exc:
            raise InvalidKey(f"{self.name}.key() refused {raw!r:.80}: {exc}") from exc
        return validate_key(key)


def _check_type(cls: object) -> type[Entity]:
    if not (isinstance(cls, type) and issubclass(cls, Entity)) or cls is Entity:
        raise UnknownEntityType(f"{cls!r} is not a subclass of pachyderm.Entity")
    name = cls.__dict__.get("name", getattr(cls, "name", None))
    if (
        not isinstance(name, str)
        or len(name) > MAX_NAME_CHARS
        or not _NAME_RE.match(name.replace("<locals>", "_locals_"))
    ):
        raise InvalidOptions(
            f"{cls.__qualname__}.name must be a dotted identifier of at most {MAX_NAME_CHARS} "
            f"characters; got {name!r:.80}"
        )
    version = cls.version
    if type(version) is not int or version < 1:
        raise InvalidOptions(f"{cls.__qualname__}.version must be an int >= 1; got {version!r}")
    if issubclass(cls, EventSourced):
        if cls is EventSourced:
            raise UnknownEntityType(f"{cls!r} is not a subclass of pachyderm.EventSourced")
        for method in ("handle", "apply"):
            if getattr(cls, method) is getattr(EventSourced, method):
                raise InvalidOptions(f"{cls.__qualname__} does not define {method}()")
            if inspect.iscoroutinefunction(getattr(cls, method)):
                raise InvalidOptions(f"{cls.__qualname__}.{method} must be a plain def (pure)")
        every = cls.snapshot_every
        if every is not None and (type(every) is not int or every < 1):
            raise InvalidOptions(
                f"{cls.__qualname__}.snapshot_every must be an int >= 1 or None; got {every!r}"
            )
    elif cls.activate is Entity.activate:
        raise InvalidOptions(f"{cls.__qualname__} does not define activate(message, state)")
    return cls


class Registry:
    """The entity types of one world, by class and by stored name."""

    # Mutable state: `_by_class` and `_by_name`, filled once by the constructor; read-only after.
    __slots__ = ("_by_class", "_by_name", "by_class")

    def __init__(self, types: Iterable[type[Entity]]) -> None:
        self._by_class: dict[type[Entity], EntityInfo] = {}
        self._by_name: dict[str, EntityInfo] = {}
        if isinstance(types, str | bytes) or not isinstance(types, Iterable):
            raise InvalidOptions(f"entities is a list of entity types; got {types!r:.80}")
        for cls in types:
            info = EntityInfo(_check_type(cls))
            other = self._by_name.get(info.name)
            if other is not None and other.cls is not cls:
                raise InvalidOptions(
                    f"two entity types share the name {info.name!r}: "
                    f"{other.cls.__qualname__} and {cls.__qualname__}"
                )
            self._by_class[cls] = info
            self._by_name[info.name] = info
        #: The types by class, for the hot paths that check refs inline (read only).
        self.by_class: Mapping[type[Entity], EntityInfo] = self._by_class

    def __iter__(self) -> Any:
        return iter(self._by_class.values())

    def info(self, cls: object) -> EntityInfo:
        try:
            return self._by_class[cls]  # type: ignore[index]
        except (KeyError, TypeError):
            raise UnknownEntityType(
                f"{cls!r} is not an entity type of this world; pass it in World(entities=[...])"
            ) from None

    def by_name(self, name: str) -> EntityInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownEntityType(f"no entity type named {name!r} in this world") from None

    def resolve(self, ref: object) -> tuple[EntityInfo, str]:
        """Check a ref ``(EntityType, key)``; return its type and normalised key. No I/O."""
        if type(ref) is tuple:
            # The common case first: a plain ASCII key of a type without `key()`, which needs
            # none of `validate_key`'s work (no surrogate, and chars are bytes).
            try:
                cls, raw = ref
                info = self._by_class.get(cls)
            except (TypeError, ValueError):  # not a pair, or an unhashable type
                info = None
            if (
                info is not None
                and not info.custom_key
                and type(raw) is str
                and raw.isascii()
                and raw
                and len(raw) <= MAX_KEY_BYTES
                and "\x00" not in raw
            ):
                return info, raw
        if type(ref) is not tuple or len(ref) != 2:
            raise InvalidKey(f"a ref is a tuple (EntityType, key); got {ref!r:.80}")
        cls, raw = ref
        info = self.info(cls)
        return info, info.normalise_key(raw)
