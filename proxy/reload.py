"""Config reload without a restart (`SIGHUP`): keys, limits, budgets, models and upstreams.

A file that does not load is refused with its problems logged, and the running config stays.
Store settings (`store.*`) need a restart. Under `--workers N`, uvicorn's supervisor handles
SIGHUP by a rolling restart that keeps an old worker whenever its replacement cannot start.
"""

from __future__ import annotations

import logging

from .auth import KeyRing
from .config import Config, ConfigError, load_config
from .forwarding.upstream import UpstreamClient
from .gateway import Gateway

log = logging.getLogger("proxy.reload")


class Reloader:
    def __init__(self, gateway: Gateway, path: str | None, environ: dict[str, str] | None = None):
        self.gateway = gateway
        self.path = path
        self.environ = environ
        self._retired: list[UpstreamClient] = []  # replaced clients: requests in flight keep them

    async def reload(self) -> bool:
        if self.path is None:
            log.warning("reload asked, but the app was not started from a config file")
            return False
        try:
            config = load_config(self.path, self.environ)
        except ConfigError as exc:
            log.error("config reload refused, keeping the running config: %s", "; ".join(exc.problems))
            return False
        await self.apply(config)
        return True

    async def apply(self, config: Config) -> None:
        gateway = self.gateway
        if config.store != gateway.config.store:
            log.warning("store settings changed: they take effect at the next restart")
            config = config.model_copy(update={"store": gateway.config.store})
        upstreams = dict(gateway.upstreams)
        retired = []
        for name, upstream in config.upstreams.items():
            current = upstreams.get(name)
            if current is not None and current.config == upstream:
                continue
            client = UpstreamClient(name, upstream)
            await client.start()
            upstreams[name] = client
            if current is not None:
                retired.append(current)
        retired += [client for name, client in upstreams.items() if name not in config.upstreams]
        upstreams = {name: client for name, client in upstreams.items() if name in config.upstreams}
        gateway.apply(config, KeyRing(config, self.environ), upstreams)
        gateway.budgets.config = config
        # a replaced client may still carry streams and retries of requests admitted before the
        # reload: it stays open (its idle pooled connections time out on their own) until shutdown
        self._retired += retired
        log.warning("config reloaded: %d upstreams, %d models, %d teams, %d keys", len(config.upstreams),
                    len(config.models), len(config.teams), len(config.keys))

    async def close(self) -> None:
        for client in self._retired:
            await client.close()
        self._retired.clear()
