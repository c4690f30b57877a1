"""Console logging for the ``loom`` loggers, in uvicorn's style so the two read as one log."""

from __future__ import annotations

import logging

LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def configure_logging(level: str) -> None:
    """Send ``loom.*`` records to stderr at ``level``; idempotent, so serve() may be called more than once."""
    from uvicorn.logging import TRACE_LOG_LEVEL, DefaultFormatter

    logger = logging.getLogger("loom")
    logger.setLevel(TRACE_LOG_LEVEL if level == "trace" else level.upper())
    if not any(getattr(h, "_loom", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        handler._loom = True  # type: ignore[attr-defined]  # marks our handler so a second call adds none
        logger.addHandler(handler)
