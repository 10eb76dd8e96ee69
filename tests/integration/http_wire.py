"""Raw HTTP/1.1 on a socket: send a byte stream (optionally split), read the answers in order.

For the fast-path differential tests: the same bytes go to a server answering through the fast
path and to one where aiohttp answers everything; the answers must be the same, one by one.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

READ_TIMEOUT_S = 20.0  # a hang guard only: every stream sent here ends in a closing request


@dataclass(frozen=True)
class Answer:
    status_line: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # lowercased names, Date left out, in order
    body: bytes


def parse_answers(raw: bytes) -> tuple[list[Answer], bytes]:
    """The complete answers in `raw` and the bytes after them (a partial answer, if any)."""
    answers: list[Answer] = []
    start = 0
    while True:
        end = raw.find(b"\r\n\r\n", start)
        if end < 0:
            return answers, raw[start:]
        lines = raw[start:end].split(b"\r\n")
        headers: list[tuple[bytes, bytes]] = []
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                length = int(value)
            if name != b"date":
                headers.append((name, value))
        if len(raw) < end + 4 + length:
            return answers, raw[start:]
        body = raw[end + 4 : end + 4 + length]
        answers.append(Answer(lines[0], tuple(headers), body))
        start = end + 4 + length


def exchange(port: int, chunks: Sequence[bytes], pause_s: float = 0.002) -> list[Answer]:
    """Send `chunks` (one write each, TCP_NODELAY, a short pause between), read until the server
    closes; the answers in order, and a final pseudo-answer for any bytes that did not parse."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i, chunk in enumerate(chunks):
                if i and pause_s:
                    time.sleep(pause_s)
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused and closed early: what it answered is still read below
        raw = b""
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raw += b"\r\n\r\n<no close>"
    answers, rest = parse_answers(raw)
    if rest:
        answers.append(Answer(b"<unparsed>", (), rest))
    return answers
