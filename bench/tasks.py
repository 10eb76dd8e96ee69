"""Task benchmark: no-op tasks submitted -> succeeded, refold beside Celery (Redis) and a bare
share-consumer loop, run side by side; POST -> succeeded latency at half load; merge factor
against the merge window.

    PYTHONPATH=. python -m bench.tasks [--quick] [--tasks N] [--repeats R] [--workers W]
                                       [--windows 20,50,200] [--out bench/out]

Starts its own Kafka broker (unless REFOLD_BOOTSTRAP_SERVERS names one) and its own
`redis-server` (Debian's package: `apt-get install -y redis-server`) on a free loopback port,
and stops both by pid. Per repetition, interleaved (refold, Celery, bare, refold, ...):

1. refold: one `refold worker --http` (intake, dispatcher, status projection, reconciler) and W
   `refold task-worker`s; N tasks submitted through the Python `TaskClient` (bulk, 1,000 at a time),
   then N through `POST /tasks/{queue}` (bench/loadgen.py, 256 connections); a task counts
   when its `succeeded` event is read from the status topic (read_committed), and the end
   waits until the status projection answers `succeeded` for the last one.
   Rate = N / (last succeeded - first submit).
2. Celery: W+1 worker processes (the same count of Python processes as refold's), Redis broker
   and result backend, N `apply_async` calls; a task counts when its result is in Redis (its
   `date_done`). Both pools (solo processes, one prefork) run; the faster is the peer.
3. bare: W+1 processes, each a confluent-kafka `ShareConsumer` loop (poll, ACCEPT, commit) on a
   one-partition topic like the work topic, N records produced (acks=all, idempotent) while it
   runs: the ceiling of moving records through a share group at all.

Then, per merge window: a client run (merge factor at full load) and an open-loop POST run at
half the measured rate (p50/p99 POST -> succeeded read from the status topic).

Before all of it, a warm-up (`--warm-up S`, default 30 s; 0 skips it): one refold set runs a
client run and an open-loop POST run of S seconds, reported apart as `warm_up` and left out of
every median. A broker this bench has just started is a cold JVM: its JIT compiles the
request paths during the first tens of seconds of load, and the first latency run after a
broker start measured that (2026-11-28, one fresh broker, five runs in a row at 650/s: POST ->
succeeded p99 858 ms, then 298, 225, 300, 295 ms). A running cluster is warm; so is what this
bench reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refold.cli import broker
from refold.core.config import Config
from refold.core.tasks import WORK_ITEM
from refold.kafka.registry import codec_for
from refold.kafka.task_log import TaskClient, TaskLog

from bench import report
from bench.common import latency_summary, median, ratio
from bench.task_peers import KEYS, bare_run, celery_run, free_port, redis_server, stop, task_data
from bench.task_watch import StatusWatch, task_steps
from bench.taskapp import NoOp

log = logging.getLogger("bench.tasks")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "out"
#: 64 bounded the closed-loop rate by concurrency over latency (766/s; 1,018/s at 256)
HTTP_CONNECTIONS = 256
HALF_LOAD_CAP = 2500.0  # half the 5,000 tasks/s aim
WARM_UP_RATE = 600.0  # POSTs/s of the warm-up's open-loop run (unless --rate names one)


@dataclass(slots=True)
class RefoldSet:
    """One `refold worker --http` and W task workers of a fresh queue, warmed up."""

    config: Config
    work: Path
    queue: str
    window_ms: int
    workers: int
    concurrency: int
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    watch: StatusWatch | None = None
    client: TaskClient | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": self.config.bootstrap_servers,
            "REFOLD_DATA_DIR": str(self.work / "worker"),
            "REFOLD_APP": "bench.taskapp",
            "BENCH_TASK_QUEUE": self.queue,
            "BENCH_TASK_WINDOW_MS": str(self.window_ms),
            "PYTHONPATH": str(ROOT),
        }

    def _spawn(self, name: str, *args: str) -> None:
        out = (self.work / f"{name}.log").open("ab")
        cmd = [sys.executable, "-m", "refold.cli.main", *args]
        self.procs.append(
            subprocess.Popen(cmd, env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        )

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self._spawn("worker", "worker", "--http", f"127.0.0.1:{self.port}", "--http-procs", "1")
        deadline = time.monotonic() + 90
        while not self._healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"refold worker did not start; see {self.work}/worker.log")
            time.sleep(0.2)
        for i in range(self.workers):
            self._spawn(
                f"task-worker-{i}", "task-worker", "--queue", self.queue,
                "--concurrency", str(self.concurrency),
            )  # fmt: skip
        queue = self.queue_def()
        self.watch = StatusWatch(self.config, queue.status_topic, queue.partitions)
        self.client = TaskClient(self.config, {self.queue: queue})
        warm = self.ids("warm", 50)
        submit_client(self.client, self.queue, warm)
        if self.watch.wait(warm, 120) is None:
            raise RuntimeError(f"warm-up tasks did not succeed; see the logs in {self.work}")

    def queue_def(self) -> NoOp:
        attrs = {"name": self.queue, "merge_window_ms": self.window_ms}
        return type("BenchQueue", (NoOp,), attrs)()

    def ids(self, label: str, n: int) -> list[str]:
        return [f"{label}-{i:07d}" for i in range(n)]

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def readable(self, task_id: str, timeout: float = 60) -> float | None:
        """When the status projection answers `succeeded` for `task_id` (monotonic)."""
        url = f"http://127.0.0.1:{self.port}/tasks/{self.queue}/{task_id}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=5) as r:
                if json.loads(r.read()).get("status") == "succeeded":
                    return time.monotonic()
            time.sleep(0.005)
        return None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.watch is not None:
            self.watch.close()
        for proc in reversed(self.procs):
            stop(proc)


def submit_client(client: TaskClient, queue: str, ids: list[str]) -> float:
    """Submit `ids` as a bulk submitter would (`submit_nowait` 1,000 at a time, then every
    acknowledgement awaited); seconds it took."""
    subs = [client.prepare(queue, {"task_id": t, "data": task_data(i)}) for i, t in enumerate(ids)]
    t0 = time.monotonic()
    pending = []
    for k in range(0, len(subs), 1000):
        pending += client.submit_nowait(queue, subs[k : k + 1000])
    for p in pending:
        p.wait(60)
    return time.monotonic() - t0


def post_all(port: int, queue: str, ids: list[str], connections: int) -> None:
    """POST every id once, closed loop over `connections`, through bench/loadgen.py."""
    _loadgen(port, queue, ids, ["--count", str(len(ids)), "--connections", str(connections)])


def _loadgen(port: int, queue: str, ids: list[str], args: list[str]) -> dict[str, Any]:
    """bench/loadgen.py POSTing task i's body as request i (its own process: a lean client
    whose CPU does not crowd the worker on 2 cores, as aiohttp's client in this process did)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
        for i, task_id in enumerate(ids):
            f.write(json.dumps({"task_id": task_id, "data": task_data(i)}).encode() + b"\n")
    load = [sys.executable, "-m", "bench.loadgen", "--base", f"http://127.0.0.1:{port}"]
    load += ["--path", f"/tasks/{queue}", "--bodies", f.name, *args]
    try:
        out = json.loads(subprocess.run(load, capture_output=True, check=True, cwd=ROOT).stdout)
    finally:
        os.unlink(f.name)
    if out["statuses"] != {"202": len(ids)}:
        raise RuntimeError(f"POST /tasks/{queue}: {out['statuses']}, errors {out['errors']}")
    return out


def post_open_loop(
    port: int, queue: str, ids: list[str], rate: float
) -> tuple[dict[str, float], float]:
    """POST `ids` at `rate`/s, open loop; each task's due time on time.monotonic()'s clock
    (lateness counts as latency), and the rate offered."""
    seconds = (len(ids) + 0.5) / rate  # loadgen sends int(rate * seconds) requests
    args = ["--rate", str(rate), "--seconds", str(seconds), "--connections", "512"]
    out = _loadgen(port, queue, ids, args)
    start = out["start_monotonic"]
    return {task_id: start + i / rate for i, task_id in enumerate(ids)}, rate


def refold_rate(s: RefoldSet, label: str, n: int, via: str) -> dict[str, Any]:
    """N tasks through the client (or HTTP); submitted -> succeeded rate and merge factor."""
    assert s.watch is not None and s.client is not None
    ids = s.ids(label, n)
    t0 = time.monotonic()
    if via == "client":
        submit_client(s.client, s.queue, ids)
    else:
        post_all(s.port, s.queue, ids, HTTP_CONNECTIONS)
    submitted = time.monotonic()
    last = s.watch.wait(ids, max(120.0, n / 50))
    if last is None:
        return _unfinished(s.watch, ids, t0)
    last_id = max(ids, key=lambda i: s.watch.done[i])  # type: ignore[union-attr]
    readable = s.readable(last_id) or float("nan")
    return {
        "tasks": n,
        "via": via,
        "submit_per_s": n / (submitted - t0),
        "succeeded_per_s": n / (last - t0),
        "projection_lag_ms": (readable - last) * 1000,
        "merge_factor": s.watch.merge_factor(ids),
    }


def _unfinished(watch: StatusWatch, ids: list[str], t0: float) -> dict[str, Any]:
    """A run whose last tasks did not succeed in time: how far it got."""
    done = [watch.done[i] for i in ids if i in watch.done]
    return {
        "status": "failed",
        "error": f"{len(ids) - len(done)} of {len(ids)} tasks did not succeed in time",
        "finished": len(done),
        "finished_per_s": len(done) / (max(done) - t0) if done else 0.0,
    }


def refold_latency(s: RefoldSet, label: str, rate: float, seconds: float) -> dict[str, Any]:
    """Open-loop POSTs at `rate`: POST -> `succeeded` read from the status topic, and where the
    time went (from each transition's status event)."""
    assert s.watch is not None
    ids = s.ids(label, max(1, int(rate * seconds)))
    s.watch.steps = True
    try:
        started, offered = post_open_loop(s.port, s.queue, ids, rate)
        finished = s.watch.wait(ids, max(120.0, len(ids) / 50))
    finally:
        s.watch.steps = False
    if finished is None:
        out = _unfinished(s.watch, ids, min(started.values()))
        done = [s.watch.done[i] - started[i] for i in ids if i in s.watch.done]
        return {**out, **{f"finished_{k}_ms": v for k, v in latency_summary(done).items()}}
    lat = latency_summary(s.watch.done[i] - started[i] for i in ids)
    return {
        "rate": rate,
        "offered_per_s": offered,
        **{f"{k}_ms": v for k, v in lat.items() if k != "count"},
        "count": len(ids),
        "merge_factor": s.watch.merge_factor(ids),
        "steps_ms": task_steps(s.watch, ids, started),
    }


# -- Celery -----------------------------------------------------------------------------------


def attempt(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    log.info("=== %s", name)
    try:
        out = fn()
    except Exception as exc:
        log.exception("%s failed", name)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    log.info("%s: %s", name, json.dumps(out, default=str))
    return out


def refold_rep(
    config: Config, work: Path, args: argparse.Namespace, window: int, label: str, latency: bool
) -> dict[str, Any]:
    s = RefoldSet(
        config, work / label, f"bench-{uuid.uuid4().hex[:6]}", window, args.workers,
        args.concurrency,
    )  # fmt: skip
    try:
        s.start()
        out: dict[str, Any] = {"window_ms": window}
        out["client"] = attempt(
            f"{label} client", lambda: refold_rate(s, "c", args.tasks, "client")
        )
        if args.http:
            out["http"] = attempt(f"{label} http", lambda: refold_rate(s, "h", args.tasks, "http"))
        if latency:
            rates = [out[k].get("succeeded_per_s") for k in ("client", "http") if k in out]
            measured = [r for r in rates if isinstance(r, float) and r == r]  # finite ones
            half = args.rate or min([HALF_LOAD_CAP] + [r / 2 for r in measured])
            out["latency"] = attempt(
                f"{label} latency", lambda: refold_latency(s, "l", half, args.seconds)
            )
        return out
    finally:
        s.close()


def warm_up(config: Config, work: Path, args: argparse.Namespace, window: int) -> dict[str, Any]:
    """Load the broker (and the machine's caches) through the same paths before measuring:
    a client run and `args.warm_up` seconds of open-loop POSTs; reported, never in a median."""
    warm = argparse.Namespace(**{**vars(args), "tasks": min(args.tasks, 5_000)})
    warm.seconds, warm.http = args.warm_up, False
    warm.rate = args.rate or WARM_UP_RATE
    return refold_rep(config, work, warm, window, "warmup", True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tasks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="5,000 tasks, 1 repetition")
    parser.add_argument("--tasks", type=int, help="tasks per measured run (default 20,000)")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions (default 3)")
    parser.add_argument("--workers", type=int, default=1, help="refold task-worker processes")
    parser.add_argument("--concurrency", type=int, default=4, help="threads per task worker")
    parser.add_argument("--windows", help="merge windows to sweep, ms (default 20,50,200)")
    parser.add_argument("--seconds", type=float, help="latency run length (default 20 s)")
    parser.add_argument("--rate", type=float, help="latency run rate (default: half load)")
    parser.add_argument("--no-http", dest="http", action="store_false", help="skip HTTP intake")
    parser.add_argument("--only", default="refold,celery,bare", help="subset of the peers")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs)")
    parser.add_argument(
        "--warm-up", type=float, default=30.0, help="seconds of load before measuring (0: none)"
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the processes this bench started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.tasks = args.tasks or (5_000 if args.quick else 20_000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.seconds = args.seconds or (8.0 if args.quick else 20.0)
    default_windows = "50,20,200"  # the first is the repetitions' window
    windows = [int(w) for w in (args.windows or default_windows).split(",")]
    only = set(args.only.split(","))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("refold").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="refold-bench-tasks-"))
    processes = args.workers + 1  # refold: the worker and the task workers
    result: dict[str, Any] = {
        "meta": {
            "started": report.now_utc(),
            "command": "python -m bench.tasks " + " ".join(argv or sys.argv[1:]),
            "machine": report.machine(),
            "loadavg_start": os.getloadavg(),
            "tasks": args.tasks,
            "repeats": args.repeats,
            "processes": processes,
            "task_workers": args.workers,
            "concurrency": args.concurrency,
            "keys": KEYS,
            "windows": windows,
        },
        "reps": [],
    }
    broker_config: Config | None = None
    bootstrap = os.environ.get("REFOLD_BOOTSTRAP_SERVERS")
    try:
        if not bootstrap:
            broker_config = Config(data_dir=work / "broker")
            bootstrap = broker.start(broker_config, port=broker.free_port()).bootstrap_servers
        config = Config(data_dir=work / "client", bootstrap_override=bootstrap)
        log_ = TaskLog(config, codec_for(config))
        item = {"batch_id": "b", "tasks": [{"task_id": "t-0000001", "key": "k",
                "data": json.dumps(task_data(1)), "attempt": 1, "parent_id": None}]}  # fmt: skip
        work_value = log_.codec.encode(WORK_ITEM, item)
        if args.warm_up > 0 and "refold" in only:
            result["warm_up"] = warm_up(config, work, args, windows[0])
        with redis_server(work) as url:
            for r in range(args.repeats):
                rep: dict[str, Any] = {}
                if "refold" in only:
                    rep["refold"] = refold_rep(config, work, args, windows[0], f"rep{r}", r == 0)
                if "celery" in only:
                    for pool in ("solo", "prefork"):
                        rep[f"celery_{pool}"] = attempt(
                            f"rep{r} celery {pool}",
                            lambda p=pool: celery_run(url, work, args.tasks, processes, p),  # type: ignore[misc]
                        )
                if "bare" in only:
                    name = f"bench-bare-{uuid.uuid4().hex[:6]}"
                    rep["bare"] = attempt(
                        f"rep{r} bare",
                        lambda n=name: bare_run(config, n, args.tasks, processes, work_value),  # type: ignore[misc]
                    )
                result["reps"].append(rep)
        if "refold" in only:
            result["windows"] = [
                refold_rep(config, work, args, w, f"window{w}", True) for w in windows[1:]
            ]
    finally:
        if broker_config is not None:
            broker.stop(broker_config)
        if args.keep:
            log.info("scratch directory kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["meta"]["loadavg_end"] = os.getloadavg()
    result["meta"]["finished"] = report.now_utc()
    result["summary"] = summarize(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tasks.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    (args.out / "tasks.md").write_text(text)
    sys.stdout.write(text)
    return 0


def _rate(d: dict[str, Any] | None) -> float:
    return float(d.get("succeeded_per_s", float("nan"))) if d else float("nan")


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Medians over repetitions of every rate and of the per-repetition ratios."""
    reps = result["reps"]
    out: dict[str, Any] = {}
    series: dict[str, list[float]] = {}
    for rep in reps:
        refold = rep.get("refold", {})
        celery = max(_rate(rep.get("celery_solo")), _rate(rep.get("celery_prefork")))
        values = {
            "refold_client": _rate(refold.get("client")),
            "refold_http": _rate(refold.get("http")),
            "celery_solo": _rate(rep.get("celery_solo")),
            "celery_prefork": _rate(rep.get("celery_prefork")),
            "celery_best": celery,
            "bare": _rate(rep.get("bare")),
        }
        values["client_vs_celery"] = ratio(values["refold_client"], celery)
        values["http_vs_celery"] = ratio(values["refold_http"], celery)
        values["client_vs_bare"] = ratio(values["refold_client"], values["bare"])
        for k, v in values.items():
            series.setdefault(k, []).append(v)
    for k, vs in series.items():
        out[k] = {"median": median(vs), "runs": vs}
    merge = []
    for entry in [reps[0].get("refold", {})] if reps else []:
        merge.append(_merge_row(entry))
    merge += [_merge_row(w) for w in result.get("windows", [])]
    out["merge"] = merge
    return out


def _merge_row(entry: dict[str, Any]) -> dict[str, Any]:
    lat = entry.get("latency", {})
    return {
        "window_ms": entry.get("window_ms"),
        "full_load_per_s": _rate(entry.get("client")),
        "merge_full_load": entry.get("client", {}).get("merge_factor"),
        "half_load_per_s": lat.get("offered_per_s"),
        "merge_half_load": lat.get("merge_factor"),
        "p50_ms": lat.get("p50_ms"),
        "p99_ms": lat.get("p99_ms"),
        "steps_ms": lat.get("steps_ms", {}),
    }


def markdown(result: dict[str, Any]) -> str:
    meta, s = result["meta"], result["summary"]

    def cell(k: str, fmt: str = "{:,.0f}") -> str:
        v = s.get(k, {})
        runs = ", ".join(fmt.format(x) for x in v.get("runs", []))
        return f"{fmt.format(v.get('median', float('nan')))} ({runs})"

    lines = [
        "# Task benchmark",
        "",
        f"`{meta['command']}` — {meta['started']} → {meta['finished']}; {meta['machine']}",
        f"load average {meta['loadavg_start']} → {meta['loadavg_end']}; {meta['tasks']:,} no-op "
        f"tasks per run over {meta['keys']} merge keys; {meta['processes']} Python processes per "
        f"peer (refold: a worker and {meta['task_workers']} task workers of "
        f"{meta['concurrency']} threads); medians over {meta['repeats']} interleaved "
        "repetitions (every run in brackets).",
        "",
        "| submitted → succeeded | tasks/s |",
        "|---|---:|",
        f"| refold, Python TaskClient | {cell('refold_client')} |",
        f"| refold, POST /tasks | {cell('refold_http')} |",
        f"| Celery + Redis, solo pool | {cell('celery_solo')} |",
        f"| Celery + Redis, prefork | {cell('celery_prefork')} |",
        f"| bare share-consumer loop (no status) | {cell('bare')} |",
        "",
        "| ratio (median of per-repetition ratios) | |",
        "|---|---:|",
        f"| refold client / best Celery | {cell('client_vs_celery', '{:.2f}')} |",
        f"| refold HTTP / best Celery | {cell('http_vs_celery', '{:.2f}')} |",
        f"| refold client / bare share loop | {cell('client_vs_bare', '{:.2f}')} |",
        "",
        "| merge window | full load tasks/s | tasks/batch | half load (offered/s) | tasks/batch "
        "| POST→succeeded p50 | p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in s["merge"]:
        lines.append(
            "| {window_ms} ms | {full:,.0f} | {mf:.2f} | {half:,.0f} | {mh:.2f} | {p50:.0f} ms "
            "| {p99:.0f} ms |".format(
                window_ms=row["window_ms"],
                full=_num(row["full_load_per_s"]),
                mf=_num(row["merge_full_load"]),
                half=_num(row["half_load_per_s"]),
                mh=_num(row["merge_half_load"]),
                p50=_num(row["p50_ms"]),
                p99=_num(row["p99_ms"]),
            )
        )
    lines += [
        "",
        "Where a half-load task's time went, p50 / p99 ms (each transition's status event):",
        "",
        "| merge window | intake (due -> accepted) | -> dispatched | -> running | -> succeeded "
        "| -> read |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    names = ("intake", "to_dispatched", "to_running", "to_succeeded", "to_read")
    for row in s["merge"]:
        steps = row.get("steps_ms") or {}
        cells = [
            "{:.0f} / {:.0f}".format(*(_num(steps.get(n, {}).get(q)) for q in ("p50", "p99")))
            for n in names
        ]
        lines.append(f"| {row['window_ms']} ms | " + " | ".join(cells) + " |")
    warm = result.get("warm_up", {}).get("latency", {})
    if warm.get("p99_ms") is not None:
        lines += [
            "",
            "The warm-up before these runs (the broker's first load; not in any median): "
            "{:,.0f}/s offered, POST→succeeded p50 {:.0f} ms, p99 {:.0f} ms.".format(
                _num(warm.get("offered_per_s")), _num(warm.get("p50_ms")), _num(warm.get("p99_ms"))
            ),
        ]
    return "\n".join(lines) + "\n"


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else float("nan")


if __name__ == "__main__":
    sys.exit(main())
