"""What every mock wire format shares: the token arithmetic, SSE framing, and a stream script."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson


def text_tokens(value: Any) -> int:
    """Characters of every string in `value` // 4, token-id lists counted one per id; at least 1."""
    chars = 0
    ids = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            ids += 1
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item[key] for key in ("content", "text") if key in item)
    return max(1, chars // 4 + ids)


def named_event(name: str, payload: dict[str, Any]) -> bytes:
    """One SSE event with its `event:` line, as the Responses and Anthropic APIs send them."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


@dataclass(frozen=True, slots=True)
class Tally:
    """Usage the mock reported, in the mock's stats vocabulary (prompt includes cache reads/writes)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Output:
    """How much one request produces under its fault: words of text, reasoning, cache split."""

    words: list[str]
    truncated: bool  # the cap stopped it before the text was complete
    reasoning_tokens: int
    output_tokens: int  # reasoning + words, times the fault's usage_multiplier
    input_tokens: int  # every input token, cached or not
    cached_tokens: int  # read from the cache (part of input_tokens)
    cache_write_tokens: int  # written to the cache (part of input_tokens)

    @property
    def text(self) -> str:
        return "".join(self.words)


def plan_output(input_tokens: int, cap: int | None, fault: dict[str, Any], chunks: int) -> Output:
    """The deterministic output for a request: `chunks` words, reasoning first, both within `cap`."""
    available = int(fault.get("chunks", chunks))
    reasoning = max(0, int(fault.get("reasoning_tokens", 0)))
    if cap is not None:
        reasoning = min(reasoning, cap)
        count = max(0, min(available, cap - reasoning))
    else:
        count = available
    cached = min(max(0, int(fault.get("cached_tokens", 0))), input_tokens)
    written = min(max(0, int(fault.get("cache_write_tokens", 0))), input_tokens - cached)
    multiplier = float(fault.get("usage_multiplier", 1.0))
    return Output(
        words=[f"word{i}" if i == 0 else f" word{i}" for i in range(count)],
        truncated=count < available,
        reasoning_tokens=reasoning,
        output_tokens=round((count + reasoning) * multiplier),
        input_tokens=input_tokens,
        cached_tokens=cached,
        cache_write_tokens=written,
    )


@dataclass(slots=True)
class Script:
    """A stream as frames: `head`, one frame per word in `deltas`, then `tail`.

    Faults count in `deltas` (cut_after_chunks, bad_sse_line, error_after_chunks); `error_frame(n)`
    is the API's error event sent after n deltas; `tally` is reported once the tail is sent.
    """

    head: list[bytes]
    deltas: list[bytes]
    tail: list[bytes]
    tally: Tally | None
    error_frame: Callable[[int], bytes]
