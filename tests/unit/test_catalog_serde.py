"""Catalog loading, single-object encoding, schema evolution and bad input — no Kafka."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fastavro
import pytest
from refold.core.catalog import Catalog
from refold.core.errors import DecodeError, EncodeError, InputError, SchemaError
from refold.core.inputs import event_from_json, events_from_lines
from refold.core.serde import MAGIC, Codec

REPO_SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def write(directory: Path, name: str, schema: dict | str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(schema if isinstance(schema, str) else json.dumps(schema, indent=2))
    return path


def deposited(fields: list[dict]) -> dict:
    return {"type": "record", "namespace": "bank", "name": "MoneyDeposited", "fields": fields}


V1 = [{"name": "account_id", "type": "string"}, {"name": "amount_cents", "type": "long"}]
V2 = [*V1, {"name": "currency", "type": "string", "default": "EUR"}]


@pytest.fixture
def codec() -> Codec:
    return Codec(Catalog.load([REPO_SCHEMAS]))


def test_bundled_bank_schemas_load() -> None:
    catalog = Catalog.load([REPO_SCHEMAS])
    assert {"bank.AccountOpened", "bank.MoneyDeposited", "bank.MoneyWithdrawn"} <= set(
        catalog.types
    )
    assert catalog.event_type("bank.MoneyDeposited").field_names == (
        "account_id",
        "amount_cents",
        "memo",
    )


def test_round_trip_is_single_object_encoded(codec: Codec) -> None:
    data = {"account_id": "acc-1", "amount_cents": 12_345, "memo": "salary"}
    value = codec.encode("bank.MoneyDeposited", data)
    fingerprint = codec.catalog.event_type("bank.MoneyDeposited").latest.fingerprint
    assert value[:2] == MAGIC and value[2:10] == fingerprint
    assert codec.decode(value) == ("bank.MoneyDeposited", data)


def test_plain_fastavro_decodes_our_records(codec: Codec) -> None:
    """The README's snippet, without Kafka: nothing but fastavro and the .avsc files
    (tests/integration/test_readme.py runs the README's own text against the broker)."""
    value = codec.encode("bank.MoneyWithdrawn", {"account_id": "a", "amount_cents": 7, "memo": ""})
    # --- snippet (kept in sync with README.md) ---
    schemas = {}
    for path in REPO_SCHEMAS.rglob("*.avsc"):
        parsed = fastavro.parse_schema(json.loads(path.read_text()))
        canonical = fastavro.schema.to_parsing_canonical_form(parsed)
        schemas[bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))] = parsed
    assert value[:2] == b"\xc3\x01"
    record = fastavro.schemaless_reader(io.BytesIO(value[10:]), schemas[value[2:10]], None)
    # --- end snippet ---
    assert record == {"account_id": "a", "amount_cents": 7, "memo": ""}


def test_v1_written_is_read_as_v2(tmp_path: Path) -> None:
    old = Codec(
        Catalog.load([write(tmp_path / "old", "MoneyDeposited.avsc", deposited(V1)).parent])
    )
    value = old.encode("bank.MoneyDeposited", {"account_id": "a", "amount_cents": 5})
    both = tmp_path / "new"
    write(both, "MoneyDeposited.avsc", deposited(V1))
    write(both, "MoneyDeposited.v2.avsc", deposited(V2))
    new = Codec(Catalog.load([both]))
    assert new.decode(value) == (
        "bank.MoneyDeposited",
        {"account_id": "a", "amount_cents": 5, "currency": "EUR"},
    )
    # and new writes carry the v2 fingerprint
    assert (
        new.encode(
            "bank.MoneyDeposited", {"account_id": "a", "amount_cents": 1, "currency": "USD"}
        )[2:10]
        == new.catalog.event_type("bank.MoneyDeposited").latest.fingerprint
    )


def test_upcaster_where_resolution_is_not_enough(tmp_path: Path) -> None:
    v1 = [{"name": "account_id", "type": "string"}, {"name": "amount", "type": "double"}]
    old = Codec(Catalog.load([write(tmp_path / "o", "MoneyDeposited.avsc", deposited(v1)).parent]))
    value = old.encode("bank.MoneyDeposited", {"account_id": "a", "amount": 12.34})
    d = tmp_path / "n"
    write(d, "MoneyDeposited.avsc", deposited(v1))
    write(d, "MoneyDeposited.v2.avsc", deposited(V1))
    catalog = Catalog.load([d])
    catalog.register_upcaster(
        "bank.MoneyDeposited",
        1,
        lambda data: {
            "account_id": data["account_id"],
            "amount_cents": round(data["amount"] * 100),
        },
    )
    assert Codec(catalog).decode(value)[1] == {"account_id": "a", "amount_cents": 1234}


def test_unknown_fingerprint_asks_the_registry_fallback(tmp_path: Path) -> None:
    old = Codec(Catalog.load([write(tmp_path / "o", "MoneyDeposited.avsc", deposited(V1)).parent]))
    value = old.encode("bank.MoneyDeposited", {"account_id": "a", "amount_cents": 5})
    asked = []

    def lookup(fp: bytes):
        asked.append(fp)
        return old.catalog.by_fingerprint.get(fp)

    assert Codec(Catalog.load([REPO_SCHEMAS]), lookup).decode(value)[1]["amount_cents"] == 5
    assert len(asked) == 1
    with pytest.raises(DecodeError, match="unknown writer schema"):
        Codec(Catalog.load([REPO_SCHEMAS])).decode(value)


@pytest.mark.parametrize(
    "value, reason",
    [
        (b"hello world", "not an Avro single-object"),
        (b"\xc3\x01\x00", "not an Avro single-object"),
        (None, "tombstone"),
    ],
)
def test_foreign_bytes_are_a_clear_decode_error(codec: Codec, value, reason) -> None:
    with pytest.raises(DecodeError, match=reason):
        codec.decode(value)


def test_truncated_body_is_a_decode_error(codec: Codec) -> None:
    value = codec.encode("bank.MoneyDeposited", {"account_id": "acc-1", "amount_cents": 5})
    with pytest.raises(DecodeError):
        codec.decode(value[:-3])


@pytest.mark.parametrize(
    "obj, reason",
    [
        ({"type": "bank.Nope", "key": "a", "data": {}}, "unknown event type 'bank.Nope'"),
        ({"type": "bank.MoneyDeposited", "key": "a", "data": {"account_id": "a"}}, "amount_cents"),
        (
            {
                "type": "bank.MoneyDeposited",
                "key": "a",
                "data": {"account_id": "a", "amount_cents": "12"},
            },
            "amount_cents",
        ),
        ({"type": "bank.MoneyDeposited", "data": {"account_id": "a", "amount_cents": 1}}, "key"),
        ({"type": "bank.MoneyDeposited", "key": "", "data": {}}, "key"),
        ({"key": "a", "data": {}}, "type"),
        ({"type": "bank.MoneyDeposited", "key": "a", "data": [1]}, "data"),
        (
            {
                "type": "bank.MoneyDeposited",
                "key": "a",
                "data": {"account_id": "a", "amount_cents": 1, "extra": 2},
            },
            "extra",
        ),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_events_are_rejected_with_a_reason(codec: Codec, obj, reason) -> None:
    with pytest.raises(InputError, match=reason):
        event_from_json(obj, codec)


def test_jsonl_reports_every_bad_line_with_its_number(codec: Codec) -> None:
    good = json.dumps(
        {"type": "bank.MoneyDeposited", "key": "a", "data": {"account_id": "a", "amount_cents": 1}}
    )
    lines = [good, "{not json", "", good, json.dumps({"type": "bank.X", "key": "k", "data": {}})]
    events, problems = events_from_lines(lines, codec)
    assert len(events) == 2
    assert [(p.line, p.reason.split(":")[0]) for p in problems] == [
        (2, "invalid JSON"),
        (5, "unknown event type 'bank.X'"),
    ]


def test_encode_error_names_the_field(codec: Codec) -> None:
    with pytest.raises(EncodeError, match="amount_cents"):
        codec.encode("bank.MoneyDeposited", {"account_id": "a", "amount_cents": "x"})


def test_broken_schema_directory_names_file_and_line(tmp_path: Path) -> None:
    write(
        tmp_path,
        "bank/Good.avsc",
        {"type": "record", "namespace": "bank", "name": "Good", "fields": []},
    )
    bad = write(tmp_path, "bank/Bad.avsc", '{\n  "type": "record",\n  "name": \n}')
    with pytest.raises(SchemaError, match=rf"{bad}:4: invalid JSON"):
        Catalog.load([tmp_path])


@pytest.mark.parametrize(
    "name, schema, reason",
    [
        ("Wrong.avsc", deposited(V1), "is named"),
        ("MoneyDeposited.avsc", {**deposited(V1), "namespace": None}, "namespace"),
        (
            "MoneyDeposited.avsc",
            {
                "type": "record",
                "namespace": "bank",
                "name": "MoneyDeposited",
                "fields": [{"name": "x", "type": "nope"}],
            },
            "invalid Avro",
        ),
        ("MoneyDeposited.avsc", {"type": "enum", "name": "E", "symbols": ["A"]}, "Avro record"),
        ("money.txt.avsc", deposited(V1), "file name"),
    ],
)
def test_invalid_schemas_are_rejected(tmp_path: Path, name, schema, reason) -> None:
    if isinstance(schema, dict) and schema.get("namespace", "x") is None:
        schema = {k: v for k, v in schema.items() if k != "namespace"}
    write(tmp_path, name, schema)
    with pytest.raises(SchemaError, match=reason):
        Catalog.load([tmp_path])


def test_clashing_schemas_across_directories(tmp_path: Path) -> None:
    write(tmp_path / "a", "MoneyDeposited.avsc", deposited(V1))
    write(tmp_path / "b", "MoneyDeposited.avsc", deposited(V2))
    with pytest.raises(SchemaError, match="also defined by"):
        Catalog.load([tmp_path / "a", tmp_path / "b"])


def test_version_gap_is_rejected(tmp_path: Path) -> None:
    write(tmp_path, "MoneyDeposited.avsc", deposited(V1))
    write(tmp_path, "MoneyDeposited.v3.avsc", deposited(V2))
    with pytest.raises(SchemaError, match="lacks version"):
        Catalog.load([tmp_path])


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="does not exist"):
        Catalog.load([tmp_path / "nope"])


def test_an_unknown_type_says_where_types_come_from(codec: Codec) -> None:
    with pytest.raises(SchemaError) as known:
        codec.catalog.event_type("bank.Nope")
    assert "known types: bank.AccountClosed" in (known.value.hint or "")
    with pytest.raises(SchemaError) as empty:  # outside a project: no schemas/ folder, no app
        Catalog().event_type("bank.MoneyDeposited")
    assert "REFOLD_SCHEMAS_DIR" in (empty.value.hint or "")
    assert "REFOLD_APP" in (empty.value.hint or "")


@pytest.mark.parametrize(
    "amount",
    [5.5, 2.9, 5.0, True, False, "7", None, 2**63, -(2**63) - 1, float("nan"), [1]],
)
def test_encode_refuses_what_avro_would_coerce(codec: Codec, amount: object) -> None:
    data = {"account_id": "a", "amount_cents": amount, "memo": ""}
    with pytest.raises(EncodeError, match="amount_cents"):
        codec.encode("bank.MoneyDeposited", data)
    with pytest.raises(InputError, match="amount_cents"):
        event_from_json({"type": "bank.MoneyDeposited", "key": "a", "data": data}, codec)


@pytest.mark.parametrize("amount", [0, -1, 2**63 - 1, -(2**63)])
def test_encode_takes_every_long(codec: Codec, amount: int) -> None:
    data = {"account_id": "a", "amount_cents": amount, "memo": ""}
    value = codec.encode("bank.MoneyDeposited", data)
    assert codec.decode(value) == ("bank.MoneyDeposited", data)


def test_strict_check_covers_int_boolean_double_and_nested_numbers() -> None:
    from refold.core.serde import strict_check

    flat = fastavro.parse_schema(
        {
            "type": "record",
            "name": "F",
            "fields": [
                {"name": "i", "type": "int"},
                {"name": "b", "type": "boolean"},
                {"name": "d", "type": "double"},
            ],
        }
    )
    check = strict_check(flat)
    assert check is not None
    check({"i": 2**31 - 1, "b": False, "d": 3})
    for bad in ({"i": 2**31}, {"b": 1}, {"d": "5.5"}, {"d": True}, {"i": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            check({"i": 1, "b": True, "d": 1.0, **bad})
    nested = fastavro.parse_schema(
        {
            "type": "record",
            "name": "N",
            "fields": [{"name": "xs", "type": {"type": "array", "items": "long"}}],
        }
    )
    check = strict_check(nested)
    assert check is not None
    check({"xs": [1, 2]})
    with pytest.raises(ValueError):
        check({"xs": [1, 2.5]})
    strings = fastavro.parse_schema(
        {"type": "record", "name": "S", "fields": [{"name": "s", "type": "string"}]}
    )
    assert strict_check(strings) is None  # fastavro refuses non-strings itself


def test_a_binary_jsonl_line_is_a_problem_on_its_line(codec: Codec) -> None:
    good = b'{"type": "bank.AccountOpened", "key": "a", "data": {"account_id": "a", "owner": "o"}}'
    events, problems = events_from_lines([good + b"\n", b"\xff\xfe\x00junk\n"], codec)
    assert len(events) == 1
    assert [(p.line, "UTF-8" in p.reason) for p in problems] == [(2, True)]
