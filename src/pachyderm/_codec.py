"""Codecs: how states (and, later, messages) become bytes and back.

The rule, for an entity type that declares no ``state_type``:

- builtin values only: ``None``, ``bool``, ``int`` (64-bit), ``float``, ``str``, ``bytes``,
  ``datetime`` (naive stays naive; an offset comes back as the same fixed offset, the zone's name
  aside), and ``list``, ``tuple`` and ``dict`` of those;
- a ``tuple`` comes back as a ``tuple`` and a ``list`` as a ``list``, at any depth, dict keys
  included (tuples travel as a MessagePack extension);
- anything else (a ``set``, a dataclass, an object) is refused with ``SerializationError``.

An entity type that declares ``state_type`` (a dataclass, a ``msgspec.Struct``, or any type msgspec
understands, such as ``list[tuple[int, str]]``) is encoded and decoded by msgspec with that type:
faster, validated on decode, and tuples follow the annotation.

Pickle is used only when an entity type sets ``pickle = True`` on purpose.
Pickled bytes are only ever read back from this process's own storage, never from the network.
"""

from __future__ import annotations

import datetime
import pickle
from typing import Any, Final, Protocol

import msgspec

from ._errors import SerializationError

__all__ = ["Codec", "PickleCodec", "TypedCodec", "UntypedCodec", "codec_for"]

_TUPLE: Final = 1
_PAIRS: Final = 2  # a dict with a tuple among its keys (an Ext cannot be a dict key)
_DATETIME: Final = 3  # ISO 8601 text: keeps a naive datetime naive and an offset as it was
_SCALARS: Final = frozenset({type(None), bool, int, float, str, bytes})
# Values of these types are never mutated in place, so a decoded copy is not needed.
IMMUTABLE: Final = frozenset({type(None), bool, int, float, str, bytes})


class Codec(Protocol):
    """Turn a value into bytes and back. Both raise ``SerializationError``."""

    def encode(self, value: object) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


def _unsupported(value: object) -> SerializationError:
    return SerializationError(
        f"cannot encode a value of type {type(value).__qualname__}: without a declared "
        "state_type only None, bool, int, float, str, bytes, datetime, list, tuple and dict "
        "are stored (declare state_type for dataclasses and msgspec.Struct)"
    )


class UntypedCodec:
    """Builtin values, with tuples kept as tuples."""

    __slots__ = ("_decoder", "_encoder", "raw_encode")

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        #: msgspec's encode itself, for scalars (no tuple inside); OverflowError past 64 bits.
        self.raw_encode = self._encoder.encode
        self._decoder = msgspec.msgpack.Decoder(ext_hook=self._ext_hook)

    def _ext_hook(self, code: int, data: memoryview) -> object:
        if code == _TUPLE:
            return tuple(self._decoder.decode(data))
        if code == _PAIRS:
            return dict(self._decoder.decode(data))
        if code == _DATETIME:
            return datetime.datetime.fromisoformat(bytes(data).decode())
        raise SerializationError(f"unknown MessagePack extension {code}")

    def _prepare(self, value: object) -> object:
        # Returns the value unchanged when it holds no tuple, so the common case allocates nothing.
        kind = type(value)
        if kind in _SCALARS:
            return value
        if kind is list:
            items: list[object] = value  # type: ignore[assignment]
            out: list[object] | None = None
            for i, item in enumerate(items):
                if type(item) in _SCALARS:
                    continue  # unchanged, without a call
                new = self._prepare(item)
                if new is not item:
                    if out is None:
                        out = list(items)
                    out[i] = new
            return items if out is None else out
        if kind is datetime.datetime:
            text: str = value.isoformat()  # type: ignore[attr-defined]
            return msgspec.msgpack.Ext(_DATETIME, text.encode())
        if kind is tuple:
            for item in value:  # type: ignore[attr-defined]
                if type(item) not in _SCALARS:
                    break
            else:  # scalars only: msgspec encodes it as it is (a loop, not all(): no generator)
                return msgspec.msgpack.Ext(_TUPLE, self._encoder.encode(value))
            inner = [self._prepare(item) for item in value]  # type: ignore[attr-defined]
            return msgspec.msgpack.Ext(_TUPLE, self._encoder.encode(inner))
        if kind is dict:
            mapping: dict[object, object] = value  # type: ignore[assignment]
            changed = keys_changed = False
            pairs = []
            for k, v in mapping.items():
                nk = k if type(k) in _SCALARS else self._prepare(k)
                nv = v if type(v) in _SCALARS else self._prepare(v)
                keys_changed = keys_changed or nk is not k
                changed = changed or nv is not v
                pairs.append((nk, nv))
            if keys_changed:
                return msgspec.msgpack.Ext(_PAIRS, self._encoder.encode(pairs))
            return dict(pairs) if changed else mapping
        raise _unsupported(value)

    def encode(self, value: object) -> bytes:
        try:
            return self._encoder.encode(self._prepare(value))
        except SerializationError:
            raise
        except (TypeError, OverflowError, ValueError, RecursionError) as exc:
            raise SerializationError(f"cannot encode value: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        try:
            return self._decoder.decode(data)
        except SerializationError:
            raise
        except (msgspec.DecodeError, TypeError, ValueError) as exc:
            raise SerializationError(f"cannot decode stored value: {exc}") from exc


class TypedCodec:
    """msgspec with a declared type: dataclasses, ``msgspec.Struct``, typed containers."""

    __slots__ = ("_decoder", "_encoder", "type")

    def __init__(self, type_: Any) -> None:
        self.type = type_
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(type=type_)

    def encode(self, value: object) -> bytes:
        # The runtime decodes what it encoded before committing, which validates against the type.
        try:
            return self._encoder.encode(value)
        except (TypeError, OverflowError, ValueError) as exc:
            raise SerializationError(f"cannot encode state as {self.type!r}: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, TypeError, ValueError) as exc:
            raise SerializationError(f"cannot decode stored state as {self.type!r}: {exc}") from exc


class PickleCodec:
    """Pickle, only by explicit opt-in of an entity type, only for bytes this process stored."""

    __slots__ = ()

    def encode(self, value: object) -> bytes:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
            raise SerializationError(f"cannot pickle value: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        try:
            # Only reached for an entity type that opted in, on bytes read from its own storage.
            return pickle.loads(data)  # noqa: S301
        except Exception as exc:
            raise SerializationError(f"cannot unpickle stored value: {exc}") from exc


UNTYPED: Final = UntypedCodec()


def codec_for(state_type: Any, *, use_pickle: bool) -> Codec:
    """Return the codec an entity type's declarations ask for."""
    if use_pickle:
        return PickleCodec()
    if state_type is None:
        return UNTYPED
    return TypedCodec(state_type)
