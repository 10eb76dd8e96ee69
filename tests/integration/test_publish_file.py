"""`refold publish --file` through worker processes (`--jobs`), on the real broker: a bad line in
the last chunk publishes nothing; what lands is exactly the file, in order per key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from refold.core.config import Config
from refold.core.errors import PublishError
from refold.core.inputs import EncodedBatch, EventInput
from refold.engine.file_publish import MIN_CHUNK
from refold.kafka import clients
from refold.kafka.log import read_to_end
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics

from tests.integration.test_publish_tail import make_events, refold


def read_back(config: Config, topic: str) -> list[tuple[int, int, str, str, dict]]:
    """Every record of `topic`: (partition, offset, key, type, data), decoded."""
    codec = codec_for(config)
    consumer = clients.consumer(config, f"read-{topic}")
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        starts = {(topic, p): 0 for p in md.partitions}
        out = []
        for batch in read_to_end(consumer, starts):
            for msg in batch:
                type_name, data = codec.decode(msg.value())
                key = (msg.key() or b"").decode()
                out.append((msg.partition(), msg.offset(), key, type_name, data))
        return out
    finally:
        consumer.close()


def write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 4 * MIN_CHUNK  # several chunks for the worker processes


@pytest.mark.parametrize("senders", ["1", "2"])
def test_a_bad_line_in_the_last_chunk_publishes_nothing(config, unique, tmp_path, senders):
    topic = unique("bank")
    Topics(config).ensure([*internal_topics(config), event_topic(topic)])
    lines = [json.dumps(e) for e in make_events(3000, accounts=40)]
    last = json.loads(lines[-1])
    last["data"]["amount_cents"] = 12.5  # a float where a long is due: no coercion
    lines[-1] = json.dumps(last)
    flag = json.loads(lines[-2])
    flag["data"]["amount_cents"] = True
    lines[-2] = json.dumps(flag)
    path = tmp_path / "bad-at-the-end.jsonl"
    write(path, lines)
    done = refold(
        config, "publish", topic, "--file", str(path), "--jobs", "2", "--senders", senders
    )
    assert done.returncode == 2, done.stderr
    said = done.stderr.splitlines()
    assert len(said) == 3
    assert said[0].startswith(f"{path}:2999: ") and "amount_cents" in said[0] and "bool" in said[0]
    assert said[1].startswith(f"{path}:3000: ") and "12.5" in said[1] and "float" in said[1]
    assert "2 invalid line(s)" in said[2] and "nothing published" in said[2]
    assert read_back(config, topic) == []


@pytest.mark.parametrize("senders", ["1", "3"])
def test_worker_processes_publish_exactly_the_file_in_order_per_key(
    config, unique, tmp_path, senders
):
    topic = unique("bank")
    events = make_events(3000, accounts=40)
    path = tmp_path / "events.jsonl"
    write(path, [json.dumps(e) for e in events])
    done = refold(
        config,
        "publish",
        topic,
        "--file",
        str(path),
        "--jobs",
        "3",
        "--create",
        "--senders",
        senders,
    )
    assert done.returncode == 0, done.stderr
    assert "published 3000 event(s)" in done.stdout
    records = read_back(config, topic)
    assert len(records) == len(events)
    sent: dict[str, list] = defaultdict(list)
    for e in events:
        sent[e["key"]].append((e["type"], e["data"]))
    landed: dict[str, list] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for partition, _offset, key, type_name, data in sorted(records):
        landed[key].append((type_name, data))
        partitions[key].add(partition)
    assert landed == sent  # every event once, each key's in file order
    assert all(len(p) == 1 for p in partitions.values())


def test_batches_carry_the_bulk_envelope_and_a_refused_event_stops_them(config, unique):
    """`publish_batches` (what the file path sends with): a record the producer refuses is a
    PublishError counting it and every event after it; what came before landed, in order; the
    publisher publishes again afterwards and bounds its offsets."""
    topic = unique("bank")
    Topics(config).ensure([*internal_topics(config), event_topic(topic, partitions=1)])
    codec = codec_for(config)
    events = make_events(5, accounts=2)
    first, second = EncodedBatch(), EncodedBatch()
    for i, e in enumerate(events):
        data = e["data"] if i != 3 else {**e["data"], "memo": "x" * 1_100_000}
        key = e["key"] if i != 3 else "acc-huge"
        (first if i < 2 else second).add(
            EventInput(e["type"], key, data, codec.encode(e["type"], data))
        )
    with Publisher(config, codec, source="refold://batches") as publisher:
        with pytest.raises(PublishError) as caught:
            publisher.publish_batches(topic, [first, second])
        assert f"2 of 5 events not acknowledged by '{topic}' (first: key 'acc-huge')" in str(
            caught.value
        )
        records = read_back(config, topic)
        assert [(r[2], r[4]) for r in records] == [(e["key"], e["data"]) for e in events[:3]]
        summary = publisher.publish_batches(topic, [first])  # a good call after a failed one
    assert summary.count == 2 and summary.min_offset == "0:4"


def test_a_bad_file_is_reported_even_with_no_broker_named(tmp_path):
    """The producer made while the file is parsed must not turn a bad file into a broker error:
    with no broker configured at all, the bad lines are still what is reported (exit 2)."""
    lines = [json.dumps(e) for e in make_events(3000, accounts=40)]
    lines[1500] = lines[1500].replace('"data"', '"dat"')
    path = tmp_path / "bad-no-broker.jsonl"
    write(path, lines)
    env = {k: v for k, v in os.environ.items() if k != "REFOLD_BOOTSTRAP_SERVERS"}
    env["REFOLD_DATA_DIR"] = str(tmp_path / "no-broker")  # no broker record there either
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-m", "refold.cli.main", "publish", "t", "--file", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    said = done.stderr.splitlines()
    assert said[0].startswith(f"{path}:1501: ")
    assert "1 invalid line(s)" in said[-1] and "nothing published" in said[-1]


def test_senders_that_fail_say_why_and_exit_non_zero(config, unique, tmp_path):
    """Every sender fails (the topic is missing, no --create): one clear error, exit 1, and no
    sender process left behind (the CLI returned, so each was joined)."""
    topic = unique("missing")
    path = tmp_path / "events.jsonl"
    write(path, [json.dumps(e) for e in make_events(3000, accounts=40)])
    done = refold(config, "publish", topic, "--file", str(path), "--jobs", "2", "--senders", "2")
    assert done.returncode == 1, done.stderr
    [said] = done.stderr.splitlines()
    assert said.startswith("refold: error: ") and topic in said
