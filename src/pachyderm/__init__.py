"""Pachyderm: immortal entities (virtual actors) for Python. An elephant never forgets."""

from __future__ import annotations

from . import backends as backends
from . import history as history
from ._clock import Clock as Clock
from ._clock import SystemClock as SystemClock
from ._effects import after as after
from ._effects import cancel as cancel
from ._effects import send as send
from ._entity import MAX_KEY_BYTES as MAX_KEY_BYTES
from ._entity import Entity as Entity
from ._entity import EventSourced as EventSourced
from ._entity import Update as Update
from ._errors import ActivationFailed as ActivationFailed
from ._errors import EntityBroken as EntityBroken
from ._errors import IncompatibleVersion as IncompatibleVersion
from ._errors import Indeterminate as Indeterminate
from ._errors import InvalidKey as InvalidKey
from ._errors import InvalidOptions as InvalidOptions
from ._errors import Overloaded as Overloaded
from ._errors import PachydermError as PachydermError
from ._errors import Rejected as Rejected
from ._errors import SerializationError as SerializationError
from ._errors import StorageLocked as StorageLocked
from ._errors import Timeout as Timeout
from ._errors import TooLarge as TooLarge
from ._errors import TooManyEffects as TooManyEffects
from ._errors import Unavailable as Unavailable
from ._errors import UnknownEntityType as UnknownEntityType
from ._worker import Worker as Worker
from ._world import World as World
from ._world import WorldOptions as WorldOptions

__version__ = "0.1.0.dev0"

__all__ = [
    "Entity",
    "EventSourced",
    "Update",
    "send",
    "after",
    "cancel",
    "World",
    "WorldOptions",
    "Worker",
    "Clock",
    "SystemClock",
    "backends",
    "history",
    "MAX_KEY_BYTES",
    # errors
    "PachydermError",
    "ActivationFailed",
    "EntityBroken",
    "IncompatibleVersion",
    "Indeterminate",
    "InvalidKey",
    "InvalidOptions",
    "Overloaded",
    "Rejected",
    "SerializationError",
    "StorageLocked",
    "Timeout",
    "TooLarge",
    "TooManyEffects",
    "Unavailable",
    "UnknownEntityType",
]
