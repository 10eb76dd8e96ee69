"""The bank domain's write side: the `accounts` decider (commands with no-overdraft invariants)."""
