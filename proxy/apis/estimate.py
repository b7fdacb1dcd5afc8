"""Input-token estimates for the agent APIs' prompts: every text part of items and blocks, / 4.

Like `proxy.tokens`, every function accepts any JSON value and never raises; a part of an
unknown shape counts the text fields it has. Images and documents count a fixed charge.
"""

from __future__ import annotations

from typing import Any

from ..tokens import IMAGE_PART_TOKENS, MESSAGE_OVERHEAD_TOKENS, estimate_text_tokens, json_tokens

# fields whose string value the model reads as text, in Responses items and Anthropic blocks
TEXT_FIELDS = ("text", "content", "arguments", "output", "name", "input", "thinking", "refusal", "summary")
# fields that may hold nested parts (message content, tool results, reasoning summaries)
NESTED_FIELDS = ("content", "output", "summary")
IMAGE_TYPES = frozenset({"input_image", "image", "image_url", "document", "input_file"})
MAX_DEPTH = 8  # parts nest a few levels at most; the body reader already bounds JSON depth


def part_tokens(part: Any, depth: int = 0) -> int:
    """A string, a list of parts, or one part (an item or a content block) with its text fields."""
    if isinstance(part, str):
        return estimate_text_tokens(part)
    if depth > MAX_DEPTH:
        return 0
    if isinstance(part, list):
        return sum(part_tokens(item, depth + 1) for item in part)
    if not isinstance(part, dict):
        return 0
    if part.get("type") in IMAGE_TYPES:
        return IMAGE_PART_TOKENS
    total = 0
    for field in TEXT_FIELDS:
        value = part.get(field)
        if isinstance(value, str):
            total += estimate_text_tokens(value)
        elif field in NESTED_FIELDS and isinstance(value, list):
            total += part_tokens(value, depth + 1)
        elif field == "input" and isinstance(value, dict):  # an Anthropic tool_use block's arguments
            total += json_tokens(value)
    return total


def items_tokens(items: Any) -> int:
    """A prompt given as a string or as a list of messages/items, each with its message overhead."""
    if isinstance(items, str):
        return estimate_text_tokens(items)
    if not isinstance(items, list):
        return 0
    return sum(MESSAGE_OVERHEAD_TOKENS + part_tokens(item) for item in items if isinstance(item, dict))
