"""The setup a request runs on: config, keyring and upstream clients, taken once when it starts.

A reload swaps in a new `Snapshot`; requests already running keep theirs to the end (settled,
last byte sent), so a renamed model or upstream can never be looked up in the wrong config.
A snapshot counts the requests holding it; `on_idle` fires when a replaced snapshot's last
request has finished, which is when its upstream clients may be closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .auth import KeyRing
from .config import Config
from .forwarding.upstream import UpstreamClient


@dataclass(eq=False, slots=True)
class Snapshot:
    config: Config
    keyring: KeyRing
    upstreams: dict[str, UpstreamClient]
    users: int = 0
    on_idle: Callable[[Snapshot], None] | None = None  # set once the snapshot was replaced

    def enter(self) -> None:
        self.users += 1

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0 and self.on_idle is not None:
            self.on_idle(self)
