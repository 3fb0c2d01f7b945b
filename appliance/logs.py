"""Logging set-up: JSON lines when not on a terminal, and a filter that scrubs API keys from
every record, whatever logger produced it."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from appliance.redaction import scrub_keys

# The request being served, for every log line written while serving it (set by the audit
# middleware; copied into worker threads by asyncio.to_thread).
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class RedactKeys(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = scrub_keys(message)
        if scrubbed is not message:
            record.msg, record.args = scrubbed, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        if record.threadName and not record.threadName.startswith("MainThread"):
            entry["thread"] = record.threadName
        if record.exc_info:
            entry["exc"] = scrub_keys(self.formatException(record.exc_info))
        return json.dumps(entry)


def configure_logging(level: str = "info", *, json_lines: bool | None = None) -> None:
    json_lines = (not sys.stderr.isatty()) if json_lines is None else json_lines
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactKeys())
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # httpx logs every upstream request at INFO: a line per request, and its cost, for nothing
    # the audit record does not already hold. Its warnings and errors still come through.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
