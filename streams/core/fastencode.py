"""Straight-line Avro encoders for flat event records, generated once per writer schema.

The encoding twin of `refold.core.fastdecode`: fastavro's `schemaless_writer` spends most of its
microseconds per small record on set-up (a stream object, a schema walk). For records whose
fields are strings, longs, ints, booleans, doubles, floats or `["null", T]` of those, this module
writes the encoding code out field by field and compiles it once. The generated function is
strict (no coercion: only an `int` is a long, only a `bool` a boolean, a `float` or an `int`
within 64 bits a double) and returns None for anything it does not take as is (a missing field,
a wrong type, an out-of-range integer, a string that is not UTF-8 encodable): the caller then
encodes with `Codec.encode`, which applies defaults or says precisely what is wrong. The output
is checked byte for byte against fastavro in the unit tests.
"""

from __future__ import annotations

from collections.abc import Callable
from struct import Struct
from typing import Any, cast

Encoder = Callable[[dict[str, Any]], bytes | None]

_DOUBLE = Struct("<d").pack
_FLOAT = Struct("<f").pack
_SIMPLE = ("string", "long", "int", "boolean", "double", "float")
_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
#: One-byte varints: every zigzagged value below 128 (strings up to 63 bytes, longs -64..63).
_SMALL = [bytes((i,)) for i in range(128)]


def varint(n: int) -> bytes:
    """The Avro varint of an already zigzagged, non-negative `n`."""
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _kind(avro_type: Any) -> tuple[str, bool] | None:
    """(primitive, nullable) for a field type this module encodes, else None."""
    if isinstance(avro_type, dict) and "logicalType" not in avro_type:
        avro_type = avro_type.get("type")
    if isinstance(avro_type, str):
        return (avro_type, False) if avro_type in _SIMPLE else None
    if isinstance(avro_type, list) and len(avro_type) == 2 and avro_type[0] == "null":
        inner = _kind(avro_type[1])
        if inner is not None and not inner[1]:
            return inner[0], True
    return None


def _value(kind: str, var: str, out: str, indent: str) -> list[str]:
    """Lines appending the encoding of `var` (of Avro type `kind`) to the list `out`; each
    returns None from the encoder if the value is not exactly of that type."""
    if kind == "string":
        return [
            f"{indent}if type({var}) is not str:",
            f"{indent}    return None",
            f"{indent}e = {var}.encode()",
            f"{indent}n = len(e) << 1",
            f"{indent}{out}.append(small[n] if n < 128 else varint(n))",
            f"{indent}{out}.append(e)",
        ]
    if kind in _RANGES:
        low, high = _RANGES[kind]
        return [
            f"{indent}if type({var}) is not int or not {low} <= {var} <= {high}:",
            f"{indent}    return None",
            f"{indent}n = ({var} << 1) ^ ({var} >> 63)",
            f"{indent}{out}.append(small[n] if n < 128 else varint(n))",
        ]
    if kind == "boolean":
        return [
            f"{indent}if type({var}) is not bool:",
            f"{indent}    return None",
            f"{indent}{out}.append(b'\\x01' if {var} else b'\\x00')",
        ]
    pack = "pack_double" if kind == "double" else "pack_float"
    return [
        f"{indent}if type({var}) is not float and (type({var}) is not int"
        f" or not -{2**63} <= {var} <= {2**63}):",
        f"{indent}    return None",
        f"{indent}{out}.append({pack}({var}))",
    ]


def generate(schema: Any, prefix: bytes) -> Encoder | None:
    """An encoder writing `prefix` + the Avro body of a record of `schema`, or None when the
    schema has a field type this module does not handle (fastavro then does it all)."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return None
    fields = schema.get("fields", ())
    kinds = [_kind(f["type"]) for f in fields]
    if any(k is None for k in kinds):
        return None
    lines = ["def encode(data):", "    out = [prefix]", "    try:"]
    for i, (field, kind) in enumerate(zip(fields, kinds, strict=True)):
        primitive, nullable = cast(tuple[str, bool], kind)
        var = f"v{i}"
        # A missing field goes to the caller (fastavro applies its default or refuses it).
        lines.append(f"        {var} = data[{field['name']!r}]")
        if nullable:
            lines += [
                f"        if {var} is None:",
                "            out.append(b'\\x00')",
                "        else:",
                "            out.append(b'\\x02')",
                *_value(primitive, var, "out", "            "),
            ]
        else:
            lines += _value(primitive, var, "out", "        ")
    lines += [
        "    except (KeyError, UnicodeEncodeError, OverflowError):",
        "        return None",
        "    return b''.join(out)",
    ]
    namespace: dict[str, Any] = {
        "prefix": prefix,
        "varint": varint,
        "small": _SMALL,
        "pack_double": _DOUBLE,
        "pack_float": _FLOAT,
    }
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<avro encoder of {schema.get('name')}>", "exec"), namespace)
    return cast(Encoder, namespace["encode"])
