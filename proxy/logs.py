"""Log lines as JSON, one object a line, whatever the message holds (quotes, newlines, tracebacks).

Every logger of the process goes through one handler on the root logger: the proxy's own
(`proxy.*`), uvicorn's (`uvicorn.error`; its access log is off), and Python warnings. A line reads
`{"event": "log", "level": ..., "logger": ..., "message": ...}`, with `traceback` (and `stack`) when
the record carries them. `logging_config(level)` is the `dictConfig` that `serve` hands to uvicorn,
which applies it in its own process and again in every worker it spawns under `--workers N`.
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any

import orjson


class JsonFormatter(logging.Formatter):
    """One JSON object per record, without a newline (the handler ends the line)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "event": "log",
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["traceback"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(line).decode()
        except orjson.JSONEncodeError:  # a lone surrogate (bytes smuggled through surrogateescape)
            return orjson.dumps({k: _valid_utf8(v) for k, v in line.items()}).decode()


def _message(record: logging.LogRecord) -> str:
    """The %-formatted message; a call whose arguments do not fit its format still gives a line."""
    try:
        return record.getMessage()
    except Exception:
        return f"{record.msg!s} (unformattable log arguments: {record.args!r})"


def _valid_utf8(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_formatter() -> JsonFormatter:
    """The `dictConfig` factory: also routes `warnings.warn` through logging, so a warning is a
    JSON line too (`captureWarnings` is per process, and uvicorn's workers apply only the config)."""
    logging.captureWarnings(True)
    return JsonFormatter()


def logging_config(level: str) -> dict[str, Any]:
    """Every logger to one stderr handler with the JSON formatter, at `level` (`info`, `warning`...)."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,  # module loggers (`proxy.gateway`...) exist before this runs
        "formatters": {"json": {"()": json_formatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["stderr"]},
        # uvicorn's loggers carry no handler of their own: they propagate to the root's
        "loggers": {
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": level, "handlers": [], "propagate": True},
        },
    }


def configure_logging(level: str) -> None:
    logging.config.dictConfig(logging_config(level))
