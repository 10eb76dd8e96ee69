"""JSON that every reader takes: user data (task data, saga start data, the parts a task's
`split` answers) encoded with neither NaN nor Infinity. Python's json writes them as `NaN` and
`Infinity` by default, which strict JSON readers (orjson, JavaScript's JSON.parse, our own HTTP
intake) refuse; a record holding them can be written but not read back everywhere."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from refold.core.errors import InputError

#: What an error about a NaN or an Infinity tells the caller to do.
NOT_FINITE_HINT = (
    "NaN and Infinity have no JSON form; send null, a string or a finite number instead"
)


def strict_json(value: Any, where: str = "data") -> str:
    """`value` as canonical JSON (sorted keys, no spaces), or InputError naming `where` it
    has no JSON form: the first NaN or Infinity (`data.items[2].price = nan`), a value json
    cannot encode (a set, a datetime, keys of several types), a loop, nesting too deep."""
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except ValueError as exc:  # not finite (or a circular reference)
        try:
            found = not_finite(value, where)
        except RecursionError:  # too deep to say where
            found = None
        if found is None:
            raise InputError(f"{where} is not JSON: {exc}") from exc
        raise InputError(f"{found} is not JSON: {NOT_FINITE_HINT}") from exc
    except TypeError as exc:  # a datetime, a set, keys of several types...
        raise InputError(f"{where} is not JSON: {exc}") from exc
    except RecursionError:
        raise InputError(f"{where} is not JSON: nested too deeply") from None


def not_finite(value: Any, path: str, seen: set[int] | None = None) -> str | None:
    """Where the first NaN or Infinity of `value` is (`data.items[2].price = nan`), if any
    (`seen`: the containers on the way, so a loop ends)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} = {value!r}"
    if isinstance(value, dict):
        children: Iterable[tuple[str, Any]] = ((f"{path}.{k}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    seen = set() if seen is None else seen
    if id(value) in seen:
        return None
    seen.add(id(value))
    for where, child in children:
        found = not_finite(child, where, seen)
        if found is not None:
            return found
    return None
