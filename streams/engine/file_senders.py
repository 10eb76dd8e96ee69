"""Sending a validated file's events with several producer processes (`refold publish --file`).

One Python thread calling `produce()` per record (five envelope headers each) is what limits a
file's send: it keeps one core busy while the other is mostly idle. `Senders` sends with several
processes instead, each through its own idempotent producer. The steps, in order:

1. the senders are forked FIRST, before this process has any Kafka client (librdkafka's threads
   do not survive a fork) and before the parse workers; each makes its producer at once, so the
   connection and the idempotent producer id (0.5-1 s) are had while the file is parsed;
2. the parse workers (`read_events(shares=N)`) give each chunk's events as N shares by key
   (`hash(key) % N`: every process is forked from this one, so one hash secret): every event of
   one key is in one share, in file order;
3. only once EVERY chunk is valid is each sender handed its share (`marshal` blobs through a
   pipe); with any bad line the senders are told to stop and nothing is sent;
4. each sender sends its share in order: events of one key go through one producer in file
   order, so they keep their order in their partition (different keys of one partition may
   interleave between senders, as they may between any two publishers);
5. this process waits for every sender and raises PublishError if any failed (naming the first
   failure; as with one producer, events after a failure may be missing), then reads the end
   offsets for the summary.
"""

from __future__ import annotations

import multiprocessing
from contextlib import suppress
from multiprocessing.connection import Connection
from types import TracebackType

from confluent_kafka import KafkaException
from refold.core.config import Config
from refold.core.errors import PublishError, RefoldError
from refold.core.serde import Codec
from refold.engine.file_publish import FileEvents, unpack_batch
from refold.kafka.publisher import Publisher, PublishSummary
from refold.kafka.topics import Topics

#: What a sender answers: (events sent, error message or None, its hint).
Outcome = tuple[int, str | None, str | None]


class Senders:
    """`count` sender processes, idle (their producers connected) until `send` or `close`."""

    def __init__(self, config: Config, codec: Codec, count: int) -> None:
        self._config = config
        context = multiprocessing.get_context("fork")
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for _ in range(count):
            ours, theirs = context.Pipe()
            proc = context.Process(target=_sender, args=(config, codec, theirs), daemon=True)
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)

    def __len__(self) -> int:
        return len(self._conns)

    def send(self, topic: str, read: FileEvents) -> PublishSummary:
        """Send `read.shares` (one per sender), wait for every sender, and bound the offsets."""
        if len(read.shares) != len(self._conns):
            raise ValueError(f"{len(read.shares)} shares for {len(self._conns)} senders")
        for conn, share in zip(self._conns, read.shares, strict=True):
            conn.send((topic, share))  # a sender starts sending as soon as it has its share
        outcomes: list[Outcome] = []
        for conn in self._conns:
            try:
                outcomes.append(conn.recv())
            except EOFError:
                outcomes.append((0, "a sender process ended without an answer", None))
        self.close()
        failed = [(message, hint) for _n, message, hint in outcomes if message is not None]
        if failed:
            message, hint = failed[0]
            raise PublishError(message, hint=hint)
        sent = sum(n for n, _message, _hint in outcomes)
        if sent != read.count:  # a share lost or sent twice would be a bug, never a success
            raise PublishError(f"the senders sent {sent} of {read.count} events to {topic!r}")
        ends = Topics(self._config).end_offsets(topic)
        return PublishSummary(topic, sent, {p: e - 1 for p, e in ends.items() if e > 0})

    def close(self) -> None:
        """Stop every sender (one not handed its share sends nothing) and wait for it."""
        for conn in self._conns:
            with suppress(OSError):  # it ended already (answered, or died)
                conn.send(None)
            conn.close()
        for proc in self._procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._conns, self._procs = [], []

    def __enter__(self) -> Senders:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()


def _sender(config: Config, codec: Codec, conn: Connection) -> None:
    """A sender process: make the producer now, then send the share it is handed (or stop)."""
    publisher: Publisher | None = None
    trouble: Outcome | None = None
    try:
        publisher = Publisher(config, codec)
        publisher.warm_up()
    except RefoldError as exc:  # e.g. no broker configured: said if it is asked to send
        trouble = (0, str(exc), exc.hint)
    except KafkaException as exc:
        trouble = (0, f"Kafka: {exc.args[0] if exc.args else exc}", None)
    try:
        order = conn.recv()
    except EOFError:
        return
    if order is None:
        return
    if trouble is not None or publisher is None:
        conn.send(trouble)
        return
    topic, blobs = order
    try:
        with publisher:
            summary = publisher.publish_batches(topic, [unpack_batch(b) for b in blobs])
        conn.send((summary.count, None, None))
    except RefoldError as exc:
        conn.send((0, str(exc), exc.hint))
    except KafkaException as exc:  # e.g. the broker went away while sending
        conn.send((0, f"Kafka: {exc.args[0] if exc.args else exc}", None))
