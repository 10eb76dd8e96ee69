"""A/B of `Publisher.publish_bulk`: the working tree's publisher against another revision's.

Loads `streams/kafka/publisher.py` of `--against REV` beside the working tree's (imports that
moved since are mapped by `--map OLD=NEW` lines, e.g. names the old file imported from a module
that no longer has them) and publishes the same N pre-encoded bank events to a fresh 6-partition
topic with each, alternating which goes first, on the broker of REFOLD_BOOTSTRAP_SERVERS. Prints
events/s and client CPU microseconds per event of every run, and the medians of the per-run
ratios. Run it under `tune_allocator()`, as `refold publish` does.

    PYTHONPATH=. python bench/publish_ab.py --against main [--events 200000] [--repeats 5] \
        [--map 'from refold.core.serde import X=from refold.core.envelope import X']
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType

from refold.core.config import Config
from refold.kafka import publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics

from bench.common import generate


def load_publisher(rev: str, mappings: list[str]) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:streams/kafka/publisher.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for mapping in mappings:
        old, new = mapping.split("=", 1)
        source = source.replace(old, new.replace("\\n", "\n"))
    path = Path(tempfile.mkdtemp()) / f"publisher_{rev.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision to compare with")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--map", action="append", default=[], help="OLD=NEW source rewrite")
    args = parser.parse_args()
    publisher.tune_allocator(0)
    config = Config.from_env()
    codec = codec_for(config)
    events = generate(codec, args.events, 20_000).events
    topics = Topics(config)
    variants = {"this": publisher, args.against: load_publisher(args.against, args.map)}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.repeats):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for name in order:
            topic = f"ab-publish-{uuid.uuid4().hex[:8]}"
            topics.ensure([*internal_topics(config), event_topic(topic, 6)])
            pub = variants[name].Publisher(config, codec, source="refold://ab")
            pub.publish_bulk(topic, events[:1000])  # the producer connected, schemas registered
            start, cpu = time.perf_counter(), time.process_time()
            summary = pub.publish_bulk(topic, events)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            pub.close()
            assert summary.count == len(events)
            rates[name].append(len(events) / wall)
            cpus[name].append(cpu * 1e6 / len(events))
            print(
                f"rep {rep} {name:>8}: {rates[name][-1]:>9,.0f} ev/s {cpus[name][-1]:.2f} cpu-us/ev"
            )
    speed = [a / b for a, b in zip(rates["this"], rates[args.against], strict=True)]
    cost = [a / b for a, b in zip(cpus["this"], cpus[args.against], strict=True)]
    print(
        f"events/s this/{args.against}: {[round(r, 3) for r in speed]}, median "
        f"{statistics.median(speed):.3f}"
    )
    print(
        f"client CPU per event this/{args.against}: {[round(r, 3) for r in cost]}, median "
        f"{statistics.median(cost):.3f}"
    )


if __name__ == "__main__":
    main()
