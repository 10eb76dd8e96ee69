"""`refold` command line: every failure exits non-zero with one line naming what was wrong."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException
from refold.cli.output import EXIT_INPUT, data_json, seconds
from refold.cli.output import out as _out
from refold.cli.publish_commands import LEFT_FOR_EXIT, cmd_publish
from refold.core.config import Config
from refold.core.errors import BrokerError, ConfigError, InputError, RefoldError

if TYPE_CHECKING:
    from refold.engine.worker import Worker
    from refold.kafka.topics import Topics

log = logging.getLogger("refold")

EXIT_ERROR = 1

Command = Callable[[argparse.Namespace, Config], int]


# -- broker ---------------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace, config: Config) -> int:
    from refold.cli import broker

    if args.action == "start":
        info = broker.start(
            config, nodes=args.nodes, port=args.port, fresh=args.fresh, secure=args.secure
        )
        print(
            f"Kafka {broker.kafka_version()} ({len(info.nodes)} node(s)) "
            f"at {info.bootstrap_servers}" + (" (TLS, SASL/SCRAM, ACLs)" if info.secure else "")
        )
        print(f"recorded in {config.broker_record}; data in {config.data_dir / 'broker'}")
        if info.secure:
            print(
                "client settings per role: refold broker credentials admin|worker|publisher|reader"
            )
    elif args.action == "credentials":
        if args.role is None:
            raise InputError(
                "credentials of which role?", hint="admin, worker, publisher or reader"
            )
        print("\n".join(broker.credentials(config, args.role)))
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
    # Counted against the cluster's list before: the commands', tasks' and sagas' topics are
    # made by their own helpers (only the event and internal topics were counted: "0 created"
    # on a first run that made a task queue's five).
    existed = topics.names()
    topics.ensure(specs)
    names = sorted(
        {s.name for s in specs}
        | _ensure_command_topics(config, topics)
        | _ensure_tasks(config, topics)
        | _ensure_sagas(config, topics)
    )
    created = [name for name in names if name not in existed]
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
    data = data_json(args.data)
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


# -- tail -------------------------------------------------------------------------


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


# -- worker ---------------------------------------------------------------------------------


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
        from refold.http.auth import ENV as TOKENS_ENV

        loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
        if not loopback and not os.environ.get(TOKENS_ENV) and not args.insecure:
            raise ConfigError(
                f"refusing to serve HTTP on {host} without API tokens: anyone who reaches it "
                "could read every projection and send commands",
                hint=f"set {TOKENS_ENV} to a tokens file (see the README's Security section), "
                "listen on 127.0.0.1, or pass --insecure",
            )
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

            advertise = f"http://{args.advertise}" if args.advertise else None
            query = QueryServer(worker, host, port, procs=args.http_procs, advertise=advertise)
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
    "demo": cmd_demo,
}

#: Commands defined in other modules, imported only when one of theirs runs (or for the full
#: parser, e.g. `refold --help`): `refold publish` does not load the task and saga APIs.
#: Each module's `add_parsers` adds exactly these commands.
_PROJECTION_COMMANDS = ("query", "status", "dead-letters", "replay", "rollback", "drop")
LAZY_COMMANDS: dict[str, tuple[str, ...]] = {
    "refold.cli.projection_commands": _PROJECTION_COMMANDS,
    "refold.cli.task_commands": ("task", "task-worker"),
    "refold.cli.saga_commands": ("saga",),
}


def _command(name: str) -> Command:
    """The function of command `name` (a module of `LAZY_COMMANDS` is imported here)."""
    if name in COMMANDS:
        return COMMANDS[name]
    module = next(m for m, names in LAZY_COMMANDS.items() if name in names)
    command: Command = getattr(import_module(module), "cmd_" + name.replace("-", "_"))
    return command


def _command_named(argv: Sequence[str] | None) -> str | None:
    """The command `argv` names, read past the global options (None if it names none)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data-dir")
    pre.add_argument("--bootstrap-servers")
    pre.add_argument("-v", "--verbose", action="store_true")
    pre.add_argument("command", nargs="?")
    try:
        known, _rest = pre.parse_known_args(argv)
    except SystemExit:  # e.g. a global option without its value: the full parser says so
        return None
    return known.command if isinstance(known.command, str) else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; given the command about to run, the subcommands of `LAZY_COMMANDS`
    modules are added only if it is theirs (every one for None or an unknown name)."""
    own = command in COMMANDS

    def add_parsers_of(module: str) -> None:
        if not own:
            import_module(module).add_parsers(sub)

    parser = argparse.ArgumentParser(
        prog="refold",
        description="Kafka event sourcing: publish events, fold projections, replay, query.",
    )
    parser.add_argument("--data-dir", help="data directory (env REFOLD_DATA_DIR, default .refold)")
    parser.add_argument("--bootstrap-servers", help="Kafka address (env REFOLD_BOOTSTRAP_SERVERS)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="run a local Apache Kafka broker (KRaft) from Maven jars")
    p.add_argument("action", choices=["start", "stop", "status", "credentials"])
    p.add_argument("role", nargs="?", help="credentials: admin | worker | publisher | reader")
    p.add_argument(
        "--nodes", type=int, choices=[1, 3], default=1, help="1 node or a 3-node cluster"
    )
    p.add_argument("--port", type=int, help="client port of the first node (default 19092)")
    p.add_argument("--fresh", action="store_true", help="wipe the broker's data first")
    p.add_argument("--secure", action="store_true", help="TLS, SASL/SCRAM users per role, and ACLs")

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
    p.add_argument(
        "--jobs",
        type=int,
        help="processes parsing the file (default: one per CPU, up to 4, for files of 8 MB+)",
    )
    p.add_argument(
        "--senders",
        type=int,
        default=1,
        help="--file: processes sending it, each with its own producer, events of one key "
        "through one (default 1)",
    )

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
    p.add_argument("--timeout", type=seconds, default=30.0, help="seconds --wait waits")
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
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve HTTP beyond loopback without API tokens (REFOLD_API_TOKENS_FILE)",
    )
    p.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="the address other workers forward lookups to (default: the --http address)",
    )

    add_parsers_of("refold.cli.projection_commands")

    p = sub.add_parser("demo", help="the bank passbook story, end to end, on a local broker")
    p.add_argument("--keep-broker", action="store_true", help="leave the broker running after")

    add_parsers_of("refold.cli.task_commands")
    add_parsers_of("refold.cli.saga_commands")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(_command_named(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Connection churn (broker restarts, coordinator loading) is normal and retried by librdkafka.
    logging.getLogger("librdkafka").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    if args.command == "publish":  # tune_collector's thresholds, without loading the fold runtime
        gc.set_threshold(100_000, 50, 100)
    else:
        from refold.engine.runtime import tune_collector

        tune_collector()
    config = Config.from_env()
    if args.data_dir:
        config = config.with_(data_dir=Path(args.data_dir))
    if args.bootstrap_servers:
        config = config.with_(bootstrap_override=args.bootstrap_servers)
    try:
        code = _command(args.command)(args, config)
    except InputError as exc:
        _fail(exc)
        return EXIT_INPUT
    except RefoldError as exc:
        _fail(exc)
        return EXIT_ERROR
    except KafkaException as exc:  # what librdkafka raises when the broker does not answer
        _fail(_unreachable(config, exc))
        return EXIT_ERROR
    except SystemError as exc:  # a KafkaException raised inside a librdkafka callback
        if not isinstance(exc.__cause__, KafkaException):
            raise
        _fail(_unreachable(config, exc.__cause__))
        return EXIT_ERROR
    except TimeoutError as exc:  # a future (a command's append) not done in time
        _fail(BrokerError(f"no answer from Kafka at {_address(config)} in time: {exc}", hint=_HINT))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if LEFT_FOR_EXIT:
        if argv is None:  # the `refold` process itself: done, every client flushed and closed
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)  # not freeing a million objects one by one (0.1-0.2 s per 1M)
        LEFT_FOR_EXIT.clear()
    return code


_HINT = "is the broker running? `refold broker status`, or check REFOLD_BOOTSTRAP_SERVERS"


def _address(config: Config) -> str:
    try:
        return config.bootstrap_servers
    except RefoldError:
        return "(no address)"


def _unreachable(config: Config, exc: KafkaException) -> BrokerError:
    from refold.kafka.log import NOT_AUTHORIZED

    error = exc.args[0] if exc.args else None
    text = error.str() if isinstance(error, KafkaError) else str(exc)
    if isinstance(error, KafkaError) and error.code() in NOT_AUTHORIZED:
        hint = (
            "this client's Kafka principal lacks an ACL for that (on a `refold broker start "
            "--secure` cluster, `refold broker credentials ROLE` prints each role's settings)"
        )
        return BrokerError(f"Kafka at {_address(config)} refused: {text}", hint=hint)
    return BrokerError(f"Kafka at {_address(config)}: {text}", hint=_HINT)


def _fail(exc: RefoldError) -> None:
    hint = f" (hint: {exc.hint})" if exc.hint else ""
    print(f"refold: error: {exc}{hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
