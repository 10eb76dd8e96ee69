"""Avro schemas shipped with refold (package data): the bank example's, one .avsc per type and version."""
