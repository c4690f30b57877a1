"""Console logging for the ``loom`` loggers, in uvicorn's style so the two read as one log."""

from __future__ import annotations

import logging
import os
import re
import sys

from uvicorn.logging import TRACE_LOG_LEVEL, DefaultFormatter

LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# C0 and C1 control characters and DEL: a model id or text that carries them must not write lines of its own
# (a fake "ERROR:" line) or terminal escapes into the log.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class LoomFormatter(DefaultFormatter):
    """uvicorn's level prefix, the time, and the message with its control characters escaped (a traceback, which
    logging adds after the message, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


# Libraries that warn at import about what is not the user's to fix and reads as an error: torchao (pulled in by
# gptqmodel) about kernels built for other CUDA versions, torch's pytree about a registration torchao makes.
QUIET = ("torchao", "torch.utils._pytree")


def configure_logging(level: str) -> None:
    """Send ``loom.*`` records to stderr at ``level``, and quiet ``QUIET``'s warnings (errors still show, and
    ``--log-level debug`` shows them all); idempotent, so serve() may be called more than once.

    In a terminal, loads show the libraries' progress bars; in a log file they would be lines of carriage returns
    and escape codes, and the load line already says what loaded, so they are off there (colours are uvicorn's
    rule: only on a terminal)."""
    if not sys.stderr.isatty() and not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' and huggingface_hub's bars
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR if level not in ("debug", "trace") else logging.DEBUG)
    logger = logging.getLogger("loom")
    logger.setLevel(TRACE_LOG_LEVEL if level == "trace" else level.upper())
    if not any(getattr(h, "_loom", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(LoomFormatter("%(levelprefix)s %(asctime)s %(message)s", "%H:%M:%S"))
        handler._loom = True  # type: ignore[attr-defined]  # marks our handler so a second call adds none
        logger.addHandler(handler)
