"""structlog setup: one JSON object per line, stdlib loggers (APScheduler, watchdog) included."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(level: str = "info", stream: TextIO | None = None, json: bool = True) -> None:
    """Route structlog and stdlib logging to ``stream`` (default stderr) as JSON lines."""
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*_SHARED, structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # Python warnings (watchdog's, say) become JSON lines too
    root.setLevel(level.upper())
    # Third-party chatter stays at warning unless debugging.
    for noisy in ("apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)


def get(name: str = "watchtrain") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
