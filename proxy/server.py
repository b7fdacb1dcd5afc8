"""Running the app under uvicorn (uvloop + httptools when installed), one or N workers."""

from __future__ import annotations

import importlib.util
import logging

import uvicorn

from .config import Config

FACTORY = "proxy.app:app_from_env"


def _fastest(module: str, fast: str, default: str) -> str:
    return fast if importlib.util.find_spec(module) is not None else default


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format='{"event": "log", "level": "%(levelname)s", '
                        '"logger": "%(name)s", "message": "%(message)s"}')


def serve(config: Config, *, host: str, port: int, workers: int = 1) -> None:
    """Serve the config in $LLM_PROXY_CONFIG (each worker loads it through the factory)."""
    configure_logging(config.log_level)
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
