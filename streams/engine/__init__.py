"""The engine: the fold runtime, rebuild, replay, time travel, the command processor, status,
the worker."""
