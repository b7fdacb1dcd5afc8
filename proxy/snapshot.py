"""The setup a request runs on: config, keyring, upstream clients and upstream quotas, taken once
when it starts.

Everything derived from one config is built here together (`build_snapshot`) and swapped in
one assignment (`SnapshotHolder.swap`); whatever reads the running config outside a request
(the limiter, the budget watch, the request log, the admin and ops API) reads it from the
holder, so no part of the proxy can run on a config another part has already replaced.

A reload swaps in a new `Snapshot`; requests already running keep theirs to the end (settled,
last byte sent), so a renamed model or upstream can never be looked up in the wrong config.
A snapshot counts the requests holding it; `on_idle` fires when a replaced snapshot's last
request has finished, which is when its upstream clients may be closed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .config import Config
from .limits.quotas import UpstreamQuotas
from .request.authenticate import KeyRing, RuntimeLookup
from .upstream.client import UpstreamClient


@dataclass(eq=False, slots=True)
class Snapshot:
    config: Config
    keyring: KeyRing
    upstreams: dict[str, UpstreamClient]
    quotas: UpstreamQuotas
    users: int = 0
    on_idle: Callable[[Snapshot], None] | None = None  # set once the snapshot was replaced

    def enter(self) -> None:
        self.users += 1

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0 and self.on_idle is not None:
            self.on_idle(self)


def build_snapshot(
    config: Config,
    environ: Mapping[str, str] | None = None,
    running: Mapping[str, UpstreamClient] | None = None,
    runtime: RuntimeLookup | None = None,
) -> Snapshot:
    """The setup of `config`: its keyring, and its upstream clients (a running client whose
    settings did not change is kept; new ones still need `start()`)."""
    keyring = KeyRing(config, environ, runtime)
    upstreams = {}
    for name, upstream in config.upstreams.items():
        current = (running or {}).get(name)
        if current is None or current.config != upstream:
            current = UpstreamClient(name, upstream)
        upstreams[name] = current
    return Snapshot(config, keyring, upstreams, UpstreamQuotas(config))


class SnapshotHolder:
    """The running snapshot: what a new request takes, and what the rest of the proxy reads."""

    __slots__ = ("current",)

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot

    @property
    def config(self) -> Config:
        return self.current.config

    def swap(self, snapshot: Snapshot) -> Snapshot:
        """Swap in a reloaded setup for the next request; returns the replaced one, which the
        requests already running keep until they finish."""
        replaced, self.current = self.current, snapshot
        return replaced
