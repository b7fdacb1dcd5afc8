"""Reading reported token counts: the agent APIs' usage becomes the project's one `Usage`."""

from __future__ import annotations

from typing import Any

from ..tokens import CHARS_PER_TOKEN


def count(value: Any) -> int:
    """A reported token count: a positive int, else 0 (a malformed field never raises)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def estimated_output(chars: int) -> int:
    """Output tokens of `chars` characters of produced text: ceil(chars / 4), as the estimator counts."""
    return -(-chars // CHARS_PER_TOKEN)
