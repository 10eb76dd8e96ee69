"""Bearer tokens with scopes for the HTTP API (`REFOLD_API_TOKENS_FILE`).

The file holds one `TOKEN SCOPE[,SCOPE...]` per line (`#` starts a comment); scopes are `read`
(lookups, scans, statuses, `/metrics`, the dashboard's data), `publish` (`POST /events`),
`command` (commands, tasks, sagas) and `admin` (every scope). A request sends `Authorization:
Bearer TOKEN`. No token or an unknown one: 401; a token without the route's scope: 403.
`/healthz` and the dashboard's page (`/`; open it as `/#token=TOKEN`) need none. Tokens are
compared in constant time (every known token, every time), and the file is read again when it
changes (checked at most once a second), so a token is added or revoked without a restart.
Without the environment variable the API is open, as before: a worker then refuses to listen
beyond loopback unless told `--insecure`.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from pathlib import Path

from refold.core.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "REFOLD_API_TOKENS_FILE"
SCOPES = frozenset({"read", "publish", "command", "admin"})
CHECK_EVERY_S = 1.0


def _parse(text: str, path: Path) -> list[tuple[bytes, frozenset[str]]]:
    tokens: list[tuple[bytes, frozenset[str]]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{path}:{number}: want `TOKEN SCOPE[,SCOPE...]`")
        token, scopes = parts[0], frozenset(s for s in parts[1].split(",") if s)
        unknown = scopes - SCOPES
        if unknown or not scopes:
            raise ConfigError(
                f"{path}:{number}: unknown scope {', '.join(sorted(unknown)) or '(none)'}",
                hint="scopes: " + ", ".join(sorted(SCOPES)),
            )
        if len(token) < 16:
            raise ConfigError(f"{path}:{number}: a token must be at least 16 characters")
        tokens.append((token.encode(), scopes))
    return tokens


class Tokens:
    """The tokens of one file, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._tokens: list[tuple[bytes, frozenset[str]]] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._load()

    @classmethod
    def from_env(cls) -> Tokens | None:
        raw = os.environ.get(ENV)
        return cls(Path(raw)) if raw else None

    def _load(self) -> None:
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the API tokens file {self.path}: {exc}") from exc
        self._tokens = _parse(text, self.path)
        self._stamp = (st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < CHECK_EVERY_S:
            return
        with self._lock:
            self._checked = now
            try:
                st = self.path.stat()
                if (st.st_mtime_ns, st.st_size) != self._stamp:
                    self._load()
            except (OSError, ConfigError) as exc:  # keep the last good tokens, say why
                log.warning("API tokens file not reloaded: %s", exc)

    def scopes(self, authorization: bytes | str | None) -> frozenset[str] | None:
        """The scopes of the bearer token in an Authorization header; None if it names none."""
        if not authorization:
            return None
        self._refresh()
        value = authorization.encode() if isinstance(authorization, str) else authorization
        kind, _, token = value.strip().partition(b" ")
        if kind.lower() != b"bearer" or not token:
            return None
        token = token.strip()
        found: frozenset[str] | None = None
        for known, scopes in self._tokens:  # no early exit: the time says nothing of the token
            if hmac.compare_digest(known, token):
                found = scopes
        return found

    def allows(self, authorization: bytes | str | None, scope: str) -> int:
        """200 when the header's token has `scope` (or admin), 401 without a known token,
        403 with a token that lacks it."""
        scopes = self.scopes(authorization)
        if scopes is None:
            return 401
        return 200 if scope in scopes or "admin" in scopes else 403


def route_scope(method: str, path: str) -> str | None:
    """The scope a route needs (None: open: the health check, and the dashboard's page, which
    holds no data and sends the token from its URL's `#token=` to `/dashboard.json`)."""
    if path in ("/healthz", "/"):
        return None
    if method == "POST":
        return "publish" if path.startswith("/events") else "command"
    return "read"
