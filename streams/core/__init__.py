"""Core: errors, configuration, the event and its envelope, the Avro codec and catalog, the fold
and decider APIs, app loading. Imports nothing else of refold."""
