"""Error base types, below every other module: `config` and the `data` package both raise
them, and neither imports the other for it (config -> data -> errors, one way)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and the fix."""
