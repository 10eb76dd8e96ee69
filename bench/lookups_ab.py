"""A/B of key lookups/s over HTTP: this tree's query server against another revision's.

Each repetition starts a worker with a QueryServer (`--procs` processes) on the same folded
topic, once with this tree and once with the other revision (alternating which goes first), and
offers closed-loop load with bench/loadgen.py for `--seconds`. Prints lookups/s per run and the
median of the per-repetition ratios (this tree / the other).

The other revision runs from a directory in which `refold` imports it, e.g. for main:

    git worktree add --detach /tmp/rev main
    (cd /tmp/rev/streams && ln -s ../projections/store store && ln -s ../projections/http http \\
        && ln -s ../schemas schemas && ln -s ../deploy deploy)
    mkdir /tmp/rev-path && ln -s /tmp/rev/streams /tmp/rev-path/refold
    REFOLD_BOOTSTRAP_SERVERS=... python -m bench.lookups_ab --against-path /tmp/rev-path
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

from refold.cli.broker import free_port
from refold.core.config import Config
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics

ROOT = Path(__file__).resolve().parents[1]
SERVER = textwrap.dedent(
    """
    import pathlib, sys, time
    from refold.core.config import Config
    from refold.engine.worker import Worker
    from refold.examples.bank.projections import Balances
    from refold.http.server import QueryServer
    topic, name, port, procs, total, data = sys.argv[1:7]
    config = Config.from_env().with_(data_dir=pathlib.Path(data))
    projection = type("B", (Balances,), {"name": name, "topics": (topic,)})()
    worker = Worker(config, [projection])
    worker.start()
    while worker.runners[name].stats.folded < int(total):
        time.sleep(0.1)
    server = QueryServer(worker, "127.0.0.1", int(port), procs=int(procs))
    server.start()
    time.sleep(2.5)  # the health thread has checked, the lag is refreshed
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()
    worker.stop()
    """
)


def run_once(env: dict[str, str], topic: str, args: argparse.Namespace, scratch: Path) -> float:
    name = f"ab_{uuid.uuid4().hex[:8]}"
    port = free_port()
    command = [sys.executable, "-c", SERVER, topic, name, str(port), str(args.procs)]
    command += [str(args.events), str(scratch / name)]
    server = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and b"ready" in server.stdout.readline()
        paths = scratch / f"{name}.paths"
        paths.write_text("".join(f"/projections/{name}/acc-{i:05d}\n" for i in range(args.keys)))
        load = [sys.executable, "-m", "bench.loadgen", "--base", f"http://127.0.0.1:{port}"]
        load += ["--paths", str(paths), "--seconds", str(args.seconds), "--connections", "32"]
        out = subprocess.run(load, capture_output=True, text=True, cwd=ROOT, check=True)
        return float(json.loads(out.stdout)["rate"])
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against-path", required=True, help="where `refold` is the other rev")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=2_000)
    args = parser.parse_args()
    config = Config.from_env()
    topic = f"lookups-ab-{uuid.uuid4().hex[:8]}"
    Topics(config).ensure([event_topic(topic), *internal_topics(config)])
    events = []
    for i in range(args.events):
        key = f"acc-{i % args.keys:05d}"
        data = {"account_id": key, "amount_cents": 5, "memo": ""}
        events.append(("bank.MoneyDeposited", key, data))
    with Publisher(config, codec_for(config)) as publisher:
        for start in range(0, len(events), 2000):
            publisher.publish_many(topic, events[start : start + 2000])
    here = {**os.environ}
    other = {**os.environ, "PYTHONPATH": args.against_path}
    rates: dict[str, list[float]] = {"this": [], "other": []}
    with tempfile.TemporaryDirectory(prefix="refold-lookups-ab-") as tmp:
        for rep in range(args.repeats):
            order = [("this", here), ("other", other)]
            for label, env in order if rep % 2 == 0 else order[::-1]:
                rates[label].append(run_once(env, topic, args, Path(tmp)))
                print(f"{label:<6} {rates[label][-1]:>9.0f} lookups/s", flush=True)
    ratios = [a / b for a, b in zip(rates["this"], rates["other"], strict=True)]
    print("ratios (this / other):", ", ".join(f"{r:.2f}" for r in ratios))
    print(f"median ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
