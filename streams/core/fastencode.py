"""Straight-line Avro encoders for flat event records, generated once per writer schema.

The encoding twin of `refold.core.fastdecode`. fastavro's `schemaless_writer` took ~17 µs for
one task status (a record of 16 optional fields), most of it per-call set-up and union
resolution; the status events of a task (accepted, dispatched, running, succeeded) are encoded
on the dispatcher's and the task workers' threads, one each per task. For a flat record
(primitives, unions of `null` and primitives, arrays of primitives) this module writes the
encoding out field by field and compiles it once.

It only encodes what the strict path (`serde.strict_check` + fastavro) would encode the same
way: values of exactly the declared Python type (`int` not `bool` for a long, in range), every
field present or with a default. For anything else the encoder returns None and the caller
encodes with `Codec.encode`, which says what is wrong (the file publish path, `refold.core.
inputs`, and `Codec.encode` itself, whose fallback is fastavro). The unit tests check the bytes
against fastavro's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from struct import Struct
from typing import Any

from refold.core.fastdecode import _array_items, _kind

Encoder = Callable[[Mapping[str, Any]], bytes | None]

_DOUBLE = Struct("<d")
_FLOAT = Struct("<f")
_LONG = (-(2**63), 2**63 - 1)
_INT = (-(2**31), 2**31 - 1)
#: The Python type a union branch takes (fastavro picks the first branch a value fits).
_PYTYPE = {"null": "NoneType", "string": "str", "bytes": "bytes", "boolean": "bool"}
_PYTYPE |= {"long": "int", "int": "int", "double": "float", "float": "float"}


def _varint(n: int, out: bytearray) -> None:
    """A non-negative (already zigzagged) number as an Avro varint."""
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _number(expr: str, indent: str, *, signed: bool = True) -> list[str]:
    """Zigzag `expr` (a checked long or int; `signed=False`: a length, never negative, whose
    zigzag is a shift) into `out`. Varints of up to three bytes are written inline: a call
    of `_varint` per amount was a tenth of a bank event's encoding (measured)."""
    zigzag = f"({expr} << 1) ^ ({expr} >> 63)" if signed else f"{expr} << 1"
    return [
        f"{indent}n = {zigzag}",
        f"{indent}if n < 128:",
        f"{indent}    out.append(n)",
        f"{indent}elif n < 16384:",
        f"{indent}    out.append(n & 127 | 128)",
        f"{indent}    out.append(n >> 7)",
        f"{indent}elif n < 2097152:",
        f"{indent}    out.append(n & 127 | 128)",
        f"{indent}    out.append(n >> 7 & 127 | 128)",
        f"{indent}    out.append(n >> 14)",
        f"{indent}else:",
        f"{indent}    _varint(n, out)",
    ]


def _primitive(kind: str, v: str, indent: str) -> list[str]:
    """Check `v` is exactly of `kind` (else raise) and append its encoding to `out`."""
    if kind in ("long", "int"):
        low, high = _LONG if kind == "long" else _INT
        return [
            f"{indent}if type({v}) is not int or not {low} <= {v} <= {high}:",
            f"{indent}    raise TypeError({kind!r})",
            *_number(v, indent),
        ]
    if kind in ("string", "bytes"):
        value = f"{v}.encode()" if kind == "string" else v
        return [
            f"{indent}if type({v}) is not {_PYTYPE[kind]}:",
            f"{indent}    raise TypeError({kind!r})",
            f"{indent}s = {value}",
            *_number("len(s)", indent, signed=False),
            f"{indent}out += s",
        ]
    if kind == "boolean":
        return [
            f"{indent}if {v} is True:",
            f"{indent}    out.append(1)",
            f"{indent}elif {v} is False:",
            f"{indent}    out.append(0)",
            f"{indent}else:",
            f"{indent}    raise TypeError('boolean')",
        ]
    if kind in ("double", "float"):
        pack = "_DOUBLE" if kind == "double" else "_FLOAT"
        return [
            f"{indent}if type({v}) is not float and (type({v}) is not int"
            f" or not -{2**63} <= {v} <= {2**63}):",
            f"{indent}    raise TypeError({kind!r})",
            f"{indent}out += {pack}.pack({v})",
        ]
    return [f"{indent}if {v} is not None:", f"{indent}    raise TypeError('null')"]


def _union(kinds: tuple[str, ...], v: str, indent: str) -> list[str] | None:
    """A union whose branches take distinct Python types (else None: fastavro decides)."""
    pytypes = [_PYTYPE[k] for k in kinds]
    if len(set(pytypes)) != len(pytypes):
        return None  # e.g. long and int, or double and float: which one is fastavro's choice
    if "int" in pytypes and "float" in pytypes:
        return None  # an int fits a double branch too
    if len(kinds) == 2 and "null" in kinds:  # an optional field: the common case, quickest
        null = kinds.index("null")
        return [
            f"{indent}if {v} is None:",
            f"{indent}    out.append({null << 1})",
            f"{indent}else:",
            f"{indent}    out.append({(1 - null) << 1})",
            *_primitive(kinds[1 - null], v, indent + "    "),
        ]
    lines: list[str] = [f"{indent}t = type({v}).__name__"]
    for i, (kind, pytype) in enumerate(zip(kinds, pytypes, strict=True)):
        lines.append(f"{indent}{'if' if i == 0 else 'elif'} t == {pytype!r}:")
        lines.append(f"{indent}    out.append({i << 1})")  # branch indexes stay below 64
        lines += _primitive(kind, v, indent + "    ")
    lines += [f"{indent}else:", f"{indent}    raise TypeError('no union branch')"]
    return lines


def _array(kind: str, v: str, indent: str) -> list[str]:
    """Avro blocks as fastavro writes them: one block of every item, then 0 (empty: 0)."""
    inner = indent + "        "
    return [
        f"{indent}if type({v}) is not list:",
        f"{indent}    raise TypeError('array')",
        f"{indent}if {v}:",
        *_number(f"len({v})", indent + "    ", signed=False),
        f"{indent}    for item in {v}:",
        *_primitive(kind, "item", inner),
        f"{indent}out.append(0)",
    ]


def generate(schema: Mapping[str, Any], prefix: bytes) -> Encoder | None:
    """An encoder writing `prefix` then the record body, or None if the schema is not flat."""
    if schema.get("type") != "record" or len(schema["fields"]) > 200:
        return None
    lines = ["def encode(data):", "    out = bytearray(PREFIX)"]
    defaults: dict[str, Any] = {}
    for i, field in enumerate(schema["fields"]):
        v = f"v{i}"
        if "default" not in field:
            lines.append(f"    {v} = data[{field['name']!r}]")
        elif field["default"] is None:
            lines.append(f"    {v} = data.get({field['name']!r})")
        elif isinstance(field["default"], (bool, int, float, str, list)) and "bytes" not in str(
            field["type"]
        ):
            defaults[f"D{i}"] = field["default"]  # checked like a value when it is used
            lines.append(f"    {v} = data.get({field['name']!r}, D{i})")
        else:
            return None  # defaults of bytes (as text) or maps: fastavro's
        items = _array_items(field["type"])
        if items is not None:
            lines += _array(items, v, "    ")
            continue
        kind = _kind(field["type"])
        if kind is None:
            return None
        if isinstance(kind, tuple):
            union = _union(kind, v, "    ")
            if union is None:
                return None
            lines += union
        else:
            lines += _primitive(kind, v, "    ")
    # Refusals raise inside; the encoder answers None for them (no exception reaches callers).
    body = ["    " + line for line in lines[1:]]
    lines = [
        lines[0],
        "    try:",
        *body,
        "        return bytes(out)",
        "    except (TypeError, ValueError, KeyError, UnicodeError, OverflowError):",
        "        return None",
    ]
    namespace: dict[str, Any] = {
        "PREFIX": prefix,
        "_DOUBLE": _DOUBLE,
        "_FLOAT": _FLOAT,
        "_varint": _varint,
        **defaults,
    }
    exec(compile("\n".join(lines), f"<refold encoder {schema.get('name')}>", "exec"), namespace)
    encode: Encoder = namespace["encode"]
    return encode
