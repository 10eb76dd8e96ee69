"""`refold publish`: one event from --type/--key/--data, or a JSONL file validated whole, then
sent (refold.engine.file_publish; several sending processes: refold.engine.file_senders).

Kept apart from the other commands so that `refold publish` imports only what it uses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException
from refold.cli.output import EXIT_INPUT, data_json
from refold.core.config import Config
from refold.core.errors import InputError, RefoldError

if TYPE_CHECKING:
    from refold.core.inputs import LineProblem
    from refold.core.serde import Codec

#: What a command leaves for the process's exit to drop (see `refold.cli.main.main`): a file
#: publish's events.
LEFT_FOR_EXIT: list[object] = []


def cmd_publish(args: argparse.Namespace, config: Config) -> int:
    from refold.core.inputs import event_from_json
    from refold.kafka.publisher import Publisher, tune_allocator
    from refold.kafka.registry import codec_for
    from refold.kafka.topics import Topics, event_topic, internal_topics

    tune_allocator()  # this process only publishes: no fastbins (see its docstring)
    codec = codec_for(config)
    if args.file:
        if args.type or args.key or args.data:
            raise InputError("give either --file or --type/--key/--data, not both")
        if args.jobs is not None and args.jobs < 1:
            raise InputError(f"--jobs must be 1 or more, not {args.jobs}")
        if args.senders < 1:
            raise InputError(f"--senders must be 1 or more, not {args.senders}")
        return _publish_file(args, config, codec)
    if not (args.type and args.key and args.data is not None):
        raise InputError(
            "publish needs --file FILE, or --type, --key and --data",
            hint="refold publish bank.accounts --type bank.MoneyDeposited --key acc-1 "
            '--data \'{"account_id": "acc-1", "amount_cents": 500}\'',
        )
    data = data_json(args.data)
    events = [event_from_json({"type": args.type, "key": args.key, "data": data}, codec)]
    if args.create:
        Topics(config).ensure([*internal_topics(config), event_topic(args.topic)])
    with Publisher(config, codec) as publisher:
        [position] = publisher.publish_encoded(args.topic, events)
        where = f"partition:offset {position.partition}:{position.offset}"
    print(f"published {len(events)} event(s) to {args.topic} ({where})")
    return 0


def _publish_file(args: argparse.Namespace, config: Config, codec: Codec) -> int:
    """`refold publish --file`: every line validated, then sent (`refold.engine.file_publish`;
    with several processes, `refold.engine.file_senders`)."""
    from refold.engine.file_publish import can_fork, planned_jobs, read_events
    from refold.engine.file_senders import Senders
    from refold.kafka.publisher import Publisher
    from refold.kafka.topics import Topics, event_topic, internal_topics

    try:
        source = sys.stdin.buffer.read() if args.file == "-" else Path(args.file)
        jobs = planned_jobs(source, args.jobs)
        count = args.senders if can_fork() else 1
    except OSError as exc:
        raise InputError(f"cannot read {args.file}: {exc.strerror}") from exc
    with ExitStack() as stack:
        # --senders N: the senders are forked first, while this process holds no Kafka client,
        # and connect while the file is parsed (refold.engine.file_senders).
        senders = stack.enter_context(Senders(config, codec, count)) if count > 1 else None
        warm: list[Publisher] = []

        def warm_up() -> None:  # one process sends: its producer starts during the parse
            if senders is not None:
                return
            try:
                publisher = Publisher(config, codec)  # no position per event: millions, maybe
                publisher.warm_up()
            except (RefoldError, KafkaException):  # e.g. no broker named: said after the check
                return
            warm.append(publisher)

        try:
            read = read_events(source, codec, jobs, under_way=warm_up, shares=count)
        except OSError as exc:
            raise InputError(f"cannot read {args.file}: {exc.strerror}") from exc
        if read.problems:
            _report_problems(args.file, read.problems)
            return EXIT_INPUT  # the senders are stopped on the way out: nothing was sent
        if args.create:  # no process is forked after this client is made
            Topics(config).ensure([*internal_topics(config), event_topic(args.topic)])
        if senders is not None:
            summary = senders.send(args.topic, read)
        else:
            with warm[0] if warm else Publisher(config, codec) as publisher:
                summary = publisher.publish_batches(args.topic, read.batches)
    where = f"read-your-writes: min_offset={summary.min_offset}"
    print(f"published {summary.count} event(s) to {args.topic} ({where})")
    LEFT_FOR_EXIT.append(read)
    return 0


def _report_problems(name: str, problems: Sequence[LineProblem]) -> None:
    for problem in problems:
        print(f"{name}:{problem.line}: {problem.reason}", file=sys.stderr)
    print(
        f"refold: error: {len(problems)} invalid line(s) in {name}; nothing published",
        file=sys.stderr,
    )
