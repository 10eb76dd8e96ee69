"""CPU per request of the HTTP fast path's framing: this tree's `refold.http.fastpath` against
another revision's, in one process, without sockets or Kafka.

Feeds the same bytes (a typical `GET /projections/{name}/{key}` from a client library, with
Host, Accept, User-Agent and Connection headers, one request per read, and 16 pipelined in one
read) to each version's protocol over a transport that only counts bytes, with reads answering
a constant lookup, alternating which goes first; prints µs per request of every run and the
median of the per-run ratios.

    PYTHONPATH=. python bench/fastpath_micro.py --against main [--requests 200000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import ModuleType
from typing import Any

from refold.http import fastpath

from bench.publish_ab import load_publisher

REQUEST = (
    b"GET /projections/balances/acc-000123 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Accept: */*\r\nUser-Agent: python-requests/2.32\r\nConnection: keep-alive\r\n\r\n"
)
ANSWER = (200, b'{"key":"acc-000123","state":{"balance_cents":1200},"position":{"t:0":5}}')


class Reads:
    def lookup(self, name: str, key: str) -> Any:
        return ANSWER

    def healthz_answer(self) -> Any:
        return ANSWER


class Sink(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False


def load(rev: str) -> ModuleType:
    # The fast path of `rev`, loaded beside this tree's (publish_ab's loader, another path).
    import bench.publish_ab as ab

    original = ab.subprocess.run

    def run(args: list[str], **kw: Any) -> Any:
        return original([*args[:-1], f"{rev}:projections/http/fastpath.py"], **kw)

    ab.subprocess.run = run  # type: ignore[assignment]
    try:
        return load_publisher(rev, [])
    finally:
        ab.subprocess.run = original  # type: ignore[assignment]


async def per_request_us(module: ModuleType, requests: int, pipelined: int) -> float:
    front = module.Front(Reads(), lambda: None, {})
    protocol = front.protocol()
    sink = Sink()
    protocol.connection_made(sink)
    data = REQUEST * pipelined
    reads = requests // pipelined
    start = time.process_time()
    for _ in range(reads):
        protocol.data_received(data)
    return (time.process_time() - start) * 1e6 / (reads * pipelined)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    variants = {"this": fastpath, args.against: load(args.against)}
    for pipelined in (1, 16):
        us: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.repeats):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in order:
                us[name].append(
                    asyncio.run(per_request_us(variants[name], args.requests, pipelined))
                )
        ratios = [a / b for a, b in zip(us["this"], us[args.against], strict=True)]
        print(
            f"{pipelined:>2} per read: this {statistics.median(us['this']):.2f} µs, "
            f"{args.against} {statistics.median(us[args.against]):.2f} µs per request; "
            f"this/{args.against} {[round(r, 3) for r in ratios]}, median "
            f"{statistics.median(ratios):.3f}"
        )


if __name__ == "__main__":
    main()
