"""The query server over real HTTP on loopback, against a worker folding a real Kafka topic."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from refold.core.config import Config
from refold.core.projection import Projection
from refold.core.serde import Event, Position
from refold.engine.worker import Worker
from refold.http.server import QueryServer
from refold.kafka.publisher import Publisher
from refold.kafka.topics import Topics, event_topic, internal_topics

DEPOSITED = "bank.MoneyDeposited"
WAIT = "15000"  # ms a read may wait for the fold; generous for slow CI machines


def deposits_projection(projection_name: str, topic: str, **attrs: Any) -> Projection:
    """A fresh projection class (names are class attributes) folding deposits per account."""

    class Deposits(Projection):
        name = projection_name
        topics = (topic,)

        def initial(self, key: str) -> dict[str, Any]:
            return {"balance_cents": 0, "deposits": 0, "memos": []}

        def on_MoneyDeposited(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
            if event.data["memo"] == "boom":
                raise ValueError("the fold refuses memo 'boom'")
            state["balance_cents"] += event.data["amount_cents"]
            state["deposits"] += 1
            state["memos"].append(event.data["memo"])
            return state

    for attr, value in attrs.items():
        setattr(Deposits, attr, value)
    return Deposits()


def expected_states(deposits: list[tuple[str, int, str]]) -> dict[str, dict[str, Any]]:
    """The fold computed independently: per key, in publish order (one key, one partition)."""
    out: dict[str, dict[str, Any]] = {}
    for key, amount, memo in deposits:
        state = out.setdefault(key, {"balance_cents": 0, "deposits": 0, "memos": []})
        state["balance_cents"] += amount
        state["deposits"] += 1
        state["memos"].append(memo)
    return out


def min_offset(positions: list[Position]) -> str:
    """`P:O,...` naming the last offset written to each partition."""
    last: dict[int, int] = {}
    for p in positions:
        last[p.partition] = max(p.offset, last.get(p.partition, -1))
    return ",".join(f"{p}:{o}" for p, o in sorted(last.items()))


@dataclass
class Response:
    status: int
    body: Any  # parsed JSON, or text for non-JSON answers
    content_type: str


@dataclass
class Served:
    """A worker with one projection, its query server, and a publisher to feed its topic."""

    topic: str
    name: str
    worker: Worker
    server: QueryServer
    publisher: Publisher

    def publish(self, deposits: list[tuple[str, int, str]]) -> list[Position]:
        return self.publisher.publish_many(
            self.topic,
            [
                (DEPOSITED, key, {"account_id": key, "amount_cents": amount, "memo": memo})
                for key, amount, memo in deposits
            ],
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> Response:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        url = self.server.url + path + query
        req = urllib.request.Request(
            url, data=body, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, raw, ctype = resp.status, resp.read(), resp.headers["Content-Type"]
        except urllib.error.HTTPError as exc:
            status, raw, ctype = exc.code, exc.read(), exc.headers["Content-Type"]
        body_out = json.loads(raw) if ctype.startswith("application/json") else raw.decode()
        return Response(status, body_out, ctype)

    def get(self, path: str, **params: str) -> Response:
        return self.request("GET", path, params=params)

    def get_key(self, key: str, **params: str) -> Response:
        return self.get(f"/projections/{self.name}/{urllib.parse.quote(key, safe='')}", **params)

    def post(self, obj: Any, topic: str | None = None) -> Response:
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return self.request("POST", f"/events/{topic or self.topic}", body)


@pytest.fixture
def serve(config: Config, unique: Callable[[str], str]) -> Iterator[Callable[..., Served]]:
    """Factory: `serve(procs=1, **projection_attrs)` starts a worker and a server of `procs`
    processes (the worker and reader processes) on a fresh topic."""
    closers: list[Callable[[], None]] = []

    def make(procs: int = 1, **attrs: Any) -> Served:
        topic, name = unique("http"), unique("deposits")
        Topics(config).ensure([event_topic(topic), *internal_topics(config)])
        worker = Worker(config, [deposits_projection(name, topic, **attrs)])
        worker.start()
        closers.append(worker.stop)
        server = QueryServer(worker, "127.0.0.1", 0, procs=procs)
        server.start()
        closers.append(server.stop)
        publisher = Publisher(config, worker.codec)
        closers.append(publisher.close)
        return Served(topic, name, worker, server, publisher)

    yield make
    for close in reversed(closers):
        close()


def assert_error(resp: Response, status: int, error: str | None = None) -> None:
    assert resp.status == status, resp.body
    assert resp.content_type.startswith("application/json")
    assert isinstance(resp.body["error"], str) and "detail" in resp.body, resp.body
    if error is not None:
        assert resp.body["error"] == error, resp.body


def test_get_key_returns_the_folded_state_and_position(serve: Callable[..., Served]) -> None:
    s = serve()
    assert s.server.port > 0
    tricky = ["a/b", "ü ber%20?#&", "x:y,z", "acc-1"]
    deposits = [(tricky[i % 4], 100 + i, f"m{i}") for i in range(40)]
    deposits += [(f"acc-{i:02d}", i, "solo") for i in range(20)]
    positions = s.publish(deposits)
    wanted = min_offset(positions)

    for key, state in expected_states(deposits).items():
        resp = s.get_key(key, min_offset=wanted, wait_ms=WAIT)
        assert resp.status == 200, resp.body
        assert resp.body["key"] == key
        assert resp.body["state"] == state
        for p in positions:  # the answer says it has folded at least what was published
            assert resp.body["position"][f"{s.topic}:{p.partition}"] > p.offset

    missing = s.get_key("no-such-account")
    assert_error(missing, 404, "no state for key")
    assert sum(missing.body["position"].values()) == len(deposits)


def test_read_your_writes_after_post(serve: Callable[..., Served]) -> None:
    s = serve()
    first = s.publish([("rw-1", 500, "opening")])
    assert s.get_key("rw-1", min_offset=min_offset(first), wait_ms=WAIT).body["state"] == {
        "balance_cents": 500,
        "deposits": 1,
        "memos": ["opening"],
    }

    for n in range(1, 4):
        posted = s.post(
            {
                "type": DEPOSITED,
                "key": "rw-1",
                "data": {"account_id": "rw-1", "amount_cents": 25, "memo": f"p{n}"},
            }
        )
        assert posted.status == 201, posted.body
        assert posted.body["topic"] == s.topic
        assert posted.body["partition"] == first[0].partition
        assert posted.body["offset"] == first[0].offset + n
        where = f"{posted.body['partition']}:{posted.body['offset']}"
        if n == 2:  # the topic:partition:offset spelling
            where = f"{s.topic}:{where}"
        resp = s.get_key("rw-1", min_offset=where, wait_ms=WAIT)
        assert resp.status == 200, resp.body
        assert resp.body["state"]["balance_cents"] == 500 + 25 * n
        assert resp.body["state"]["memos"][-1] == f"p{n}"
        folded = resp.body["position"][f"{s.topic}:{posted.body['partition']}"]
        assert folded > posted.body["offset"]


def test_waiting_for_an_offset_that_never_comes_answers_409(serve: Callable[..., Served]) -> None:
    s = serve()
    positions = s.publish([("late", 1, "only")])
    partition = positions[0].partition
    assert s.get_key("late", min_offset=min_offset(positions), wait_ms=WAIT).status == 200

    for params in ({"wait_ms": "200"}, {}):  # a short wait, and no wait at all
        resp = s.get_key("late", min_offset=f"{partition}:{positions[0].offset + 5}", **params)
        assert_error(resp, 409, "position not reached")
        assert resp.body["position"][f"{s.topic}:{partition}"] == positions[0].offset + 1
    # The scan route honours the same parameters.
    assert_error(s.get(f"/projections/{s.name}", min_offset=f"{partition}:99", wait_ms="50"), 409)


def test_prefix_paging_returns_every_key_once_in_order(serve: Callable[..., Served]) -> None:
    s = serve()
    users = [f"user-{i:03d}" for i in range(53)]
    others = ["aaa", "user", "userx-1", "zzz"]
    deposits = [(k, 1, "") for k in users + others]
    positions = s.publish(deposits)

    seen: list[str] = []
    params = {"prefix": "user-", "limit": "7", "min_offset": min_offset(positions), "wait_ms": WAIT}
    while True:
        page = s.get(f"/projections/{s.name}", **params)
        assert page.status == 200, page.body
        assert len(page.body["items"]) <= 7
        for item in page.body["items"]:
            assert item["state"] == {"balance_cents": 1, "deposits": 1, "memos": [""]}
        seen += [item["key"] for item in page.body["items"]]
        if page.body["next"] is None:
            break
        assert page.body["next"] == seen[-1]
        params["after"] = page.body["next"]
    assert seen == users

    everything = s.get(f"/projections/{s.name}", limit="1000")
    assert [i["key"] for i in everything.body["items"]] == sorted(users + others)
    assert everything.body["next"] is None
    default = s.get(f"/projections/{s.name}")
    assert len(default.body["items"]) == 57 and default.body["next"] is None
    after = s.get(f"/projections/{s.name}", after="user-051", limit="3")
    assert [i["key"] for i in after.body["items"]] == ["user-052", "userx-1", "zzz"]
    assert after.body["next"] is None  # exactly `limit` left: nothing follows
    assert s.get(f"/projections/{s.name}", prefix="nobody").body == {
        "items": [],
        "next": None,
        "position": everything.body["position"],
    }


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = name
    if labels:
        wanted += "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_healthy(s: Served, timeout: float = 30.0) -> Response:
    """`/healthz` once it says 200 (the health thread checks the group about once a second, and
    a partition counts as behind until a refresh after its catch-up)."""
    deadline = time.monotonic() + timeout
    while True:
        health = s.get("/healthz")
        if health.status == 200 or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def test_projections_healthz_and_metrics_report_the_fold(serve: Callable[..., Served]) -> None:
    s = serve()
    deposits = [(f"k{i}", i, "") for i in range(30)]
    positions = s.publish(deposits)
    assert s.get_key("k1", min_offset=min_offset(positions), wait_ms=WAIT).status == 200
    written = {p.partition: 0 for p in positions}
    for p in positions:
        written[p.partition] = max(written[p.partition], p.offset + 1)

    health = wait_healthy(s)
    assert (health.status, health.body) == (
        200,
        {
            "status": "ok",
            "projections": {s.name: "running"},
            "broker": "reachable",
            "unowned": {},
            "behind": {},
        },
    )
    found = s.get_key("k1").body
    assert (found["lag"], found["stale"]) == (0, False)  # every partition is folded here

    [listed] = s.get("/projections").body
    assert listed["name"] == s.name and listed["version"] == 1 and listed["state"] == "running"
    assert listed["error"] is None and listed["topics"] == [s.topic]
    assert (listed["events_folded"], listed["dead_letters"], listed["skipped"]) == (30, 0, 0)
    parts = {p["partition"]: p for p in listed["partitions"]}
    assert sorted(parts) == list(range(6))  # one worker owns every partition of the topic
    for partition, part in parts.items():
        assert part["topic"] == s.topic
        assert part["next_offset"] == written.get(partition, 0)
        assert part["lag"] == 0  # caught up

    text = s.get("/metrics")
    assert text.status == 200 and text.content_type.startswith("text/plain; version=0.0.4")
    body = text.body
    assert metric(body, "refold_events_folded_total", projection=s.name) == 30
    assert metric(body, "refold_dead_letters_total", projection=s.name) == 0
    assert metric(body, "refold_projection_up", projection=s.name) == 1
    for partition, offset in written.items():
        labels = {"projection": s.name, "topic": s.topic, "partition": str(partition)}
        assert metric(body, "refold_projection_next_offset", **labels) == offset
        assert metric(body, "refold_projection_lag", **labels) == 0
    assert "# TYPE refold_projection_lag gauge" in body
    assert 0 <= metric(body, "refold_http_loop_lag_seconds") < 0.5  # an idle loop is on time
    key_route = {"route": "/projections/{name}/{key}"}
    assert metric(body, "refold_http_requests_total", **key_route, status="200") == 2
    assert metric(body, "refold_http_requests_total", route="/healthz", status="200") == 1
    s.get_key("absent")
    after = s.get("/metrics").body
    assert metric(after, "refold_http_requests_total", **key_route, status="404") == 1
    assert metric(after, "refold_http_requests_total", route="/metrics", status="200") == 1


def test_bad_input_answers_json_4xx_and_the_server_keeps_serving(
    serve: Callable[..., Served],
) -> None:
    s = serve()
    deposit: dict[str, Any] = {
        "type": DEPOSITED,
        "key": "acc",
        "data": {"account_id": "acc", "amount_cents": 5, "memo": ""},
    }

    assert_error(s.post(b"{not json"), 400, "invalid JSON")
    assert_error(s.post(b""), 400, "invalid JSON")
    unknown_type = s.post({**deposit, "type": "bank.NoSuchEvent"})
    assert_error(unknown_type, 422, "invalid event")
    assert "bank.NoSuchEvent" in unknown_type.body["detail"]
    wrong_type = s.post({**deposit, "data": {**deposit["data"], "amount_cents": "five"}})
    assert_error(wrong_type, 422, "invalid event")
    assert "amount_cents" in wrong_type.body["detail"]
    assert_error(s.post({"type": DEPOSITED, "data": deposit["data"]}), 422)  # no key
    assert_error(s.post([deposit]), 422)
    assert_error(s.post(deposit, topic=s.topic + "-missing"), 404, "unknown topic")
    assert_error(s.post(deposit, topic="_refold.schemas"), 403, "internal topic")

    assert_error(s.get_key("acc", min_offset="x"), 400, "bad query")
    for bad in ("0:1:2:3", "0:-1", "0", "other-topic:0:1", "0:1,", "0:99999999999999999999"):
        assert_error(s.get_key("acc", min_offset=bad), 400, "bad query")
    for bad in ("-1", "30001", "soon", ""):
        assert_error(s.get_key("acc", min_offset="0:0", wait_ms=bad), 400, "bad query")
    for bad in ("0", "1001", "ten"):
        assert_error(s.get(f"/projections/{s.name}", limit=bad), 400, "bad query")

    unknown = s.get("/projections/no-such-projection/acc")
    assert_error(unknown, 404, "unknown projection")
    assert s.name in unknown.body["detail"]
    assert_error(s.get("/projections/no-such-projection"), 404, "unknown projection")
    assert_error(s.get("/no/such/route"), 404)
    assert_error(s.request("DELETE", "/healthz"), 405)
    assert_error(s.request("POST", f"/events/{s.topic}", b"x" * ((1 << 20) + 10)), 413)

    assert wait_healthy(s).status == 200
    ok = s.post(deposit)  # after all that, a good event is still accepted and folded
    assert ok.status == 201, ok.body
    resp = s.get_key("acc", min_offset=f"{ok.body['partition']}:{ok.body['offset']}", wait_ms=WAIT)
    assert resp.body["state"] == {"balance_cents": 5, "deposits": 1, "memos": [""]}


def test_a_failed_projection_is_unhealthy_and_unavailable(serve: Callable[..., Served]) -> None:
    s = serve(on_error="stop")
    positions = s.publish([("ok", 1, "fine"), ("ok", 2, "boom")])
    resp = s.get_key("ok", min_offset=min_offset(positions), wait_ms=WAIT)
    # The runner stops before the poison event: the wait ends in 409, or, when the runner had
    # already stopped as the request came in (a loaded machine), in 503.
    expected = {409: "position not reached", 503: "projection unavailable"}
    assert_error(resp, resp.status if resp.status in expected else 409, expected.get(resp.status))

    health = s.get("/healthz")
    assert (health.status, health.body["status"]) == (503, "failed")
    [listed] = s.get("/projections").body
    assert listed["state"] == "failed" and "boom" in listed["error"]
    assert metric(s.get("/metrics").body, "refold_projection_up", projection=s.name) == 0
    assert_error(s.get_key("ok"), 503, "projection unavailable")
    assert_error(s.get(f"/projections/{s.name}"), 503, "projection unavailable")
