"""Config reload without a restart (`SIGHUP`): keys, limits, budgets, models, upstreams and the
process settings (`log_level`, `alert_webhook_url`, `spend_retention_days`, `shutdown_grace_s`).

A file that does not load is refused with its problems logged, and the running config stays.
Store settings (`store.*`) and `listen` need a restart; so does the part of `shutdown_grace_s`
that uvicorn holds (its wait for in-flight responses at `SIGTERM`, fixed when it starts).
Under `--workers N`, uvicorn's supervisor handles SIGHUP by a rolling restart that keeps an old
worker whenever its replacement cannot start.

Requests already running finish on the snapshot they started with; an upstream client that the
reload replaced is closed once the last of those requests has finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from .config import Config, load_config
from .errors import ConfigError
from .limits.limiter import Limiter
from .observe import RequestLog
from .snapshot import Snapshot, SnapshotHolder, build_snapshot

log = logging.getLogger("proxy.reload")
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")


def apply_log_level(level: str) -> None:
    """Our loggers (they inherit the root's level) and uvicorn's, as `serve` set them at start."""
    numeric = logging.getLevelName(level.upper())
    logging.getLogger().setLevel(numeric)
    for name in UVICORN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)


class Reloader:
    def __init__(
        self,
        snapshots: SnapshotHolder,
        limiter: Limiter,
        path: str | None,
        environ: Mapping[str, str] | None = None,
        request_log: RequestLog | None = None,
        on_config: Callable[[Config], None] | None = None,
    ) -> None:
        self.snapshots = snapshots
        self.limiter = limiter
        self.path = path
        self.environ = environ
        self.request_log = request_log
        self.on_config = on_config  # told every config applied, for what follows it (metrics)
        self._lock = asyncio.Lock()  # two quick SIGHUPs apply one after the other
        self._draining: list[Snapshot] = []  # replaced snapshots some requests still run on
        self._closing: set[asyncio.Task[None]] = set()

    async def reload(self) -> bool:
        if self.path is None:
            log.warning("reload asked, but the app was not started from a config file")
            return False
        try:
            config = load_config(self.path, self.environ)
        except ConfigError as exc:
            log.error("config reload refused, keeping the running config: %s", "; ".join(exc.problems))
            return False
        try:
            await self.apply(config)
        except Exception:  # a bug: the signal handler's task must not die silently
            log.exception("config reload failed")
            return False
        return True

    async def apply(self, config: Config) -> None:
        async with self._lock:
            running = self.snapshots.config
            if config.store != running.store:
                log.warning("store settings changed: they take effect at the next restart")
                config = config.model_copy(update={"store": running.store})
            if config.listen != running.listen:
                log.warning("listen changed: it takes effect at the next restart")
            running_clients = self.snapshots.current.upstreams
            snapshot = build_snapshot(config, self.environ, running_clients, self.snapshots.current.keyring.runtime)
            for name, client in snapshot.upstreams.items():
                if client is not running_clients.get(name):
                    await client.start()  # the keyring is built: nothing can fail after this
            replaced = self.snapshots.swap(snapshot)
            self._follow_settings(config, running)
            replaced.on_idle = self._drained
            self._draining.append(replaced)
            if replaced.users == 0:
                self._drained(replaced)
            log.warning(
                "config reloaded: %d upstreams, %d models, %d teams, %d keys",
                len(config.upstreams),
                len(config.models),
                len(config.teams),
                len(config.keys),
            )

    def _follow_settings(self, config: Config, running: Config) -> None:
        """The settings read outside the request path."""
        if config.log_level != running.log_level:
            apply_log_level(config.log_level)
            if self.request_log is not None:
                self.request_log.set_level(config.log_level)
        for store in (self.limiter.store, self.limiter.fallback):
            if store is not None:
                store.retention_days = config.spend_retention_days
        if config.shutdown_grace_s != running.shutdown_grace_s:
            log.warning(
                "shutdown_grace_s changed to %ss: the journal flush at shutdown uses it now; the wait "
                "for in-flight responses keeps the value the server started with until a restart",
                config.shutdown_grace_s,
            )
        if self.on_config is not None:
            self.on_config(config)

    # -- replaced upstream clients ---------------------------------------------------------------
    def _drained(self, snapshot: Snapshot) -> None:
        """The last request on a replaced snapshot finished: close what nothing uses any more."""
        task = asyncio.get_running_loop().create_task(self._close_unused())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_unused(self) -> None:
        live = [self.snapshots.current, *(s for s in self._draining if s.users)]
        in_use = {id(client) for snapshot in live for client in snapshot.upstreams.values()}
        idle = [s for s in self._draining if not s.users]
        self._draining = [s for s in self._draining if s.users]
        unused = {id(c): c for s in idle for c in s.upstreams.values() if id(c) not in in_use}
        for client in unused.values():
            await client.close()
            log.info("upstream client '%s' replaced by a reload: closed after its last request", client.name)

    async def close(self) -> None:
        """At shutdown: every client of a replaced snapshot (the running ones close with the app)."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        current = {id(client) for client in self.snapshots.current.upstreams.values()}
        for snapshot in self._draining:
            for client in snapshot.upstreams.values():
                if id(client) not in current:
                    await client.close()
        self._draining.clear()
