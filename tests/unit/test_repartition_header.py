"""The repartition record's source header (refold.engine.repartition): what the fold stage reads
back is what the routing stage wrote, whatever the aggregate key holds."""

from __future__ import annotations

from refold.core.config import Config
from refold.engine.repartition import SOURCE_HEADER, repartition_topic, source_of


class Record:
    """The part of a Kafka message `source_of` reads."""

    def __init__(self, headers: list[tuple[str, bytes | None]] | None) -> None:
        self._headers = headers

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self._headers


def test_the_source_position_comes_back_with_colons_in_the_key() -> None:
    written = b"bank.accounts:4:1234:tenant:acc-1"
    record = Record([("ce_id", b"x"), ("ce_type", b"bank.X"), (SOURCE_HEADER, written)])
    assert source_of(record) == ("bank.accounts", 4, 1234, "tenant:acc-1")  # type: ignore[arg-type]


def test_a_record_without_the_header_has_no_source() -> None:
    assert source_of(Record([("ce_id", b"x")])) is None  # type: ignore[arg-type]
    assert source_of(Record(None)) is None  # type: ignore[arg-type]


def test_each_version_has_its_own_topic() -> None:
    config = Config(app_id="shop")
    assert repartition_topic(config, "owners", 2) == "_shop.owners.v2.repartition"
