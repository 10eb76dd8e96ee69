"""Straight-line Avro decoders for flat event records, generated once per writer schema.

fastavro's `schemaless_reader` spends most of its ~4-6 µs per small record on per-call set-up
(stream object, schema walk). Event records are usually flat: strings, longs, booleans,
doubles, optional (`["null", T]`) fields and arrays of those (a task status's `parts`). For
those, this module writes the decoding code out field by field (like `dataclasses` writes
`__init__`) and compiles it once; anything else returns None and the codec keeps using
fastavro. The generated code is checked against fastavro in the unit tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from struct import Struct
from typing import Any

_DOUBLE = Struct("<d")
_FLOAT = Struct("<f")
_PRIMITIVES = {"string", "bytes", "long", "int", "boolean", "double", "float", "null"}

Decoder = Callable[[bytes], dict[str, Any]]


def _kind(avro_type: Any) -> str | tuple[str, ...] | None:
    if isinstance(avro_type, str) and avro_type in _PRIMITIVES:
        return avro_type
    if isinstance(avro_type, dict) and avro_type.get("type") in _PRIMITIVES:
        if "logicalType" in avro_type:
            return None  # logical types (timestamps, decimals) need conversions: use fastavro
        return str(avro_type["type"])
    if isinstance(avro_type, list) and all(
        _kind(t) is not None and not isinstance(_kind(t), tuple) for t in avro_type
    ):
        return tuple(str(_kind(t)) for t in avro_type)
    return None


def _varint(var: str, indent: str) -> list[str]:
    return [
        f"{indent}{var} = b[pos]",
        f"{indent}pos += 1",
        f"{indent}if {var} & 0x80:",
        f"{indent}    {var} &= 0x7F",
        f"{indent}    shift = 7",
        f"{indent}    while True:",
        f"{indent}        x = b[pos]",
        f"{indent}        pos += 1",
        f"{indent}        {var} |= (x & 0x7F) << shift",
        f"{indent}        if not x & 0x80:",
        f"{indent}            break",
        f"{indent}        shift += 7",
        f"{indent}{var} = ({var} >> 1) ^ -({var} & 1)",
    ]


def _primitive(kind: str, target: str, indent: str) -> list[str]:
    if kind in ("long", "int"):
        return [*_varint("v", indent), f"{indent}{target} = v"]
    if kind in ("string", "bytes"):
        take = "b[pos:end].decode()" if kind == "string" else "b[pos:end]"
        return [
            *_varint("n", indent),
            f"{indent}end = pos + n",
            f"{indent}if n < 0 or end > size:",
            f"{indent}    raise ValueError('length beyond the end of the record')",
            f"{indent}{target} = {take}",
            f"{indent}pos = end",
        ]
    if kind == "boolean":
        return [f"{indent}{target} = b[pos] == 1", f"{indent}pos += 1"]
    if kind == "double":
        return [f"{indent}{target} = _DOUBLE.unpack_from(b, pos)[0]", f"{indent}pos += 8"]
    if kind == "float":
        return [f"{indent}{target} = _FLOAT.unpack_from(b, pos)[0]", f"{indent}pos += 4"]
    return [f"{indent}{target} = None"]  # null


def _array_items(avro_type: Any) -> str | None:
    """The item kind of an array of a primitive type (`{"type": "array", "items": "string"}`)."""
    if isinstance(avro_type, dict) and avro_type.get("type") == "array":
        kind = _kind(avro_type.get("items"))
        if isinstance(kind, str) and kind != "null":
            return kind
    return None


def _array(kind: str, target: str, indent: str) -> list[str]:
    """Avro blocks: a count (negative: followed by the block's byte size), items, ..., 0."""
    inner = indent + "        "
    return [
        f"{indent}items = []",
        f"{indent}while True:",
        *_varint("count", indent + "    "),
        f"{indent}    if count == 0:",
        f"{indent}        break",
        f"{indent}    if count < 0:",
        f"{indent}        count = -count",
        *_varint("skip", indent + "        "),
        f"{indent}    for _ in range(count):",
        *_primitive(kind, "item", inner),
        f"{inner}items.append(item)",
        f"{indent}{target} = items",
    ]


def generate(schema: Mapping[str, Any], offset: int) -> Decoder | None:
    """A decoder for the record body starting at `offset`, or None if the schema is not flat."""
    if schema.get("type") != "record":
        return None
    lines = ["def decode(b):", f"    pos = {offset}", "    size = len(b)", "    out = {}"]
    for field in schema["fields"]:
        target = f"out[{field['name']!r}]"
        items = _array_items(field["type"])
        if items is not None:
            lines += _array(items, target, "    ")
            continue
        kind = _kind(field["type"])
        if kind is None:
            return None
        if isinstance(kind, tuple):
            lines += _varint("branch", "    ")
            for i, branch in enumerate(kind):
                lines.append(f"    {'if' if i == 0 else 'elif'} branch == {i}:")
                lines += _primitive(branch, target, "        ")
            lines += [
                "    else:",
                "        raise ValueError(f'union branch {branch} out of range')",
            ]
        else:
            lines += _primitive(kind, target, "    ")
    lines += [
        "    if pos != size:",
        "        raise ValueError(f'{size - pos} trailing bytes after the Avro body')",
        "    return out",
    ]
    namespace: dict[str, Any] = {"_DOUBLE": _DOUBLE, "_FLOAT": _FLOAT}
    exec(compile("\n".join(lines), f"<refold decoder {schema.get('name')}>", "exec"), namespace)
    decode: Decoder = namespace["decode"]
    return decode
