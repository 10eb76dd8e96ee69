"""Any worker answers any key (refold.http.routing): two `refold worker --http` processes share a
projection's partitions; every key is asked of both and each answers it correctly and current,
forwarding what the other folds; after one is killed with kill -9 the other answers every key
again, by itself.

The oracle is the test's own: the balance and event count per key of what it published.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from refold.core.config import Config
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics

from tests.integration.test_commands import _free_port
from tests.integration.test_projections import WorkerProcess, oracle

KEYS = 150
EVENTS = 3000


class HttpWorker(WorkerProcess):
    """A ledger worker serving HTTP on a port of its own."""

    def start(self) -> None:  # type: ignore[override]
        self.port = _free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "refold.cli.main", "worker", "--only", self.name]
        cmd += ["--http", f"127.0.0.1:{self.port}", "--http-procs", "1"]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )

    def get(self, path: str) -> tuple[int, Any, dict[str, str]]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                return resp.status, json.loads(resp.read()), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            return exc.code, json.loads(body) if body else None, dict(exc.headers)

    def owners(self) -> set[str]:
        """Who folds this projection's partitions, as this worker's health says."""
        code, body, _ = self.get("/projections")
        assert code == 200, body
        [entry] = [p for p in body if p["name"] == self.name]
        return {p["owner"] for p in entry["health"].get("partitions", [])}


#: Keys that only travel percent-encoded: forwarded, they must reach the owner as sent.
ODD_KEYS = ("acc q?x=1", "acc #h", "acc%25", "acc é")


def _events(rng: random.Random) -> list[tuple[str, str, dict]]:
    out = []
    for i in range(EVENTS):
        key = f"acc-{rng.randrange(KEYS)}" if i % 50 else ODD_KEYS[i // 50 % len(ODD_KEYS)]
        kind = "bank.MoneyDeposited" if rng.random() < 0.7 else "bank.MoneyWithdrawn"
        data = {"account_id": key, "amount_cents": rng.randrange(1, 5000), "memo": str(i)}
        out.append((kind, key, data))
    return out


def _all_answered(worker: HttpWorker, truth: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Who served each key when `worker` was asked; AssertionError naming the first wrong or
    stale answer."""
    served = {}
    for key, (balance, count) in truth.items():
        code, body, headers = worker.get(f"/projections/{worker.name}/{urllib.parse.quote(key)}")
        assert code == 200, (key, code, body)
        assert not body["stale"], (key, body)
        assert (body["state"]["balance_cents"], body["state"]["events"]) == (balance, count), key
        served[key] = headers.get("X-Refold-Served-By", "here")
    return served


def _eventually(check, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, OSError):  # OSError: not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.timeout(400)
def test_every_worker_answers_every_key_and_goes_on_when_one_dies(
    config: Config, unique, tmp_path: Path
) -> None:
    topic, name = unique("routed"), unique("ledger")
    Topics(config).ensure([event_topic(topic, partitions=6), *internal_topics(config)])
    events = _events(random.Random(17))
    with Publisher(config, codec_for(config)) as publisher:
        publisher.publish_many(topic, events)
    truth = oracle(events)
    a = HttpWorker(config, name, topic, tmp_path / "a")
    b = HttpWorker(config, name, topic, tmp_path / "b")
    a.start()
    b.start()
    try:
        # Both own some partitions: each sees the other's as "elsewhere".
        def shared() -> None:
            for w in (a, b):
                assert w.owners() == {"here", "elsewhere"}, w.owners()

        _eventually(shared, 120)
        served_a = _eventually(lambda: _all_answered(a, truth), 60)
        served_b = _eventually(lambda: _all_answered(b, truth), 60)
        # Forwarding happened both ways: some keys were answered by the other worker.
        assert {"here"} < set(served_a.values()) and {"here"} < set(served_b.values())
        remote = next(k for k, who in served_a.items() if who != "here")
        path = f"/projections/{name}/{urllib.parse.quote(remote)}"
        code, body, _ = a.get(path + "?route=local")  # this worker's own (stale) view
        assert code in (200, 404) and body["stale"] is True, body
        request = urllib.request.Request(f"http://127.0.0.1:{a.port}{path}?route=redirect")
        opener = urllib.request.build_opener(_NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as redirect:
            opener.open(request, timeout=30)
        assert redirect.value.code == 307
        assert (
            redirect.value.headers["Location"] == f"http://127.0.0.1:{b.port}{path}?route=redirect"
        )
        # A scan from either lists every key once, in order, with the oracle's states.
        for w in (a, b):
            listed, after = [], None
            while True:
                query = "?limit=40" + (f"&after={urllib.parse.quote(after)}" if after else "")
                code, page, _ = w.get(f"/projections/{name}{query}")
                assert code == 200, page
                listed += page["items"]
                after = page["next"]
                if after is None:
                    break
            keys = [item["key"] for item in listed]
            assert keys == sorted(truth, key=str.encode), (len(keys), len(truth))
            for item in listed:
                state = item["state"]
                assert (state["balance_cents"], state["events"]) == truth[item["key"]], item
        # kill -9 one: the other takes its partitions and answers every key itself.
        b.kill9()
        served = _eventually(lambda: _all_answered(a, truth), 90)
        assert set(served.values()) == {"here"}
    finally:
        a.stop()
        b.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
