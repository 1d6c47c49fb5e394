"""Structured logs: one JSON object per line on stderr (or readable text with ``text``).

Every process uses this, so a task can be followed across server, agent and
worker logs by its ids. Secrets never reach a log line: tokens and computer
secrets are never passed to a logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    # The logging HOWTO's "Optimization": no format here shows the caller's file and
    # line, the thread or the process, and each costs a frame walk or calls per record
    # (a worker logs two lines per task; measured ~8% of a worker's CPU before).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log is one line per exchange: too loud for a fleet.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
