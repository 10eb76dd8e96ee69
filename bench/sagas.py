"""Sagas benchmark: transfers completed per second, and POST -> final status at half load,
beside the same transfers sent as plain commands (the baseline) in the same run.

Part of `make bench` (`--quick` in `make bench-quick`). Run against a broker
(REFOLD_BOOTSTRAP_SERVERS, else one it starts):

    PYTHONPATH=. python -m bench.sagas [--sagas 2000] [--accounts 200] [--seconds 20] [--quick]

One `refold worker` subprocess runs the bank's transfers saga over a decider of its own
(`tests/integration/apps/transfers.py`), with HTTP. A tenth of the transfers go to an account that
does not exist (compensated).

1. Throughput: N transfers are POSTed as fast as the client can (64 in flight); the rate is taken
   from the saga events' own times (first `started` to last `finished`).
2. Latency: an open-loop client POSTs at half the measured rate; each saga's latency is from the
   moment its POST was sent to the time of its `finished` event (same machine, same clock).
3. Baseline, the same transfers without the saga layer, through the same worker: a client does
   what the saga does by hand over `POST /commands/{aggregate}?wait_ms=`: the withdrawal, then
   the deposit, and the refund when the deposit is rejected. Throughput with every transfer in
   flight at once (as the sagas are, once POSTed), then latency (first POST to last result)
   open-loop at half its own rate. The ratios (saga / baseline) are what the saga layer costs:
   its events, its sweeps, its results index.
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
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from refold.core.commands import Decider
from refold.core.config import Config
from refold.kafka import clients
from refold.kafka.command_client import CommandClient
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics

from bench.commands import percentile

ROOT = Path(__file__).resolve().parents[1]
RETRY_429_S = 0.05


def start_worker(
    config: Config, decider: Decider, saga: str, data_dir: Path, port: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers,
        "REFOLD_DATA_DIR": str(data_dir),
        "REFOLD_APP": "tests.integration.apps.transfers",
        "VAULT_NAME": decider.name,
        "VAULT_TOPIC": decider.events_topic,
        "REFOLD_TEST_SAGA": saga,
        "PYTHONPATH": str(ROOT),
    }
    args = [sys.executable, "-m", "refold.cli.main", "worker", "--http", f"127.0.0.1:{port}"]
    log = (data_dir.parent / f"{data_dir.name}.log").open("ab")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return proc
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def fund(client: CommandClient, decider: Decider, accounts: list[str]) -> None:
    ids = [client.send(decider.name, a, "bank.OpenAccount", {"owner": a}) for a in accounts]
    ids += [client.send(decider.name, a, "bank.Deposit", {"amount_cents": 10**9}) for a in accounts]
    for cid in ids:
        assert client.wait(cid, 120)["status"] == "accepted", cid


def saga_times(config: Config, topic: str, ids: set[str], timeout: float) -> dict[str, Any]:
    """Per saga id: its `started` and `finished` times (ms) and final status, read from the
    saga topic until every id in `ids` has finished."""
    codec = codec_for(config)
    consumer = clients.consumer(config, config.group("bench-sagas", uuid.uuid4().hex[:6]))
    parts = Topics(config).partitions(topic)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(parts)])
    found: dict[str, dict[str, Any]] = {}
    done = 0
    deadline = time.monotonic() + timeout
    try:
        while done < len(ids):
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(ids) - done} saga(s) did not finish in {timeout:g} s")
            for msg in consumer.consume(5000, 0.5):
                if msg.error() is not None:
                    continue
                _type, data = codec.decode(msg.value())
                sid = data["saga_id"]
                if sid not in ids:
                    continue
                entry = found.setdefault(sid, {})
                if data["kind"] == "started":
                    entry.setdefault("started", data["at_ms"])
                elif data["kind"] == "finished" and "finished" not in entry:
                    entry.update(finished=data["at_ms"], status=data["status"])
                    done += 1
    finally:
        consumer.close()
    return found


async def post_all(port: int, saga: str, plan: list[tuple[str, dict]], rate: float | None):
    """POST every start (open loop at `rate`/s, else 64 in flight); the send times by id."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/sagas/{saga}"
    sent: dict[str, float] = {}
    gate = asyncio.Semaphore(64 if rate is None else 10_000)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as session:

        async def post(saga_id: str, data: dict) -> None:
            async with gate:
                sent[saga_id] = time.time() * 1000
                async with session.post(url, json={"saga_id": saga_id, "data": data}) as r:
                    assert r.status == 202, await r.text()

        tasks = []
        start = time.perf_counter()
        for i, (saga_id, data) in enumerate(plan):
            if rate is not None:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(saga_id, data)))
        await asyncio.gather(*tasks)
        offered = len(plan) / (time.perf_counter() - start)
    return sent, offered


async def direct_all(
    port: int, aggregate: str, plan: list[tuple[str, dict]], rate: float | None
) -> tuple[list[float], float, dict[str, int]]:
    """The baseline: each transfer as its two (or three) commands, sent one after the other by
    the client, each waited for (`wait_ms`). Returns each transfer's latency (ms, first POST to
    last result), the rate achieved (transfers/s, wall clock) and the outcomes."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/commands/{aggregate}?wait_ms=30000"
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    refused = [0]  # 429 answers (POST /commands' admission control), each retried after a wait
    # Every transfer in flight at once, as the sagas are once POSTed (the POSTs themselves go 64
    # at a time there: a POST returns at once, a transfer here holds its connection throughout).
    gate = asyncio.Semaphore(10_000)
    connector = aiohttp.TCPConnector(limit=1024)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def command(cid: str, key: str, type_: str, data: dict) -> str:
            body = {"command_id": cid, "key": key, "type": type_, "data": data}
            while True:
                async with session.post(url, json=body) as r:
                    result = await r.json()
                    if r.status == 429:  # the worker's backlog is full: nothing was appended
                        # Again soon rather than after Retry-After (whole seconds): the baseline
                        # measures what the command path takes in, not a client's patience.
                        refused[0] += 1
                        await asyncio.sleep(RETRY_429_S)
                        continue
                    assert r.status == 200, result  # answered with the result within wait_ms
                    return str(result["status"])

        async def transfer(tid: str, t: dict) -> None:
            async with gate:
                began = time.perf_counter()
                amount = t["amount_cents"]
                out = f"transfer {tid} to {t['to']}"
                status = await command(
                    f"{tid}/withdraw",
                    t["from"],
                    "bank.Withdraw",
                    {"amount_cents": amount, "memo": out},
                )
                if status != "accepted":
                    outcome = "failed"
                else:
                    memo = f"transfer {tid} from {t['from']}"
                    status = await command(
                        f"{tid}/deposit",
                        t["to"],
                        "bank.Deposit",
                        {"amount_cents": amount, "memo": memo},
                    )
                    outcome = "completed"
                    if status != "accepted":
                        refund = {"amount_cents": amount, "memo": f"refund {tid}"}
                        await command(f"{tid}/refund", t["from"], "bank.Deposit", refund)
                        outcome = "compensated"
                latencies.append((time.perf_counter() - began) * 1000)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        tasks = []
        start = time.perf_counter()
        for i, (tid, t) in enumerate(plan):
            if rate is not None:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(transfer(tid, t)))
        await asyncio.gather(*tasks)
        achieved = len(plan) / (time.perf_counter() - start)
    if refused[0]:
        outcomes["refused_429_retried"] = refused[0]
    return latencies, achieved, outcomes


def baseline(port: int, aggregate: str, n: int, seconds: float, accounts: list, rng) -> dict:
    """The same transfers as plain commands: throughput, then latency at half of it."""
    _lat, rate, outcomes = asyncio.run(
        direct_all(port, aggregate, make_plan("dt", n, accounts, rng), None)
    )
    half = rate / 2
    plan = make_plan("dl", max(1, int(half * seconds)), accounts, rng)
    latencies, offered, more = asyncio.run(direct_all(port, aggregate, plan, half))
    for k, v in more.items():
        outcomes[k] = outcomes.get(k, 0) + v
    return {
        "completed_per_s": round(rate, 1),
        "latency_at_rate_per_s": round(offered, 1),
        "latency_transfers": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "outcomes": outcomes,
    }


def make_plan(prefix: str, n: int, accounts: list[str], rng: random.Random) -> list:
    plan = []
    for i in range(n):
        src = rng.choice(accounts)
        dst = f"missing-{i}" if rng.random() < 0.1 else rng.choice(accounts)
        plan.append((f"{prefix}-{i}", {"from": src, "to": dst, "amount_cents": 1}))
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="300 sagas, 5 s of latency")
    args = parser.parse_args()
    if args.quick:
        args.sagas, args.seconds = min(args.sagas, 300), min(args.seconds, 5.0)
    work = Path(tempfile.mkdtemp(prefix="refold-bench-sagas-"))
    broker_config = None
    bootstrap = os.environ.get("REFOLD_BOOTSTRAP_SERVERS")
    if not bootstrap:
        from refold.cli import broker

        broker_config = Config(data_dir=work / "broker-data")
        bootstrap = broker.start(broker_config, port=broker.free_port()).bootstrap_servers
    config = Config(data_dir=work / "client", bootstrap_override=bootstrap)
    tag = uuid.uuid4().hex[:8]
    name, saga = f"bench-vault-{tag}", f"bench-transfers-{tag}"
    from refold.examples.bank.accounts import Accounts

    decider = type("BenchVault", (Accounts,), {"name": name, "events_topic": name})()
    Topics(config).ensure([*internal_topics(config), event_topic(name, args.partitions)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = start_worker(config, decider, saga, work / "worker", port)
    try:
        rng = random.Random(14)
        accounts = [f"acc-{i:04d}" for i in range(args.accounts)]
        with CommandClient(config, {name: decider}) as client:
            fund(client, decider, accounts)
        plan = make_plan("tp", args.sagas, accounts, rng)
        asyncio.run(post_all(port, saga, plan, None))
        times = saga_times(config, f"{saga}.saga", {sid for sid, _ in plan}, 900)
        span = (
            max(t["finished"] for t in times.values()) - min(t["started"] for t in times.values())
        ) / 1000
        rate = args.sagas / span
        half = rate / 2
        plan = make_plan("lat", int(half * args.seconds), accounts, rng)
        sent, offered = asyncio.run(post_all(port, saga, plan, half))
        lat_times = saga_times(config, f"{saga}.saga", set(sent), 900)
        latencies = [lat_times[sid]["finished"] - sent[sid] for sid in sent]
        statuses: dict[str, int] = {}
        for t in [*times.values(), *lat_times.values()]:
            statuses[t["status"]] = statuses.get(t["status"], 0) + 1
        direct = baseline(port, name, args.sagas, args.seconds, accounts, rng)
    finally:
        worker.terminate()
        worker.wait(30)
        if broker_config is not None:
            from refold.cli import broker

            broker.stop(broker_config)
    report = {
        "sagas": args.sagas,
        "partitions": args.partitions,
        "completed_per_s": round(rate, 1),
        "latency_at_rate_per_s": round(offered, 1),
        "latency_sagas": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies), 1),
        "statuses": statuses,
        "baseline_commands": direct,
        "ratio_completed_per_s": round(rate / direct["completed_per_s"], 2),
        "ratio_p50": round(percentile(latencies, 0.50) / direct["p50_ms"], 2),
        "ratio_p99": round(percentile(latencies, 0.99) / direct["p99_ms"], 2),
        "loadavg": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
