"""`refold` command line: every failure exits non-zero with one line naming what was wrong."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException
from refold.cli import saga_commands, task_commands
from refold.core.config import Config
from refold.core.errors import BrokerError, ConfigError, InputError, RefoldError

if TYPE_CHECKING:
    from refold.core.projection import Projection
    from refold.engine.worker import Worker
    from refold.kafka.topics import Topics
    from refold.store.rocksdb import RocksStore

log = logging.getLogger("refold")

EXIT_ERROR = 1
EXIT_INPUT = 2

Command = Callable[[argparse.Namespace, Config], int]


def _out(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, separators=(", ", ": ")) + "\n")


# -- broker ---------------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace, config: Config) -> int:
    from refold.cli import broker

    if args.action == "start":
        info = broker.start(config, nodes=args.nodes, port=args.port, fresh=args.fresh)
        print(
            f"Kafka {broker.kafka_version()} ({len(info.nodes)} node(s)) "
            f"at {info.bootstrap_servers}"
        )
        print(f"recorded in {config.broker_record}; data in {config.data_dir / 'broker'}")
    elif args.action == "stop":
        stopped = broker.stop(config)
        print(f"stopped {stopped} node(s)" if stopped else "no broker of ours was running")
    else:
        st = broker.status(config)
        print(broker.describe_status(st))
        return 0 if st.answering else EXIT_ERROR
    return 0


# -- topics ---------------------------------------------------------------------------------


def cmd_topics(args: argparse.Namespace, config: Config) -> int:
    from refold.kafka.topics import Topics, event_topic, internal_topics

    specs = internal_topics(config) + [event_topic(t, args.partitions) for t in args.topics]
    specs += [event_topic(t, args.partitions) for t in _declared_topics(config)]
    topics = Topics(config)
    created = topics.ensure(specs)
    names = sorted(
        {s.name for s in specs}
        | _ensure_command_topics(config, topics)
        | _ensure_tasks(config, topics)
        | _ensure_sagas(config, topics)
    )
    print(f"{len(names)} topic(s) ready ({len(created)} created): {', '.join(names)}")
    return 0


def _declared_topics(config: Config) -> list[str]:
    """Source topics of the app's projections (REFOLD_APP); none without an app."""
    from refold.core.app import load_projections

    return sorted({t for p in load_projections(config.app_modules) for t in p.topics})


def _ensure_command_topics(config: Config, topics: Topics) -> set[str]:
    """The command and results topics of every decider whose event topic exists."""
    from refold.core.app import load_deciders
    from refold.kafka.command_topics import ensure_command_topics

    names: set[str] = set()
    for decider in load_deciders(config.app_modules).values():
        if topics.exists(decider.events_topic):
            ensure_command_topics(topics, decider)
            names |= {decider.command_topic, decider.results_topic, decider.claims_topic}
    return names


def _ensure_tasks(config: Config, topics: Topics) -> set[str]:
    """The intake, work, status, dead-letter and cancel topics of every task queue."""
    from refold.core.app import load_task_queues
    from refold.kafka.task_log import ensure_task_topics

    return set(ensure_task_topics(topics, load_task_queues(config.app_modules)))


def _ensure_sagas(config: Config, topics: Topics) -> set[str]:
    """The saga and dead-letter topics of every saga."""
    from refold.core.app import load_sagas
    from refold.kafka.saga_log import ensure_saga_topics

    return set(ensure_saga_topics(topics, load_sagas(config.app_modules)))


# -- commands -------------------------------------------------------------------------------


def cmd_command(args: argparse.Namespace, config: Config) -> int:
    from refold.kafka.command_client import CommandClient

    if args.app:
        config = config.with_(app_modules=tuple(m for m in args.app.split(",") if m))
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise InputError(f"--data is not valid JSON: {exc.msg} at column {exc.colno}") from exc
    obj: dict[str, object] = {"key": args.key, "type": args.type, "data": data}
    if args.expected_version is not None:
        obj["expected_version"] = args.expected_version
    if args.id is not None:
        obj["command_id"] = args.id
    with CommandClient(config) as client:
        command = client.prepare(args.aggregate, obj)
        position = client.append(command).result(60)
        if not args.wait:
            _out({"command_id": command.command_id, "status": "pending", "position": str(position)})
            return 0
        result = client.wait(
            command.command_id, args.timeout, aggregate=args.aggregate, sent=command
        )
    _out(result)
    return 0 if result["status"] == "accepted" else EXIT_ERROR


# -- publish / tail -------------------------------------------------------------------------


def cmd_publish(args: argparse.Namespace, config: Config) -> int:
    from refold.core.inputs import event_from_json, events_from_lines
    from refold.kafka.publisher import Publisher, tune_allocator
    from refold.kafka.registry import codec_for
    from refold.kafka.topics import Topics, event_topic, internal_topics

    tune_allocator()  # this process only publishes: no fastbins (see its docstring)
    codec = codec_for(config)
    if args.file:
        if args.type or args.key or args.data:
            raise InputError("give either --file or --type/--key/--data, not both")
        path = Path(args.file)
        try:
            with sys.stdin.buffer if args.file == "-" else path.open("rb") as fh:
                events, problems = events_from_lines(fh, codec)
        except OSError as exc:
            raise InputError(f"cannot read {args.file}: {exc.strerror}") from exc
        if problems:
            for problem in problems:
                print(f"{args.file}:{problem.line}: {problem.reason}", file=sys.stderr)
            print(
                f"refold: error: {len(problems)} invalid line(s) in {args.file}; nothing published",
                file=sys.stderr,
            )
            return EXIT_INPUT
    else:
        if not (args.type and args.key and args.data is not None):
            raise InputError(
                "publish needs --file FILE, or --type, --key and --data",
                hint="refold publish bank.accounts --type bank.MoneyDeposited --key acc-1 "
                '--data \'{"account_id": "acc-1", "amount_cents": 500}\'',
            )
        try:
            data = json.loads(args.data)
        except json.JSONDecodeError as exc:
            raise InputError(f"--data is not valid JSON: {exc.msg} at column {exc.colno}") from exc
        events = [event_from_json({"type": args.type, "key": args.key, "data": data}, codec)]
    if args.create:
        Topics(config).ensure([*internal_topics(config), event_topic(args.topic)])
    with Publisher(config, codec) as publisher:
        if args.file:  # no position per event: a file may hold millions
            summary = publisher.publish_bulk(args.topic, events)
            where = f"read-your-writes: min_offset={summary.min_offset}"
        else:
            [position] = publisher.publish_encoded(args.topic, events)
            where = f"partition:offset {position.partition}:{position.offset}"
    print(f"published {len(events)} event(s) to {args.topic} ({where})")
    return 0


def cmd_tail(args: argparse.Namespace, config: Config) -> int:
    from refold.engine.tail import tail
    from refold.kafka.registry import codec_for

    codec = codec_for(config)
    for item in tail(
        config,
        codec,
        args.topic,
        from_beginning=args.from_beginning,
        follow=args.follow or not args.from_beginning,
        limit=args.limit,
    ):
        _out(item.to_json())
        sys.stdout.flush()
    return 0


# -- worker / query / status --------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    import signal

    from refold.engine.worker import Worker

    if args.app:
        config = config.with_(app_modules=tuple(m for m in args.app.split(",") if m))
    hint = (
        "name your app's modules with REFOLD_APP=module or --app module; "
        "the bank example is refold.examples.bank"
    )
    if not config.app_modules:
        raise ConfigError("nothing to run: no app named", hint=hint)
    host, port = "", 0
    if args.http:
        host, _, raw_port = args.http.rpartition(":")
        if not raw_port.isdigit():
            raise InputError(f"--http wants HOST:PORT, not {args.http!r}")
        host, port = host or "127.0.0.1", int(raw_port)
    worker = Worker(config, only=args.only.split(",") if args.only else None)
    if not worker.projections and not worker.deciders:
        apps = ",".join(config.app_modules)
        raise ConfigError(f"nothing to run: {apps} has no projections or deciders", hint=hint)
    # Before anything starts: a SIGTERM while starting still stops it all in order (readers,
    # their scratch dirs, runners), instead of killing the process half-way.
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    server = None
    worker.start()
    try:
        if args.http:
            from refold.http.server import QueryServer

            query = QueryServer(worker, host, port, procs=args.http_procs)
            query.start()
            server = query  # stopped below only once started
        names = ", ".join(
            [
                *(f"{r.name} v{r.version}" for r in worker.runners.values()),
                *(f"commands {n}" for n in worker.processors),
            ]
        )
        http = f"; HTTP on http://{server.host}:{server.port}" if server else ""
        print(f"worker running {names}{http}", flush=True)
        _report_failures_until(done, worker)
    finally:
        if server:
            server.stop()
        worker.stop()
    return 0


def _report_failures_until(done: threading.Event, worker: Worker) -> None:
    """Log each failed projection and command processor once, checking every half second,
    until `done`."""
    said: set[int] = set()  # each failure is logged once, not every half second
    while not done.wait(0.5):
        for runner in worker.runners.values():
            if runner.stats.state == "failed" and id(runner) not in said:
                said.add(id(runner))
                log.error("projection %s failed: %s", runner.name, runner.stats.error)
        for name, processor in worker.processors.items():
            if processor.stats.state == "failed" and id(processor) not in said:
                said.add(id(processor))
                log.error("command processor %s failed: %s", name, processor.stats.error)


def _open_reader(config: Config, name: str) -> tuple[RocksStore, int]:

    from refold.store.rocksdb import RocksStore
    from refold.store.scratch import scratch_dir
    from refold.store.versions import live_version, store_path

    version = live_version(config, name) or 1
    path = store_path(config, name, version)
    if not path.is_dir():
        raise InputError(
            f"projection {name!r} has no store under {config.data_dir}",
            hint="run `refold worker` first, or check REFOLD_DATA_DIR",
        )
    return RocksStore.open_secondary(path, scratch_root=scratch_dir(config.data_dir)), version


def cmd_query(args: argparse.Namespace, config: Config) -> int:
    if args.as_of:
        from refold.engine.timetravel import fold_as_of, parse_time
        from refold.kafka.registry import codec_for

        if args.key is None:
            raise InputError("--as-of needs a KEY")
        moment = parse_time(args.as_of)
        found = fold_as_of(
            config, codec_for(config), _projection(config, args.name), args.key, moment
        )
        if found.state is None:
            raise InputError(f"no state for key {args.key!r} in {args.name} as of {args.as_of}")
        _out(
            {
                "key": found.key,
                "state": found.state,
                "position": found.position,
                "as_of": moment.isoformat(),
            }
        )
        return 0
    store, _version = _open_reader(config, args.name)
    try:
        if args.key is not None:
            state = store.get(args.key)
            if state is None:
                raise InputError(f"no state for key {args.key!r} in {args.name}")
            _out({"key": args.key, "state": state})
        else:
            for key, state in store.scan(prefix=args.prefix or "", limit=args.limit):
                _out({"key": key, "state": state})
    finally:
        store.close()
    return 0


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from refold.core.app import load_versions
    from refold.engine.status import Watermarks, status_table, store_status

    watermarks = Watermarks(config, timeout=10.0)
    rows = [store_status(config, v, watermarks) for v in load_versions(config.app_modules).values()]
    if args.json:
        for row in rows:
            _out(row.to_json())
    else:
        print(status_table(rows))
    return 0


def _projection(config: Config, name: str, version: int | None = None) -> Projection:
    """The class of that version of the projection (default: the newest). A store is folded
    only by its own version's code, so a version the code has no class for is an error."""
    from refold.core.app import load_versions
    from refold.engine.frozen import frozen_reason

    versions = load_versions(config.app_modules)
    if name not in versions:
        raise InputError(
            f"unknown projection {name!r}", hint="known: " + ", ".join(sorted(versions))
        )
    classes = versions[name]
    if version is None:
        return classes[max(classes)]
    reason = frozen_reason(name, classes, version)
    if reason is not None:
        raise InputError(
            f"cannot fold v{version}: {reason}",
            hint=f"deploy v{version}'s class beside the others, or replay v{max(classes)}",
        )
    return classes[version]


def cmd_replay(args: argparse.Namespace, config: Config) -> int:
    from refold.engine.replay import plan, replay
    from refold.kafka.registry import codec_for

    if args.app:
        config = config.with_(app_modules=tuple(m for m in args.app.split(",") if m))
    projection = _projection(config, args.name, args.version)
    version = args.version or projection.version
    if args.dry_run:
        print(plan(config, projection, version).describe())
        return 0
    result = replay(
        config,
        codec_for(config),
        projection,
        version,
        diff=args.diff,
        swap=args.swap,
        diff_path=Path(args.diff_file) if args.diff_file else None,
        progress=None if args.quiet else sys.stderr,
        procs=args.procs,
        catch_up_timeout=args.stall_timeout,
        live_frozen=_live_frozen(config, args.name),
    )
    rate = result.folded / result.seconds if result.seconds else 0.0
    split = f", {result.parts} processes" if result.parts > 1 else ""
    print(
        f"{args.name} v{version}: folded {result.folded} events in {result.seconds:.1f} s "
        f"({rate:,.0f} events/s{split}), caught up with the live version"
    )
    if result.diff is not None:
        print(result.diff.describe())
        for row in result.diff.samples:
            print(
                f"  {row['change']:<8} {row['key']}: {json.dumps(row['before'])} -> "
                f"{json.dumps(row['after'])}"
            )
        print(f"full diff: {result.diff.path}")
    if result.swapped:
        print(f"v{version} is live (the previous version stays for `refold rollback {args.name}`)")
    return 0


def _live_frozen(config: Config, name: str) -> bool:
    """Whether the code lacks the live version's class: workers serve it frozen."""
    from refold.core.app import load_versions
    from refold.engine.frozen import frozen_reason
    from refold.store.versions import live_version

    live = live_version(config, name)
    return (
        live is not None
        and frozen_reason(name, load_versions(config.app_modules)[name], live) is not None
    )


def cmd_rollback(args: argparse.Namespace, config: Config) -> int:
    from refold.store.versions import rollback

    current, target = rollback(config, args.name)
    frozen = " (frozen: the code has no class for it)" if _live_frozen(config, args.name) else ""
    print(f"{args.name}: v{target} is live again (was v{current}){frozen}")
    return 0


def cmd_drop(args: argparse.Namespace, config: Config) -> int:
    from refold.store.versions import drop

    drop(config, args.name, args.version)
    print(f"{args.name}: dropped v{args.version}")
    return 0


def cmd_dead_letters(args: argparse.Namespace, config: Config) -> int:
    from refold.core.app import load_versions
    from refold.engine.runtime import dead_letter_topic_name
    from refold.engine.tail import dead_letters
    from refold.kafka.topics import Topics

    versions = load_versions(config.app_modules)
    if args.name not in versions and not Topics(config).exists(
        dead_letter_topic_name(config, args.name)
    ):  # a projection gone from the code may still have dead letters: those are shown
        raise InputError(
            f"unknown projection {args.name!r}", hint="known: " + ", ".join(sorted(versions))
        )
    for record in dead_letters(config, args.name, limit=args.limit):
        _out(record)
    return 0


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    from refold.cli.demo import run_demo

    return run_demo(config, keep_broker=args.keep_broker)


# -- wiring ---------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "broker": cmd_broker,
    "topics": cmd_topics,
    "publish": cmd_publish,
    "tail": cmd_tail,
    "command": cmd_command,
    "worker": cmd_worker,
    "query": cmd_query,
    "status": cmd_status,
    "dead-letters": cmd_dead_letters,
    "replay": cmd_replay,
    "rollback": cmd_rollback,
    "drop": cmd_drop,
    "demo": cmd_demo,
    "task": task_commands.cmd_task,
    "task-worker": task_commands.cmd_task_worker,
    "saga": saga_commands.cmd_saga,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refold",
        description="Kafka event sourcing: publish events, fold projections, replay, query.",
    )
    parser.add_argument("--data-dir", help="data directory (env REFOLD_DATA_DIR, default .refold)")
    parser.add_argument("--bootstrap-servers", help="Kafka address (env REFOLD_BOOTSTRAP_SERVERS)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="run a local Apache Kafka broker (KRaft) from Maven jars")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument(
        "--nodes", type=int, choices=[1, 3], default=1, help="1 node or a 3-node cluster"
    )
    p.add_argument("--port", type=int, help="client port of the first node (default 19092)")
    p.add_argument("--fresh", action="store_true", help="wipe the broker's data first")

    p = sub.add_parser("topics", help="create the declared topics")
    p.add_argument("action", choices=["ensure"])
    p.add_argument("topics", nargs="*", metavar="TOPIC", help="more event topics to create")
    p.add_argument("--partitions", type=int, default=6, help="partitions for new topics")

    p = sub.add_parser("publish", help="publish events (one, or a JSONL file)")
    p.add_argument("topic")
    p.add_argument("--type", help="event type, e.g. bank.MoneyDeposited")
    p.add_argument("--key", help="aggregate id, e.g. acc-1")
    p.add_argument("--data", help="event data as a JSON object")
    p.add_argument("--file", help='JSON lines {"type", "key", "data"}; - for stdin')
    p.add_argument("--create", action="store_true", help="create the topic if it is missing")

    p = sub.add_parser("tail", help="print a topic's events as JSON lines")
    p.add_argument("topic")
    p.add_argument(
        "--from-beginning", action="store_true", help="start at offset 0 and stop at the end"
    )
    p.add_argument("--follow", action="store_true", help="with --from-beginning: keep waiting")
    p.add_argument("--limit", type=int, help="stop after N records")

    p = sub.add_parser("command", help="send a command to an aggregate (JSON result)")
    p.add_argument("aggregate", help="the decider's name, e.g. accounts")
    p.add_argument("--type", required=True, help="command type, e.g. bank.Withdraw")
    p.add_argument("--key", required=True, help="aggregate id, e.g. acc-1")
    p.add_argument("--data", default="{}", help="command data as a JSON object")
    p.add_argument("--expected-version", type=int, help="reject unless the aggregate is at N")
    p.add_argument("--id", help="command id (idempotency key; default: a new UUID)")
    p.add_argument("--wait", action="store_true", help="wait for the result (exit 1 if rejected)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds --wait waits")
    p.add_argument("--app", help="comma-separated modules with deciders (env REFOLD_APP)")

    p = sub.add_parser("worker", help="fold projections into RocksDB and serve queries")
    p.add_argument("--app", help="comma-separated modules with projections (env REFOLD_APP)")
    p.add_argument("--http", metavar="HOST:PORT", help="serve the HTTP API, e.g. 127.0.0.1:8080")
    p.add_argument(
        "--http-procs",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        metavar="N",
        help="processes serving HTTP key lookups: the worker and N-1 readers (default: cores)",
    )
    p.add_argument("--only", help="comma-separated projection names to run (default: all)")

    p = sub.add_parser("query", help="read a projection's state (JSON)")
    p.add_argument("name")
    p.add_argument("key", nargs="?")
    p.add_argument("--prefix", help="list keys starting with this")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument(
        "--as-of", metavar="TIME", help="the key's state at an ISO-8601 time (from the log)"
    )

    p = sub.add_parser(
        "replay", help="rebuild a projection version from offset 0 beside the live one"
    )
    p.add_argument("name")
    p.add_argument("--version", type=int, help="version number to build (default: the code's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument(
        "--diff", action="store_true", help="compare with the live version once caught up"
    )
    p.add_argument("--diff-file", help="where to write the full diff (JSON lines)")
    p.add_argument("--swap", action="store_true", help="make it live once caught up")
    p.add_argument("--app", help="comma-separated modules with projections (env REFOLD_APP)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument(
        "--procs",
        type=int,
        help="processes that fold a build from scratch, partitions split between them "
        "(default: one per core when there are at least 200,000 events; 1 = no split)",
    )

    p.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up when nothing is folded for this long, say the broker is gone (default 120)",
    )

    p = sub.add_parser("rollback", help="make the previous version of a projection live again")
    p.add_argument("name")

    p = sub.add_parser("drop", help="delete a (not live) version of a projection")
    p.add_argument("name")
    p.add_argument("--version", type=int, required=True)

    p = sub.add_parser("status", help="every projection with version, offsets, lag, dead letters")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    p = sub.add_parser("dead-letters", help="list a projection's dead-lettered records")
    p.add_argument("name")
    p.add_argument("--limit", type=int)

    p = sub.add_parser("demo", help="the bank passbook story, end to end, on a local broker")
    p.add_argument("--keep-broker", action="store_true", help="leave the broker running after")

    task_commands.add_parsers(sub)
    saga_commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Connection churn (broker restarts, coordinator loading) is normal and retried by librdkafka.
    logging.getLogger("librdkafka").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    from refold.engine.runtime import tune_collector

    tune_collector()
    config = Config.from_env()
    if args.data_dir:
        config = config.with_(data_dir=Path(args.data_dir))
    if args.bootstrap_servers:
        config = config.with_(bootstrap_override=args.bootstrap_servers)
    try:
        return COMMANDS[args.command](args, config)
    except InputError as exc:
        _fail(exc)
        return EXIT_INPUT
    except RefoldError as exc:
        _fail(exc)
        return EXIT_ERROR
    except KafkaException as exc:  # what librdkafka raises when the broker does not answer
        _fail(_unreachable(config, exc))
        return EXIT_ERROR
    except TimeoutError as exc:  # a future (a command's append) not done in time
        _fail(BrokerError(f"no answer from Kafka at {_address(config)} in time: {exc}", hint=_HINT))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


_HINT = "is the broker running? `refold broker status`, or check REFOLD_BOOTSTRAP_SERVERS"


def _address(config: Config) -> str:
    try:
        return config.bootstrap_servers
    except RefoldError:
        return "(no address)"


def _unreachable(config: Config, exc: KafkaException) -> BrokerError:
    error = exc.args[0] if exc.args else None
    text = error.str() if isinstance(error, KafkaError) else str(exc)
    return BrokerError(f"Kafka at {_address(config)}: {text}", hint=_HINT)


def _fail(exc: RefoldError) -> None:
    hint = f" (hint: {exc.hint})" if exc.hint else ""
    print(f"refold: error: {exc}{hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
