"""The only place that configures loguru sinks.

Every record passes a patcher that redacts secrets; stdlib logging (APScheduler, watchdog,
GitPython) is routed into loguru through an InterceptHandler. diagnose=False everywhere: variable
values in tracebacks could carry tokens.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from agent import redact as _redact
from agent.redact import redact

# loguru is imported where a sink is configured or a record is logged, not with this module: a
# one-shot command that logs nothing (a no-op `install`, `status`) never imports it (quiet()).

_configured = False
_health_sink: int | None = None
HEALTH_KEY = "health_json"  # records bound with this extra go to the health report only


def add_secret(value: str | None) -> None:
    """Treat value as a secret in every log record and report from now on (the registry in
    agent/redact.py: one mechanism for logs, install logs, state files and outputs)."""
    _redact.register(value)


def scrub(text: str) -> str:
    """The same as redact() (kept for the callers that import it from here)."""
    return redact(text)


def _not_health(record) -> bool:
    return HEALTH_KEY not in record["extra"]


def _patch(record) -> None:
    record["message"] = scrub(record["message"])
    if record["exception"] is not None:
        exc = record["exception"]
        if exc.value is not None and exc.value.args:
            try:
                exc.value.args = tuple(scrub(a) if isinstance(a, str) else a
                                       for a in exc.value.args)
            except (AttributeError, TypeError):
                pass


class InterceptHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from loguru import logger

        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = logging.currentframe(), 2
        while frame and frame.f_code.co_filename == logging.__file__:
            frame = frame.f_back
            depth += 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


ROOM_FLOOR = 256 * 1024  # bytes: below this free, file sinks pause instead of failing per record
_room: dict[str, tuple[float, bool]] = {}  # folder -> (when checked, has room)


def has_room(folder: Path) -> bool:
    """Whether a log file in folder can be written: not a read-only mount, not a full disk.
    Checked at most once a second per folder. A file sink whose folder has no room skips its
    records (one line on stderr when that starts and ends) instead of making loguru print a
    traceback for every record."""
    key = str(folder)
    now = time.monotonic()
    seen = _room.get(key)
    if seen is not None and now - seen[0] < 1.0:
        return seen[1]
    try:
        st = os.statvfs(key)
        ok = not st.f_flag & os.ST_RDONLY and st.f_bavail * st.f_frsize >= ROOM_FLOOR
    except OSError:
        ok = True  # a folder that vanished: the sink (watch=True) recreates it
    if seen is not None and seen[1] != ok:
        sys.stderr.write(f"log: {key}: " + ("room again: writing log files again\n" if ok else
                         "the disk is full or read-only: log files are not written until "
                         "there is room\n"))
    elif seen is None and not ok:
        sys.stderr.write(f"log: {key}: the disk is full or read-only: log files are not "
                         "written until there is room\n")
    _room[key] = (now, ok)
    return ok


def _with_room(folder: Path, inner):
    return lambda record: inner(record) and has_room(folder)


def configure(level: str = "INFO", file: Path | None = None, stderr: bool = True,
              rotation: str = "20 MB", retention: int = 5) -> None:
    """(Re)configure sinks. Safe to call more than once."""
    global _configured, _health_sink
    from loguru import logger

    logger.remove()
    _health_sink = None
    logger.configure(patcher=_patch)
    fmt = "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | {message}"
    if stderr:
        logger.add(sys.stderr, level=level, format=fmt, diagnose=False, backtrace=False,
                   filter=_not_health)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        logger.add(file, level="DEBUG", format=fmt, rotation=rotation, retention=retention,
                   diagnose=False, backtrace=False, enqueue=False, watch=True,
                   filter=_with_room(file.parent, _not_health))
    if not _configured:
        logging.basicConfig(handlers=[InterceptHandler()], level=logging.INFO, force=True)
        for name in ("apscheduler", "watchdog", "git"):
            logging.getLogger(name).setLevel(logging.WARNING)
        _configured = True


def quiet() -> None:
    """One-shot commands: warnings only, to stderr.

    Applied when loguru is first imported (at once if it already is): a command that logs
    nothing does not pay for importing it, and whatever does log later (`from loguru import
    logger` anywhere) gets these sinks and the redacting patcher before its first record.
    Meanwhile stdlib logging goes through InterceptHandler, which imports loguru on the
    first record."""
    if "loguru" in sys.modules:
        configure(level="WARNING", stderr=True)
        return
    global _configured
    if not _configured:
        logging.basicConfig(handlers=[InterceptHandler()], level=logging.INFO, force=True)
        for name in ("apscheduler", "watchdog", "git"):
            logging.getLogger(name).setLevel(logging.WARNING)
        _configured = True
    for finder in sys.meta_path:
        if isinstance(finder, _ConfigureOnImport):
            return
    sys.meta_path.insert(0, _ConfigureOnImport(lambda: configure(level="WARNING",
                                                                 stderr=True)))


class _ConfigureOnImport:
    """A meta path finder that only watches for `import loguru`: it lets the normal finders
    load it, runs `then` right after the module has executed, and removes itself."""

    def __init__(self, then):
        self.then = then

    def find_spec(self, name, path=None, target=None):
        if name != "loguru":
            return None
        import importlib.util

        try:
            sys.meta_path.remove(self)
        except ValueError:
            return None
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real, then = spec.loader.exec_module, self.then

        def exec_module(module):
            real(module)
            sys.modules[name] = module  # configure() imports it: the module is complete
            then()

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def _health_only(record) -> bool:
    return HEALTH_KEY in record["extra"]


def health_report(path: Path, max_size: str = "10 MB", retention: int = 5) -> None:
    """(Re)open the health report sink: one JSON object per line, nothing else.

    The caller serialises (loguru's documented pattern for a custom serialisation: the JSON text
    travels in `extra` and the format prints only it), so each line is exactly the flat report
    record - time, check, status, detail, duration, action - not loguru's nested `serialize=True`
    envelope. Rotation by size, a bounded number of old files, and `watch=True`: a deleted or
    moved report file is reopened on the next record.
    """
    global _health_sink
    from loguru import logger

    close_health_report()
    path.parent.mkdir(parents=True, exist_ok=True)
    _health_sink = logger.add(
        path, level="DEBUG", format="{extra[" + HEALTH_KEY + "]}",
        filter=_with_room(path.parent, _health_only), rotation=max_size, retention=retention, watch=True, enqueue=False, diagnose=False,
        backtrace=False, catch=True)


def close_health_report() -> None:
    global _health_sink
    if _health_sink is not None:
        from loguru import logger

        try:
            logger.remove(_health_sink)
        except (ValueError, OSError):  # OSError: the last flush hit a full disk
            pass
        _health_sink = None
