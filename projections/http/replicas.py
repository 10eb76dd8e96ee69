"""The worker's reader processes: more CPUs for key lookups than one process's GIL.

`refold worker --http HOST:PORT --http-procs N` serves the port from the worker and N-1 reader
processes (refold.http.replica), all listening with SO_REUSEPORT so the kernel spreads
connections over them. `ReaderProcesses` starts them, tells them the live version and state of
every projection whenever that changes (so a swap or rollback is followed within a tick),
collects their request counts for `/metrics`, restarts one that died, and ends them with the
worker: each exits when its stdin — a pipe only the worker holds — ends, which also happens
when the worker is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from refold.core.errors import ConfigError
from refold.engine.frozen import Serving
from refold.engine.worker import Worker
from refold.http.answers import Answer, Freshness
from refold.http.limits import ConnectionStats
from refold.store.scratch import make_scratch, scratch_dir

log = logging.getLogger(__name__)

TICK_S = 0.05  # how often the views are compared and pushed, and the processes checked
RESTART_EVERY_S = 1.0  # at most one restart per process slot in this time


class Reads(Protocol):
    """What the readers are told besides the views: how current each answer is, /healthz."""

    def freshness(self, runner: Serving) -> Freshness: ...

    def healthz_answer(self) -> Answer: ...


@dataclass(slots=True)
class _Reader:
    slot: int
    proc: subprocess.Popen[bytes]
    started: float
    ready: bool = False
    counts: dict[tuple[str, int], int] = field(default_factory=dict)
    connections: list[int] = field(default_factory=list)  # ConnectionStats.as_list()
    partial: bytes = b""


class ReaderProcesses:
    """`count` reader processes on host:port, relaying what they cannot answer to `upstream`."""

    def __init__(
        self, worker: Worker, count: int, host: str, port: int, upstream: int, reads: Reads
    ) -> None:
        self.worker = worker
        self._reads = reads  # the worker's server: its freshness and /healthz answers
        self.count = count
        self._args = [host, str(port), str(upstream)]
        # The readers' views live in here (removed by stop(), else swept by the next worker).
        self._scratch = make_scratch(scratch_dir(worker.config.data_dir), "readers")
        self._readers: list[_Reader] = []
        self._retired: dict[tuple[str, int], int] = {}  # counts of readers that ended
        self._retired_connections = ConnectionStats()  # their refusals and timeouts
        self._lock = threading.Lock()
        self._views = b""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start every reader and return once all listen (ConfigError if one does not)."""
        self._views = self._snapshot()
        self._readers = [self._spawn(slot) for slot in range(self.count)]
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            while not all(r.ready for r in self._readers):
                dead = [r for r in self._readers if r.proc.poll() is not None]
                if dead or time.monotonic() > deadline:
                    self.stop()
                    why = f"exited with {dead[0].proc.returncode}" if dead else "did not listen"
                    raise ConfigError(
                        f"a reader process for {self._args[0]}:{self._args[1]} {why}",
                        hint="see the log above; --http-procs 1 serves without reader processes",
                    )
                self._read(selector, 0.1)
        self._thread = threading.Thread(target=self._run, name="http-readers", daemon=True)
        self._thread.start()
        log.info("%d reader processes serve HTTP beside the worker", self.count)

    def stop(self, timeout: float = 10.0) -> None:
        """Close every reader's stdin, wait for them to exit (kill after `timeout`); idempotent."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for reader in self._readers:
            _close(reader.proc.stdin)
        deadline = time.monotonic() + timeout
        for reader in self._readers:
            try:
                reader.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("reader process %d did not exit; killing it", reader.proc.pid)
                reader.proc.kill()
                reader.proc.wait()
            _close(reader.proc.stdout)
        shutil.rmtree(self._scratch, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [r.proc.pid for r in self._readers if r.proc.poll() is None]

    def counts(self) -> dict[tuple[str, int], int]:
        """Requests the readers answered themselves, by (route, status): at most a tick old."""
        with self._lock:
            total = dict(self._retired)
            for reader in self._readers:
                for counter, n in reader.counts.items():
                    total[counter] = total.get(counter, 0) + n
        return total

    def connection_stats(self) -> ConnectionStats:
        """The readers' connections (open, refused, timed out): at most a tick old."""
        total = ConnectionStats()
        with self._lock:
            total.add(self._retired_connections.as_list())
            for reader in self._readers:
                if reader.connections:
                    total.add(reader.connections)
        return total

    # -- the supervising thread --------------------------------------------------------------

    def _spawn(self, slot: int) -> _Reader:
        proc = subprocess.Popen(
            [sys.executable, "-m", "refold.http.replica", *self._args, str(self._scratch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        reader = _Reader(slot, proc, time.monotonic())
        self._send(reader, self._views)
        return reader

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            while not self._stopping.is_set():
                try:
                    self._tick(selector)
                except Exception:  # keep supervising; say what went wrong
                    log.exception("reader processes: supervision failed")
                    time.sleep(TICK_S)

    def _tick(self, selector: selectors.BaseSelector) -> None:
        views = self._snapshot()
        if views != self._views:
            self._views = views
            for reader in self._readers:
                self._send(reader, views)
        self._read(selector, TICK_S)
        for i, reader in enumerate(self._readers):
            code = reader.proc.poll()
            if code is None or self._stopping.is_set():
                continue
            if time.monotonic() - reader.started < RESTART_EVERY_S:
                continue
            log.warning("reader process %d exited with %s; starting another", reader.proc.pid, code)
            _close(reader.proc.stdin)
            _close(reader.proc.stdout)
            with self._lock:
                for counter, n in reader.counts.items():
                    self._retired[counter] = self._retired.get(counter, 0) + n
                if reader.connections:  # its connections are gone; its counters stay
                    self._retired_connections.add([0, *reader.connections[1:]])
                self._readers[i] = self._spawn(reader.slot)

    def _snapshot(self) -> bytes:
        """What the readers must know of each projection's live version, as one JSON line."""
        views: dict[str, dict[str, Any]] = {}
        for name, runner in list(self.worker.runners.items()):
            views[name] = {
                "path": str(runner.store.path),
                "version": runner.version,
                "state": runner.stats.state,
                "assigned": [list(tp) for tp in runner.stats.assigned],
                "fresh": self._reads.freshness(runner).to_json(),
            }
        code, body = self._reads.healthz_answer()
        line = {"views": views, "healthz": [code, body.decode()]}
        return json.dumps(line, sort_keys=True).encode() + b"\n"

    def _send(self, reader: _Reader, line: bytes) -> None:
        stdin = reader.proc.stdin
        if stdin is None or stdin.closed:
            return
        try:
            stdin.write(line)
            stdin.flush()
        except OSError:  # it died: the next tick restarts it
            return

    def _read(self, selector: selectors.BaseSelector, timeout: float) -> None:
        """Take what the readers said within `timeout`: ready flags and request counts."""
        by_fd: dict[int, _Reader] = {}
        for reader in self._readers:
            stdout = reader.proc.stdout
            if stdout is not None and not stdout.closed:
                by_fd[stdout.fileno()] = reader
        for fd, reader in by_fd.items():
            selector.register(fd, selectors.EVENT_READ, reader)
        try:
            events = selector.select(timeout)
        finally:
            for fd in by_fd:
                selector.unregister(fd)
        for key, _ in events:
            reader = key.data
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:  # it exited: the tick restarts it
                _close(reader.proc.stdout)
                continue
            lines = (reader.partial + chunk).split(b"\n")
            reader.partial = lines.pop()
            for line in lines:
                message = json.loads(line)
                if message.get("ready"):
                    reader.ready = True
                if "counts" in message:
                    with self._lock:
                        reader.counts = {(r, s): n for r, s, n in message["counts"]}
                        reader.connections = list(message.get("connections") or [])


def _close(stream: IO[bytes] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):  # a broken pipe to a reader that already exited
            stream.close()
