"""The `llm-proxy` command line: `commands` parses and dispatches (serve, demo, check-config, prices,
new-key, hash-key, usage, keys, teams); `usage`, `what_if` and `registry` hold the longer commands,
`config_file` finds and loads the config file for them. `main` is the console script's entry point."""

from .commands import main

__all__ = ["main"]
