"""refold: Kafka event sourcing for Python teams.

The stable surface is what this module exports (and, as they land, `refold.tasks` and
`refold.sagas`): the fold and decider APIs users write against, the event they receive, the
configuration, the publisher and command client they call, and the error root.
Everything else is internal and may change between releases.

The names are loaded on first use (PEP 562): `import refold` alone imports nothing else, so a
CLI command or a subpackage import pays only for what it uses. `from refold import Publisher`
works as before.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from refold.core.commands import Command, CommandResult, Decider, EventSpec, Rejected
    from refold.core.config import Config
    from refold.core.errors import RefoldError
    from refold.core.projection import Projection
    from refold.core.serde import Event, Position
    from refold.kafka.command_client import CommandClient
    from refold.kafka.publisher import Publisher

#: Each public name and the module that defines it.
_HOMES: dict[str, str] = {
    "Command": "refold.core.commands",
    "CommandClient": "refold.kafka.command_client",
    "CommandResult": "refold.core.commands",
    "Config": "refold.core.config",
    "Decider": "refold.core.commands",
    "Event": "refold.core.serde",
    "EventSpec": "refold.core.commands",
    "Position": "refold.core.serde",
    "Projection": "refold.core.projection",
    "Publisher": "refold.kafka.publisher",
    "RefoldError": "refold.core.errors",
    "Rejected": "refold.core.commands",
}

__all__ = [
    "Command",
    "CommandClient",
    "CommandResult",
    "Config",
    "Decider",
    "Event",
    "EventSpec",
    "Position",
    "Projection",
    "Publisher",
    "RefoldError",
    "Rejected",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'refold' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
