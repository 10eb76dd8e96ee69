"""Stores: the store port, RocksDB and in-memory implementations, versions on disk, and the
contract suite every store passes."""
