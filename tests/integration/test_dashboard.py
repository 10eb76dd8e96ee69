"""The dashboard (`GET /`, `GET /dashboard.json`) of a worker folding a real Kafka topic, rendered
in a real headless Chromium (Debian's `chromium`; `make test` installs it).

The oracle is the test's own: how many deposits it published and how many of them the fold
refuses (memo "boom": dead-lettered).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_http import Served, serve  # noqa: F401 - `serve` is a fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a machine with no internet: without the background-networking ones Chromium keeps
# trying Google's hosts.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _published(s: Served, good: int, boom: int) -> None:
    deposits = [(f"acc-{i % 7}", 100 + i, f"m{i}") for i in range(good)]
    deposits += [(f"acc-{i % 7}", 1, "boom") for i in range(boom)]
    s.publish(deposits)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        [p] = s.get("/dashboard.json").body["projections"]
        if p["events_folded"] == good and p["dead_letters"] == boom:
            return
        time.sleep(0.2)
    raise AssertionError(f"not folded in time: {p}")


def _chromium(url: str, tmp: Path, *args: str) -> str:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_dashboard_json_counts_what_was_folded(serve: Callable[..., Served]) -> None:  # noqa: F811
    s = serve()
    _published(s, good=120, boom=3)
    deadline = time.monotonic() + 30
    while True:  # the health thread describes a new version on its first check ("starting")
        snapshot = s.get("/dashboard.json").body
        [p] = snapshot["projections"]
        if p["health"]["status"] != "starting" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (p["name"], p["version"], p["state"]) == (s.name, 1, "running")
    assert sum(part["lag"] for part in p["partitions"]) == 0
    owners = [part["owner"] for part in p["health"]["partitions"]]
    assert owners and set(owners) == {"here"}, p["health"]  # one worker owns every partition
    assert snapshot["worker"]["id"] == s.worker.worker_id
    assert snapshot["commands"] == snapshot["tasks"] == snapshot["sagas"] == []
    page = s.get("/")
    assert page.status == 200 and page.content_type.startswith("text/html")
    assert "dashboard.json" in page.body  # the page polls its data from the same worker


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (`make test` installs Debian's)")
def test_the_page_shows_the_live_numbers_in_a_real_browser(
    serve: Callable[..., Served],  # noqa: F811
    tmp_path: Path,
) -> None:
    s = serve()
    _published(s, good=250, boom=2)
    dom = _chromium(s.server.url + "/", tmp_path, "--virtual-time-budget=4000", "--dump-dom")
    row = re.search(rf'<tr data-projection="{re.escape(s.name)}">(.*?)</tr>', dom, re.S)
    assert row is not None, dom[-3000:]
    cells = dict(re.findall(r'<td class="n (folded|dead|lag)[^"]*">([^<]*)</td>', row.group(1)))
    # Folded and dead-lettered are the test's own counts; lag and health move with the broker's
    # watermarks and the health thread, so the page is asked only to show them.
    assert (cells["folded"], cells["dead"]) == ("250", "2"), cells
    assert cells["lag"].isdigit() or cells["lag"] == "?", cells
    status = re.search(r'<b id="status" class="(\w+)">([^<]+)</b>', dom)
    assert status is not None and status.group(2) != "loading", dom[:3000]
    partitions = len(s.get("/dashboard.json").body["projections"][0]["health"]["partitions"])
    owners = re.search(rf'<tr data-owners="{re.escape(s.name)}">(.*?)</tr>', dom, re.S)
    assert owners is not None, dom[-3000:]
    assert owners.group(1).count('data-owner="here"') == partitions > 0, owners.group(1)
    # The numbers move when the log does: more events, and the page shows them.
    s.publish([("acc-x", 5, f"late{i}") for i in range(30)])
    deadline = time.monotonic() + 60
    while s.get("/dashboard.json").body["projections"][0]["events_folded"] != 280:
        assert time.monotonic() < deadline, "the late events were not folded"
        time.sleep(0.2)
    dom = _chromium(s.server.url + "/", tmp_path, "--virtual-time-budget=4000", "--dump-dom")
    assert '<td class="n folded">280</td>' in dom, dom[-3000:]
    shot = Path(os.environ.get("REFOLD_TEST_OUTPUT", tmp_path)) / "dashboard.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    _chromium(
        s.server.url + "/",
        tmp_path,
        "--virtual-time-budget=4000",
        "--window-size=1280,900",
        f"--screenshot={shot}",
    )
    assert shot.stat().st_size > 10_000, shot  # a rendered page, not a blank one
    print(f"dashboard screenshot: {shot}")
