"""The task bench's peers and process plumbing: a private redis-server, Celery runs and a bare
share-consumer loop (the ceiling of moving records through a share group), and stopping what
the bench started, by pid. Used by `bench.tasks`."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from confluent_kafka import AcknowledgeType
from refold.core.config import Config
from refold.kafka import clients
from refold.kafka.task_log import configure_share_group
from refold.kafka.topics import Topics, event_topic

log = logging.getLogger("bench.tasks")
ROOT = Path(__file__).resolve().parents[1]
KEYS = 50  # merge-key values (the test size: 5,000 tasks over 50 keys)


def task_data(i: int) -> dict[str, Any]:
    return {"product_id": f"p{i % KEYS:03d}", "qty": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes] | mp.Process, timeout: float = 20) -> None:
    """Stop a process this bench started, by its pid: TERM, then KILL."""
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(10)


# -- Redis ------------------------------------------------------------------------------------


@contextmanager
def redis_server(work: Path) -> Iterator[str]:
    """A private `redis-server` on a free loopback port, no persistence; stopped by pid."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit(
            "bench.tasks: redis-server not found (the Celery peer needs a real Redis); "
            "hint: apt-get update && apt-get install -y redis-server"
        )
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*args, "--dir", str(work)],
        stdout=(work / "redis.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(
                        f"redis-server did not start; see {work / 'redis.log'}"
                    ) from None
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


# -- refold -----------------------------------------------------------------------------------


def celery_run(url: str, work: Path, n: int, processes: int, pool: str) -> dict[str, Any]:
    """N no-op tasks through Celery with `processes` worker processes; rate to results in Redis."""
    import redis

    env = {**os.environ, "BENCH_REDIS_URL": url, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker"]
    quiet = ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]
    if pool == "solo":
        commands = [[*base, "--pool=solo", "-n", f"w{i}@%h", *quiet] for i in range(processes)]
    else:  # one prefork parent and its children: `processes` in all
        commands = [[*base, "--pool=prefork", "-c", str(max(1, processes - 1)), *quiet]]
    r = redis.Redis.from_url(url)
    r.flushdb()
    out = (work / f"celery-{pool}.log").open("ab")
    procs = [subprocess.Popen(c, env=env, stdout=out, stderr=subprocess.STDOUT) for c in commands]
    from bench.celery_app import sender

    sender.conf.broker_url = url
    send = sender.send_task
    try:
        warm = [send("bench.noop", ("p0",), task_id=f"warm-{uuid.uuid4().hex}") for _ in range(50)]
        if celery_wait(r, [w.id for w in warm], 120) is None:
            raise RuntimeError(f"Celery warm-up did not finish; see {work}/celery-{pool}.log")
        ids = [f"c-{uuid.uuid4().hex}" for _ in range(n)]
        t0 = time.time()
        for i, task_id in enumerate(ids):
            send("bench.noop", (task_data(i)["product_id"],), task_id=task_id)
        submitted = time.time()
        last = celery_wait(r, ids, max(120.0, n / 50))
        if last is None:
            return {"status": "failed", "error": "Celery tasks did not finish in time"}
        return {
            "tasks": n,
            "pool": pool,
            "processes": processes,
            "submit_per_s": n / (submitted - t0),
            "succeeded_per_s": n / (last - t0),
        }
    finally:
        for proc in procs:
            stop(proc)


def celery_wait(r: Any, ids: list[str], timeout: float) -> float | None:
    """Wall time of the last result's `date_done` once every id has a SUCCESS result in Redis.
    Polls the oldest pending ids first (Celery runs roughly in order), 2,000 at a time."""
    pending = list(ids)
    last = 0.0
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            log.error("Celery: %d of %d tasks without a result", len(pending), len(ids))
            return None
        head = pending[:2000]
        values = r.mget([f"celery-task-meta-{i}" for i in head])
        left = []
        for task_id, raw in zip(head, values, strict=True):
            meta = json.loads(raw) if raw else None
            if meta is None or meta.get("status") != "SUCCESS":
                left.append(task_id)
                continue
            done = datetime.fromisoformat(meta["date_done"].replace("Z", "+00:00")).timestamp()
            last = max(last, done)
        pending = left + pending[2000:]
        if len(left) == len(head):
            time.sleep(0.02)
    return last


# -- the bare share-consumer loop ---------------------------------------------------------------


def _bare_consumer(
    bootstrap: str, group: str, topic: str, count: Any, last: Any, halt: Any
) -> None:
    config = Config(bootstrap_override=bootstrap)
    consumer = clients.share_consumer(config, group)
    consumer.subscribe([topic])
    try:
        while not halt.is_set():
            msgs = consumer.poll(0.2)
            if not msgs:
                continue
            for msg in msgs:
                consumer.acknowledge(msg, AcknowledgeType.ACCEPT)
            consumer.commit_async()
            now = time.time()
            with count.get_lock():
                count.value += len(msgs)
                last.value = max(last.value, now)
    finally:
        consumer.close()


def bare_run(config: Config, name: str, n: int, processes: int, value: bytes) -> dict[str, Any]:
    """N records through `processes` bare share-consumer processes (poll, ACCEPT, commit)."""
    Topics(config).ensure([event_topic(name, 1)])
    group = f"{name}.share"
    configure_share_group(config, group)
    ctx = mp.get_context("spawn")
    count, last, halt = ctx.Value("q", 0), ctx.Value("d", 0.0), ctx.Event()
    procs = [
        ctx.Process(
            target=_bare_consumer,
            args=(config.bootstrap_servers, group, name, count, last, halt),
            daemon=True,
        )
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    producer = clients.producer(config, defaults={"linger.ms": 5})

    def produce(k: int) -> None:
        for i in range(k):
            while True:
                try:
                    producer.produce(name, value, f"b{i}".encode())
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.flush(60)

    try:
        produce(50 * processes)  # warm-up: every consumer joined and fetching
        if not _wait(lambda: count.value >= 50 * processes, 120):
            raise RuntimeError("bare share consumers got no records")
        time.sleep(2)
        base = count.value
        t0 = time.time()
        produce(n)
        if not _wait(lambda: count.value >= base + n, max(120.0, n / 50)):
            return {"status": "failed", "error": f"{count.value - base} of {n} records"}
        return {"tasks": n, "processes": processes, "succeeded_per_s": n / (last.value - t0)}
    finally:
        halt.set()
        for proc in procs:
            stop(proc)


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- the run ----------------------------------------------------------------------------------
