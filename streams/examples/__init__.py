"""Example apps, written against the public API only, like a user's app."""
