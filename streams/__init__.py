"""refold: Kafka event sourcing for Python teams.

The stable surface is what this module exports (and, as they land, `refold.tasks` and
`refold.sagas`): the fold and decider APIs users write against, the event they receive, the
configuration, the publisher and command client they call, and the error root.
Everything else is internal and may change between releases.
"""

from refold.core.commands import Command, CommandResult, Decider, EventSpec, Rejected
from refold.core.config import Config
from refold.core.errors import RefoldError
from refold.core.projection import Projection
from refold.core.serde import Event, Position
from refold.kafka.command_client import CommandClient
from refold.kafka.publisher import Publisher

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
