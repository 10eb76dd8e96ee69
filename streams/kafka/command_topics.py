"""The command and results topics of a decider, co-partitioned with its event topic."""

from __future__ import annotations

from refold.core.commands import Decider
from refold.core.errors import CommandError
from refold.kafka.topics import Topics, TopicSpec


def command_topic_specs(decider: Decider, partitions: int) -> list[TopicSpec]:
    """The command topic (the request log), the results topic and the id claims topic, all with
    `partitions`."""
    window = str(decider.result_retention_ms)
    return [
        TopicSpec(
            decider.command_topic, partitions, {"cleanup.policy": "delete", "retention.ms": window}
        ),
        # Keyed by command id: compaction keeps every command's result, the delete policy drops
        # those older than the idempotency window.
        TopicSpec(
            decider.results_topic,
            partitions,
            {"cleanup.policy": "compact,delete", "retention.ms": window},
        ),
        # Keyed by command id, never compacted: the FIRST claim of an id decides, and
        # compaction would keep the last one.
        TopicSpec(
            decider.claims_topic, partitions, {"cleanup.policy": "delete", "retention.ms": window}
        ),
    ]


def check_copartitioned(topics: Topics, decider: Decider) -> int:
    """The shared partition count; CommandError unless all three topics have it."""
    counts = {
        t: topics.partitions(t)
        for t in (decider.events_topic, decider.command_topic, decider.results_topic)
    }
    if len(set(counts.values())) != 1:
        raise CommandError(
            f"aggregate {decider.name!r}: topics are not co-partitioned: {counts}",
            hint="the command and results topics must have the event topic's partition count; "
            "delete and re-create them (`refold topics ensure`)",
        )
    return counts[decider.events_topic]


def ensure_command_topics(topics: Topics, decider: Decider) -> int:
    """Create the command and results topics like the event topic (which must exist); returns
    the partition count. CommandError if existing ones are not co-partitioned."""
    partitions = topics.partitions(decider.events_topic)
    topics.ensure(command_topic_specs(decider, partitions))
    return check_copartitioned(topics, decider)
