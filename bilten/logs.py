"""Logging: one JSON object per line, each carrying the request id of the request it serves."""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

import msgspec

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_encoder = msgspec.json.Encoder()
_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {
    "message",
    "asctime",
    "request_id",
    "color_message",  # uvicorn's duplicate of msg
}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        # Extra fields given as logger.info("...", extra={...}).
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode(errors="replace")


class _NoWebSocketLines(logging.Filter):
    """Drop uvicorn's line per WebSocket handshake, like the HTTP access log (off too).

    They come by the thousand, the ``"WebSocket /ws?token=..."`` ones carry access tokens, and
    uvicorn reports a refusal with a 401 (the WebSocket denial response) as a handshake the app
    never completed, though nothing went wrong.
    """

    QUIET = frozenset(
        {
            "connection open",
            "connection rejected (%d %s)",
            "ASGI callable returned without completing handshake.",
        }
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if not isinstance(message, str):
            return True
        if message.rstrip().endswith("asyncio.exceptions.CancelledError"):
            # A second Ctrl-C cancels the app's lifespan on purpose (a forced exit): not an
            # error, and the traceback Starlette reports for it would only alarm.
            return False
        return message not in self.QUIET and not message.startswith('%s - "WebSocket')


def setup(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger, uvicorn's included, through one handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    error_log = logging.getLogger("uvicorn.error")
    error_log.filters = [f for f in error_log.filters if not isinstance(f, _NoWebSocketLines)]
    error_log.addFilter(_NoWebSocketLines())
