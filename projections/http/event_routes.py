"""`POST /events/{topic}` (mounted by the query server): one event, validated strictly against
its schema (`refold.core.serde.strict_check`), appended once Kafka acknowledged it.

Refused: internal topics (403), JSON that is not an event of a known type (400/422), an event
too large for a Kafka record (413); 503 only for what a retry can fix (the broker).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from refold.core import inputs
from refold.core.errors import InputError, PublishError, TopicError
from refold.core.inputs import EventInput, event_from_json
from refold.core.serde import Position
from refold.engine.worker import Worker
from refold.http import answers
from refold.http.answers import dumps as _dumps
from refold.http.answers import loads as _loads

log = logging.getLogger(__name__)

_JSON = "application/json"

#: Suffixes of the topics refold writes itself (command intake and results).
_INTERNAL_SUFFIXES = (".commands", ".results")


def is_internal_topic(topic: str, dead_letter_prefix: str) -> bool:
    """Topics only refold writes: `_*` (`_refold*`, Kafka's own), command and results topics,
    dead-letter topics."""
    return (
        topic.startswith("_")
        or topic.endswith(_INTERNAL_SUFFIXES)
        or (bool(dead_letter_prefix) and topic.startswith(dead_letter_prefix))
    )


def _error(status: int, error: str, detail: str) -> web.Response:
    return web.Response(status=status, body=answers.error_body(error, detail), content_type=_JSON)


class EventRoutes:
    """The event intake over one worker's publisher."""

    def __init__(self, worker: Worker, publishing: ThreadPoolExecutor) -> None:
        self.worker = worker
        self._publishing = publishing

    async def post(self, request: web.Request) -> web.StreamResponse:
        """`POST /events/{topic}` with `{"type","key","data"}`: 201 with where it landed."""
        topic = request.match_info["topic"]
        if is_internal_topic(topic, self.worker.config.dead_letter_topic("")):
            return _error(403, "internal topic", f"topic {topic!r} is written by refold only")
        body = await request.read()
        try:
            obj = _loads(body)
        except ValueError as exc:
            return _error(400, "invalid JSON", f"the body is not JSON: {exc}")
        try:
            event = event_from_json(obj, self.worker.codec)
        except InputError as exc:
            return _error(422, "invalid event", str(exc))
        too_large = inputs.too_large(event, self.worker.publisher.source)
        if too_large is not None:
            return _error(413, "event too large", too_large)
        try:
            where = await asyncio.get_running_loop().run_in_executor(
                self._publishing, self._publish, topic, event
            )
        except TopicError as exc:
            if exc.__cause__ is None:  # Topics raises without a cause only for a missing topic
                return _error(404, "unknown topic", str(exc))
            log.warning("POST /events/%s: %s", topic, exc)
            return _error(503, "broker unavailable", str(exc))
        except PublishError as exc:
            if "MSG_SIZE_TOO_LARGE" in str(exc):  # the broker's own limit may be lower
                return _error(413, "event too large", str(exc))
            log.error("POST /events/%s: %s", topic, exc)
            return _error(503, "not acknowledged", str(exc))
        position = {"topic": where.topic, "partition": where.partition, "offset": where.offset}
        return web.Response(status=201, body=_dumps(position), content_type=_JSON)

    def _publish(self, topic: str, event: EventInput) -> Position:
        return self.worker.publisher.publish_encoded(topic, [event])[0]
