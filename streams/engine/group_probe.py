"""Consumer-group questions for the health monitor, asked from a child process.

librdkafka 2.16 aborts the whole process (`rd_kafka_enq_once_del_source_return: Assertion
eonce->refcnt > 0 failed`) when a coordinator-targeted admin request (DescribeConsumerGroups,
ListConsumerGroupOffsets) fails to be sent, as it does while a broker is being lost
(confluentinc/librdkafka#5397, a use-after-free not fixed in a release; seen killing a worker in
tests/integration/test_broker_faults.py). A worker asks these every second, so they run in a
child process (`python -m refold.engine.group_probe`): if it dies, the question fails like a
timeout and the next one starts a new child. The worker's folds never share its fate.

Protocol: one JSON line in (first line: the client settings), one JSON line out per request.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from refold.core.config import Config
from refold.core.errors import RefoldError
from refold.kafka import clients

log = logging.getLogger(__name__)

_ABORTED = " (librdkafka aborted it: confluentinc/librdkafka#5397)"
#: A child that does not answer within the request's own timeout plus this is replaced.
GRACE_S = 3.0


class ProbeError(RefoldError):
    """The child did not answer (it died, or took too long); the question may be asked again."""


class GroupProbe:
    """The parent's side: `describe` and `committed`, each answered by the child (started on
    first use, and again after it died). One caller at a time (the health thread)."""

    def __init__(self, config: Config) -> None:
        self._settings = {
            "bootstrap": config.bootstrap_servers,
            "overrides": dict(config.client_overrides),
            "app_id": config.app_id,
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._lock = threading.Lock()

    def describe(self, group: str, timeout: float) -> list[dict[str, Any]]:
        """The group's members: [{"instance": id or None, "name": ..., "assignment": [[t, p]]}]."""
        answer = self._ask({"op": "describe", "group": group, "timeout": timeout}, timeout)
        return list(answer)

    def committed(
        self, group: str, tps: list[tuple[str, int]], timeout: float
    ) -> dict[tuple[str, int], int]:
        """The group's committed offsets of `tps` (those it has)."""
        request = {"op": "committed", "group": group, "tps": tps, "timeout": timeout}
        return {(t, p): o for t, p, o in self._ask(request, timeout)}

    def close(self) -> None:
        with self._lock:
            self._stop_child()

    def _ask(self, request: dict[str, Any], timeout: float) -> Any:
        with self._lock:
            proc = self._child()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                proc.stdin.flush()
            except OSError as exc:
                self._stop_child()
                raise ProbeError(f"the group probe is gone: {exc}") from exc
            line = self._read_line(proc, time.monotonic() + timeout + GRACE_S)
            answer = json.loads(line)
            if "error" in answer:
                raise ProbeError(answer["error"])
            return answer["ok"]

    def _child(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._proc is not None:
            code = self._proc.returncode
            aborted = _ABORTED if code == -signal.SIGABRT else ""
            log.warning("the group probe exited (%s)%s; starting another", code, aborted)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "refold.engine.group_probe"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._buffer = b""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(self._settings).encode() + b"\n")
        self._proc.stdin.flush()
        return self._proc

    def _read_line(self, proc: subprocess.Popen[bytes], deadline: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self._stop_child()
                    raise ProbeError("the group probe did not answer in time")
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    code = proc.wait()
                    self._stop_child()
                    log.warning(
                        "the group probe exited (%s)%s; the next question starts another",
                        code,
                        _ABORTED if code == -signal.SIGABRT else "",
                    )
                    raise ProbeError(f"the group probe exited ({code})")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _stop_child(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # our own child, by its handle
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


# -- the child --------------------------------------------------------------------------------


def _describe(admin: Any, request: dict[str, Any]) -> list[dict[str, Any]]:
    group, timeout = request["group"], float(request["timeout"])
    described = admin.describe_consumer_groups([group], request_timeout=timeout)
    description = described[group].result(timeout=timeout + 1)
    members = []
    for member in description.members:
        assignment = member.assignment.topic_partitions if member.assignment is not None else []
        members.append(
            {
                "instance": member.group_instance_id,
                "name": member.group_instance_id or f"{member.client_id}@{member.host}",
                "assignment": [[tp.topic, tp.partition] for tp in assignment],
            }
        )
    return members


def _committed(admin: Any, request: dict[str, Any]) -> list[list[Any]]:
    group, timeout = request["group"], float(request["timeout"])
    tps = [TopicPartition(t, p) for t, p in request["tps"]]
    offsets = admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, tps)], request_timeout=timeout
    )
    listed = offsets[group].result(timeout=timeout + 1)
    return [[tp.topic, tp.partition, tp.offset] for tp in listed.topic_partitions if tp.offset >= 0]


def main() -> None:
    settings = json.loads(sys.stdin.readline())
    config = Config(
        bootstrap_override=settings["bootstrap"],
        client_overrides=settings["overrides"],
        app_id=settings["app_id"],
    )
    admin = clients.admin(config)
    handlers = {"describe": _describe, "committed": _committed}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer: dict[str, Any] = {"ok": handlers[request["op"]](admin, request)}
        except KafkaException as exc:
            answer = {"error": str(exc.args[0] if exc.args else exc)}
        except Exception as exc:  # e.g. a future that timed out: an answer, not a dead probe
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
