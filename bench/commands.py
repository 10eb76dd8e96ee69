"""Commands benchmark: commands decided per second, and POST -> result latency at half load.

Not part of `make test`. Run against a broker (REFOLD_BOOTSTRAP_SERVERS, else one it starts):

    PYTHONPATH=. python -m bench.commands [--commands 50000] [--accounts 2000] [--seconds 20]

1. Throughput: N commands (deposits and withdrawals over opened accounts) are appended to the
   command topic first, then a `refold worker` subprocess decides them; the rate is taken from
   the results' own decision times (first to last), so start-up and assignment do not count.
2. Latency: the worker serves HTTP; an open-loop client POSTs `?wait_ms=` commands at 500/s
   and at half the measured rate (at most 2,500/s, half the 5,000/s target) and records
   POST -> result times, with the worker's per-step times (`refold_command_step_ms`). Beside
   each, the raw baseline at the same rate: a bare exactly-once hop (bench.eos_baseline:
   producer -> transactional consume-produce-commit loop -> read_committed reader).
3. Overload: POSTs at twice the measured rate for 5 s: the p99 of the admitted commands'
   results and of the 429 refusals (the issue's aim: refused within 100 ms, not queued).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from refold.core.commands import Decider
from refold.core.config import Config
from refold.kafka.command_client import CommandClient, ResultsIndex
from refold.kafka.command_topics import ensure_command_topics
from refold.kafka.topics import Topics, event_topic, internal_topics

from bench import eos_baseline

ROOT = Path(__file__).resolve().parents[1]
MAX_OVERLOAD_PER_S = 3000.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start_worker(
    config: Config, decider: Decider, data_dir: Path, port: int | None
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers,
        "REFOLD_DATA_DIR": str(data_dir),
        "REFOLD_APP": "tests.integration.apps.vault",
        "VAULT_NAME": decider.name,
        "VAULT_TOPIC": decider.events_topic,
        "PYTHONPATH": str(ROOT),
    }
    args = [sys.executable, "-m", "refold.cli.main", "worker", "--only", decider.name]
    if port:
        args += ["--http", f"127.0.0.1:{port}"]
    return subprocess.Popen(
        args, env=env, stdout=(data_dir.parent / "worker.log").open("ab"), stderr=subprocess.STDOUT
    )


def throughput(
    config: Config, decider: Decider, client: CommandClient, n: int, accounts: int, work: Path
) -> float:
    rng = random.Random(7)
    keys = [f"acc-{i:05d}" for i in range(accounts)]
    ids = []
    futures = []
    for key in keys:
        command = client.prepare(
            decider.name, {"key": key, "type": "bank.OpenAccount", "data": {"owner": "bench"}}
        )
        futures.append(client.append(command))
        ids.append(command.command_id)
    for _ in range(n - accounts):
        kind = "bank.Deposit" if rng.random() < 0.6 else "bank.Withdraw"
        command = client.prepare(
            decider.name,
            {
                "key": rng.choice(keys),
                "type": kind,
                "data": {"amount_cents": rng.randrange(1, 5000)},
            },
        )
        futures.append(client.append(command))
        ids.append(command.command_id)
    for future in futures:
        future.result(60)
    index = ResultsIndex(config, [decider.results_topic]).start()
    worker = start_worker(config, decider, work / "w-throughput", None)
    try:
        deadline = time.monotonic() + 600
        last = None
        for cid in reversed(ids):  # the last one is decided last within its partition
            last = index.wait(cid, max(0.1, deadline - time.monotonic()))
            if last is None:
                raise SystemExit(f"command {cid} not decided")
        times = [index.get(cid)["decided_at_ms"] for cid in ids]  # type: ignore[index]
    finally:
        worker.terminate()
        worker.wait(30)
        index.stop()
    span = (max(times) - min(times)) / 1000
    return n / span if span > 0 else float("inf")


def wait_healthy(port: int, timeout_s: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def step_histograms(port: int) -> dict[str, list[tuple[float, int]]]:
    """The worker's `refold_command_step_ms` buckets: step -> [(upper bound ms, cumulative)]."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return parse_steps(text)


def parse_steps(text: str) -> dict[str, list[tuple[float, int]]]:
    """`refold_command_step_ms` buckets in a /metrics text: step -> [(le ms, cumulative)]."""
    import re

    pattern = re.compile(r'refold_command_step_ms_bucket\{.*step="([^"]+)",le="([^"]+)"\} (\d+)')
    out: dict[str, list[tuple[float, int]]] = {}
    for step, le, count in pattern.findall(text):
        out.setdefault(step, []).append((float(le), int(count)))
    return out


def step_quantiles(
    before: dict[str, list[tuple[float, int]]], after: dict[str, list[tuple[float, int]]]
) -> dict[str, dict[str, float]]:
    """p50/p99 (ms, interpolated within buckets) of what each step recorded between two scrapes."""
    out = {}
    for step, rows in after.items():
        old = dict(before.get(step, []))
        counts = [(le, n - old.get(le, 0)) for le, n in rows]
        total = counts[-1][1]
        if total <= 0:
            continue
        quantiles = {"count": float(total)}
        for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
            rank, low, below = q * total, 0.0, 0
            for le, cumulative in counts:
                if cumulative >= rank:
                    width = cumulative - below
                    high = le if le != float("inf") else low * 2
                    quantiles[name] = round(low + (high - low) * (rank - below) / max(width, 1), 2)
                    break
                low, below = le, cumulative
        out[step] = quantiles
    return out


async def latency(
    port: int, decider: Decider, rate: float, seconds: float, accounts: int
) -> dict[str, float]:
    import aiohttp

    rng = random.Random(11)
    url = f"http://127.0.0.1:{port}/commands/{decider.name}?wait_ms=10000"
    samples: list[float] = []
    refused: list[float] = []
    statuses: dict[str, int] = {}
    keys = [f"lat-{i:05d}" for i in range(accounts)]
    connector = aiohttp.TCPConnector(limit=2048)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(body: dict[str, object], record: bool) -> None:
            while True:
                t0 = time.perf_counter()
                async with session.post(url, json=body) as response:
                    result = await response.json()
                    retry = float(response.headers.get("Retry-After", "1"))
                if response.status != 429 or record:
                    break
                await asyncio.sleep(retry)  # the setup's accounts must all open
            if record:
                took = time.perf_counter() - t0
                # Refused at once under overload (429): counted, timed apart from the results.
                (refused if response.status == 429 else samples).append(took)
                status = str(result.get("status", response.status))
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(
            *(
                post({"key": k, "type": "bank.OpenAccount", "data": {"owner": "lat"}}, False)
                for k in keys
            )
        )
        loop = asyncio.get_running_loop()
        before = await loop.run_in_executor(None, step_histograms, port)
        tasks = []
        start = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            kind = "bank.Deposit" if rng.random() < 0.6 else "bank.Withdraw"
            tasks.append(
                asyncio.create_task(
                    post(
                        {
                            "key": rng.choice(keys),
                            "type": kind,
                            "data": {"amount_cents": rng.randrange(1, 5000)},
                        },
                        True,
                    )
                )
            )
        offered = total / (time.perf_counter() - start)
        await asyncio.gather(*tasks)
        after = await loop.run_in_executor(None, step_histograms, port)
    steps = step_quantiles(before, after)
    ms = lambda values, q: round(percentile(values, q) * 1000, 1)  # noqa: E731
    return {
        "offered_per_s": round(offered, 1),
        "p50_ms": ms(samples, 0.50),
        "p99_ms": ms(samples, 0.99),
        "max_ms": round(max(samples) * 1000, 1) if samples else float("nan"),
        "count": len(samples),
        "refused_429": len(refused),
        "refused_p99_ms": ms(refused, 0.99) if refused else float("nan"),
        **{f"status_{k}": v for k, v in statuses.items()},
        "steps": steps,  # type: ignore[dict-item]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=50_000)
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument(
        "--rate",
        type=float,
        help="POST rate for the latency run (default: half the measured rate, at most 2,500/s)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="refold-bench-commands-"))
    broker_config = None
    bootstrap = os.environ.get("REFOLD_BOOTSTRAP_SERVERS")
    if not bootstrap:
        from refold.cli import broker

        broker_config = Config(data_dir=work / "broker-data")
        bootstrap = broker.start(broker_config, port=broker.free_port()).bootstrap_servers
    config = Config(data_dir=work / "client", bootstrap_override=bootstrap)
    try:
        name = f"bench-cmd-{uuid.uuid4().hex[:8]}"
        from refold.examples.bank.accounts import Accounts

        decider = type("BenchVault", (Accounts,), {"name": name, "events_topic": name})()
        topics = Topics(config)
        topics.ensure([*internal_topics(config), event_topic(name, args.partitions)])
        ensure_command_topics(topics, decider)
        with CommandClient(config, {name: decider}) as client:
            rate = throughput(config, decider, client, args.commands, args.accounts, work)
        half = min(2500.0, rate / 2)
        rates = sorted({round(r) for r in (args.rate or half, 500.0)})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runs: dict[str, object] = {}
        worker = start_worker(config, decider, work / "w-latency", port)
        try:
            wait_healthy(port)
            for offered in rates:
                # The raw baseline beside it: the same rate through a bare exactly-once hop.
                ours = asyncio.run(latency(port, decider, offered, args.seconds, 500))
                bare = eos_baseline.run(bootstrap, offered, args.seconds)
                runs[f"at_{offered}_per_s"] = {
                    "refold": ours,
                    "bare_eos_hop": bare,
                    "p50_over_bare": round(float(ours["p50_ms"]) / float(bare["p50_ms"]), 2),
                    "p99_over_bare": round(float(ours["p99_ms"]) / float(bare["p99_ms"]), 2),
                }
            # Overload: twice the measured maximum offered, at most what this one-process client
            # can send (about 3,000/s here; the report has the rate it reached); what is
            # admitted must stay fast, what is not must be refused at once (429), not queued.
            over = round(min(2 * rate, MAX_OVERLOAD_PER_S))
            runs[f"overload_{over}_per_s"] = asyncio.run(
                latency(port, decider, over, min(args.seconds, 5.0), 500)
            )
        finally:
            worker.terminate()
            worker.wait(30)
        report = {
            "commands": args.commands,
            "partitions": args.partitions,
            "decided_per_s": round(rate),
            "half_max_per_s": round(half),
            **runs,
            "loadavg": os.getloadavg(),
            "cpus": os.cpu_count(),
        }
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    finally:
        if broker_config is not None:
            from refold.cli import broker

            broker.stop(broker_config)


if __name__ == "__main__":
    main()
