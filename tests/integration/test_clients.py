"""One client factory: REFOLD_KAFKA_* settings reach every client; REFOLD_APP_ID keeps two
deployments on one cluster out of each other's groups and internal topics."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka.admin import AdminClient
from refold.core.config import Config
from refold.core.projection import Projection
from refold.core.serde import Event
from refold.engine.worker import Worker
from refold.kafka.publisher import Publisher
from refold.kafka.topics import Topics, event_topic


def counting(projection_name: str, topic: str) -> Projection:
    class Count(Projection):
        name = projection_name
        topics = (topic,)

        def initial(self, key: str) -> dict[str, Any]:
            return {"cents": 0}

        def on_MoneyDeposited(self, state: dict[str, Any], event: Event) -> dict[str, Any]:
            state["cents"] += event.data["amount_cents"]
            return state

    return Count()


def folded(store: Any) -> dict[str, int]:
    return {key: state["cents"] for key, state in store.scan()}


def test_two_app_ids_fold_the_same_topic_apart_with_the_users_client_settings(
    config: Config, unique
) -> None:
    topic, name, client_id = unique("shared"), unique("count"), unique("client")
    Topics(config).ensure([event_topic(topic, partitions=3)])
    deployments = [
        config.with_(
            app_id=app_id,
            data_dir=config.data_dir / app_id,
            client_overrides={"client.id": client_id},
        )
        for app_id in (unique("staging"), unique("prod"))
    ]
    for deployment in deployments:  # each deployment's own schema topic
        Topics(deployment).ensure([event_topic(deployment.schemas_topic, 1)])
    oracle: dict[str, int] = {}
    with Publisher(deployments[0]) as publisher:
        for i in range(60):
            key, cents = f"acc-{i % 7}", 100 + i
            oracle[key] = oracle.get(key, 0) + cents
            publisher.publish(
                topic, "bank.MoneyDeposited", key, {"account_id": key, "amount_cents": cents}
            )
    workers = [Worker(d, [counting(name, topic)]) for d in deployments]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            store, deadline = worker.runner(name).store, time.monotonic() + 60
            while time.monotonic() < deadline and folded(store) != oracle:
                time.sleep(0.1)
            assert folded(store) == oracle, f"{worker.config.app_id} did not fold every event"
        admin = AdminClient({"bootstrap.servers": config.bootstrap_servers})
        groups = [d.group(name, "v1") for d in deployments]
        described = {g: f.result() for g, f in admin.describe_consumer_groups(groups).items()}
        for group, description in described.items():
            assert description.members, f"group {group} has no member"
            # every member of each deployment's group is one of its own clients, with the
            # client.id the user passed through REFOLD_KAFKA_CLIENT_ID
            assert {m.client_id for m in description.members} == {client_id}
        assert groups[0] != groups[1]
    finally:
        for worker in workers:
            worker.stop()
    topics = set(AdminClient({"bootstrap.servers": config.bootstrap_servers}).list_topics().topics)
    assert {d.schemas_topic for d in deployments} <= topics
    assert {d.dead_letter_topic(name) for d in deployments} <= topics
