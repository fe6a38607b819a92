"""structlog set-up shared by the API, the workers and the commands.

Every line is one JSON object (`timestamp`, `level`, `event`, bound context). The standard
library's loggers (uvicorn, Celery, SQLAlchemy, aiohttp) go through the same renderer, so an
SRE can parse every line the same way. Our own events are rendered by structlog and written
straight to stdout, not through the standard library's records and handlers: a basket logs
some forty events, and that path cost about a third of a millisecond each on the worker's
event loop, between an exchange answer and the next request.
"""

from __future__ import annotations

import logging
import sys
import threading
from decimal import Decimal
from typing import Any

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from service.redaction import Redactor

# Values under these keys never reach a log line, whoever binds them.
_SECRET_KEYS = frozenset(
    {
        "api_key",
        "api_secret",
        "secret",
        "token",
        "authorization",
        "signature",
        "x-bapi-sign",
        "x-bapi-api-key",
        "credentials_keys",
        "credentials_private_keys",
        "credentials_public_key",
        "password",
    }
)


# These names and their variants (any case, '-' or '_' or camelCase, and names holding
# `secret`, `token`, `password`...: service/redaction.py), at any depth.
_REDACTOR = Redactor(_SECRET_KEYS)


def _redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    _REDACTOR.redact_mapping(event_dict)
    return event_dict


def _redact_exception_text(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """After the traceback is rendered: its exceptions' texts (arguments shown as
    `'api_secret': '...'`, a driver naming the value it refused). Lines without one cost a
    dict lookup."""
    for key in ("exception", "stack"):
        text = event_dict.get(key)
        if isinstance(text, str):
            event_dict[key] = _REDACTOR.scrub_text(text)
    return event_dict


def _decimals_as_strings(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # Decimal would render through repr ("Decimal('1.5')"): amounts are logged as strings.
    for key, value in event_dict.items():
        if isinstance(value, Decimal):
            event_dict[key] = str(value)
    return event_dict


class _LineWriter:
    """Writes each rendered event as one line on stdout, flushed (a pipe's reader sees it at
    once). stdout is looked up per line: a redirect or a test's capture may replace it."""

    _lock = threading.Lock()  # the API's worker threads may log too

    def __init__(self, name: str | None = None) -> None:
        self.name = name  # structlog.stdlib.add_logger_name reads it

    def msg(self, line: str) -> None:
        out = sys.stdout
        with self._lock:
            out.write(line + "\n")
            out.flush()

    debug = info = warning = error = critical = exception = msg


def _line_writer(*args: Any) -> _LineWriter:
    return _LineWriter(args[0] if args and isinstance(args[0], str) else None)


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    """Route structlog and the standard library through one renderer. Idempotent."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_secrets,
        _decimals_as_strings,
    ]
    renderer: Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()

    # Exceptions as a string field in JSON; the console renderer draws them itself.
    exceptions: list[Processor] = (
        []
        if log_format == "console"
        else [structlog.processors.format_exc_info, _redact_exception_text]
    )
    structlog.configure(
        processors=[*shared, *exceptions, renderer],
        logger_factory=_line_writer,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exceptions,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Python warnings (e.g. Celery's) become log lines in the same JSON, not raw stderr.
    logging.captureWarnings(True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Per-request access lines and SQL echo are noise at INFO.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name, **initial)
    return logger
