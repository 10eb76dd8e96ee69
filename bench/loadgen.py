"""HTTP load generator for the query scenario, run as its own process; prints one JSON object.

Keep-alive HTTP/1.1 over `--connections` asyncio connections, one request in flight on each.
It speaks just enough HTTP (GET, Content-Length bodies) to spend far less CPU per request than
a full client such as aiohttp, which on a 2-core machine would otherwise be what is measured.

- closed loop (no `--rate`): every connection sends back to back for `--seconds`: the maximum
  rate this client reaches;
- open loop (`--rate R`): request i is due at start + i/R; the next free connection takes it,
  and its latency runs from when it was due, so a stalled server shows as latency (no
  coordinated omission), not as a lower rate.

Paths come from `--paths FILE` (one per line, picked at random) or `--path`. With `--bodies FILE`
(one JSON body per line) every request is a POST of the next body, in turn, to `--path`.

    python -m bench.loadgen --base http://127.0.0.1:8080 --paths keys.txt [--rate 2000]
    python -m bench.loadgen --base ... --path '/commands/bank?wait_ms=5000' --bodies cmds.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def percentiles(latencies: list[float]) -> dict[str, float]:
    values = sorted(latencies)
    out: dict[str, float] = {}
    for label, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)):
        rank = max(0, min(len(values) - 1, int(-(-q * len(values) // 100)) - 1))
        out[label] = values[rank] * 1000 if values else float("nan")
    out["max"] = values[-1] * 1000 if values else float("nan")
    return out


class Load:
    """Connections, the paths to request, and what came back."""

    def __init__(
        self, base: str, paths: list[str], connections: int, bodies: list[bytes] | None = None
    ) -> None:
        url = urlsplit(base)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.requests = [f"GET {p} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode() for p in paths]
        self.posts: list[bytes] | None = None
        if bodies is not None:  # POSTs, each body in turn
            head = f"POST {paths[0]} HTTP/1.1\r\nHost: {self.host}\r\n"
            head += "Content-Type: application/json\r\nContent-Length: "
            self.posts = [b"%s%d\r\n\r\n%s" % (head.encode(), len(b), b) for b in bodies]
        self.connections = connections
        self.latencies: list[float] = []
        self.by_status: dict[int, list[float]] = {}
        self.statuses: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.send_delays: list[float] = []  # due -> written, seconds
        self.rng = random.Random(7)
        self.start_monotonic = 0.0

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def _one(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], i: int) -> int:
        """Request `i`: the i-th body (in turn) when posting, else a random path."""
        reader, writer = conn
        posts = self.posts
        writer.write(posts[i % len(posts)] if posts else self.rng.choice(self.requests))
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        if length:
            await reader.readexactly(length)
        return status

    async def _worker(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], due: Any, clock: Any
    ) -> None:
        """Send until `due()` says stop (None); each answer's latency runs from its due time."""
        try:
            while (slot := due()) is not None:
                i, when = slot
                delay = when - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                # How late the request goes out: when every connection holds an unanswered
                # request, a due one waits here for the first free connection.
                self.send_delays.append(clock() - when)
                try:
                    status = await self._one(conn, i)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    name = type(exc).__name__
                    self.errors[name] = self.errors.get(name, 0) + 1
                    conn[1].close()
                    conn = await self._connect()
                    continue
                took = clock() - when
                self.latencies.append(took)
                self.by_status.setdefault(status, []).append(took)
                self.statuses[status] = self.statuses.get(status, 0) + 1
        finally:
            conn[1].close()

    async def run(self, seconds: float, rate: float | None, count: int | None = None) -> float:
        clock = time.perf_counter
        # Every connection is open before the first request is due: with 1,024 of them, a
        # fixed 0.2 s head start was not enough on a busy server, and the requests of the
        # connections still opening were counted late from their due times.
        conns = await asyncio.gather(*(self._connect() for _ in range(self.connections)))
        start = clock() + 0.05
        # When request i is due on time.monotonic()'s clock, which other processes share.
        self.start_monotonic = time.monotonic() + (start - clock())
        end = start + seconds
        slots = itertools.count()
        if rate:
            total = int(rate * seconds)

            def due() -> tuple[int, float] | None:
                i = next(slots)
                return (i, start + i / rate) if i < total else None
        else:

            def due() -> tuple[int, float] | None:
                now = clock()
                if count is not None:  # each of `count` requests once, however long it takes
                    i = next(slots)
                    return (i, max(now, start)) if i < count else None
                return (next(slots), max(now, start)) if now < end else None

        await asyncio.gather(*(self._worker(conn, due, clock) for conn in conns))
        return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="http://host:port")
    parser.add_argument("--paths", type=Path, help="file with one path per line")
    parser.add_argument("--path", help="a single path, e.g. /healthz")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, help="open loop at this many requests/s")
    parser.add_argument("--count", type=int, help="closed loop: stop after this many requests")
    parser.add_argument("--bodies", type=Path, help="POST these JSON bodies (one a line) to --path")
    parser.add_argument("--raw", type=Path, help="also write every latency (s, JSON) here")
    args = parser.parse_args()
    paths = args.paths.read_text().split() if args.paths else [args.path or "/healthz"]
    bodies = args.bodies.read_bytes().splitlines() if args.bodies else None
    load = Load(args.base, paths, args.connections, bodies)
    try:  # uvloop's loop costs this client less CPU per request, leaving more to the server
        import uvloop

        seconds = uvloop.run(load.run(args.seconds, args.rate, args.count))
    except ImportError:
        seconds = asyncio.run(load.run(args.seconds, args.rate, args.count))
    if args.raw:
        args.raw.write_text(json.dumps(load.latencies))
    done = len(load.latencies)
    report: dict[str, Any] = {
        "tool": "bench/loadgen.py",
        "mode": "open" if args.rate else "closed",
        "offered_per_s": args.rate,
        "connections": args.connections,
        "seconds": seconds,
        "requests": done,
        "rate": done / seconds if seconds else float("nan"),
        "statuses": {str(k): v for k, v in sorted(load.statuses.items())},
        "errors": load.errors,
        "start_monotonic": load.start_monotonic,  # request i was due at this + i / rate
        "latency_ms": percentiles(load.latencies),
        "latency_ms_by_status": {str(k): percentiles(v) for k, v in sorted(load.by_status.items())},
        # due -> written: large values mean the client ran out of free connections (every one
        # waiting for an answer), so the latencies above include time queued in this client
        "send_delay_ms": percentiles(load.send_delays),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
