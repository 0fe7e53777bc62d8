"""Effects into outbox rows: checked when a handler returns, gathered into an entity's write."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from . import _faults
from ._codec import IMMUTABLE, UNTYPED
from ._core._resident import Call, Resident
from ._effects import After, Cancel, Send
from ._errors import ActivationFailed, SerializationError, TooLarge, TooManyEffects
from .backends._base import Consume, Envelope, Outbox, Write

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["effects_of", "faults_after_commit", "outbox_of"]

#: The due time of a timer is never 0.0 (that marks a message to deliver at once).
_LEAST_DUE: Final = 5e-324
raw_encode = UNTYPED.raw_encode


def effects_of(
    engine: Engine, resident: Resident, effects: tuple[object, ...], version: int
) -> tuple[Envelope | str, ...] | None:
    """Check an activation's effects; return its outbox rows and cancelled timer names.

    A tuple: when they are all rows, it is the write's ``Outbox.sends`` as it is (no copy).

    Raises the named error of the first bad effect (the activation then fails whole).
    """
    if not effects:
        return None
    options = engine.options
    if len(effects) > options.max_effects:
        raise TooManyEffects(
            f"the activation returned {len(effects)} effects; max_effects is {options.max_effects}"
        )
    info, key = resident.info, resident.key
    sender_type = info.name
    out: list[Envelope | str] = []
    wall: float | None = None
    resolve = engine.registry.resolve
    index = -1
    for effect in effects:
        index += 1
        kind = type(effect)
        if kind is Cancel:
            out.append(effect.name)  # type: ignore[attr-defined]
            continue
        if kind is Send:
            to_info, to_key = resolve(effect.ref)  # type: ignore[attr-defined]
            due, name = 0.0, None
        elif kind is After:
            to = effect.to  # type: ignore[attr-defined]
            to_info, to_key = (info, key) if to is None else engine.registry.resolve(to)
            if wall is None:
                wall = engine.clock.wall()
            due = max(wall + effect.seconds, _LEAST_DUE)  # type: ignore[attr-defined]
            name = effect.name  # type: ignore[attr-defined]
        else:
            raise ActivationFailed(
                f"{sender_type}: an effect is made by pachyderm.send(), after() or cancel(); "
                f"got {effect!r:.80}"
            )
        message = effect.message  # type: ignore[attr-defined]
        if type(message) in IMMUTABLE:
            try:
                data = raw_encode(message)  # a scalar: nothing to prepare
            except OverflowError as exc:
                raise SerializationError(f"cannot encode {message!r:.40}: {exc}") from exc
        else:
            data = UNTYPED.encode(message)
        if len(data) > options.max_message_bytes:
            raise TooLarge(
                f"a message is {len(data)} bytes; max_message_bytes is {options.max_message_bytes}"
            )
        out.append(
            Envelope(sender_type, key, version, index, to_info.name, to_key, due, name, data)
        )
    return tuple(out)


def outbox_of(calls: list[Call]) -> Outbox | None:
    """The outbox part of one entity's write: what its calls consumed, sent and cancelled.

    Effects apply in call order: a later named timer replaces an earlier one of this write, and
    a cancel removes an earlier one of this write as well as the stored one.
    """
    if len(calls) == 1:  # the common case, without the lists
        fast = _outbox_of_one(calls[0])
        if fast is not None:
            return fast
    sends: list[Envelope] = []
    cancels: list[str] = []
    consumes: list[Consume] = []
    for call in calls:
        delivery = call.delivery
        if delivery is not None:
            consumes.append(
                Consume(
                    delivery.id,
                    _dead_reason(call.result) if isinstance(call.result, BaseException) else None,
                    delivery.due != 0.0,
                )
            )
        effects = call.effects
        if effects is None:
            continue
        for effect in effects:
            if isinstance(effect, str):  # a cancel: also of a timer armed earlier in this write
                sends = [e for e in sends if e.name != effect]
                cancels.append(effect)
            elif effect.name is not None:  # a named timer replaces one armed earlier here
                sends = [e for e in sends if e.name != effect.name]
                sends.append(effect)
            else:
                sends.append(effect)
    if not (sends or cancels or consumes):
        return None
    return Outbox(tuple(sends), tuple(cancels), tuple(consumes))


def _outbox_of_one(call: Call) -> Outbox | None:
    """``outbox_of([call])`` for a call whose effects hold no timer name and no cancel (else
    None: the general case). Builds the same objects, without the lists."""
    effects = call.effects
    if effects:
        for effect in effects:
            if type(effect) is str or effect.name is not None:  # type: ignore[union-attr]
                return None
        sends: tuple[Envelope, ...] = effects  # type: ignore[assignment]
    else:
        sends = ()
    delivery = call.delivery
    if delivery is None:
        if not sends:
            return None
        consumes: tuple[Consume, ...] = ()
    else:
        result = call.result
        dead = _dead_reason(result) if isinstance(result, BaseException) else None
        consumes = (Consume(delivery.id, dead, delivery.due != 0.0),)
    return Outbox(sends, (), consumes)


def _dead_reason(error: object) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:497] + "..."


def faults_after_commit(writes: list[Write], outcome: Sequence[bool]) -> None:
    """The crash points right after a commit returned (only when a test installed a hook)."""
    for write, won in zip(writes, outcome, strict=True):
        if won and write.outbox is not None:
            if write.outbox.consumes:
                _faults.point("receiver-committed")
            if write.outbox.sends:
                _faults.point("commit-before-dispatch")
