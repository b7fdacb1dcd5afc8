"""The context-window policy: refuse (or truncate) before a request costs money."""

from __future__ import annotations

from ..config import Model
from ..errors import ContextLengthExceeded
from ..tokens import message_tokens


def _exceeded(model_name: str, window: int, prompt: int, output: int) -> ContextLengthExceeded:
    return ContextLengthExceeded(
        f"This model's maximum context length is {window} tokens. However, you requested about "
        f"{prompt + output} tokens ({prompt} in the messages, {output} in the completion). "
        "Please reduce the length of the messages or completion.",
        param="messages",
    )


def apply_context_policy(model_name: str, model: Model, endpoint: str, body: dict, prompt: int, output: int) -> int:
    """Returns the (possibly reduced) prompt estimate; may drop old messages from `body` in place."""
    window = model.context_window
    if window is None or prompt + output <= window:
        return prompt
    if model.context_overflow != "truncate" or endpoint != "chat":
        raise _exceeded(model_name, window, prompt, output)
    messages: list = body["messages"]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
    always_kept = {i for i, m in enumerate(messages) if m.get("role") in ("system", "developer")} | {last_user}
    dropped: set[int] = set()
    for index in (i for i in range(len(messages)) if i not in always_kept):  # oldest first
        dropped.add(index)
        prompt -= message_tokens(messages[index])  # each message is estimated once: linear, not quadratic
        if prompt + output <= window:
            body["messages"] = [m for i, m in enumerate(messages) if i not in dropped]
            return prompt
    raise _exceeded(model_name, window, prompt, output)
