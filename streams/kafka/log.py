"""Reading partitions to their ends: the one place that knows where a partition ends.

`read_to_end` reads given partitions from given offsets up to the ends they had when the call
started (or ends the caller names), then returns. Where a partition ends is the consumer's own
view of its high watermark: with `isolation.level=read_committed` the broker answers the last
stable offset, so an open transaction is not waited for. Transaction markers (commit and abort
records) occupy offsets that are never delivered, so a partition whose last offset is a marker
ends when the consumer's position passes it, not when a record at `end - 1` arrives.

A broker that does not answer is a `LogReadError` naming the partitions and how far they got,
never a hang.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterable, Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as KafkaTP
from refold.core.errors import LogReadError, TopicError

log = logging.getLogger(__name__)

TP = tuple[str, int]
_ASK_AGAIN = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._UNKNOWN_PARTITION,  # seen for minutes after a controller loss, until a refresh
}
_ASK_S = 3.0  # one ask for a watermark; a lost leader never answers
#: How long one read may go without a record or a position moving before it gives up.
DEFAULT_TIMEOUT_S = 30.0


def topic_partitions(consumer: Consumer, topic: str, *, timeout: float = 10.0) -> list[int]:
    """The partition numbers of `topic`; TopicError when it does not exist or cannot be read."""
    try:
        md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    except KafkaException as exc:
        raise TopicError(
            f"cannot read metadata for topic {topic!r}: {exc}",
            hint="is the broker running? `refold broker status`",
        ) from exc
    if md is None or md.error is not None or not md.partitions:
        raise TopicError(f"topic {topic!r} does not exist", hint="`refold topics ensure`")
    return sorted(md.partitions)


def watermarks(
    consumer: Consumer, tps: Iterable[TP], *, timeout: float = 10.0
) -> dict[TP, tuple[int, int]]:
    """(low, high) offsets of each partition, asked of the broker now; for a read_committed
    consumer `high` is the last stable offset. LogReadError when the broker does not answer."""
    out: dict[TP, tuple[int, int]] = {}
    for topic, partition in tps:
        out[(topic, partition)] = _watermark(consumer, topic, partition, timeout)
    return out


def _watermark(consumer: Consumer, topic: str, partition: int, timeout: float) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            low, high = consumer.get_watermark_offsets(
                KafkaTP(topic, partition), max(0.1, min(remaining, _ASK_S))
            )
            return low, high
        except KafkaException as exc:
            # A leader moving (a new topic elects one, a broker was lost) answers with an error
            # or not at all: librdkafka asks the leader it has cached, even one that is gone,
            # so refresh the topic's metadata, then ask again until the deadline.
            if exc.args[0].code() not in _ASK_AGAIN or time.monotonic() > deadline:
                raise LogReadError(
                    f"no end offsets for {topic}[{partition}] within {timeout:.0f} s: {exc}",
                    hint="is the broker running? `refold broker status`",
                ) from exc
            try:
                consumer.list_topics(topic, timeout=max(0.1, min(remaining, _ASK_S)))
            except KafkaException as refresh:
                log.debug("metadata refresh of %s failed: %s", topic, refresh)
            time.sleep(0.1)


def end_offsets(consumer: Consumer, tps: Iterable[TP], *, timeout: float = 10.0) -> dict[TP, int]:
    """The offset the next record of each partition will get (its high watermark)."""
    return {tp: high for tp, (_low, high) in watermarks(consumer, tps, timeout=timeout).items()}


def read_to_end(
    consumer: Consumer,
    starts: Mapping[TP, int],
    *,
    until: Mapping[TP, int] | None = None,
    batch_size: int = 1000,
    timeout: float = DEFAULT_TIMEOUT_S,
    stopped: Callable[[], bool] | None = None,
) -> Generator[list[Message], None, None]:
    """Yield batches of the records of `starts`' partitions, each read from its start offset
    (OFFSET_BEGINNING allowed) up to, not including, its end, then return.

    The end of a partition is `until[tp]` when given, else its high watermark when the call
    started; records at or past it are not yielded. Partitions already at their end are not
    read at all. The consumer is assigned the partitions for the duration and unassigned after
    (also when the caller stops iterating early). `stopped()` is asked between batches.
    LogReadError when nothing arrives and no position moves for `timeout` seconds.
    """
    bounds = dict(until) if until is not None else end_offsets(consumer, starts)
    lows = watermarks(consumer, starts) if until is None else {}
    todo = {tp: end for tp, end in bounds.items() if end > _first(starts[tp], lows.get(tp))}
    if not todo:
        return
    consumer.assign([KafkaTP(t, p, starts[(t, p)]) for t, p in todo])
    try:
        yield from _read(consumer, todo, batch_size, timeout, stopped or _never)
    finally:
        consumer.unassign()


def _first(start: int, watermark: tuple[int, int] | None) -> int:
    """The first offset a read from `start` can return (OFFSET_BEGINNING: the log start)."""
    if start >= 0:
        return start
    return watermark[0] if watermark is not None else 0


def _never() -> bool:
    return False


def _read(
    consumer: Consumer,
    todo: dict[TP, int],
    batch_size: int,
    timeout: float,
    stopped: Callable[[], bool],
) -> Generator[list[Message], None, None]:
    moved_at = time.monotonic()
    positions: dict[TP, int] = {}
    while todo and not stopped():
        msgs = consumer.consume(batch_size, 0.2)
        batch = [m for m in msgs if _wanted(m, todo)]
        for msg in batch:
            tp = (msg.topic(), msg.partition())
            if msg.offset() + 1 >= todo[tp]:
                del todo[tp]
        if batch:
            moved_at = time.monotonic()
            yield batch
        if not todo:
            return
        # Markers are never delivered: the consumer's position says when one was the last offset.
        now = {(tp.topic, tp.partition): tp.offset for tp in consumer.position(_kafka_tps(todo))}
        for tp, offset in now.items():
            if offset >= todo[tp]:
                del todo[tp]
        if now != positions:
            positions, moved_at = now, time.monotonic()
        elif not batch and time.monotonic() - moved_at > timeout:
            where = ", ".join(
                f"{t}[{p}] at {positions.get((t, p))} of {e}" for (t, p), e in todo.items()
            )
            raise LogReadError(
                f"reading to the end stalled for {timeout:.0f} s: {where}",
                hint="is the broker running? `refold broker status`",
            )


#: Errors no retry can fix: this client's principal may not read the topic (or use its group).
NOT_AUTHORIZED = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
    }
)


def _wanted(msg: Message, todo: Mapping[TP, int]) -> bool:
    err = msg.error()
    if err is not None:
        if err.code() in NOT_AUTHORIZED:
            raise LogReadError(
                f"not allowed to read {msg.topic()}: {err.str()}",
                hint="this client's Kafka principal has no READ ACL for it "
                "(on a `refold broker start --secure` cluster: the reader or worker role)",
            )
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consume error on %s[%s]: %s", msg.topic(), msg.partition(), err)
        return False
    end = todo.get((msg.topic(), msg.partition()))
    return end is not None and msg.offset() < end


def _kafka_tps(tps: Iterable[TP]) -> list[KafkaTP]:
    return [KafkaTP(t, p) for t, p in tps]
