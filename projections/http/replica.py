"""A reader process: serves plain key lookups of a worker's projections from its own CPU.

Started by the worker's query server (refold.http.replicas) as
`python -m refold.http.replica HOST PORT UPSTREAM_PORT SCRATCH_DIR`. It listens on the worker's
HTTP port beside the worker (SO_REUSEPORT: the kernel spreads connections over the processes)
and reads the stores through RocksDB secondary instances, so lookups do not share the worker's
GIL with its fold threads.

- Plain `GET /projections/{name}/{key}` and `GET /healthz` are answered here (the fast path of
  refold.http.fastpath). The view is caught up with the worker's commits before a read when
  the last catch-up is older than `READ_LAG_S`, so an answer holds every state committed more
  than that before the request arrived; its position is the one stored with that very state.
- Everything else — `min_offset` waits, scans, `as_of`, POSTs, `/metrics`, a projection this
  process cannot read — is relayed byte for byte to the worker's own server on loopback
  (`UPSTREAM_PORT`), which answers as if the client had asked it directly.

Control: stdin carries JSON lines from the worker, `{"views": {name: {"path", "version",
"state", "assigned", "fresh"}}, "healthz": [status, body]}`, the projections' live versions,
runner states and freshness (`answers.Freshness`: lag or stale per key partition), and the
worker's `/healthz` answer (a LIVE pointer switch arrives as a new path). stdout carries JSON
lines to it: `{"ready": true}` once listening, then `{"counts": [[route, status, n], ...]}`
(cumulative) while answering. End of stdin — the worker stopped or died, even by SIGKILL —
ends the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from refold.core.errors import StoreError
from refold.http import answers
from refold.http.answers import DOWN, TP, Answer
from refold.http.auth import Tokens
from refold.http.fastpath import Front, new_loop
from refold.http.limits import ConnectionStats
from refold.store.rocksdb import RocksStore

log = logging.getLogger(__name__)

READ_LAG_S = 0.005  # a read catches the view up first when its last catch-up is older
COUNTS_EVERY_S = 0.25


class View:
    """One projection's live version, read through a secondary instance of its store."""

    def __init__(self, name: str, info: Mapping[str, Any], scratch: Path) -> None:
        self.name = name
        self.path = str(info["path"])
        self.scratch = scratch / f"{os.getpid()}-{name}-v{info['version']}-{time.monotonic_ns()}"
        self.store = RocksStore.open_secondary(self.path, self.scratch)
        self.caught_up_at = time.monotonic()
        self.state = "starting"
        self.assigned: tuple[TP, ...] = ()
        self.positions: dict[TP, int] = {}
        self.encoded = b"{}"
        self.fresh = answers.UNKNOWN
        self.update(info)

    def update(self, info: Mapping[str, Any]) -> None:
        """The runner's state, owned partitions and freshness, as the worker last reported."""
        self.state = str(info["state"])
        self.assigned = tuple((str(t), int(p)) for t, p in info["assigned"])
        self.fresh = answers.Freshness.from_json(info["fresh"])
        self._positions()

    def _positions(self) -> None:
        # Like the runner's positions: the owned partitions, at the offsets stored with the
        # states this view holds (the view only moves on catch_up(), on this thread).
        stored = self.store.offsets()
        self.positions = {tp: stored.get(tp, 0) for tp in self.assigned}
        self.encoded = answers.dumps(answers.position(self.positions))

    def read(self, key: str) -> Answer:
        now = time.monotonic()
        if now - self.caught_up_at > READ_LAG_S:
            self.store.catch_up()
            self.caught_up_at = now
            self._positions()
        state = self.store.get(key)
        fresh = self.fresh.fragment(key)
        if state is None:
            return 404, answers.key_missing(self.name, key, self.positions, fresh)
        return 200, answers.key_found(key, state, self.encoded, fresh)

    def close(self) -> None:
        try:
            self.store.close()
        except StoreError as exc:
            log.warning("reader: closing the view of %s: %s", self.path, exc)
        shutil.rmtree(self.scratch, ignore_errors=True)


class Reads:
    """The fast path's reads over this process's views; None relays a request to the worker."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.views: dict[str, View] = {}
        self.healthz: Answer = (503, answers.error_body("starting", "no word from the worker yet"))

    def apply(self, infos: Mapping[str, Mapping[str, Any]], healthz: list[Any]) -> None:
        """Follow the worker: open views of new live versions, close those no longer live."""
        for name in set(self.views) - set(infos):
            self.views.pop(name).close()
        for name, info in infos.items():
            view = self.views.get(name)
            if view is not None and view.path == str(info["path"]):
                view.update(info)
                continue
            try:
                fresh = View(name, info, self.scratch)
            except StoreError as exc:  # the worker answers this projection's reads meanwhile
                log.warning("reader: cannot open %s: %s", info["path"], exc)
                if view is not None:
                    self.views.pop(name).close()
                continue
            self.views[name] = fresh
            if view is not None:
                view.close()
        self.healthz = (int(healthz[0]), str(healthz[1]).encode())

    def lookup(self, name: str, key: str) -> Answer | None:
        view = self.views.get(name)
        if view is None or view.state in DOWN or view.fresh.owner(key) is not None:
            return None  # the worker answers: unknown names, stopped runners, keys it routes
        try:
            return view.read(key)
        except StoreError as exc:
            log.warning("reader: %s unreadable here, relaying: %s", name, exc)
            return None

    def healthz_answer(self) -> Answer:
        return self.healthz  # the worker's own answer, at most a tick old

    def close(self) -> None:
        for view in self.views.values():
            view.close()
        self.views.clear()


class Relay(asyncio.Protocol):
    """A client connection handed over by the fast path, spliced to the worker's own server."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._client: asyncio.Transport | None = None
        self._worker: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._client = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(lambda: _Back(self), *self._upstream)
        except OSError as exc:
            log.warning("reader: the worker's server at %s is unreachable: %s", self._upstream, exc)
            if self._client is not None:
                body = answers.error_body("worker unavailable", str(exc))
                self._client.write(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body)
                )
                self._client.close()
            return
        if self._client is None or self._client.is_closing():
            transport.close()
            return
        self._worker = transport
        transport.writelines(self._pending)
        self._pending.clear()
        if self._eof and transport.can_write_eof():
            transport.write_eof()

    def data_received(self, data: bytes) -> None:
        if self._worker is not None:
            self._worker.write(data)
        else:
            self._pending.append(data)

    def eof_received(self) -> bool:
        self._eof = True
        if self._worker is not None and self._worker.can_write_eof():
            self._worker.write_eof()
        return True  # keep the client side open for the rest of the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._client = None
        if self._worker is not None:
            self._worker.close()

    def pause_writing(self) -> None:
        if self._worker is not None:
            self._worker.pause_reading()

    def resume_writing(self) -> None:
        if self._worker is not None:
            self._worker.resume_reading()

    def to_client(self, data: bytes) -> None:
        if self._client is not None:
            self._client.write(data)

    def worker_closed(self) -> None:
        self._worker = None
        if self._client is not None:
            self._client.close()

    def pause_worker(self, paused: bool) -> None:
        if self._client is not None:
            (self._client.pause_reading if paused else self._client.resume_reading)()


class _Back(asyncio.Protocol):
    """The worker side of a Relay."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def data_received(self, data: bytes) -> None:
        self._relay.to_client(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.worker_closed()

    def pause_writing(self) -> None:
        self._relay.pause_worker(True)

    def resume_writing(self) -> None:
        self._relay.pause_worker(False)


async def serve(host: str, port: int, upstream: int, scratch: Path) -> None:
    """Follow the worker's control lines, answer on host:port, until stdin ends."""
    loop = asyncio.get_running_loop()
    control = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(control), sys.stdin)
    reads = Reads(scratch)
    counts: dict[tuple[str, int], int] = {}
    front = Front(reads, lambda: Relay(("127.0.0.1", upstream)), counts, Tokens.from_env())
    listener: asyncio.AbstractServer | None = None
    reporter: asyncio.Task[None] | None = None
    try:
        while line := await control.readline():
            told = json.loads(line)
            reads.apply(told["views"], told["healthz"])
            if listener is None:  # listen once the views are open: answers are right at once
                listener = await loop.create_server(
                    front.protocol, host, port, reuse_port=True, reuse_address=True, backlog=1024
                )
                _say({"ready": True})
                reporter = loop.create_task(_report(counts, front.stats))
    finally:
        if reporter is not None:
            reporter.cancel()
        if listener is not None:
            listener.close()
        front.close_all()
        reads.close()
        with contextlib.suppress(OSError):  # the last reader out removes the worker's dir too
            scratch.rmdir()
        front.stats.open = 0  # every connection of this process is closed now
        _say(
            {
                "counts": [[r, s, n] for (r, s), n in counts.items()],
                "connections": front.stats.as_list(),
            }
        )


async def _report(counts: dict[tuple[str, int], int], stats: ConnectionStats) -> None:
    sent: dict[tuple[str, int], int] = {}
    sent_connections: list[int] = []
    while True:
        await asyncio.sleep(COUNTS_EVERY_S)
        connections = stats.as_list()
        if counts != sent or connections != sent_connections:
            sent, sent_connections = dict(counts), connections
            _say(
                {
                    "counts": [[r, s, n] for (r, s), n in sent.items()],
                    "connections": connections,
                }
            )


def _say(message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the worker is gone: stdin ends next
        os.write(1, json.dumps(message).encode() + b"\n")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s reader %(message)s")
    # Ctrl-C reaches the whole process group: the worker stops, and its closing stdin stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    host, port, upstream, scratch = sys.argv[1:5]
    loop = new_loop()
    try:
        loop.run_until_complete(serve(host, int(port), int(upstream), Path(scratch)))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
