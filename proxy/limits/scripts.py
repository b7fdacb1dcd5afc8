"""The store's Lua scripts, one job per file: the only definition of the limit, lease and budget
rules. Redis runs them with EVALSHA; `MemoryStore` runs the same source in an embedded Lua 5.1.

What the scripts share (the constants, `int`, `named`, the clock and the bucket rules) is written
once, in `lua/prelude.lua`; `source` puts its code on each script's first line, so the line
number in a script's error is the line of that script's file. KEYS and ARGV of each script are
laid out by `proxy.limits.layout`.
"""

from __future__ import annotations

from importlib import resources

ADMIT = "admit.lua"
SETTLE = "settle.lua"
RENEW = "renew.lua"
HOLD = "hold.lua"  # a target's hold shared with every replica (`proxy.request.shared_holds`)
HELD = "held.lua"  # ... and every replica's poll of them
PRELUDE = "prelude.lua"


def _read(name: str) -> str:
    return resources.files("proxy.limits").joinpath("lua", name).read_text(encoding="utf-8")


def source(name: str) -> str:
    """Script `name` as the stores run it: the prelude, then the script."""
    return assemble(_read(name))


def assemble(script: str) -> str:
    """`script` after the prelude's code, which shares the script's first line."""
    return f"{one_line(_read(PRELUDE))} {script}"


def one_line(lua: str) -> str:
    """The code of `lua` on one line: its comment lines left out, the others joined by spaces.

    Lua reads a newline as a space, except in a comment or a long string, so `lua` may hold
    neither after code on a line."""
    code = [line.strip() for line in lua.splitlines() if line.strip() and not line.strip().startswith("--")]
    unsafe = [line for line in code if "--" in line or "[[" in line or "[=" in line]
    if unsafe:
        raise ValueError(f"a comment or long string would swallow the rest of the line: {unsafe[0]}")
    return " ".join(code)
