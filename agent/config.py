"""Load and validate configuration into a frozen desired state.

Errors are ConfigError with `file:line: component 'x': problem` so the CLI can print one line.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from agent.model import ComfyUISettings, Component, Config, ConfigError

DEFAULT_WORKSPACE = "/workspace"
OVERLAY_NAME = "pod-agent.yaml"
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PLACEHOLDER_RE = re.compile(r"(?<!\$)\{(workspace|comfyui|venv|python|markers)\}")


# --------------------------------------------------------------------------- YAML with lines
class _Map(dict):
    """A mapping that remembers where each key came from: (file, line)."""

    where: tuple[str, int] = ("?", 0)
    src: dict


class _Loader(yaml.SafeLoader):
    pass


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.where = (loader.name, node.start_mark.line + 1)
    out.src = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise ConfigError(f"{loader.name}:{key_node.start_mark.line + 1}: duplicate key '{key}'")
        out[key] = loader.construct_object(value_node, deep=True)
        out.src[key] = (loader.name, key_node.start_mark.line + 1)
    return out


class _Seq(list):
    """A list that remembers the line of each item."""

    lines: list[int]


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def default_config_path() -> Path:
    packaged = Path(__file__).parent / "_config" / "default.yaml"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "config" / "default.yaml"


def load_yaml(path: Path) -> _Map:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    loader = _Loader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    if data is None:
        data = _Map()
        data.where, data.src = (str(path), 1), {}
    if not isinstance(data, _Map):
        raise ConfigError(f"{path}:1: the top level must be a mapping of keys")
    return data


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
        elif not components and key == "components" and isinstance(value, _Map) \
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


def _check(m: _Map, key: str, value: Any, typ: str, who: str, ctx: _Ctx) -> Any:
    def bad(expected: str) -> ConfigError:
        return _fail(m, key, who, f"'{key}' must be {expected}, got {value!r}")

    if typ == "str":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad("a string")
        return ctx.expand(str(value))
    if typ == "opt_str":
        return None if value is None else _check(m, key, value, "str", who, ctx)
    if typ == "path":
        return Path(_check(m, key, value, "str", who, ctx)).expanduser()
    if typ == "opt_path":
        return None if value is None else _check(m, key, value, "path", who, ctx)
    if typ == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if typ in ("int", "opt_int"):
        if value is None and typ == "opt_int":
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad("a whole number >= 0")
        return value
    if typ in ("float", "opt_float"):
        if value is None and typ == "opt_float":
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise bad("a number >= 0")
        return float(value)
    if typ in ("list[str]", "list[path]"):
        if isinstance(value, str) and typ == "list[path]":
            value = [value]
        if not isinstance(value, list) or not all(
            isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value
        ):
            raise bad("a list of strings")
        items = [ctx.expand(str(v)) for v in value]
        return tuple(Path(v) for v in items) if typ == "list[path]" else tuple(items)
    if typ == "dict[str,str]":
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad("a mapping of names to strings")
        return {str(k): ctx.expand(str(v)) for k, v in value.items()}
    if typ.startswith("enum:"):
        choices = typ[5:].split("|")
        if str(value) not in choices:
            raise bad("one of " + ", ".join(choices))
        return str(value)
    if typ == "any":
        return value
    raise AssertionError(typ)  # pragma: no cover


def _fields(m: Any, where: _Map, key: str, schema: Mapping[str, tuple[str, Any]], who: str,
            ctx: _Ctx, extra_check: Callable[[str], bool] | None = None) -> dict[str, Any]:
    if m is None:
        m = _Map()
        m.where, m.src = where.src.get(key, where.where), {}
    if not isinstance(m, _Map):
        raise _fail(where, key, who, f"'{key}' must be a mapping")
    out: dict[str, Any] = {}
    for k in m:
        if k not in schema and not (extra_check and extra_check(k)):
            raise _fail(m, k, who, f"unknown field '{k}' (known: {', '.join(sorted(schema))})")
    for k, (typ, default) in schema.items():
        if k in m:
            out[k] = _check(m, k, m[k], typ, who, ctx)
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
}

# `http:` - the agent's HTTP endpoint for orchestrators (agent/http.py).
HTTP_FIELDS = {
    "enabled": ("bool", True),
    "address": ("str", "127.0.0.1"),
    "port": ("int", 9188),
    "token": ("opt_str", None),  # bearer token for POST endpoints; env POD_AGENT_HTTP_TOKEN wins
}

SIZE_RE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*$", re.IGNORECASE)


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


def load(config_path: str | Path | None = None, workspace: str | Path | None = None) -> Config:
    """Build the desired state from the base config (built-in or --config) and the overlay."""
    config_path = config_path or os.environ.get("POD_AGENT_CONFIG") or None
    base_file = Path(config_path) if config_path else default_config_path()
    data = load_yaml(base_file)
    sources = [str(base_file)]

    ws_raw = workspace or os.environ.get("POD_AGENT_WORKSPACE") or data.get("workspace") \
        or DEFAULT_WORKSPACE
    if not isinstance(ws_raw, (str, Path)):
        raise _fail(data, "workspace", "config", "'workspace' must be a path")
    ws = Path(ws_raw).expanduser().absolute()
    overlay = ws / OVERLAY_NAME
    if overlay.is_file():
        data = _merge(data, load_yaml(overlay))
        sources.append(str(overlay))
        if workspace is None and not os.environ.get("POD_AGENT_WORKSPACE") and "workspace" in data:
            ws = Path(str(data["workspace"])).expanduser().absolute()
    forbidden = [p for p in os.environ.get("POD_AGENT_FORBID_WORKSPACE", "").split(":") if p]
    if any(ws == Path(p).absolute() for p in forbidden):
        raise ConfigError(f"workspace {ws} is forbidden by POD_AGENT_FORBID_WORKSPACE")

    ctx = _Ctx({"workspace": str(ws)})
    top = _fields(data, data, "(top)", TOP_FIELDS, "config", ctx)
    cui_map = data.get("comfyui")
    cui = _fields(cui_map, data, "comfyui", {k: v for k, v in COMFYUI_FIELDS.items()
                                             if k not in ("python",)} | {"python": ("any", None)},
                  "comfyui", ctx)
    ctx.subst["comfyui"] = str(cui["dir"])
    if cui["venv"] is not None:
        ctx.subst["venv"] = str(cui["venv"])
    py_raw = cui_map.get("python") if isinstance(cui_map, _Map) else None
    if py_raw is None:
        if cui["venv"] is None:
            py_raw = _resolve_python(cui["base_python"])
        else:
            py_raw = "{venv}/bin/python"
    cui["python"] = Path(_check(cui_map if isinstance(cui_map, _Map) else data, "python", py_raw,
                                "str", "comfyui", ctx))
    ctx.subst["python"] = str(cui["python"])
    markers_dir = Path(ctx.expand(str(top["markers_dir"]))).absolute()
    ctx.subst["markers"] = str(markers_dir)

    agent = _fields(data.get("agent"), data, "agent", AGENT_FIELDS, "agent", ctx)
    defaults = _fields(data.get("defaults"), data, "defaults", DEFAULTS_FIELDS, "defaults", ctx)
    components = _components(data, ctx, ws, defaults)
    health = _health(data, ctx)
    http = _http(data, ctx)

    settings = ComfyUISettings(
        dir=cui["dir"], python=cui["python"], venv=cui["venv"],
        base_python=cui["base_python"], args=cui["args"], port=cui["port"], host=cui["host"],
        env=cui["env"] or {}, log=cui["log"], sage_attention=cui["sage_attention"],
    )
    return Config(
        workspace=ws,
        markers_dir=markers_dir,
        state_dir=Path(ctx.expand(str(top["state_dir"]))).absolute(),
        progress_log=Path(ctx.expand(str(top["progress_log"]))).absolute(),
        installer=top["installer"],
        installer_env=top["installer_env"] or {},
        installer_args=top["installer_args"],
        comfyui=settings,
        components=components,
        agent=agent,
        sources=tuple(sources),
        health=health,
        http=http,
    )


def _health(data: _Map, ctx: _Ctx) -> dict[str, Any]:
    health = _fields(data.get("health"), data, "health", HEALTH_FIELDS, "health", ctx)
    where = data.get("health") if isinstance(data.get("health"), _Map) else data
    if not SIZE_RE.match(health["report_max_size"]):
        raise _fail(where, "report_max_size", "health", "'report_max_size' must be a size such "
                    f"as '10 MB', got {health['report_max_size']!r}")
    raw = health.pop("checks")
    if raw is not None and not isinstance(raw, _Map):
        raise _fail(where, "checks", "health", "'checks' must be a mapping of check names")
    raw = raw if raw is not None else {}
    for name in raw:
        if name not in CHECKS:
            raise _fail(raw, name, "health", f"unknown check '{name}' (known: "
                        f"{', '.join(CHECKS)})")
    checks: dict[str, dict[str, Any]] = {}
    for name, (defaults, own, actions) in CHECKS.items():
        schema = {k: (typ, defaults.get(k, default)) for k, (typ, default)
                  in CHECK_FIELDS.items()} | own
        who = f"health check '{name}'"
        body = raw.get(name)
        values = _fields(body, raw if isinstance(raw, _Map) else where, name, schema, who, ctx)
        if values["on_fail"] not in actions:
            raise _fail(body if isinstance(body, _Map) else raw, "on_fail", who,
                        f"'on_fail' must be one of {', '.join(actions)} for this check, "
                        f"got {values['on_fail']!r}")
        if values["interval"] <= 0 or values["timeout"] <= 0:
            key = "interval" if values["interval"] <= 0 else "timeout"
            raise _fail(body if isinstance(body, _Map) else raw, key, who,
                        f"'{key}' must be > 0")
        if "paths" in values:
            values["paths"] = tuple(ctx.expand(str(v)) for v in values["paths"])
        checks[name] = values
    health["checks"] = checks
    return health


def _http(data: _Map, ctx: _Ctx) -> dict[str, Any]:
    http = _fields(data.get("http"), data, "http", HTTP_FIELDS, "http", ctx)
    if http["port"] > 65535:
        where = data.get("http") if isinstance(data.get("http"), _Map) else data
        raise _fail(where, "port", "http", f"'port' must be 0-65535, got {http['port']}")
    return http


def _components(data: _Map, ctx: _Ctx, ws: Path, defaults: Mapping[str, Any]) -> dict[str, Component]:
    from agent.kinds import KINDS

    raw = data.get("components")
    if raw is None:
        return {}
    if not isinstance(raw, _Map):
        raise _fail(data, "components", "config", "'components' must be a mapping of names")
    out: dict[str, Component] = {}
    for name, body in raw.items():
        who = f"component '{name}'"
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise _fail(raw, name, who, "a component name must be a plain identifier "
                        "(letters, digits, underscore; not starting with a digit)")
        if not isinstance(body, _Map):
            raise _fail(raw, name, who, "must be a mapping with at least 'kind'")
        kind = body.get("kind")
        if kind not in KINDS:
            if "kind" not in body:
                raise _fail(body, None, who, "missing 'kind' (one of: " + ", ".join(KINDS) + ")")
            raise _fail(body, "kind", who, f"unknown kind '{kind}' (one of: {', '.join(KINDS)})")
        module = KINDS[kind]
        schema = dict(COMMON_FIELDS) | module.FIELDS
        values = _fields(body, raw, name, schema, who, ctx)
        try:
            spec = module.validate({k: values[k] for k in module.FIELDS}, ctx.expand)
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
            restart_comfyui=values["restart_comfyui"] and kind != "overall",
        )
    for name, comp in out.items():
        body = raw[name]
        for dep in comp.depends_on:
            if dep not in out:
                raise _fail(body, "depends_on", f"component '{name}'",
                            f"unknown dependency '{dep}' (known: {', '.join(out)})")
    _check_cycles(out, raw)
    return out


def _check_cycles(comps: Mapping[str, Component], raw: _Map) -> None:
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in comps[name].depends_on:
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                raise _fail(raw[name], "depends_on", f"component '{name}'",
                            "dependency cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in comps:
        if name not in state:
            visit(name, [name])
