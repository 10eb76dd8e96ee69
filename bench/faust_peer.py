"""The Faust peer of the rebuild scenario: a faust-streaming app that folds the bank events into a
RocksDB-backed table (rocksdict driver) keyed by account, run in its own process.

It decodes with refold's codec and folds with the same `Balances.apply`, so both sides do the
same work per event. Faust is configured as its experts tune a throughput-bound worker
(`TUNED`: larger fetches and poll batches, a deeper stream buffer, batched producer writes to the
changelog, no standby replicas), and otherwise runs as documented: an agent iterating
`stream.events()`, a changelogged table, at-least-once.

Progress goes to `--progress` every second. One worker writes its result to `--result` once its
agent has folded `--events` events and shuts itself down; when several workers share the group
(`bench.scenarios_faust` starts them), each folds only its partitions, so each writes its result
(its own part of the table) when `--stop-file` appears, and the scenario adds them up.

    python -m bench.faust_peer --bootstrap HOST:PORT --topic T --events N --data-dir D \
        --result R.json --progress P.json [--stop-file S]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

STARTED = time.time()

import faust  # noqa: E402 - the clock starts before Faust's own (slow) import
from refold.core.catalog import Catalog  # noqa: E402
from refold.core.config import Config  # noqa: E402
from refold.core.serde import Codec, Event  # noqa: E402
from refold.examples.bank.projections import Balances  # noqa: E402

APP_SETTINGS: dict[str, Any] = {
    "store": "rocksdb://",  # faust-streaming has no rocksdict:// scheme; the table picks the driver
    "web_enabled": False,  # no HTTP needed; avoids a port clash with other runs
    "topic_replication_factor": 1,
    "consumer_auto_offset_reset": "earliest",
}
# What an expert sets for a fold bound by throughput (faust-streaming's settings; the defaults
# in brackets): a 20 ms producer linger for the changelog [0], 1 MiB producer batches [16 KiB],
# 4 MiB requests [1 MiB], 10,000 records per poll [no limit set], 4 MiB fetches [1 MiB], a
# 16,384-event stream buffer [4,096], no standby replicas [1].
TUNED: dict[str, Any] = {
    "producer_linger": 0.02,
    "producer_max_batch_size": 1 << 20,
    "producer_max_request_size": 4 << 20,
    "broker_max_poll_records": 10_000,
    "consumer_max_fetch_size": 4 << 20,
    "stream_buffer_maxsize": 16_384,
    "table_standby_replicas": 0,
}
APP_SETTINGS.update(TUNED)
TABLE_OPTIONS = {"driver": "rocksdict"}
# INFO, as Faust's docs run workers (`-l info`). At WARNING and above the worker's terminal
# spinner sets the root logger to DEBUG, so every aiokafka debug call builds a log record.
LOGLEVEL = "INFO"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def build(args: argparse.Namespace) -> faust.Worker:
    codec = Codec(Catalog.load(Config().schemas_dirs))
    fold = Balances()
    app = faust.App(
        args.app_id,
        broker=f"kafka://{args.bootstrap}",
        datadir=str(args.data_dir),
        topic_partitions=args.partitions,
        **APP_SETTINGS,
    )
    source = app.topic(
        args.topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=args.partitions,
    )
    # Keys are str (raw bytes on the wire), values JSON: the app's default serializers.
    # (Faust pops "driver" out of the options mapping it is given: pass a copy.)
    table = app.Table(
        "balances",
        default=None,
        partitions=args.partitions,
        key_type=str,
        options=dict(TABLE_OPTIONS),
    )
    progress: dict[str, Any] = {
        "count": 0,
        "first": None,
        "first_cpu": 0.0,
        "done": None,
        "last": None,  # when the last event so far was folded
        "started": STARTED,
    }

    @app.agent(source)
    async def fold_balances(stream: Any) -> None:
        decode, apply, initial = codec.decode, fold.apply, fold.initial
        async for ev in stream.events():
            msg = ev.message
            if progress["first"] is None:
                progress["first"], progress["first_cpu"] = time.time(), cpu_seconds()
            key = msg.key.decode()
            type_name, data = decode(msg.value)
            state = table.get(key)
            event = Event(
                type_name,
                key,
                data,
                msg.topic,
                msg.partition,
                msg.offset,
                int(msg.timestamp * 1000),
                msg.headers,
            )
            table[key] = apply(initial(key) if state is None else state, event)
            progress["count"] += 1
            progress["last"] = time.time()
            if progress["count"] == args.events:
                progress["done"] = progress["last"]
                finish(table, progress, args)

    @app.timer(0.5)
    async def report_progress() -> None:
        write_json(args.progress, {**progress, "now": time.time()})
        if args.stop_file is not None and args.stop_file.exists() and not args.result.exists():
            progress["done"] = progress["last"]
            finish(table, progress, args)

    return faust.Worker(app, loglevel=LOGLEVEL, redirect_stdouts=False)


def finish(table: Any, progress: dict[str, Any], args: argparse.Namespace) -> None:
    """Record the timing, check the table against the expected totals, then stop the worker."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    keys = total = events = 0
    for _key, state in table.items():
        keys += 1
        total += state["balance_cents"]
        events += state["events"]
    write_json(
        args.result,
        {
            **progress,
            "cpu_s": cpu - progress["first_cpu"],  # from the first event on, like the runtime's
            "max_rss_mb": usage.ru_maxrss / 1024,
            "table_keys": keys,
            "table_total_balance_cents": total,
            "table_total_events": events,
            "settings": {
                **APP_SETTINGS,
                "table_options": TABLE_OPTIONS,
                "worker_loglevel": LOGLEVEL,
                "faust_version": faust.__version__,
            },
            "store_driver": "rocksdict" if getattr(table.data, "use_rocksdict", False) else "other",
        },
    )
    os.kill(os.getpid(), signal.SIGTERM)  # Faust's worker shuts down cleanly on SIGTERM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--progress", type=Path, required=True)
    parser.add_argument("--stop-file", type=Path, help="write the result and stop once it exists")
    build(parser.parse_args()).execute_from_commandline()


if __name__ == "__main__":
    main()
