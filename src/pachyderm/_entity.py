"""Entity types, refs and keys: what a user writes, and how it is checked before any I/O."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from ._codec import IMMUTABLE, UNTYPED, Codec, codec_for
from ._errors import InvalidKey, InvalidOptions, UnknownEntityType

__all__ = [
    "MAX_KEY_BYTES",
    "Entity",
    "EntityInfo",
    "Registry",
    "Update",
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


class EntityInfo:
    """What the runtime knows of one registered entity type."""

    __slots__ = (
        "cls",
        "codec",
        "custom_key",
        "encode_scalar",
        "is_async",
        "name",
        "shareable",
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
    if cls.activate is Entity.activate:
        raise InvalidOptions(f"{cls.__qualname__} does not define activate(message, state)")
    return cls


class Registry:
    """The entity types of one world, by class and by stored name."""

    # Mutable state: `_by_class` and `_by_name`, filled once by the constructor; read-only after.
    __slots__ = ("_by_class", "_by_name")

    def __init__(self, types: Iterable[type[Entity]]) -> None:
        self._by_class: dict[type[Entity], EntityInfo] = {}
        self._by_name: dict[str, EntityInfo] = {}
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
        if type(ref) is tuple and len(ref) == 2:
            # The common case first: a plain ASCII key of a type without `key()`, which needs
            # none of `validate_key`'s work (no surrogate, and chars are bytes).
            cls, raw = ref
            try:
                info = self._by_class.get(cls)
            except TypeError:
                info = None
            if (
                info is not None
                and not info.custom_key
                and type(raw) is str
                and raw.isascii()
                and 0 < len(raw) <= MAX_KEY_BYTES
                and "\x00" not in raw
            ):
                return info, raw
        if type(ref) is not tuple or len(ref) != 2:
            raise InvalidKey(f"a ref is a tuple (EntityType, key); got {ref!r:.80}")
        cls, raw = ref
        info = self.info(cls)
        return info, info.normalise_key(raw)
