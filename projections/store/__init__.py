"""Stores: the store port, RocksDB and in-memory implementations, versions on disk, the contract suite."""
