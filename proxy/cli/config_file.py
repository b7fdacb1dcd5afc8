"""The config file of a CLI command: `--config FILE` or `$LLM_PROXY_CONFIG`, loaded or exit 1
with every problem listed (shared by `llm-proxy` and `llm-proxy usage`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..config import Config, load_config
from ..errors import ConfigError

CONFIG_ENV = "LLM_PROXY_CONFIG"


def config_path(given: str | None) -> str:
    path = given or os.environ.get(CONFIG_ENV)
    if not path:
        raise SystemExit(f"llm-proxy: no config: pass --config FILE or set {CONFIG_ENV}")
    return str(Path(path).resolve())


def load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(1) from None
