"""Running the app under uvicorn (uvloop + httptools when installed), one or N workers."""

from __future__ import annotations

import importlib.util
import os
import resource
import signal
import socket
import sys
import tempfile
from typing import Any

import uvicorn

from .config import Config
from .http.connections import ConnectionGuard
from .logs import configure_logging as configure_logging  # re-exported: `llm-proxy demo` imports it here
from .logs import logging_config
from .metrics import MULTIPROC_ENV

FACTORY = "proxy.app:app_from_env"
STARTUP_FAILURE = 3  # uvicorn's exit status when the app does not start


def _fastest(module: str, fast: str, default: str) -> str:
    return fast if importlib.util.find_spec(module) is not None else default


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


def raise_open_files_limit() -> None:
    """Lift the soft descriptor limit to the hard one (as Go's runtime does): the default soft
    1,024 is below `server.max_connections` plus the upstream pools."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class FollowingServer(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown waits the `shutdown_grace_s` of the config the
    app runs when the shutdown starts, not the one it started with (a SIGHUP may change it)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        from .app import running_grace_s

        grace = running_grace_s(self.config.loaded_app)
        if grace is not None:
            self.config.timeout_graceful_shutdown = grace  # type: ignore[assignment]  # seconds, float works
        await super().shutdown(sockets=sockets)


def serve(config: Config, *, host: str, port: int, workers: int = 1) -> None:
    """Serve the config in $LLM_PROXY_CONFIG (each worker loads it through the factory).

    Logs are JSON lines (proxy.logs): uvicorn applies `log_config` here and again in each worker
    it spawns, which starts from a fresh interpreter and never runs this function."""
    configure_logging(config.log_level)
    prepare_multiprocess_metrics(workers)
    raise_open_files_limit()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it; by then everything is settled
    # and flushed, so the re-raised signal ends the process with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    settings: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "loop": _fastest("uvloop", "uvloop", "asyncio"),
        # httptools, with header limits and timeouts; uvicorn annotates a class, calls any factory
        "http": ConnectionGuard(config.server).protocol(),
        "log_level": config.log_level,
        "log_config": logging_config(config.log_level),
        "access_log": False,
        # uvicorn annotates int, hands the value to asyncio.wait_for (seconds as a float work)
        "timeout_graceful_shutdown": config.shutdown_grace_s,
        "server_header": False,
    }
    if workers > 1:
        # uvicorn's supervisor builds each worker's server itself: the grace period a worker waits
        # is the one of the config file when that worker was started
        uvicorn.run(FACTORY, **settings)
        return
    server = FollowingServer(uvicorn.Config(FACTORY, **settings))
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
