"""The store's Lua scripts, one job per file: the only definition of the limit, lease and budget
rules. Redis runs them with EVALSHA; `MemoryStore` runs the same files in an embedded Lua 5.1.

KEYS and ARGV of each script are laid out by `proxy.limits.layout`.
"""

from __future__ import annotations

from importlib import resources

ADMIT = "admit.lua"
SETTLE = "settle.lua"
RENEW = "renew.lua"


def source(name: str) -> str:
    return resources.files("proxy.limits").joinpath("lua", name).read_text(encoding="utf-8")
