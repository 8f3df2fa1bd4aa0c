"""The only place that configures loguru sinks.

Every record passes a patcher that redacts secrets; stdlib logging (APScheduler, watchdog,
GitPython) is routed into loguru through an InterceptHandler. diagnose=False everywhere: variable
values in tracebacks could carry tokens.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from loguru import logger

from agent.redact import redact

_configured = False


def _patch(record) -> None:
    record["message"] = redact(record["message"])
    if record["exception"] is not None:
        exc = record["exception"]
        if exc.value is not None and exc.value.args:
            try:
                exc.value.args = tuple(redact(a) if isinstance(a, str) else a
                                       for a in exc.value.args)
            except (AttributeError, TypeError):
                pass


class InterceptHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = logging.currentframe(), 2
        while frame and frame.f_code.co_filename == logging.__file__:
            frame = frame.f_back
            depth += 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


def configure(level: str = "INFO", file: Path | None = None, stderr: bool = True,
              rotation: str = "20 MB", retention: int = 5) -> None:
    """(Re)configure sinks. Safe to call more than once."""
    global _configured
    logger.remove()
    logger.configure(patcher=_patch)
    fmt = "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | {message}"
    if stderr:
        logger.add(sys.stderr, level=level, format=fmt, diagnose=False, backtrace=False)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        logger.add(file, level="DEBUG", format=fmt, rotation=rotation, retention=retention,
                   diagnose=False, backtrace=False, enqueue=False, watch=True)
    if not _configured:
        logging.basicConfig(handlers=[InterceptHandler()], level=logging.INFO, force=True)
        for name in ("apscheduler", "watchdog", "git"):
            logging.getLogger(name).setLevel(logging.WARNING)
        _configured = True


def quiet() -> None:
    """One-shot commands: warnings only, to stderr."""
    configure(level="WARNING", stderr=True)
