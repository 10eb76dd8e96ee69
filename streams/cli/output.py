"""What the CLI's commands share: one JSON line per answer, `--data` read as JSON, the exit code
of bad input, and `--wait` for a task or saga to end."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Collection
from typing import Any

from refold.core.errors import InputError

#: The exit code of input refused (a bad line, bad `--data`); 1 is any other failure.
EXIT_INPUT = 2


def out(obj: object) -> None:
    """One JSON line on stdout."""
    sys.stdout.write(json.dumps(obj, separators=(", ", ": ")) + "\n")


def data_json(text: str) -> object:
    """`--data` read as JSON, or the InputError that says why not (never a traceback)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--data is not valid JSON: {exc.msg} at column {exc.colno}") from exc
    except RecursionError:
        raise InputError("--data is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # an integer of over 4300 digits
        raise InputError(f"--data is not valid JSON: {exc}") from None


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0, as `--timeout` wants. `-1` made a
    `--wait` give up at once without a word of why, `nan` or `inf` made it wait for ever (or
    raise a traceback where the wait is a thread's)."""
    return _seconds(text, positive=False)


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (a stall timeout: 0 would give up at
    the first look)."""
    return _seconds(text, positive=True)


def _seconds(text: str, *, positive: bool) -> float:
    bound = "> 0" if positive else ">= 0"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds {bound}, not {text!r}"
        )
    return value


def wait_ended(
    read: Callable[[], dict[str, Any] | None],
    terminal: Collection[str],
    timeout: float,
    every_s: float = 0.3,
) -> tuple[dict[str, Any] | None, bool]:
    """Read a status until its `status` is one of `terminal` or `timeout` passed: (the last
    state read, whether it ended)."""
    deadline = time.monotonic() + timeout
    while True:
        state = read()
        if state is not None and state["status"] in terminal:
            return state, True
        if time.monotonic() > deadline:
            return state, False
        time.sleep(every_s)
