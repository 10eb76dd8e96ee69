"""The raw baseline of the commands benchmark: a bare exactly-once hop, no refold code.

    PYTHONPATH=. python -m bench.eos_baseline --bootstrap HOST:PORT --rate 500 --seconds 8

What a command's trip costs in Kafka alone, on the same broker and machine: an idempotent
producer (acks=all, linger 1 ms) sends records at `rate`/s, stamped with their send time, to a
6-partition input topic; a consume-produce-commit loop copies each batch it polls to an output
topic in one transaction with its input offsets (librdkafka's transactional API, as refold's
processor uses it, retry.backoff.ms 5); a read_committed consumer of the output measures send ->
read. Loop and reader run in a child process of their own (as refold's worker does), the sender
in this one. Prints one JSON line: p50/p99 of send -> read and of the send's ack, transactions,
and the median batch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

PARTITIONS = 6


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _loop_and_read(bootstrap: str, source: str, sink: str, expected: int, out: object) -> None:
    """Child: the transactional copy loop on one thread, the read_committed reader on another."""
    import threading

    stop = threading.Event()
    batches: list[int] = []
    seen: list[float] = []

    def loop() -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"eos-loop-{source}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "transactional.id": f"eos-loop-{source}",
                "linger.ms": 1,
                "retry.backoff.ms": 5,
            }
        )
        producer.init_transactions()
        consumer.subscribe([source])
        while not stop.is_set():
            first = consumer.poll(0.1)
            if first is None or first.error():
                continue
            msgs = [first, *consumer.consume(499, 0)]
            producer.begin_transaction()
            ends: dict[int, int] = {}
            for msg in msgs:
                if msg.error():
                    continue
                producer.produce(sink, msg.value(), msg.key(), partition=msg.partition())
                ends[msg.partition()] = msg.offset() + 1
            offsets = [TopicPartition(source, p, o) for p, o in ends.items()]
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata())
            producer.commit_transaction()
            batches.append(len(msgs))
        consumer.close()

    def read() -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"eos-read-{sink}",
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 10,
            }
        )
        consumer.subscribe([sink])
        while len(seen) < expected and not stop.is_set():
            first = consumer.poll(0.1)
            if first is None:
                continue
            for msg in [first, *consumer.consume(999, 0)]:
                if not msg.error():
                    seen.append(time.time() - float(msg.value()))
        consumer.close()

    threads = [threading.Thread(target=loop), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    threads[1].join()
    stop.set()
    threads[0].join()
    out.send({"latencies": seen, "batches": batches})  # type: ignore[attr-defined]


def run(bootstrap: str, rate: float, seconds: float) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    source, sink = f"bench-eos-in-{tag}", f"bench-eos-out-{tag}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics(
        [NewTopic(source, PARTITIONS, 1), NewTopic(sink, PARTITIONS, 1)]
    ).values():
        future.result(30)
    total = int(rate * seconds)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_loop_and_read, args=(bootstrap, source, sink, total, send))
    child.start()
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 1,
            "acks": "all",
            "enable.idempotence": True,
        }
    )
    acks: list[float] = []
    # The loop's group assignment first: a warm-up record through the whole hop is not counted.
    time.sleep(3.0)
    start = time.perf_counter()
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = time.time()
        producer.produce(
            source,
            repr(sent).encode(),
            str(i).encode(),
            on_delivery=lambda err, _msg, t=sent: acks.append(time.time() - t),
        )
        producer.poll(0)
    offered = total / (time.perf_counter() - start)
    producer.flush(30)
    report = receive.recv() if receive.poll(120) else {"latencies": [], "batches": []}
    child.join(30)
    if child.is_alive():
        child.kill()
    admin.delete_topics([source, sink])
    latencies, batches = report["latencies"], report["batches"]
    return {
        "offered_per_s": round(offered, 1),
        "count": len(latencies),
        "p50_ms": round(_quantile(latencies, 0.50) * 1000, 1),
        "p99_ms": round(_quantile(latencies, 0.99) * 1000, 1),
        "ack_p50_ms": round(_quantile(acks, 0.50) * 1000, 1),
        "ack_p99_ms": round(_quantile(acks, 0.99) * 1000, 1),
        "transactions": len(batches),
        "median_batch": statistics.median(batches) if batches else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    print(json.dumps(run(args.bootstrap, args.rate, args.seconds)))


if __name__ == "__main__":
    main()
