"""Run every benchmark scenario against a real broker and write a Markdown and a JSON report.

    python -m bench.run [--quick] [--events N] [--accounts N] [--repeats N] [--out bench/out]
                        [--only publish,rebuild,faust,freshness,queries] [--keep]

Starts its own local Kafka broker (deploy/ assembly, a free port, a scratch data dir) and stops
it at the end, unless REFOLD_BOOTSTRAP_SERVERS names one to use. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refold.cli import broker
from refold.core.config import Config
from refold.engine.runtime import tune_collector
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for

from bench import (
    report,
    scenarios_faust,
    scenarios_freshness,
    scenarios_memory,
    scenarios_publish,
    scenarios_queries,
    scenarios_rebuild,
)
from bench.common import PARTITIONS, BankData, Bench, Params, end_offsets, generate

log = logging.getLogger("bench")

SCENARIOS = ("publish", "rebuild", "faust", "freshness", "queries", "memory")
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 200,000 events, 20,000 accounts, shorter loads",
    )
    parser.add_argument("--events", type=int, help="bank events (default 1,000,000; quick 200,000)")
    parser.add_argument("--accounts", type=int, help="accounts (default 100,000; quick 20,000)")
    parser.add_argument("--repeats", type=int, help="runs per variant where cheap (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report directory")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


def attempt(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one scenario; a failure is logged and reported, and the other scenarios still run."""
    log.info("=== %s", name)
    try:
        return fn()
    except Exception as exc:
        log.error("scenario %s failed:\n%s", name, traceback.format_exc())
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def seed_topic(bench: Bench, data: BankData) -> str:
    """The bank topic without measuring (when the publish scenario is not selected)."""
    topic = bench.topic("bank")
    with Publisher(bench.config("seed"), bench.codec) as publisher:
        publisher.publish_bulk(topic, data.events)
    return topic


def run_scenarios(bench: Bench, params: Params, only: set[str], out: dict[str, Any]) -> None:
    log.info("generating %d events over %d accounts", params.events, params.accounts)
    data = generate(bench.codec, params.events, params.accounts)
    topic: str | None = None
    if "publish" in only:
        written: list[str] = []

        def publish() -> dict[str, Any]:
            result = scenarios_publish.run(bench, data, params)
            written.append(result.topic)
            return result.to_json()

        out["publish"] = attempt("publish", publish)
        topic = written[0] if written else None
    if topic is None and only & {"rebuild", "faust", "queries"}:
        topic = seed_topic(bench, data)
    ends = end_offsets(bench.config("ends"), topic) if topic else {}
    if "rebuild" in only and topic:
        out["rebuild"] = attempt(
            "rebuild", lambda: scenarios_rebuild.run(bench, topic, ends, data, params).to_json()
        )
    if "faust" in only and topic:
        # one Faust worker, then two in one group: refold's replay runs on as many processes
        out["faust"] = attempt(
            "faust", lambda: scenarios_faust.run(bench, topic, len(ends), data, params).to_json()
        )
        out["faust2"] = attempt(
            "faust2",
            lambda: scenarios_faust.run(bench, topic, len(ends), data, params, workers=2).to_json(),
        )
    if "freshness" in only:
        out["freshness"] = attempt(
            "freshness", lambda: scenarios_freshness.run(bench, data, params).to_json()
        )
    if "queries" in only and topic:
        out["queries"] = attempt(
            "queries", lambda: scenarios_queries.run(bench, topic, ends, data, params).to_json()
        )
    if "memory" in only:
        out["memory"] = attempt("memory", lambda: scenarios_memory.run(bench, params).to_json())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_collector()  # as `refold worker` runs
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("refold").setLevel(logging.WARNING)
    params = Params.build(
        quick=args.quick, events=args.events, accounts=args.accounts, repeats=args.repeats
    )
    only = set(args.only.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="refold-bench-"))
    started, clock = report.now_utc(), time.monotonic()
    result: dict[str, Any] = {
        "meta": {
            "started": started,
            "command": "python -m bench.run " + " ".join(sys.argv[1:]),
            "machine": report.machine(),
            "loadavg_start": _loadavg(),
        },
        "params": {**{k: getattr(params, k) for k in params.__slots__}, "partitions": PARTITIONS},
    }
    broker_config: Config | None = None
    try:
        bootstrap = os.environ.get("REFOLD_BOOTSTRAP_SERVERS")
        broker_pid: int | None = None
        if bootstrap:
            result["meta"]["broker"] = f"external, {bootstrap} (REFOLD_BOOTSTRAP_SERVERS)"
        else:
            broker_config = Config(data_dir=work / "broker")
            info = broker.start(broker_config, port=broker.free_port())
            bootstrap, broker_pid = info.bootstrap_servers, info.nodes[0].pid
            result["meta"]["broker"] = (
                f"local Apache Kafka {broker.kafka_version()} (KRaft, "
                f"1 node, heap {info.heap_mb} MB) on {bootstrap}"
            )
        codec = codec_for(Config(bootstrap_override=bootstrap))
        bench = Bench(bootstrap, work / "runs", codec, broker_pid, out=args.out)
        run_scenarios(bench, params, only, result)
    finally:
        if broker_config is not None:
            broker.stop(broker_config)
        if args.keep:
            log.info("scratch directory kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["meta"].update(
        finished=report.now_utc(), seconds=time.monotonic() - clock, loadavg_end=_loadavg()
    )
    result["targets"] = report.targets(result)
    text = report.markdown(result)
    (args.out / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / "report.md").write_text(text)
    print(text)
    failed = [k for k, v in result.items() if isinstance(v, dict) and v.get("status") == "failed"]
    return 1 if failed else 0


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
