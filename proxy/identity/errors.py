"""Why a token was refused: defined with every other exception in `proxy.errors`."""

from __future__ import annotations

from ..errors import TOKEN_MESSAGES as MESSAGES
from ..errors import TokenReason as Reason
from ..errors import TokenRejected

__all__ = ["MESSAGES", "Reason", "TokenRejected"]
