"""`refold demo`: the bank passbook story end to end on a real broker.

Starts a local broker if none answers, publishes a handful of deposits and withdrawals, folds them
with a worker, prints balances and a passbook with the balance after each line, then asks the HTTP
API; then submits monthly statements to the `statements` task queue over HTTP (202, a merged
batch, `succeeded` with each statement). Stops everything it started (the broker too, unless
asked to keep it).
"""

from __future__ import annotations

import gc
import json
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import Any

from refold.cli import broker, demo_sagas
from refold.core.config import Config
from refold.core.errors import ConfigError, RefoldError
from refold.kafka import clients
from refold.kafka.command_client import CommandClient
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics

#: The example app the demo runs; a user's own worker loads only the modules it names.
BANK_APP = "refold.examples.bank"
ACCOUNTS = "bank.accounts"


def _answers(config: Config) -> bool:
    try:
        admin = clients.admin(config, **{"socket.timeout.ms": 2000})
        return bool(admin.list_topics(timeout=3).brokers)
    except (ConfigError, Exception):  # no record, unreachable, bad address: "does not answer"
        return False


def _story(run: str) -> list[tuple[str, str, dict[str, Any]]]:
    """The passbook story as commands: (command type, account, data)."""
    alice, savings, bob = f"alice-{run}", f"alice-savings-{run}", f"bob-{run}"

    def dep(acc: str, cents: int, memo: str) -> tuple[str, str, dict[str, Any]]:
        return ("bank.Deposit", acc, {"amount_cents": cents, "memo": memo})

    def wd(acc: str, cents: int, memo: str) -> tuple[str, str, dict[str, Any]]:
        return ("bank.Withdraw", acc, {"amount_cents": cents, "memo": memo})

    def open_(acc: str, owner: str) -> tuple[str, str, dict[str, Any]]:
        return ("bank.OpenAccount", acc, {"owner": owner})

    return [
        open_(alice, "alice"), open_(savings, "alice"), open_(bob, "bob"),
        dep(alice, 250_000, "salary"), wd(alice, 120_000, "rent"), dep(bob, 80_000, "salary"),
        wd(alice, 4_550, "groceries"), dep(savings, 50_000, "monthly saving"),
        wd(bob, 2_399, "books"), wd(alice, 1_275, "coffee beans"), dep(alice, 15_000, "refund"),
        wd(bob, 60_000, "bike"), wd(savings, 10_000, "holiday"),
        wd(bob, 500_000, "a new car"),  # more than bob has: the decider refuses the overdraft
    ]  # fmt: skip


def _money(cents: int) -> str:
    return f"{cents / 100:>12,.2f}"


def run_demo(config: Config, *, keep_broker: bool = False) -> int:
    started = time.monotonic()
    we_started = False
    if not _answers(config):
        if config.bootstrap_override:
            raise RefoldError(
                f"REFOLD_BOOTSTRAP_SERVERS={config.bootstrap_override} does not answer",
                hint="unset it to let the demo start a local broker",
            )
        print("starting a local Kafka broker (first run assembles it through Maven) ...")
        info = broker.start(config)
        we_started = not keep_broker
        print(f"  broker at {info.bootstrap_servers}")
    try:
        _play(config)
    finally:
        if we_started:
            gc.collect()  # let go of every Kafka client before their broker goes away
            broker.stop(config)
            print("\nstopped the broker the demo started (keep it with --keep-broker)")
    print(f"done in {time.monotonic() - started:.1f} s")
    return 0


def _play(config: Config) -> None:
    from refold.engine.task_worker import TaskWorker
    from refold.engine.worker import Worker
    from refold.http.server import QueryServer

    config = config.with_(app_modules=(*config.app_modules, BANK_APP))
    Topics(config).ensure([*internal_topics(config), event_topic(ACCOUNTS)])
    run = uuid.uuid4().hex[:4]
    story = _story(run)
    codec = codec_for(config)
    worker = Worker(config, codec=codec)
    worker.start()
    server = QueryServer(worker, "127.0.0.1", 0)
    server.start()
    # Started now: a task worker takes seconds to join its share group, the story's time.
    statements = worker.tasks.queue("statements")
    # The bank queue reads the passbook from this demo's server.
    setattr(statements, "url", server.url)  # noqa: B010
    task_worker = TaskWorker(config, codec, statements, concurrency=2)
    task_worker.start()
    try:
        print(f"\nsending the passbook story as {len(story)} commands to `accounts`")
        wanted: dict[tuple[str, int], int] = {}
        with CommandClient(config) as client:
            for type_name, key, data in story:
                command_id = client.send("accounts", key, type_name, data)
                result = client.wait(command_id, 30)
                amount = data.get("amount_cents")
                what = f"{type_name.split('.')[1]:<12}{key:<22}" + (
                    _money(amount) if amount else f"{'':>12}"
                )
                outcome = result["status"]
                if outcome == "rejected":
                    outcome += f": {result['reason']}"
                print(f"  {what}  {outcome}")
                for pos in result.get("events") or ():
                    tp = (pos["topic"], pos["partition"])
                    wanted[tp] = max(wanted.get(tp, -1), pos["offset"])
        for runner in worker.runners.values():
            mine = {tp: o for tp, o in wanted.items() if tp[0] in runner.topics}
            if not runner.wait_for(mine, timeout=60):
                raise RefoldError(f"projection {runner.name} did not catch up within 60 s")
        _show(worker, story, run)
        key = f"alice-{run}"
        url = f"{server.url}/projections/balances/{key}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        print(f"\nover HTTP: GET {url}\n  {json.dumps(body)}")
        _statements(server.url, run)
        demo_sagas.show_transfers(worker, run)
    finally:
        task_worker.stop()
        server.stop()
        worker.stop()


def _show(worker: Any, story: list[tuple[str, str, dict[str, Any]]], run: str) -> None:
    balances = worker.runner("balances").store
    passbook = worker.runner("passbook").store
    owners = worker.runner("owners").store
    accounts = list(dict.fromkeys(key for _t, key, _d in story))
    print("\nbalances (projection `balances`)")
    print(f"  {'account':<22}{'owner':<8}{'balance':>12}  deposits withdrawals")
    for acc in accounts:
        s = balances.get(acc)
        print(
            f"  {acc:<22}{s['owner'] or '-':<8}{_money(s['balance_cents'])}  "
            f"{s['deposits']:>8} {s['withdrawals']:>11}"
        )
    acc = f"alice-{run}"
    book = passbook.get(acc)
    print(f"\npassbook of {acc} (projection `passbook`): every line with the balance after it")
    print(f"  {'offset':>6}  {'memo':<16}{'amount':>12}{'balance':>12}")
    for entry in book["entries"]:
        print(
            f"  {entry['offset']:>6}  {entry['memo']:<16}{_money(entry['amount_cents'])}"
            f"{_money(entry['balance_cents'])}"
        )
    alice = owners.get("alice")
    if alice is not None:
        print(
            f"\nowner alice (projection `owners`): {len(alice['accounts'])} account(s) over all "
            f"demo runs, total {_money(alice['total_cents']).strip()}"
        )


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _months() -> tuple[str, str]:
    """This month and the one before, as `YYYY-MM`."""
    now = datetime.now(UTC)
    year, month = (now.year, now.month - 1) if now.month > 1 else (now.year - 1, 12)
    return f"{now:%Y-%m}", f"{year:04d}-{month:02d}"


def _statements(base: str, run: str) -> None:
    """Monthly statements through the task queue: alice's two months merge into one batch."""
    this, last = _months()
    alice = f"alice-{run}"
    wanted = [(alice, this), (alice, last), (f"bob-{run}", this)]
    print("\nmonthly statements: tasks on the `statements` queue, merged by account")
    ids: list[str] = []
    for account, month in wanted:
        task = {
            "task_id": f"statement-{account}-{month}",
            "data": {"account": account, "month": month},
        }
        code, answer = _http("POST", f"{base}/tasks/statements", task)
        if code != 202:
            raise RefoldError(f"POST /tasks/statements answered {code}: {answer}")
        print(f"  POST /tasks/statements {json.dumps(task['data'])}  {code} {answer['status']}")
        ids.append(answer["task_id"])
    code, first = _http("GET", f"{base}/tasks/statements/{ids[0]}")  # read-your-writes
    print(f"  GET  /tasks/statements/{ids[0]} at once: {code} {first.get('status')}")
    states = _wait_ended(base, ids, timeout=120)  # seconds when all is well; load stretches it
    for task_id in ids:
        state = states[task_id]
        merged = [t for t in ids if t != task_id and states[t]["batch_id"] == state["batch_id"]]
        with_ = f" (one batch with {', '.join(merged)})" if merged else ""
        print(f"  {task_id:<34}{state['status']:<10} batch {state['batch_id']}{with_}")
    statement = states[ids[0]]["result"]
    print(
        f"\nstatement of {alice} for {this} (the task's result): opening "
        f"{_money(statement['opening_cents']).strip()}, closing "
        f"{_money(statement['closing_cents']).strip()}"
    )
    for line in statement["lines"]:
        print(
            f"  {line['time'][:10]}  {line['memo']:<16}{_money(line['amount_cents'])}"
            f"{_money(line['balance_cents'])}"
        )


def _wait_ended(base: str, ids: list[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    states: dict[str, Any] = {}
    while len(states) < len(ids):
        for task_id in ids:
            code, state = _http("GET", f"{base}/tasks/statements/{task_id}")
            if code == 200 and state["status"] in ("succeeded", "dead", "cancelled"):
                states[task_id] = state
        if len(states) < len(ids):
            if time.monotonic() > deadline:
                raise RefoldError(f"statements did not end within {timeout:g} s: {states}")
            time.sleep(0.1)
    return states
