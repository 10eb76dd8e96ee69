"""One error root for refold; each area has its own subclass carrying context."""

from __future__ import annotations


class RefoldError(Exception):
    """Root of every error refold raises on purpose.

    `hint` is a short suggestion the CLI prints after the message.
    """

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(RefoldError):
    """The environment or flags do not describe a usable setup."""


class BrokerError(RefoldError):
    """The local Kafka broker could not be assembled, started, stopped or reached."""


class SchemaError(RefoldError):
    """A schema file is invalid or clashes with another, or a type is unknown."""


class EncodeError(RefoldError):
    """An event does not match its schema (missing field, wrong type, ...)."""


class DecodeError(RefoldError):
    """Bytes on a topic could not be decoded as a refold event."""


class InputError(RefoldError):
    """User input (a JSON event, a JSONL file, an HTTP body) is malformed."""


class TopicError(RefoldError):
    """A topic is missing or could not be created."""


class LogReadError(RefoldError):
    """Partitions could not be read to their ends: the broker did not answer in time."""


class PublishError(RefoldError):
    """Kafka did not acknowledge a record; carries topic and key."""


class StoreError(RefoldError):
    """A projection store could not be opened, read or written."""


class StoreLocked(StoreError):
    """The store is open for writing elsewhere (RocksDB's LOCK): in another process (a worker,
    a replay building that version), whose pid `holder` is when the kernel tells it, or in this
    one (`holder` None)."""

    def __init__(self, message: str, *, holder: int | None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.holder = holder


class ProjectionError(RefoldError):
    """A projection is malformed, failed to import or failed while folding."""


class CommandError(RefoldError):
    """A command could not be sent, decided or answered (topics, partitions, transactions)."""


class TaskError(RefoldError):
    """A task queue is malformed, or a task could not be submitted, dispatched or reported."""


class SagaError(RefoldError):
    """A saga is malformed, or its events could not be written."""


class SagaStepsError(SagaError):
    """A saga's `steps(saga_id, data)` raised, or gave no valid steps, or other steps than at its
    start (not pure): that saga cannot go on, the others must."""


class TaskConflict(TaskError):
    """A task id was submitted before with another body: the id names that first task."""


class SagaConflict(SagaError):
    """A saga id was started before with other data: the id names that first run, whose status
    is at `status_url`."""

    def __init__(
        self, message: str, *, saga_id: str, status_url: str, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.saga_id = saga_id
        self.status_url = status_url
