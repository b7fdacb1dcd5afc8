"""Running the app under uvicorn (uvloop + httptools when installed), one or N workers."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import tempfile

import uvicorn

from .config import Config
from .metrics import MULTIPROC_ENV

FACTORY = "proxy.app:app_from_env"


def _fastest(module: str, fast: str, default: str) -> str:
    return fast if importlib.util.find_spec(module) is not None else default


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format='{"event": "log", "level": "%(levelname)s", '
                        '"logger": "%(name)s", "message": "%(message)s"}')


def prepare_multiprocess_metrics(workers: int) -> str | None:
    """Under --workers N, every worker writes metrics to one fresh directory that /metrics reads."""
    if workers <= 1 and not os.environ.get(MULTIPROC_ENV):
        return None
    path = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="llm-proxy-metrics-")
    os.makedirs(path, exist_ok=True)
    for stale in os.listdir(path):  # samples of an earlier run would be added to ours
        if stale.endswith(".db"):
            os.remove(os.path.join(path, stale))
    os.environ[MULTIPROC_ENV] = path
    return path


def serve(config: Config, *, host: str, port: int, workers: int = 1) -> None:
    """Serve the config in $LLM_PROXY_CONFIG (each worker loads it through the factory)."""
    configure_logging(config.log_level)
    prepare_multiprocess_metrics(workers)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it; by then everything is settled
    # and flushed, so the re-raised signal ends the process with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run(
        FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop=_fastest("uvloop", "uvloop", "asyncio"),
        http=_fastest("httptools", "httptools", "h11"),
        log_level=config.log_level,
        access_log=False,
        timeout_graceful_shutdown=config.shutdown_grace_s,
        server_header=False,
    )
