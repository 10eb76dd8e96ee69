"""HTTP: the query server, its fast path, reader processes (replicas), status and command routes."""
