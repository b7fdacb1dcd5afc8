"""Where the registry lives in the store.

    llmrl:{_registry}:keys | :teams            hash name -> entry JSON (digests only)
    llmrl:{_registry}:keys:rev | :teams:rev    hash name -> registry version of its last write
    llmrl:{_registry}:keys:changed | ...       zset name -> version of its last write (deleted
                                               names too): what a cache fetches to catch up
    llmrl:{_registry}:version                  string, +1 on every change (what replicas poll)
    llmrl:{_registry}:audit                    zset "<version> <record JSON>" scored by ms, 90 days
    llmrl:{<team>}:x:<credential id>           revocation fence: string "ms from which this
                                               credential is refused" (0: revoked), under the
                                               team's hash tag so the admit script can read it

The registry's own keys share one hash tag (one Cluster slot: the write script is atomic). No
team is named `_registry` (names start with a letter or digit). The prefix must be the one the
limits store uses (`proxy.limits.layout.DEFAULT_PREFIX`), so fences sit beside the team's counters.
"""

from __future__ import annotations

from typing import Literal

DEFAULT_PREFIX = "llmrl"
Kind = Literal["keys", "teams"]


class RegistryLayout:
    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.base = f"{prefix}:{{_registry}}"
        self.version = f"{self.base}:version"
        self.audit = f"{self.base}:audit"

    def entries(self, kind: Kind) -> str:
        return f"{self.base}:{kind}"

    def revs(self, kind: Kind) -> str:
        return f"{self.base}:{kind}:rev"

    def changed(self, kind: Kind) -> str:
        return f"{self.base}:{kind}:changed"

    def write_keys(self, kind: Kind) -> list[str]:
        return [self.entries(kind), self.revs(kind), self.version, self.audit, self.changed(kind)]

    def fence(self, team: str, credential_id: str) -> str:
        return f"{self.prefix}:{{{team}}}:x:{credential_id}"
