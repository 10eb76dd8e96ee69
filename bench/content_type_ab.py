"""A/B of the CloudEvents `content-type` header on `Publisher.publish_bulk`, in one process.

The same N pre-encoded bank events go to a fresh 6-partition topic with the six-header envelope
(`content-type: application/avro`, the default) and with the five headers of before (the
envelope's template called with `content_type=""`), alternating which goes first, on the broker
of REFOLD_BOOTSTRAP_SERVERS. Prints events/s and client CPU microseconds per event of every run
and the medians of the per-run ratios. Runs under `tune_allocator()`, as `refold publish` does.

    PYTHONPATH=. python bench/content_type_ab.py [--events 200000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import uuid

from refold.core import envelope
from refold.core.config import Config
from refold.kafka import publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics

from bench.common import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    publisher.tune_allocator(0)
    config = Config.from_env()
    codec = codec_for(config)
    events = generate(codec, args.events, 20_000).events
    topics = Topics(config)
    with_header = envelope.template
    variants = {
        "with": with_header,
        "without": functools.partial(with_header, content_type=""),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for rep in range(args.repeats):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in order:
                envelope.template = variants[name]  # type: ignore[assignment]
                topic = f"ab-ctype-{uuid.uuid4().hex[:8]}"
                topics.ensure([*internal_topics(config), event_topic(topic, 6)])
                pub = publisher.Publisher(config, codec, source="refold://ab")
                pub.publish_bulk(topic, events[:1000])  # connected, schemas registered
                start, cpu = time.perf_counter(), time.process_time()
                summary = pub.publish_bulk(topic, events)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                pub.close()
                assert summary.count == len(events)
                rates[name].append(len(events) / wall)
                cpus[name].append(cpu * 1e6 / len(events))
                print(
                    f"rep {rep} {name:>8}: {rates[name][-1]:>9,.0f} ev/s "
                    f"{cpus[name][-1]:.2f} cpu-us/ev"
                )
    finally:
        envelope.template = with_header  # type: ignore[assignment]
    speed = [a / b for a, b in zip(rates["with"], rates["without"], strict=True)]
    cost = [a / b for a, b in zip(cpus["with"], cpus["without"], strict=True)]
    print(
        f"events/s with/without: {[round(r, 3) for r in speed]}, median "
        f"{statistics.median(speed):.3f}"
    )
    print(
        f"client CPU per event with/without: {[round(r, 3) for r in cost]}, median "
        f"{statistics.median(cost):.3f}"
    )


if __name__ == "__main__":
    main()
