"""The bastion's log lines: one record per line, as text or as JSON.

Text (the default) is ``TIME LEVEL LOGGER: MESSAGE``; ``--log-format json`` writes one
JSON object per line with ``time`` (RFC 3339 UTC), ``level``, ``logger``, ``message``
and, for an audit event, its fields (``event``, ``code``, ``result``, ``user``,
``device``, ``addr``). A field that is unset is left out, never written as ``None``.
No record can forge another: the text form escapes every control character
(:func:`bastion.audit.escape_control`), and JSON escapes them by itself.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from bastion.audit import escape_control
from bastion.config import LOG_FORMATS, LOG_LEVELS
from bastion.protocol.errors import UsageError

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """No record can forge another: its message is escaped onto one line (a client's
    disconnect reason holding a newline once wrote a fake ``session.start allow``
    line), and a traceback keeps its own lines but each is indented, so none starts
    like a record."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_control(line) for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            entry.update({k: v for k, v in audit.items() if v is not None and k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else OneLineFormatter(TEXT_FORMAT)


def check_level(value: str, what: str = "--log-level") -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise UsageError(
            f"{what} {value!r} is not a log level; use one of: {', '.join(LOG_LEVELS)}"
        )
    return level


def check_format(value: str, what: str = "--log-format") -> str:
    fmt = value.strip().lower()
    if fmt not in LOG_FORMATS:
        raise UsageError(
            f"{what} {value!r} is not a log format; use one of: {', '.join(LOG_FORMATS)}"
        )
    return fmt


_handler: logging.Handler | None = None


def configure(level: str, log_format: str) -> None:
    """The process's logging: stderr (journald keeps it under systemd)."""
    global _handler
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        logging.basicConfig(handlers=[_handler], force=True)
    apply(level, log_format)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def apply(level: str, log_format: str) -> None:
    """Set the level and format, now (also on SIGHUP)."""
    logging.getLogger().setLevel(getattr(logging, level.upper()))
    if _handler is not None:
        _handler.setFormatter(formatter(log_format))
