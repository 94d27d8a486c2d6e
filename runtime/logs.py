"""Logging setup for the entry points: structlog, JSON lines on a pipe, pretty on a terminal.

Only entry points (the CLI) call `configure_logging`; library modules just do
`log = structlog.get_logger(__name__)`. Records from the standard `logging` module (pymodbus,
aiomqtt) go through the same renderer so that journald gets one format.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(level: str = "info", *, json: bool | None = None,
                      stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (stderr by default).

    `json=None` picks JSON when the stream is not a terminal (systemd, pipes) and coloured
    key=value lines when it is.
    """
    stream = stream or sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if json:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
        shared_tail: list[structlog.typing.Processor] = [structlog.processors.dict_tracebacks]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        shared_tail = []

    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *shared_tail, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # pymodbus logs an ERROR for every unanswered request; the poller reports a failing device
    # once (poll_failed / poll_recovered), so the library's noise is only wanted in debug.
    logging.getLogger("pymodbus").setLevel(logging.DEBUG if numeric <= logging.DEBUG
                                           else logging.CRITICAL)
