"""Hypothesis on `refold publish --file`: a JSON-lines file of generated good and bad lines either
publishes every event (exit 0) or, when any line is bad, publishes nothing and exits 2 naming
each bad line as FILE:LINE. The oracle is how each line was made, not the parser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refold.core.config import Config
from refold.kafka.topics import Topics, event_topic, internal_topics

from tests.integration.test_projections import ROOT, end_offsets

DEPOSITED = "bank.MoneyDeposited"


def _line(key: str, amount: object, memo: object) -> bytes:
    data = {"account_id": key, "amount_cents": amount, "memo": memo}
    return json.dumps({"type": DEPOSITED, "key": key, "data": data}).encode()


KEYS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8)
GOOD = st.builds(
    _line, KEYS, st.integers(0, 10**9), st.text(st.characters(codec="utf-8"), max_size=12)
)
BAD = (
    st.builds(
        _line,
        KEYS,
        st.floats(allow_nan=False).filter(lambda f: not f.is_integer())
        | st.booleans()
        | st.integers(2**63, 2**80)
        | st.text(max_size=4),
        st.text(max_size=4),
    )
    | st.builds(_line, KEYS, st.integers(0, 9), st.integers())  # memo: a number
    | st.builds(_line, st.just("\udc80"), st.integers(0, 9), st.just(""))  # a lone surrogate key
    | st.binary(min_size=1, max_size=24)
    .filter(lambda b: b"\n" not in b and b"\r" not in b)
    .filter(lambda b: b.strip() != b"" and not b.lstrip().startswith(b"{"))
    | st.sampled_from([b"{}", b"[]", b"null", b"[" * 5000, b"1" * 5000, b'{"type": "nope"}'])
)


@pytest.mark.timeout(300)
def test_a_file_with_any_bad_line_publishes_nothing(config: Config, unique, tmp_path: Path) -> None:
    topic = unique("fuzzpub")
    Topics(config).ensure([*internal_topics(config), event_topic(topic, 2)])
    env = {
        "REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers,
        "REFOLD_DATA_DIR": str(tmp_path / "cli"),
        "PYTHONPATH": str(ROOT),
    }
    published, runs = [0], [0]

    @settings(
        max_examples=8,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        lines=st.lists(
            st.tuples(st.just(True), GOOD) | st.tuples(st.just(False), BAD), min_size=1, max_size=6
        )
    )
    def check(lines: list[tuple[bool, bytes]]) -> None:
        runs[0] += 1
        before = sum(end_offsets(config, topic).values())
        path = tmp_path / "events.jsonl"
        path.write_bytes(b"".join(line + b"\n" for _, line in lines))
        done = subprocess.run(
            [sys.executable, "-m", "refold.cli.main", "publish", topic, "--file", str(path)],
            env=env,
            capture_output=True,
            timeout=120,
        )
        bad = [n for n, (good, _) in enumerate(lines, start=1) if not good]
        stderr = done.stderr.decode(errors="replace")
        if bad:
            assert done.returncode == 2, stderr
            for n in bad:
                assert f"{path}:{n}: " in stderr, (n, stderr)
            assert "Traceback" not in stderr
        else:
            assert done.returncode == 0, stderr
            published[0] += len(lines)
        after = sum(end_offsets(config, topic).values())
        assert after - before == (0 if bad else len(lines)), (lines, stderr)

    check()
    assert runs[0] >= 8 and published[0] > 0  # every example ran; some were all good
