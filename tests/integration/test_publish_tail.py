"""Publish and tail round trips through the CLI and the Python publisher, on the real broker."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from confluent_kafka import Producer
from refold.core.config import Config
from refold.engine.tail import BadRecord, tail
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics


def refold(config: Config, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers,
        "REFOLD_DATA_DIR": str(config.data_dir),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    return subprocess.run(
        [sys.executable, "-m", "refold.cli.main", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def make_events(n: int, accounts: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        acc = f"acc-{rng.randrange(accounts)}"
        kind = rng.choice(["bank.MoneyDeposited", "bank.MoneyWithdrawn"])
        out.append(
            {
                "type": kind,
                "key": acc,
                "data": {
                    "account_id": acc,
                    "amount_cents": rng.randrange(1, 10_000),
                    "memo": f"#{i}",
                },
            }
        )
    return out


def test_thousand_events_from_jsonl_come_back_in_order_per_key(config, unique, tmp_path):
    topic = unique("bank")
    events = make_events(1000, accounts=37)
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n")

    done = refold(config, "publish", topic, "--file", str(path), "--create")
    assert done.returncode == 0, done.stderr
    assert "published 1000 event(s)" in done.stdout
    printed = done.stdout.split("min_offset=")[1].strip().rstrip(")")

    done = refold(config, "tail", topic, "--from-beginning")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 1000
    by_key_sent: dict[str, list] = defaultdict(list)
    by_key_read: dict[str, list] = defaultdict(list)
    for e in events:
        by_key_sent[e["key"]].append((e["type"], e["data"]))
    for line in lines:
        assert {"type", "key", "data", "id", "time", "topic", "partition", "offset"} <= set(line)
        assert line["topic"] == topic
        by_key_read[line["key"]].append((line["type"], line["data"]))
    assert by_key_read == by_key_sent
    # every key lives in exactly one partition
    parts: dict[str, set] = defaultdict(set)
    for line in lines:
        parts[line["key"]].add(line["partition"])
    assert all(len(p) == 1 for p in parts.values())
    # The printed read-your-writes bound is each partition's last offset.
    last: dict[int, int] = {}
    for line in lines:
        last[line["partition"]] = max(line["offset"], last.get(line["partition"], -1))
    assert printed == ",".join(f"{p}:{o}" for p, o in sorted(last.items()))


def test_file_with_one_bad_line_publishes_nothing(config, unique, tmp_path):
    topic = unique("bank")
    Topics(config).ensure([*internal_topics(config), event_topic(topic)])
    events = [json.dumps(e) for e in make_events(20, accounts=3)]
    events[11] = json.dumps(
        {
            "type": "bank.MoneyDeposited",
            "key": "acc-1",
            "data": {"account_id": "acc-1", "amount_cents": "twelve"},
        }
    )
    events[15] = "{oops"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(events))
    done = refold(config, "publish", topic, "--file", str(path))
    assert done.returncode == 2
    assert f"{path}:12:" in done.stderr and "amount_cents" in done.stderr
    assert f"{path}:16: invalid JSON" in done.stderr
    assert "nothing published" in done.stderr
    assert list(tail(config, codec_for(config), topic, from_beginning=True, follow=False)) == []


def test_single_publish_and_bad_single_inputs(config, unique):
    topic = unique("bank")
    data = json.dumps({"account_id": "acc-9", "amount_cents": 250, "memo": "coffee"})
    done = refold(
        config, "publish", topic, "--type", "bank.MoneyWithdrawn", "--key", "acc-9", "--data", data
    )
    assert done.returncode == 1 and "does not exist" in done.stderr and "--create" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

    done = refold(
        config,
        "publish",
        topic,
        "--create",
        "--type",
        "bank.MoneyWithdrawn",
        "--key",
        "acc-9",
        "--data",
        data,
    )
    assert done.returncode == 0, done.stderr
    assert f"published 1 event(s) to {topic} (partition:offset " in done.stdout

    for args, reason in [
        (["--type", "bank.Nope", "--key", "k", "--data", "{}"], "unknown event type"),
        (["--type", "bank.MoneyWithdrawn", "--key", "k", "--data", "{bad"], "not valid JSON"),
        (["--type", "bank.MoneyWithdrawn", "--key", "k", "--data", "[" * 5000], "nested too"),
        (["--type", "bank.MoneyWithdrawn", "--key", "k", "--data", "9" * 5000], "4300 digits"),
        (["--type", "bank.MoneyWithdrawn", "--data", data], "--key"),
        (
            ["--type", "bank.MoneyWithdrawn", "--key", "k", "--data", '{"account_id": "k"}'],
            "amount_cents",
        ),
    ]:
        done = refold(config, "publish", topic, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert reason in done.stderr, (args, done.stderr)
    out = [
        json.loads(line)
        for line in refold(config, "tail", topic, "--from-beginning").stdout.splitlines()
    ]
    assert [(e["type"], e["key"], e["data"]["amount_cents"]) for e in out] == [
        ("bank.MoneyWithdrawn", "acc-9", 250)
    ]


def test_foreign_record_is_reported_and_tailing_goes_on(config, unique):
    topic = unique("bank")
    Topics(config).ensure([*internal_topics(config), event_topic(topic, partitions=1)])
    codec = codec_for(config)
    with Publisher(config, codec) as publisher:
        first = publisher.publish(
            topic, "bank.AccountOpened", "acc-1", {"account_id": "acc-1", "owner": "ada"}
        )
        raw = Producer({"bootstrap.servers": config.bootstrap_servers})
        raw.produce(topic, b"hello from the console producer", b"acc-1")
        raw.flush(10)
        last = publisher.publish(
            topic,
            "bank.MoneyDeposited",
            "acc-1",
            {"account_id": "acc-1", "amount_cents": 10, "memo": ""},
        )
    assert first.offset == 0 and last.offset == 2
    items = list(tail(config, codec, topic, from_beginning=True, follow=False))
    assert [type(i).__name__ for i in items] == ["Event", "BadRecord", "Event"]
    bad = items[1]
    assert isinstance(bad, BadRecord) and (bad.partition, bad.offset) == (0, 1)
    assert "not an Avro single-object" in bad.reason

    done = refold(config, "tail", topic, "--from-beginning", "--limit", "3")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert (
        lines[1]["error"] and lines[1]["offset"] == 1 and lines[2]["type"] == "bank.MoneyDeposited"
    )


def test_publisher_positions_and_murmur2_placement(config, unique):
    """Positions come back in input order; placement matches Kafka's Java partitioner."""
    topic = unique("bank")
    Topics(config).ensure([*internal_topics(config), event_topic(topic)])
    with Publisher(config, codec_for(config)) as publisher:
        positions = publisher.publish_many(
            topic,
            [
                (
                    "bank.MoneyDeposited",
                    f"acc-{i}",
                    {"account_id": f"acc-{i}", "amount_cents": i + 1},
                )
                for i in range(200)
            ],
        )
    assert len(positions) == 200
    for i, pos in enumerate(positions):
        assert pos.partition == java_murmur2_partition(f"acc-{i}".encode(), 6)


def java_murmur2_partition(key: bytes, partitions: int) -> int:
    """Kafka's `Utils.murmur2` + `toPositive`, written out here as an independent oracle."""
    m, r, seed = 0x5BD1E995, 24, 0x9747B28C
    length = len(key)
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(key[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail_len = length % 4
    base = length - tail_len
    if tail_len == 3:
        h ^= key[base + 2] << 16
    if tail_len >= 2:
        h ^= key[base + 1] << 8
    if tail_len >= 1:
        h ^= key[base]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions
