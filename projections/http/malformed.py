"""aiohttp's server log for the query server: a request aiohttp cannot parse is one counted
warning line, not an ERROR with a traceback per request."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError


class MalformedRequests(logging.LoggerAdapter):
    """aiohttp's server log, where a request it cannot parse (a 4xx it answers itself) becomes
    one counted warning line (route `malformed` in `refold_http_requests_total`) instead of an
    ERROR with a traceback per request; anything else passes through unchanged."""

    def __init__(self, logger: logging.Logger, counts: dict[tuple[str, int], int]) -> None:
        super().__init__(logger, {})
        self._counts = counts

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            code = exc.code
            counter = ("malformed", code)
            self._counts[counter] = self._counts.get(counter, 0) + 1  # on the loop thread
            self.logger.warning("malformed HTTP request (%d): %s", code, exc.message)
            return
        super().log(level, msg, *args, **kwargs)
