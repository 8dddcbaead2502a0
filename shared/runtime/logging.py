"""structlog configuration: JSON lines by default, ids bound per handler call via contextvars."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:  # the settings module imports the bus: a training rank needs neither
    from torchrelay.shared.runtime.settings import LogSettings


def configure_logging(settings: LogSettings | None = None) -> None:
    """Configure structlog (and the stdlib root logger, for libraries) once per process;
    without settings, the defaults: info, JSON lines."""
    level = logging.getLevelNamesMapping()[(settings.level if settings else "info").upper()]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if settings is None or settings.format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Library logs (aiohttp, nats) go through the same renderer.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.INFO))
