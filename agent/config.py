"""Load and validate configuration into a frozen desired state.

Errors are ConfigError with `file:line: component 'x': problem` so the CLI can print one line.

Hostile input is bounded before it can hurt: a config file is read only when it is a regular
file of at most MAX_CONFIG_BYTES, must be UTF-8 text without control characters, nests at most
MAX_DEPTH levels (aliases included) and expands (aliases counted each time they are used) to at
most MAX_EXPANDED values and characters. Every number has a finite range (LIMITS), names are
plain identifiers of at most MAX_NAME characters, paths fit the kernel's limits. Nothing here
recurses over user data, so no input can raise RecursionError.
"""

from __future__ import annotations

import codecs
import math
import os
import re
import reprlib
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from agent.model import ComfyUISettings, Component, Config, ConfigError
from agent.redact import register_config

DEFAULT_WORKSPACE = "/workspace"
OVERLAY_NAME = "pod-agent.yaml"
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # use fullmatch: `$` would accept "name\n"
PLACEHOLDER_RE = re.compile(r"(?<!\$)\{(workspace|comfyui|venv|python|markers)\}")

MAX_CONFIG_BYTES = 1 << 20  # a config file larger than 1 MiB is refused, never read whole
MAX_DEPTH = 32  # nesting levels, counted through aliases
MAX_EXPANDED = 4_000_000  # values + string characters once every alias is expanded
MAX_MAPPING_KEYS = 10_000  # keys in one mapping after `<<` merges
MAX_NAME = 64  # a component name
PATH_MAX, NAME_MAX = 4095, 255  # bytes in a path, in one path component
# PyYAML's own set of characters it refuses (its error has no line): we name the line instead.
_NON_PRINTABLE = re.compile("[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD"
                            "\U00010000-\U0010FFFF]")
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")  # NUL (from "\0") or a lone surrogate ("\ud800")
_PATH_BAD = re.compile("[\x00-\x1f\x7f]")


class _Short(reprlib.Repr):
    """repr() cut short, cheap on huge values: what error messages show of a bad value."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 50, 50, 40
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdict = 5

    def repr__Map(self, x: dict, level: int) -> str:  # noqa: N802 - reprlib's naming
        return self.repr_dict(x, level)

    def repr__Seq(self, x: list, level: int) -> str:  # noqa: N802
        return self.repr_list(x, level)


_short = _Short()


def _show(value: Any, limit: int = 60) -> str:
    """A bad value as error messages show it: repr, one line, at most `limit` characters."""
    try:
        text = _short.repr(value)
    except Exception:  # noqa: BLE001 - a value that cannot even be shown
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _names(names: Any, limit: int = 20) -> str:
    """A list of known names for an error message, cut short."""
    names = list(names)
    text = ", ".join(str(n) for n in names[:limit])
    return text + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------- YAML with lines
class _Map(dict):
    """A mapping that remembers where each key came from: (file, line)."""

    where: tuple[str, int] = ("?", 0)
    src: dict


def _tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


class _Seq(list):
    """A list that remembers the line of each item."""

    lines: list[int]


def default_config_path() -> Path:
    packaged = Path(__file__).parent / "_config" / "default.yaml"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "config" / "default.yaml"


def _line_of(data: bytes | str, offset: int) -> int:
    return data[:offset].count(b"\n" if isinstance(data, bytes) else "\n") + 1


def read_text(path: Path, what: str = "config file") -> str:
    """The text of a config file: a regular file, at most MAX_CONFIG_BYTES, UTF-8, no control
    characters. Anything else is a one-line ConfigError naming the file (and the line)."""
    problem = _path_problem(str(path))
    if problem:
        raise ConfigError(f"{_show(str(path))}: the path of the {what}: {problem}")
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path}: is a directory; the {what} must be a YAML file")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: is not a regular file (a FIFO, device or socket); the "
                          f"{what} must be a YAML file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{path}: is not a regular file; the {what} must be a YAML "
                                  "file")
            chunks, size = [], 0
            while size <= MAX_CONFIG_BYTES:
                chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    data = b"".join(chunks)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: the {what} is larger than {MAX_CONFIG_BYTES // 1024} KiB; "
                          "is it the right file?")
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise ConfigError(f"{path}:1: the {what} is UTF-32 text; save it as UTF-8")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ConfigError(f"{path}:1: the {what} is UTF-16 text; save it as UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"{path}:{_line_of(data, nul)}: the {what} contains "
                          "NUL bytes: it is not UTF-8 text (UTF-16? binary?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}:{_line_of(data, exc.start)}: the {what} is not valid UTF-8 "
                          f"(byte 0x{data[exc.start]:02x}); save it as UTF-8") from None
    bad = _NON_PRINTABLE.search(text)
    if bad:
        raise ConfigError(f"{path}:{_line_of(text, bad.start())}: the {what} contains the "
                          f"control character U+{ord(bad.group()):04X}; remove it")
    return text


def load_yaml(path: Path, what: str = "config file", cache_ws: Path | None = None) -> _Map:
    """The file's mapping, each key and item with its line. With `cache_ws` (the workspace), a
    file parsed before with the same bytes is read from `<workspace>/.pod-agent/cache/`
    (agent/yamlcache.py) without importing PyYAML: the parse is the largest fixed cost of a
    no-op command."""
    text = read_text(path, what)
    from agent import yamlcache

    entry = yamlcache.entry(cache_ws, path, text)
    data = yamlcache.read(entry, str(path), _Map, _Seq) if entry is not None else None
    if data is None:
        from agent.yamlload import parse

        data = parse(text, path)
        _inspect(data)
        if entry is not None:
            yamlcache.write(entry, data, _Map, _Seq)
        return data
    _inspect(data)
    return data


_CONTAINERS = (dict, list, tuple, set, frozenset)


def _children(obj: Any, line: int, key: str) -> list[tuple[Any, int, str]]:
    if isinstance(obj, dict):
        src = getattr(obj, "src", {})
        return [(v, src.get(k, ("", line))[1], k) for k, v in obj.items()]
    lines = getattr(obj, "lines", None)
    return [(v, lines[i] if lines and i < len(lines) else line, f"{key}[{i}]")
            for i, v in enumerate(obj)]


def _inspect(data: _Map) -> None:
    """Walk the loaded data once, without recursion, each shared (aliased) value once: refuse
    NUL and lone surrogates in any string or key, nesting deeper than MAX_DEPTH and an expanded
    size over MAX_EXPANDED ("billion laughs": aliases of aliases)."""
    file = data.where[0]
    done: dict[int, tuple[int, int]] = {}  # id -> (expanded size, depth)
    stack: list[tuple[Any, int, str, bool]] = [(data, data.where[1], "(top)", False)]
    while stack:
        obj, line, key, finished = stack.pop()
        if not finished:
            if id(obj) in done:
                continue
            stack.append((obj, line, key, True))
            for k in obj if isinstance(obj, dict) else ():
                if _BAD_TEXT.search(k):
                    what = "a NUL character" if "\0" in k else "a lone surrogate"
                    raise ConfigError(f"{file}:{obj.src.get(k, ('', line))[1]}: the key "
                                      f"{_show(k)} contains {what}")
            for child, cline, ckey in _children(obj, line, key):
                if isinstance(child, _CONTAINERS):
                    if id(child) not in done:
                        stack.append((child, cline, ckey, False))
                elif isinstance(child, str) and _BAD_TEXT.search(child):
                    what = "a NUL character" if "\0" in child else "a lone surrogate"
                    raise ConfigError(f"{file}:{cline}: {_show(ckey)}: the value "
                                      f"{_show(child)} contains {what}")
            continue
        size, depth = 1, 1
        for child in (obj.values() if isinstance(obj, dict) else obj):
            if isinstance(child, _CONTAINERS):
                csize, cdepth = done[id(child)]
                size, depth = size + csize, max(depth, cdepth + 1)
            else:
                size += 1 + (len(child) if isinstance(child, (str, bytes)) else 0)
        if depth > MAX_DEPTH:
            raise ConfigError(f"{file}:{line}: {_show(key)}: nested deeper than {MAX_DEPTH} "
                              "levels (aliases included)")
        if size > MAX_EXPANDED:
            raise ConfigError(f"{file}:{line}: {_show(key)}: expands to more than "
                              f"{MAX_EXPANDED} values and characters (aliases of aliases?)")
        done[id(obj)] = (size, depth)


def _merge(base: _Map, over: _Map, components: bool = False) -> _Map:
    out = _Map(base)
    out.where, out.src = base.where, dict(base.src)
    for key, value in over.items():
        if components and isinstance(value, _Map) and set(value) == {"enabled"} and key in base \
                and isinstance(base[key], _Map):
            merged = _Map(base[key])
            merged.where, merged.src = base[key].where, dict(base[key].src)
            merged["enabled"] = value["enabled"]
            merged.src["enabled"] = value.src["enabled"]
            out[key] = merged
        elif not components and key in ("components", "services") and isinstance(value, _Map) \
                and isinstance(base.get(key), _Map):
            out[key] = _merge(base[key], value, components=True)
        elif not components and isinstance(value, _Map) and isinstance(base.get(key), _Map):
            out[key] = _merge(base[key], value)
        else:
            out[key] = value
        out.src[key] = over.src[key]
    return out


# --------------------------------------------------------------------------- field checking
class _Ctx:
    def __init__(self, subst: Mapping[str, str]):
        self.subst = dict(subst)

    def expand(self, text: str) -> str:
        return PLACEHOLDER_RE.sub(lambda m: self.subst.get(m.group(1), m.group(0)), text)


def _fail(m: _Map, key: str | None, who: str, problem: str) -> ConfigError:
    file, line = m.src.get(key, m.where) if key is not None else m.where
    return ConfigError(f"{file}:{line}: {who}: {problem}")


# --------------------------------------------------------------------------- limits
class Range:
    """The finite range of a number field: lo..hi inclusive; `positive` says the README's
    "> 0" (lo is then the smallest value that makes sense, e.g. a 0.05 s poll)."""

    def __init__(self, lo: float, hi: float, unit: str = "", positive: bool = False):
        self.lo, self.hi, self.unit, self.positive = lo, hi, unit, positive

    def text(self, key: str, whole: bool) -> str:
        if key == "port":
            return f"'{key}' must be {self.lo}-{self.hi}" + (" (0: any free port)"
                                                               if self.lo == 0 else "")
        if whole:
            return f"'{key}' must be a whole number {self.lo}-{self.hi}{self.unit}"
        span = f"a number{self.unit} from {self.lo:g} to {self.hi:g}"
        return f"'{key}' must be > 0 ({span})" if self.positive else f"'{key}' must be {span}"


MINUTE, HOUR, DAY, WEEK = 60, 3600, 86400, 7 * 86400
_S = " of seconds"
_TIMEOUT = Range(1, WEEK, _S)  # an installer: at least a second, at most a week
_INTERVAL = Range(0.05, WEEK, _S, positive=True)  # a period or a wait: > 0, no busy loop
_POLL = Range(0.05, HOUR, _S, positive=True)
_COUNT = Range(1, 1000)  # "after N failures"
_LIMIT = Range(0, 1000)  # "at most N per window"
FALLBACK = Range(0, 10 ** 9)  # any number field not listed below

COMPONENT_LIMITS = {
    "timeout": _TIMEOUT, "retries": Range(0, 100), "retry_backoff": Range(0, HOUR, _S),
    "check_timeout": _TIMEOUT, "depth": Range(0, 10 ** 6),
}
AGENT_LIMITS = {
    "reconcile_interval": _INTERVAL, "marker_debounce": Range(0, HOUR, _S),
    "restart_quiet_period": Range(0, DAY, _S), "restart_max_wait": Range(0, WEEK, _S),
    "queue_poll_interval": _POLL, "poll": _POLL, "stop_timeout": Range(0.05, HOUR, _S, True),
    "ready_timeout": Range(0.05, DAY, _S, True), "ready_poll_interval": _POLL,
    "liveness_interval": _POLL, "liveness_failures": _COUNT,
    "backoff_initial": Range(0, HOUR, _S), "backoff_max": Range(0, DAY, _S),
    "backoff_reset_after": Range(0, WEEK, _S), "degraded_after": _COUNT,
    "degraded_window": _INTERVAL, "degraded_retry": _INTERVAL,
}
HEALTH_LIMITS = {
    "summary_interval": _INTERVAL, "report_retention": Range(0, 10_000),
    "reinstall_limit": _LIMIT, "restart_limit": _LIMIT, "limit_window": _INTERVAL,
}
CHECK_LIMITS = {
    "interval": _INTERVAL, "timeout": Range(0.05, DAY, _S, positive=True), "failures": _COUNT,
    "warn_latency": Range(0, HOUR, _S), "max_rss_gb": Range(0.01, 100_000, " of GB", True),
    "max_open_files": Range(1, 10 ** 9), "cache_ttl": Range(0, 30 * DAY, _S),
    "tolerance": Range(0, 10), "warn_free_gb": Range(0, 10 ** 6, " of GB"),
    "fail_free_gb": Range(0, 10 ** 6, " of GB"), "warn_temp": Range(0, 200, " (°C)"),
}
SIZE_LIMITS = (1024, 100 * 1024 ** 3)  # health.report_max_size: 1 KiB .. 100 GiB
_UNITS = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}


def _path_problem(text: str) -> str | None:
    """Why `text` cannot be a path (control characters, too long for the kernel), or None."""
    bad = _PATH_BAD.search(text)
    if bad:
        return f"a path cannot contain the control character {bad.group()!r}"
    try:
        raw = os.fsencode(text)
    except UnicodeError:
        return "a path must be valid text"
    if len(raw) > PATH_MAX:
        return f"a path is at most {PATH_MAX} bytes long, this one has {len(raw)}"
    if any(len(part) > NAME_MAX for part in raw.split(b"/")):
        return f"each part of a path is at most {NAME_MAX} bytes long"
    return None


def _check_path(m: _Map, key: str, value: Any, who: str) -> Any:
    problem = _path_problem(str(value))
    if problem:
        raise _fail(m, key, who, f"'{key}': {problem}, got {_show(str(value))}")
    return value


def _check(m: _Map, key: str, value: Any, typ: str, who: str, ctx: _Ctx,
           rng: Range | None = None) -> Any:
    def bad(expected: str) -> ConfigError:
        return _fail(m, key, who, f"'{key}' must be {expected}, got {_show(value)}")

    if typ == "str":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad("a string")
        return ctx.expand(str(value))
    if typ == "opt_str":
        return None if value is None else _check(m, key, value, "str", who, ctx)
    if typ == "path":
        path = _check(m, key, value, "str", who, ctx)
        try:
            return Path(_check_path(m, key, path, who)).expanduser()
        except RuntimeError:  # `~name/...` for a user that does not exist
            raise _fail(m, key, who, f"'{key}': cannot expand {_show(path)}: no such user "
                        "(or no home folder)") from None
    if typ == "opt_path":
        return None if value is None else _check(m, key, value, "path", who, ctx)
    if typ == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if typ in ("int", "opt_int", "float", "opt_float"):
        if value is None and typ.startswith("opt_"):
            return None
        whole = typ.endswith("int")
        rng = rng or FALLBACK
        number = (int,) if whole else (int, float)
        if not isinstance(value, number) or isinstance(value, bool) \
                or (isinstance(value, float) and not math.isfinite(value)) \
                or not rng.lo <= value <= rng.hi \
                or (rng.positive and value <= 0):
            raise _fail(m, key, who, f"{rng.text(key, whole)}, got {_show(value)}")
        return value if whole else float(value)
    if typ in ("list[str]", "list[path]"):
        if isinstance(value, str) and typ == "list[path]":
            value = [value]
        if not isinstance(value, list) or not all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value
        ):
            raise bad("a list of strings")
        items = [ctx.expand(str(v)) for v in value]
        if typ == "list[path]":
            return tuple(Path(_check_path(m, key, v, who)) for v in items)
        return tuple(items)
    if typ == "dict[str,str]":  # every such field is an environment
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad("a mapping of names to strings")
        for k, v in value.items():
            if not k or "=" in k:
                raise _fail(m, key, who, f"'{key}': {_show(k)} is not a valid environment "
                            "variable name (empty, or contains '=')")
            if not isinstance(v, (str, int, float, bool)):
                raise _fail(value if isinstance(value, _Map) else m, k, who,
                            f"'{key}': the value of {_show(k)} must be a string, got {_show(v)}")
        return {str(k): ctx.expand(str(v)) for k, v in value.items()}
    if typ.startswith("enum:"):
        choices = typ[5:].split("|")
        if not isinstance(value, (str, int, float)) or str(value) not in choices:
            raise bad("one of " + ", ".join(choices))
        return str(value)
    if typ == "any":
        return value
    raise AssertionError(typ)  # pragma: no cover


def _fields(m: Any, where: _Map, key: str, schema: Mapping[str, tuple[str, Any]], who: str,
            ctx: _Ctx, extra_check: Callable[[str], bool] | None = None,
            limits: Mapping[str, Range] | None = None) -> dict[str, Any]:
    if m is None:
        m = _Map()
        m.where, m.src = where.src.get(key, where.where), {}
    if not isinstance(m, _Map):
        raise _fail(where, key, who, f"'{key}' must be a mapping, got {_show(m)}")
    out: dict[str, Any] = {}
    for k in m:
        if k not in schema and not (extra_check and extra_check(k)):
            raise _fail(m, k, who, f"unknown field {_show(k)} (known: "
                        f"{', '.join(sorted(schema))})")
    limits = limits or {}
    for k, (typ, default) in schema.items():
        if k in m:
            out[k] = _check(m, k, m[k], typ, who, ctx, limits.get(k))
        elif isinstance(default, str) and typ in ("str", "path", "opt_path", "opt_str"):
            out[k] = _check(m, k, default, typ, who, ctx)
        else:
            out[k] = default
    return out


TOP_FIELDS = {
    "workspace": ("str", None),
    "markers_dir": ("str", "{workspace}/.install_markers"),
    "state_dir": ("str", "{workspace}/.pod-agent"),
    "progress_log": ("str", "{workspace}/installation_progress.log"),
    "installer": ("enum:auto|uv|pip", "auto"),
    "installer_env": ("dict[str,str]", None),
    "installer_args": ("list[str]", ()),
    "comfyui": ("any", None),
    "agent": ("any", None),
    "defaults": ("any", None),
    "components": ("any", None),
    "health": ("any", None),
    "http": ("any", None),
    "services": ("any", None),  # agent/service_config.py
    "hooks": ("any", None),
}

COMFYUI_FIELDS = {
    "dir": ("path", "{workspace}/ComfyUI"),
    "venv": ("opt_path", "{workspace}/venv"),
    "python": ("path", None),
    "base_python": ("str", "python3"),
    "args": ("list[str]", ("--listen", "0.0.0.0", "--port", "8188")),
    "port": ("int", 8188),
    "host": ("str", "127.0.0.1"),
    "env": ("dict[str,str]", None),
    "log": ("path", "{workspace}/logs/comfyui.log"),
    "sage_attention": ("enum:auto|on|off", "auto"),
}

# Settings of the resident agent (`pod-agent run`).
AGENT_FIELDS = {
    "reconcile_interval": ("float", 300.0),
    "marker_debounce": ("float", 1.0),
    "restart_quiet_period": ("float", 5.0),
    "restart_max_wait": ("float", 1800.0),
    "queue_poll_interval": ("float", 3.0),
    "poll": ("opt_float", None),
    "stop_timeout": ("float", 20.0),
    "ready_timeout": ("float", 600.0),
    "ready_poll_interval": ("float", 2.0),
    "liveness_interval": ("float", 10.0),
    "liveness_failures": ("int", 3),
    "backoff_initial": ("float", 5.0),
    "backoff_max": ("float", 300.0),
    "backoff_reset_after": ("float", 600.0),
    "degraded_after": ("int", 5),
    "degraded_window": ("float", 900.0),
    "degraded_retry": ("float", 600.0),
    "start_comfyui": ("bool", True),
}

# `health:` - the resident agent's health checks (agent/health.py). Each check in `checks:` takes
# the common CHECK_FIELDS plus its own; omitted checks and fields keep these defaults.
HEALTH_FIELDS = {
    "enabled": ("bool", True),
    "summary_interval": ("float", 300.0),   # a summary record at least this often
    "report_max_size": ("str", "10 MB"),    # rotate <workspace>/logs/health.jsonl at this size
    "report_retention": ("int", 5),         # rotated report files kept
    "reinstall_limit": ("int", 3),          # reinstalls per component per limit_window ...
    "restart_limit": ("int", 6),            # ... and ComfyUI restarts, before quarantine
    "limit_window": ("float", 3600.0),
    "checks": ("any", None),
}

CHECK_ACTIONS = ("none", "restart_comfyui", "reinstall")
CHECK_FIELDS = {
    "enabled": ("bool", True),
    "interval": ("float", 60.0),
    "timeout": ("float", 30.0),
    "failures": ("int", 1),   # consecutive failed runs before the on_fail action
    "on_fail": ("enum:" + "|".join(CHECK_ACTIONS), "none"),
}

# check -> (its defaults for CHECK_FIELDS, its own fields, the on_fail actions it allows)
CHECKS: dict[str, tuple[dict[str, Any], dict[str, tuple[str, Any]], tuple[str, ...]]] = {
    "comfyui_http": ({"interval": 30.0, "timeout": 5.0, "failures": 3,
                      "on_fail": "restart_comfyui"},
                     {"warn_latency": ("float", 2.0)}, ("none", "restart_comfyui")),
    "comfyui_process": ({"interval": 30.0, "timeout": 10.0, "failures": 2,
                         "on_fail": "restart_comfyui"},
                        {"max_rss_gb": ("opt_float", None), "max_open_files": ("opt_int", None)},
                        ("none", "restart_comfyui")),
    "sageattention": ({"interval": 600.0, "timeout": 180.0, "failures": 1,
                       "on_fail": "reinstall"},
                      {"component": ("str", "sageattention"),
                       "cache_ttl": ("float", 21600.0),
                       "tolerance": ("float", 0.05)}, ("none", "reinstall")),
    "components": ({"interval": 300.0, "timeout": 180.0, "failures": 1,
                    "on_fail": "reinstall"}, {}, ("none", "reinstall")),
    "disk": ({"interval": 300.0, "timeout": 15.0},
             {"paths": ("list[str]", ("{workspace}", "/")),
              "warn_free_gb": ("float", 10.0), "fail_free_gb": ("float", 2.0)}, ("none",)),
    "gpu": ({"interval": 60.0, "timeout": 15.0},
            {"nvidia_smi": ("str", "nvidia-smi"), "warn_temp": ("float", 85.0)}, ("none",)),
    "agent": ({"interval": 10.0, "timeout": 10.0}, {}, ("none",)),
    # agent/checks/drift.py: WARN for warn_for seconds after the latest drift record
    "drift": ({"interval": 60.0, "timeout": 10.0}, {"warn_for": ("float", 3600.0)}, ("none",)),
}

# `http:` - the agent's HTTP endpoint for orchestrators (agent/http.py).
HTTP_FIELDS = {
    "enabled": ("bool", True),
    "address": ("str", "127.0.0.1"),
    "port": ("int", 9188),
    "token": ("opt_str", None),  # bearer token for POST endpoints; env POD_AGENT_HTTP_TOKEN wins
}

SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*",  # fullmatch
                     re.IGNORECASE)


COMMON_FIELDS = {
    "kind": ("str", None),
    "depends_on": ("list[str]", ()),
    "enabled": ("bool", True),
    "background": ("bool", False),
    "required": ("bool", False),
    "requires_gpu": ("bool", False),
    "timeout": ("float", None),
    "retries": ("int", None),
    "retry_backoff": ("float", None),
    "log": ("opt_path", None),
    "description": ("opt_str", None),
    "restart_comfyui": ("bool", True),
}

DEFAULTS_FIELDS = {
    "timeout": ("float", 3600.0),
    "retries": ("int", 1),
    "retry_backoff": ("float", 5.0),
}


def _resolve_python(name: str) -> str:
    if os.sep in name:
        return name
    return shutil.which(name) or sys.executable


def _workspace_path(raw: Any, m: _Map | None, key: str = "workspace") -> Path:
    """The workspace as given (--workspace, POD_AGENT_WORKSPACE or the config): a path the
    kernel can take, made absolute."""
    if not isinstance(raw, (str, Path)):
        assert m is not None
        raise _fail(m, key, "config", f"'{key}' must be a path, got {_show(raw)}")
    problem = _path_problem(str(raw))
    if problem:
        place = f"{m.src.get(key, m.where)[0]}:{m.src.get(key, m.where)[1]}: config: " \
            if m is not None else ""
        raise ConfigError(f"{place}workspace {_show(str(raw))}: {problem}")
    try:
        return Path(raw).expanduser().absolute()
    except RuntimeError:  # `~name/...` for a user that does not exist
        place = f"{m.src.get(key, m.where)[0]}:{m.src.get(key, m.where)[1]}: config: " \
            if m is not None else ""
        raise ConfigError(f"{place}workspace {_show(str(raw))}: cannot expand '~': no such "
                          "user (or no home folder)") from None


def _overlay_exists(path: Path) -> bool:
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the overlay: {exc.strerror}") from None
    return True  # a directory or a FIFO there is refused by load_yaml, with its reason


def load(config_path: str | Path | None = None, workspace: str | Path | None = None) -> Config:
    """Build the desired state from the base config (built-in or --config) and the overlay."""
    config_path = config_path or os.environ.get("POD_AGENT_CONFIG") or None
    base_file = Path(config_path) if config_path else default_config_path()
    ws_given = workspace or os.environ.get("POD_AGENT_WORKSPACE") or None
    given = _workspace_path(ws_given, None) if ws_given is not None else None
    data = load_yaml(base_file, cache_ws=given)
    sources = [str(base_file)]

    if given is not None:
        ws = given
    elif data.get("workspace") not in (None, ""):
        ws = _workspace_path(data["workspace"], data)
    else:
        ws = Path(DEFAULT_WORKSPACE)
    overlay = ws / OVERLAY_NAME
    if _overlay_exists(overlay):
        over = load_yaml(overlay, "overlay", cache_ws=ws)
        data = _merge(data, over)
        sources.append(str(overlay))
        if ws_given is None and over.get("workspace") not in (None, ""):
            ws = _workspace_path(over["workspace"], over)
    forbidden = [p for p in os.environ.get("POD_AGENT_FORBID_WORKSPACE", "").split(":") if p]
    if any(ws == Path(p).absolute() for p in forbidden):
        raise ConfigError(f"workspace {ws} is forbidden by POD_AGENT_FORBID_WORKSPACE")

    ctx = _Ctx({"workspace": str(ws)})
    top = _fields(data, data, "(top)", TOP_FIELDS, "config", ctx)
    cui_map = data.get("comfyui")
    cui = _fields(cui_map, data, "comfyui", {k: v for k, v in COMFYUI_FIELDS.items()
                                             if k not in ("python",)} | {"python": ("any", None)},
                  "comfyui", ctx, limits={"port": Range(1, 65535)})
    cui_where = cui_map if isinstance(cui_map, _Map) else data
    _check_path(cui_where, "base_python", cui["base_python"], "comfyui")
    ctx.subst["comfyui"] = str(cui["dir"])
    if cui["venv"] is not None:
        ctx.subst["venv"] = str(cui["venv"])
    py_raw = cui_map.get("python") if isinstance(cui_map, _Map) else None
    if py_raw is None:
        if cui["venv"] is None:
            py_raw = _resolve_python(cui["base_python"])
        else:
            py_raw = "{venv}/bin/python"
    cui["python"] = Path(_check_path(cui_where, "python", _check(
        cui_where, "python", py_raw, "str", "comfyui", ctx), "comfyui"))
    ctx.subst["python"] = str(cui["python"])
    paths = {}
    for key in ("markers_dir", "state_dir", "progress_log"):
        paths[key] = Path(_check_path(data, key, ctx.expand(str(top[key])), "config")).absolute()
    ctx.subst["markers"] = str(paths["markers_dir"])

    agent = _fields(data.get("agent"), data, "agent", AGENT_FIELDS, "agent", ctx,
                    limits=AGENT_LIMITS)
    defaults = _fields(data.get("defaults"), data, "defaults", DEFAULTS_FIELDS, "defaults", ctx,
                       limits=COMPONENT_LIMITS)
    components = _components(data, ctx, ws, defaults)
    health = _health(data, ctx)
    http = _http(data, ctx)
    from agent.service_config import parse_hooks, parse_services
    services = parse_services(data, ctx, ws, components)
    hooks = parse_hooks(data, ctx)

    settings = ComfyUISettings(
        dir=cui["dir"], python=cui["python"], venv=cui["venv"],
        base_python=cui["base_python"], args=cui["args"], port=cui["port"], host=cui["host"],
        env=cui["env"] or {}, log=cui["log"], sage_attention=cui["sage_attention"],
    )
    return register_config(Config(  # its secrets are masked everywhere (agent/redact.py)
        workspace=ws,
        markers_dir=paths["markers_dir"],
        state_dir=paths["state_dir"],
        progress_log=paths["progress_log"],
        installer=top["installer"],
        installer_env=top["installer_env"] or {},
        installer_args=top["installer_args"],
        comfyui=settings,
        components=components,
        agent=agent,
        sources=tuple(sources),
        health=health,
        http=http,
        services=services,
        hooks=hooks,
    ))


def _size_bytes(text: str) -> float | None:
    match = SIZE_RE.fullmatch(text)
    return float(match.group(1)) * _UNITS[match.group(2).lower()] if match else None


def _health(data: _Map, ctx: _Ctx) -> dict[str, Any]:
    health = _fields(data.get("health"), data, "health", HEALTH_FIELDS, "health", ctx,
                     limits=HEALTH_LIMITS)
    where = data.get("health") if isinstance(data.get("health"), _Map) else data
    size = _size_bytes(health["report_max_size"])
    if size is None or not math.isfinite(size) or not SIZE_LIMITS[0] <= size <= SIZE_LIMITS[1]:
        raise _fail(where, "report_max_size", "health", "'report_max_size' must be a size such "
                    f"as '10 MB', from 1 KiB to 100 GiB, got {_show(health['report_max_size'])}")
    raw = health.pop("checks")
    if raw is not None and not isinstance(raw, _Map):
        raise _fail(where, "checks", "health", "'checks' must be a mapping of check names, got "
                    f"{_show(raw)}")
    raw = raw if raw is not None else {}
    for name in raw:
        if name not in CHECKS:
            raise _fail(raw, name, "health", f"unknown check {_show(name)} (known: "
                        f"{', '.join(CHECKS)})")
    checks: dict[str, dict[str, Any]] = {}
    for name, (defaults, own, actions) in CHECKS.items():
        schema = {k: (typ, defaults.get(k, default)) for k, (typ, default)
                  in CHECK_FIELDS.items()} | own
        who = f"health check '{name}'"
        body = raw.get(name)
        values = _fields(body, raw if isinstance(raw, _Map) else where, name, schema, who, ctx,
                         limits=CHECK_LIMITS)
        if values["on_fail"] not in actions:
            raise _fail(body if isinstance(body, _Map) else raw, "on_fail", who,
                        f"'on_fail' must be one of {', '.join(actions)} for this check, "
                        f"got {_show(values['on_fail'])}")
        if values["interval"] <= 0 or values["timeout"] <= 0:
            key = "interval" if values["interval"] <= 0 else "timeout"
            raise _fail(body if isinstance(body, _Map) else raw, key, who,
                        f"'{key}' must be > 0")
        if "paths" in values:
            values["paths"] = tuple(
                _check_path(body if isinstance(body, _Map) else raw, "paths", ctx.expand(str(v)),
                            who) for v in values["paths"])
        checks[name] = values
    health["checks"] = checks
    return health


def _http(data: _Map, ctx: _Ctx) -> dict[str, Any]:
    return _fields(data.get("http"), data, "http", HTTP_FIELDS, "http", ctx,
                   limits={"port": Range(0, 65535)})


def _components(data: _Map, ctx: _Ctx, ws: Path, defaults: Mapping[str, Any]) -> dict[str, Component]:
    from agent.kinds import KINDS

    raw = data.get("components")
    if raw is None:
        return {}
    if not isinstance(raw, _Map):
        raise _fail(data, "components", "config", "'components' must be a mapping of names, "
                    f"got {_show(raw)}")
    out: dict[str, Component] = {}
    for name, body in raw.items():
        if not NAME_RE.fullmatch(name):
            raise _fail(raw, name, f"component {_show(name)}", "a component name must be a "
                        "plain identifier (letters, digits, underscore; not starting with a "
                        "digit)")
        if len(name) > MAX_NAME:
            raise _fail(raw, name, f"component {_show(name)}", f"a component name is at most "
                        f"{MAX_NAME} characters, this one has {len(name)}")
        who = f"component '{name}'"
        if not isinstance(body, _Map):
            raise _fail(raw, name, who, f"must be a mapping with at least 'kind', got "
                        f"{_show(body)}")
        kind = body.get("kind")
        if not isinstance(kind, str) or kind not in KINDS:
            if "kind" not in body:
                raise _fail(body, None, who, "missing 'kind' (one of: " + ", ".join(KINDS) + ")")
            raise _fail(body, "kind", who, f"unknown kind {_show(kind)} (one of: "
                        f"{', '.join(KINDS)})")
        module = KINDS[kind]
        schema = dict(COMMON_FIELDS) | module.FIELDS
        values = _fields(body, raw, name, schema, who, ctx, limits=COMPONENT_LIMITS)
        try:
            spec = module.validate({k: values[k] for k in module.FIELDS}, ctx.expand)
            _check_spec(kind, spec)
        except ValueError as exc:
            key = getattr(exc, "key", None)
            error = _fail(body, key if key in body else None, who, str(exc))
            items, index = body.get(key), getattr(exc, "index", None)
            if isinstance(items, _Seq) and index is not None and index < len(items.lines):
                error = ConfigError(f"{body.src[key][0]}:{items.lines[index]}: {who}: {exc}")
            raise error from None
        log = values["log"] or ws / "logs" / "install" / f"{name}.log"
        out[name] = Component(
            name=name, kind=kind, depends_on=values["depends_on"], enabled=values["enabled"],
            background=values["background"], required=values["required"],
            requires_gpu=values["requires_gpu"],
            timeout=values["timeout"] if values["timeout"] is not None else defaults["timeout"],
            retries=values["retries"] if values["retries"] is not None else defaults["retries"],
            retry_backoff=values["retry_backoff"] if values["retry_backoff"] is not None
            else defaults["retry_backoff"],
            log=Path(log).absolute(), spec=spec,
            restart_comfyui=(values["restart_comfyui"] if "restart_comfyui" in body else
                             getattr(module, "RESTART_COMFYUI", True)) and kind != "overall",
        )
    for name, comp in out.items():
        body = raw[name]
        for dep in comp.depends_on:
            if dep not in out:
                raise _fail(body, "depends_on", f"component '{name}'",
                            f"unknown dependency {_show(dep)} (known: {_names(out)})")
    _check_cycles(out, raw)
    return out


_NODE_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")


def _check_spec(kind: str, spec: Mapping[str, Any]) -> None:
    """Limits the kinds' own validation leaves open: a node folder name is one plain path
    component (no trailing newline, at most NAME_MAX bytes)."""
    if kind != "nodes":
        return
    for i, node in enumerate(spec["nodes"]):
        name = node["name"]
        if not _NODE_NAME_RE.fullmatch(name) or len(name.encode()) > NAME_MAX:
            err = ValueError(f"nodes[{i}]: cannot use {_show(name)} as a folder name (letters, "
                             f"digits, '_', '.', '-'; at most {NAME_MAX} bytes); set 'name'")
            err.key, err.index = "nodes", i  # type: ignore[attr-defined]
            raise err


def _check_cycles(comps: Mapping[str, Component], raw: _Map) -> None:
    """A dependency cycle is an error naming it; depth-first without recursion, so a chain
    of thousands of components is fine."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in comps:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(comps[root].depends_on))]
        while stack:
            name, deps = stack[-1]
            for dep in deps:
                if state.get(dep) == 1:
                    path = [n for n, _ in stack]
                    cycle = path[path.index(dep):] + [dep]
                    if len(cycle) > 10:
                        cycle = cycle[:5] + [f"... ({len(cycle) - 9} more)"] + cycle[-4:]
                    raise _fail(raw[name], "depends_on", f"component '{name}'",
                                "dependency cycle: " + " -> ".join(cycle))
                if dep not in state:
                    state[dep] = 1
                    stack.append((dep, iter(comps[dep].depends_on)))
                    break
            else:
                state[name] = 2
                stack.pop()
