"""Effects: what an activation may do besides updating its own state (send messages, set timers).

A handler returns ``Update(new_state, *effects)``. Effects are data; nothing happens when they
are made. They are checked when the handler returns (a bad one fails the activation with a named
error and nothing commits), written to the outbox in the same transaction as the new state, and
acted on only after that commit (the output gate).
"""

from __future__ import annotations

import math
from typing import Any, Final

from ._errors import InvalidOptions

__all__ = ["MAX_TIMER_NAME", "After", "Cancel", "Send", "after", "cancel", "send"]

#: The longest timer name accepted, in characters.
MAX_TIMER_NAME: Final = 200


class Send:
    """A message to an entity, delivered after the sender's commit, applied exactly once."""

    __slots__ = ("message", "ref")

    def __init__(self, ref: Any, message: Any) -> None:
        self.ref = ref
        self.message = message

    def __repr__(self) -> str:
        return f"send({self.ref!r}, {self.message!r})"


_new_send = Send.__new__


class After:
    """A durable timer: ``message`` is delivered to ``to`` (``None``: the sender) after a delay."""

    __slots__ = ("message", "name", "seconds", "to")

    def __init__(self, seconds: float, message: Any, to: Any, name: str | None) -> None:
        self.seconds = seconds
        self.message = message
        self.to = to
        self.name = name

    def __repr__(self) -> str:
        return f"after({self.seconds!r}, {self.message!r}, to={self.to!r}, name={self.name!r})"


class Cancel:
    """Cancel the sender's own pending timer of that name (nothing happens if there is none)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"cancel({self.name!r})"


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_TIMER_NAME:
        raise InvalidOptions(
            f"a timer name is a str of 1-{MAX_TIMER_NAME} characters; got {name!r:.80}"
        )
    return name


def send(ref: Any, message: Any) -> Send:
    """Return the effect "send ``message`` to the entity ``ref``".

    The ref is checked when the handler returns (``InvalidKey``, ``UnknownEntityType``). After the
    sender's commit the message is delivered at least once and applied exactly once: the
    receiver's commit consumes it. Messages from one sender to one receiver are applied in the
    order they were sent. A message to the sender itself runs after the current activation
    commits, as a new activation.
    """
    effect = _new_send(Send)  # `Send(ref, message)` without its __init__ frame (a hot path)
    effect.ref = ref
    effect.message = message
    return effect


def after(seconds: float, message: Any, *, to: Any = None, name: str | None = None) -> After:
    """Return the effect "deliver ``message`` to ``to`` (default: the sender) in ``seconds``".

    The timer is a durable row with a due time on the world's clock (wall time): it survives
    restarts, and one already due when a world starts fires once, as soon as it can.
    ``name`` (unique per sender) makes it replaceable: setting a timer of the same name
    replaces the pending one, and ``cancel(name)`` removes it.

    Raises:
        InvalidOptions: ``seconds`` is not a finite number >= 0, or a bad ``name``.
    """
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise InvalidOptions(f"after() takes finite seconds >= 0; got {seconds!r:.80}")
    return After(float(seconds), message, to, None if name is None else _check_name(name))


def cancel(name: str) -> Cancel:
    """Return the effect "cancel my pending timer named ``name``" (if it is still pending).

    Applied with the activation's commit. A timer already delivered but not yet applied is not
    applied after the cancel commits (its outbox row is the token the receiver must consume).

    Raises:
        InvalidOptions: a bad ``name``.
    """
    return Cancel(_check_name(name))
