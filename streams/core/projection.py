"""The projection API: a pure fold, `initial(key)` + `apply(state, event) -> state`, no I/O.

The runtime owns all I/O: it decodes events, loads states, calls the fold and stores the result
with the source offsets in one atomic write. A fold must be deterministic so that a replay from
offset zero rebuilds exactly the same state.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from refold.core.errors import ProjectionError
from refold.core.serde import Event

OnError = Literal["dead-letter", "stop"]


class Projection:
    """Subclass and set `name`, `topics`, `version`; override `initial` and `apply`.

    Instead of `apply`, per-type handlers may be written: a method `on_<Name>` for the event
    type `<namespace>.<Name>` (e.g. `on_MoneyDeposited`) receives `(state, event)`; types without
    a handler leave the state unchanged.

    `key(event)` chooses the key the event folds under (default: the event's key, the aggregate
    id). Returning None means "the key this aggregate's events were last folded under": the
    runtime remembers, per aggregate id, the last key chosen for it, so one event (say
    AccountOpened) can route every later event of the same aggregate to an owner.
    """

    name: ClassVar[str] = ""
    topics: ClassVar[tuple[str, ...]] = ()
    version: ClassVar[int] = 1
    #: What a poison event (undecodable, unknown type, an exception in the fold) does:
    #: "dead-letter" records it with the reason and goes on; "stop" halts this projection.
    on_error: ClassVar[OnError] = "dead-letter"
    #: What a worker does when this code's version is newer than the live version: "wait" builds
    #: it beside the live one and waits for `refold replay NAME --swap`; "swap" swaps once
    #: caught up.
    on_new_version: ClassVar[Literal["wait", "swap"]] = "wait"

    def initial(self, key: str) -> Any:
        return {}

    def apply(self, state: Any, event: Event) -> Any:
        handler = getattr(self, "on_" + event.type.rpartition(".")[2], None)
        if handler is None:
            return state
        return handler(state, event)

    def key(self, event: Event) -> str | None:
        return event.key

    # -- runtime support --------------------------------------------------------------------

    @property
    def rekeys(self) -> bool:
        """True when the projection folds under keys other than the aggregate id."""
        return type(self).key is not Projection.key

    @classmethod
    def validate(cls) -> None:
        """Raise ProjectionError if the class cannot be run."""
        where = f"{cls.__module__}.{cls.__qualname__}"
        if not cls.name or not isinstance(cls.name, str):
            raise ProjectionError(f"{where}: projection has no name", hint='set name = "..."')
        if not all(ch.isalnum() or ch in "-_." for ch in cls.name):
            raise ProjectionError(
                f"{where}: projection name {cls.name!r} may use letters, digits, - _ . only"
            )
        if isinstance(cls.topics, str) or not cls.topics:
            raise ProjectionError(
                f'{where}: projection {cls.name!r} needs topics = ("topic", ...)',
                hint="a tuple of source topic names",
            )
        if not isinstance(cls.version, int) or cls.version < 1:
            raise ProjectionError(f"{where}: version must be a positive int, not {cls.version!r}")
        if cls.on_error not in ("dead-letter", "stop"):
            raise ProjectionError(f"{where}: on_error must be 'dead-letter' or 'stop'")
