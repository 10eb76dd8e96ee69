"""refold read side: the projection API, RocksDB stores and the query server."""

from projections.projection import Projection
from streams.serde import Event

__all__ = ["Event", "Projection"]
