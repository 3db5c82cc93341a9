"""Log set-up: one line per event, as text or as JSON objects.

Call sites log a short message and put structured facts in `extra={"fields":
{...}}`; the text format appends them as key=value, the JSON format merges
them into the object.  The text format escapes control characters in every
message and field, since paths and model names are the client's own text (the
JSON encoder escapes them already).  Nothing here ever sees a token or a request body: the
callers never pass them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

LOGGERS = ("foreman", "waitress")


# Every character that could end or rewrite a line on a terminal or in a log
# file (C0, DEL, C1, and Unicode's line and paragraph separators), mapped to a
# visible escape, so a client-chosen path or model name cannot forge a line.
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7f, 0xa0))}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
                 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_controls(text: str) -> str:
    return text.translate(_CONTROL)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        message = escape_controls(record.getMessage())
        line = f"{stamp} {record.levelname.lower():7} {record.name}: {message}"
        fields: dict[str, Any] = getattr(record, "fields", {})
        if fields:
            line += " " + " ".join(f"{k}={escape_controls(str(v))}"
                                   for k, v in fields.items() if v is not None)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str, stream: IO[str] | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("foreman").setLevel(level.upper())
    logging.getLogger("waitress").setLevel(logging.WARNING)
    return handler
