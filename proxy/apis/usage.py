"""The usage of one agent-API call, in one vocabulary whichever API reported it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..tokens import CHARS_PER_TOKEN


@dataclass(frozen=True, slots=True)
class ApiUsage:
    """Token counts of one call.

    `input_tokens` is the WHOLE prompt, cached or not (OpenAI's meaning; for Anthropic it is
    input_tokens + cache_creation_input_tokens + cache_read_input_tokens). `cached_input_tokens`
    (read from the cache) and `cache_write_tokens` (written to it) are parts of it;
    `reasoning_tokens` is part of `output_tokens`.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def uncached_input_tokens(self) -> int:
        """Input billed at the plain input price: neither read from nor written to the cache."""
        return max(0, self.input_tokens - self.cached_input_tokens - self.cache_write_tokens)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def count(value: Any) -> int:
    """A reported token count: a positive int, else 0 (a malformed field never raises)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def estimated_output(chars: int) -> int:
    """Output tokens of `chars` characters of produced text: ceil(chars / 4), as the estimator counts."""
    return -(-chars // CHARS_PER_TOKEN)
