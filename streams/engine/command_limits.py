"""What a command processor's transaction must fit in, and what it does when a batch does not.

Record size. A broker refuses a record batch over its topic's `max.message.bytes` (which a
cluster may set below the producer's 1 MB), and the producer refuses a record over its own
limit; either refusal aborts the transaction, and deciding the same batch again would abort it
again, for ever, with the partition blocked behind it. So:

1. the processor reads the event topic's `max.message.bytes` (`SizeLimits.learn`, at start and
   after every refusal) and rejects a command whose event record would not fit (`allowed`);
   its producer batches no more than the topic takes (`batch_bytes`), so records that fit
   alone are never refused together;
2. a record the broker refuses anyway (the topic's limit was lowered since it was read) aborts
   the batch, which is decided again with that command rejected (`refusals`), the others
   decided as before; each such abort rejects at least one command, so the batch ends.

Time. The command consumer must poll within `max.poll.interval.ms` (librdkafka's default
300 s; set by REFOLD_KAFKA_MAX_POLL_INTERVAL_MS); a batch decided and committed in longer is
kicked out of the group, the broker refuses its offsets (UNKNOWN_MEMBER_ID) and it is aborted,
to be decided again just as slowly, for ever. So (`PollBudget`), after a batch that overran
and did not commit:

3. a command whose decide alone took half the interval or more is rejected when the batch is
   decided again ("decide took ... ms"); the others are decided as before;
4. if there is none, the next batches take half as many commands, down to one; they grow back
   (doubling) after full batches that take under a quarter of the interval.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from confluent_kafka import KafkaError
from refold.core.config import Config
from refold.core.errors import TopicError
from refold.core.serde import MAX_EVENT_BYTES
from refold.engine.decisions import CommandRecord
from refold.kafka.clients import PRODUCER_TUNING
from refold.kafka.topics import Topics

log = logging.getLogger("refold.engine.command_processor")

#: A command record's position: (topic, partition, offset).
Position = tuple[str, int, int]
#: Bytes kept free below a topic's limit for what wraps the key, value and headers: the record
#: batch header (61 bytes), the record's and its headers' length fields, and lz4's frame around
#: incompressible data (about 4 bytes a 64 kB block).
RECORD_MARGIN = 512
#: librdkafka's default max.poll.interval.ms.
DEFAULT_MAX_POLL_INTERVAL_MS = 300_000
#: Delivery errors that mean "this record is too large" (the broker's and the producer's).
TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


class SizeLimits:
    """The record size an event topic takes, as learned from its configs."""

    def __init__(self, config: Config, topic: str) -> None:
        self.topic = topic
        self._config = config
        self._topics: Topics | None = None
        #: the topic's max.message.bytes, once read
        self.topic_max: int | None = None

    def learn(self) -> bool:
        """Read the topic's `max.message.bytes`; True when `batch_bytes` changed with it. If it
        cannot be read (a broker away, no DESCRIBE_CONFIGS), what was known stays."""
        before = self.batch_bytes()
        try:
            if self._topics is None:
                self._topics = Topics(self._config)
            self.topic_max = self._topics.max_message_bytes(self.topic)
        except TopicError as exc:
            log.warning(
                "commands on %s: event records are checked against %d bytes: %s",
                self.topic,
                self.allowed,
                exc,
            )
        return self.batch_bytes() != before

    @property
    def allowed(self) -> int:
        """The largest event record (key, value and headers) a command may cause."""
        if self.topic_max is None:
            return MAX_EVENT_BYTES
        return min(MAX_EVENT_BYTES, self.topic_max - RECORD_MARGIN)

    def batch_bytes(self) -> int | None:
        """The producer's `batch.size` when the topic takes less than it would batch (None:
        the producer's own), so that records that fit one by one are not refused together."""
        wanted = self._config.client_overrides.get("batch.size", PRODUCER_TUNING["batch.size"])
        try:
            batch = int(str(wanted))
        except ValueError:  # the producer refuses it itself, naming it
            return None
        if self.topic_max is None or self.topic_max - RECORD_MARGIN >= batch:
            return None
        return max(1, self.topic_max - RECORD_MARGIN)

    def too_large(self, type_name: str, size: int) -> str | None:
        """Why an event record of `size` bytes cannot be written, or None."""
        if size <= self.allowed:
            return None
        if self.allowed == MAX_EVENT_BYTES:
            return (
                f"{type_name} is {size} bytes as a record (key, value and headers); "
                f"at most {MAX_EVENT_BYTES} fit in a record"
            )
        return (
            f"{type_name} is {size} bytes as a record (key, value and headers); topic "
            f"{self.topic!r} takes at most {self.allowed} (max.message.bytes={self.topic_max})"
        )

    def refusals(self, refused: Mapping[Position, tuple[str, int]]) -> dict[Position, str]:
        """The commands to reject after the broker or producer refused these event records
        (command position -> the event's type and record size), with the reason each gets:
        those whose record is over the limit (`learn` it again first); if none is (the limit
        could not be read, or a record close to it), the one with the largest."""
        over = {
            at: reason
            for at, (type_name, size) in refused.items()
            if (reason := self.too_large(type_name, size)) is not None
        }
        if over:
            return {at: f"the broker refused its event: {reason}" for at, reason in over.items()}
        at, (type_name, size) = max(refused.items(), key=lambda item: item[1][1])
        limit = "unknown" if self.topic_max is None else self.topic_max
        return {
            at: f"the broker refused its event {type_name} as too large: {size} bytes as a "
            f"record (key, value and headers), topic {self.topic!r} max.message.bytes={limit}"
        }


class PollBudget:
    """How many commands the next batch takes, so that it is decided and committed within
    the command consumer's max.poll.interval.ms; and what a batch that overran rejects."""

    def __init__(self, config: Config, max_batch: int) -> None:
        raw = config.client_overrides.get("max.poll.interval.ms", DEFAULT_MAX_POLL_INTERVAL_MS)
        try:
            self.interval_ms = int(str(raw))
        except ValueError:  # the consumer refuses it itself, naming it
            self.interval_ms = DEFAULT_MAX_POLL_INTERVAL_MS
        self.max_batch = max_batch
        #: how many commands the next batch may take
        self.batch = max_batch

    def overran(self, elapsed_s: float) -> bool:
        """Whether a batch that took `elapsed_s` since its poll was kicked out of the group."""
        return elapsed_s * 1000 >= self.interval_ms

    def committed(self, size: int, elapsed_s: float) -> None:
        """A batch of `size` commands committed in `elapsed_s`: batches grow back while full
        ones take little time."""
        full = size >= self.batch
        if full and self.batch < self.max_batch and elapsed_s * 1000 < self.interval_ms / 4:
            self.batch = min(self.max_batch, 2 * self.batch)

    def overrun(
        self, size: int, timed: Sequence[tuple[CommandRecord, float]]
    ) -> dict[Position, str]:
        """A batch of `size` commands overran and was aborted; `timed` says how long each of its
        decisions took. The commands to reject when it is decided again, with the reason;
        if none, the next batches take half as many commands."""
        slow = {r.position: s for r, s in timed if s * 1000 >= self.interval_ms / 2}
        if not slow:
            self.batch = max(1, min(self.batch, size) // 2)
        return {
            at: f"decide took {seconds * 1000:.0f} ms, longer than the command processor allows "
            f"one command: half its consumer's max.poll.interval.ms ({self.interval_ms} ms), "
            "within which a batch must be decided and committed"
            for at, seconds in slow.items()
        }
