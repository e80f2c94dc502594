"""Structured logs: one JSON object per line, carrying the request id of the request and,
with tracing on, the trace and span ids of the span it was written in (null outside any)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

from waitroom.core import tracing
from waitroom.core.http import request_id_var

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is data.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_encoder = msgspec.json.Encoder(enc_hook=repr)  # a stray object in extra= must not kill a log line


class JSONFormatter(logging.Formatter):
    """Formats a record as ``{"ts", "level", "logger", "msg", "request_id", "trace_id",
    "span_id", ...extra}``; the ids are null with tracing off or outside any span."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": request_id_var.get(),
            "trace_id": None,
            "span_id": None,
        }
        ids = tracing.current_ids() if tracing.enabled() else None
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode(errors="replace")


def configure_logging(level: str) -> None:
    """Send every logger's records to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would duplicate ours in another format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(_drop_websocket_access)


#: What the websockets library logs at INFO for every connection, through uvicorn's logger:
#: a line that names no fan and no path, two per fan's socket (tens of thousands in a sale,
#: each formatted and written by the event loop that serves the fans).
_PER_CONNECTION = frozenset({"connection open", "connection closed"})


def _drop_websocket_access(record: logging.LogRecord) -> bool:
    # uvicorn logs every WebSocket handshake at INFO with its full URL, and browsers pass
    # the fan's identity token in that URL's query: such lines must never reach the logs.
    if record.levelno > logging.INFO:
        return True
    return not ("WebSocket" in str(record.msg) or record.msg in _PER_CONNECTION)
