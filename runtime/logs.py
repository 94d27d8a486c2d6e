"""Logging set-up for the entry points of both programs: structlog, JSON lines on a pipe,
pretty on a terminal.

Only entry points (the CLIs) call `configure_logging` (STYLE.md §6); library modules just do
`log = structlog.get_logger(__name__)`. Records from the standard `logging` module (pymodbus,
aiomqtt, uvicorn) go through the same renderer, so journald gets one format. Logs go to stderr
by default, so that a command's stdout stays its output; as JSON (one object per line, an
exception as a structured traceback) unless the stream is a terminal.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = ("debug", "info", "warning", "error", "critical")
# Library loggers that get their own handlers unless told otherwise: routed to the root one.
_PROPAGATED = ("uvicorn", "uvicorn.error", "uvicorn.access")


class _AddProgram:
    """A processor naming the program in every line (`program`), unless the line names one."""

    def __init__(self, program: str) -> None:
        self.program = program

    def __call__(self, logger: WrappedLogger, method: str,
                 event_dict: MutableMapping[str, Any]) -> EventDict:
        event_dict.setdefault("program", self.program)
        return event_dict


def configure_logging(program: str, *, level: str = "info", json: bool | None = None,
                      stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging of `program` (`edge-agent`, `central`) to `stream`
    (stderr by default) at `level` (one of `LEVELS`; an unknown one means info).

    `json=None` picks JSON when the stream is not a terminal (systemd, pipes) and coloured
    key=value lines when it is.
    """
    stream = sys.stderr if stream is None else stream
    tty = stream.isatty()
    if json is None:
        json = not tty
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _AddProgram(program),
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tail: list[Processor]
    if json:
        tail = [structlog.processors.dict_tracebacks,
                structlog.processors.JSONRenderer(ensure_ascii=False)]
    else:
        tail = [structlog.dev.ConsoleRenderer(colors=tty)]

    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in _PROPAGATED:
        library = logging.getLogger(name)
        library.handlers[:] = []
        library.propagate = True
    # pymodbus logs an ERROR for every unanswered request; the poller reports a failing device
    # once (poll_failed / poll_recovered), so the library's noise is only wanted in debug.
    logging.getLogger("pymodbus").setLevel(logging.DEBUG if numeric <= logging.DEBUG
                                           else logging.CRITICAL)


__all__ = ["LEVELS", "configure_logging"]
