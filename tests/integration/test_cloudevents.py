"""Every publish path writes the CloudEvents Kafka binding's binary-mode headers, including the
`content-type` of the event's data (`application/avro`), so a CloudEvents reader needs no custom
unmarshaller: records written through Python, `POST /events`, `refold publish --data` and
`refold publish --file` are read back from the topic and checked one by one."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from refold.core.config import Config

from tests.integration.test_http import DEPOSITED, Served
from tests.integration.test_http import serve as serve
from tests.integration.test_projections import ROOT
from tests.integration.test_publish_bulk import read_all

BINARY_MODE = {"ce_id", "ce_type", "ce_source", "ce_time", "ce_specversion", "content-type"}


def test_every_publish_path_writes_the_avro_content_type(
    config: Config, serve: Callable[..., Served], tmp_path: Path
) -> None:
    s = serve()
    s.publish([("py-1", 1, "python")])
    posted = s.post(
        {
            "type": DEPOSITED,
            "key": "http-1",
            "data": {"account_id": "http-1", "amount_cents": 2, "memo": "http"},
        }
    )
    assert posted.status == 201, posted.body
    lines = tmp_path / "events.jsonl"
    lines.write_text(
        json.dumps(
            {
                "type": DEPOSITED,
                "key": "file-1",
                "data": {"account_id": "file-1", "amount_cents": 3, "memo": "file"},
            }
        )
        + "\n"
    )
    env = {"REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers, "PYTHONPATH": str(ROOT)}
    env["REFOLD_DATA_DIR"] = str(tmp_path / "cli")
    cli = [sys.executable, "-m", "refold.cli.main", "publish", s.topic]
    data = {"account_id": "cli-1", "amount_cents": 4, "memo": "cli"}
    for extra in (
        ["--type", DEPOSITED, "--key", "cli-1", "--data", json.dumps(data)],
        ["--file", str(lines)],
    ):
        done = subprocess.run(cli + extra, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    records = read_all(config, s.topic, 4)
    assert sorted(m.key().decode() for m in records) == ["cli-1", "file-1", "http-1", "py-1"]
    for m in records:
        headers = dict(m.headers())
        assert set(headers) >= BINARY_MODE, (m.key(), headers)
        assert headers["content-type"] == b"application/avro"
        assert headers["ce_type"] == DEPOSITED.encode()
        # The value is what the header says: Avro single-object encoding (marker C3 01).
        assert m.value()[:2] == b"\xc3\x01"
