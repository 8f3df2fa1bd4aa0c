"""The `services:` and `hooks:` sections of the config: validated into frozen ServiceSpec values.

A service is a long-running process the agent supervises besides ComfyUI (JupyterLab, sshd, the
user's own). Each bad value is one ConfigError line naming file:line, the service and the key
(agent/config.py's helpers). `enabled: auto` is decided when the agent starts (`auto_off`):
the environment variables in `auto_env` must be set and the program must exist.

`${NAME}` in `env` values, `command` items and `authorized_keys` is the agent's environment
variable NAME, read when the service starts (never stored in the config or a state file); the
config's own placeholders (`{workspace}`, ...) are expanded when the config is read.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from agent.config import _Ctx, _Map

RESTART_POLICIES = ("always", "on-failure", "never")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    command: tuple[str, ...] | str  # an argv list, or a shell line run by bash -c
    cwd: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    port: int | None = None
    ready: str | None = None  # None: running is ready; "tcp": a TCP connect; "/path": HTTP GET
    ready_timeout: float = 300.0
    restart: str = "on-failure"
    depends_on: tuple[str, ...] = ()  # components installed first (none: start at once)
    stop_timeout: float = 10.0
    log: Path = Path("service.log")
    enabled: str = "auto"  # "true" | "false" | "auto"
    required_for_ready: bool = False
    auto_env: tuple[str, ...] = ()  # with enabled: auto, these must be set (non-empty)
    auto_program: str | None = None  # with enabled: auto, this must exist (default: argv[0])
    authorized_keys: str | None = None  # keys put in ~/.ssh/authorized_keys before a start

    @property
    def shell(self) -> bool:
        return isinstance(self.command, str)

    def auto_off(self, environ: Mapping[str, str] | None = None) -> str | None:
        """Why an `enabled: auto` service does not run here (None: it runs). Also None for
        `true`; `false` is "disabled in the config"."""
        if self.enabled == "false":
            return "disabled in the config"
        if self.enabled == "true":
            return None
        environ = os.environ if environ is None else environ
        for name in self.auto_env:
            if not environ.get(name):
                return f"{name} is not set"
        program = self.auto_program or (None if self.shell else self.command[0])
        if program and not find_program(program, environ):
            return f"{program} not found" + ("" if os.sep in program else " on PATH")
        return None

    def argv(self, environ: Mapping[str, str]) -> list[str]:
        """The command to run: a shell line through bash, an argv list with ${NAME} expanded."""
        if isinstance(self.command, str):
            return ["bash", "-c", self.command]
        return [expand_env(part, environ) for part in self.command]

    def environment(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The service's own env (${NAME} expanded), to lay over the agent's."""
        return {k: expand_env(v, environ) for k, v in self.env.items()}


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    return ENV_REF.sub(lambda m: environ.get(m.group(1), ""), text)


def env_refs(spec: ServiceSpec) -> set[str]:
    """The environment variables a service reads through ${NAME} (their values are secrets
    when they are used in a secret-looking env key or are keys)."""
    parts = list(spec.env.values()) + ([spec.command] if spec.shell else list(spec.command))
    parts.append(spec.authorized_keys or "")
    return {m.group(1) for p in parts for m in ENV_REF.finditer(p)}


def find_program(program: str, environ: Mapping[str, str]) -> str | None:
    if os.sep in program:
        return program if os.access(program, os.X_OK) and os.path.isfile(program) else None
    return shutil.which(program, path=environ.get("PATH", os.defpath))


@dataclass(frozen=True)
class Hooks:
    pre_start: Path | None = None  # run (when it exists) before anything else
    post_start: Path | None = None  # run (when it exists) once ComfyUI is first ready
    log: Path = Path("hooks.log")
    timeout: float = 600.0


SERVICE_FIELDS = {
    "command": ("any", None),
    "cwd": ("opt_path", None),
    "env": ("dict[str,str]", None),
    "port": ("opt_int", None),
    "ready": ("opt_str", None),
    "ready_timeout": ("float", 300.0),
    "restart": ("enum:" + "|".join(RESTART_POLICIES), "on-failure"),
    "depends_on": ("list[str]", ()),
    "stop_timeout": ("float", 10.0),
    "log": ("opt_path", None),
    "enabled": ("any", "auto"),
    "required_for_ready": ("bool", False),
    "auto_env": ("list[str]", ()),
    "auto_program": ("opt_str", None),
    "authorized_keys": ("opt_str", None),
    "description": ("opt_str", None),
}

HOOKS_FIELDS = {
    "pre_start": ("opt_path", None),
    "post_start": ("opt_path", None),
    "log": ("path", "{workspace}/logs/hooks.log"),
    "timeout": ("float", 600.0),
}


def parse_services(data: "_Map", ctx: "_Ctx", ws: Path,
                   components: Mapping[str, Any]) -> dict[str, ServiceSpec]:
    from agent.config import (MAX_NAME, NAME_RE, Range, _Map, _check_path, _fail, _fields,
                              _names, _show)

    raw = data.get("services")
    if raw is None:
        return {}
    if not isinstance(raw, _Map):
        raise _fail(data, "services", "config", "'services' must be a mapping of names, got "
                    f"{_show(raw)}")
    limits = {"port": Range(1, 65535), "ready_timeout": Range(0.05, 86400, " of seconds", True),
              "stop_timeout": Range(0.05, 3600, " of seconds", True)}
    out: dict[str, ServiceSpec] = {}
    for name, body in raw.items():
        who = f"service {_show(name)}"
        if not NAME_RE.fullmatch(name) or len(name) > MAX_NAME:
            raise _fail(raw, name, who, "a service name must be a plain identifier (letters, "
                        f"digits, underscore; not starting with a digit; at most {MAX_NAME})")
        if name == "comfyui":
            raise _fail(raw, name, who, "'comfyui' is the agent's own service (configure it "
                        "under `comfyui:`); choose another name")
        who = f"service '{name}'"
        if not isinstance(body, _Map):
            raise _fail(raw, name, who, f"must be a mapping with at least 'command', got "
                        f"{_show(body)}")
        v = _fields(body, raw, name, SERVICE_FIELDS, who, ctx, limits=limits)
        command = _command(body, v["command"], who, ctx)
        enabled = v["enabled"]
        if enabled not in (True, False, "auto"):
            raise _fail(body, "enabled", who, f"'enabled' must be true, false or auto, got "
                        f"{_show(enabled)}")
        ready = v["ready"]
        if ready is not None and ready != "tcp" and not ready.startswith("/"):
            raise _fail(body, "ready", who, f"'ready' must be an HTTP path such as /api, or "
                        f"tcp (a TCP connect to 'port'), got {_show(ready)}")
        if ready is not None and v["port"] is None:
            raise _fail(body, "ready", who, f"'ready: {ready}' needs 'port'")
        if v["required_for_ready"] and ready is None:
            raise _fail(body, "required_for_ready", who, "'required_for_ready' needs 'ready' "
                        "(an HTTP path or tcp) to know when the service serves")
        for dep in v["depends_on"]:
            if dep not in components:
                raise _fail(body, "depends_on", who, f"'depends_on': unknown component "
                            f"{_show(dep)} (known: {_names(components)})")
        for env_name in v["auto_env"]:
            if not ENV_NAME.fullmatch(env_name):
                raise _fail(body, "auto_env", who, f"{_show(env_name)} is not an environment "
                            "variable name")
        if v["auto_program"] is not None:
            _check_path(body, "auto_program", v["auto_program"], who)
        log = v["log"] or ws / "logs" / f"{name}.log"
        out[name] = ServiceSpec(
            name=name, command=command, cwd=Path(v["cwd"]).absolute() if v["cwd"] else None,
            env=v["env"] or {}, port=v["port"], ready=ready, ready_timeout=v["ready_timeout"],
            restart=v["restart"], depends_on=v["depends_on"], stop_timeout=v["stop_timeout"],
            log=Path(log).absolute(), enabled=str(enabled).lower(),
            required_for_ready=v["required_for_ready"], auto_env=v["auto_env"],
            auto_program=v["auto_program"], authorized_keys=v["authorized_keys"])
    _register_secrets(out)
    return out


def _command(body: "_Map", value: Any, who: str, ctx: "_Ctx") -> tuple[str, ...] | str:
    from agent.config import _check, _fail, _show

    if value is None:
        raise _fail(body, None if "command" not in body else "command", who,
                    "missing 'command' (an argv list, or a shell line)")
    if isinstance(value, str):
        if not value.strip():
            raise _fail(body, "command", who, "'command' is empty")
        return ctx.expand(value)
    if isinstance(value, list):
        items = _check(body, "command", value, "list[str]", who, ctx)
        if not items or not items[0]:
            raise _fail(body, "command", who, "'command' is an empty list")
        return items
    raise _fail(body, "command", who, f"'command' must be an argv list or a shell line, got "
                f"{_show(value)}")


def _register_secrets(services: Mapping[str, ServiceSpec]) -> None:
    """A service's secret-looking env values and flags are masked everywhere, and so are the
    values of the environment variables it reads into a secret-looking key (JUPYTER_TOKEN from
    ${JUPYTER_PASSWORD}): whatever their length, once they are known."""
    from agent.redact import register, secret_name, secrets_in_args, secrets_in_env

    values: list[str | None] = []
    for spec in services.values():
        values += secrets_in_env({k: v for k, v in spec.env.items() if not ENV_REF.search(v)})
        if not spec.shell:
            values += secrets_in_args(spec.command)
        for key, text in spec.env.items():
            for m in ENV_REF.finditer(text):
                if secret_name(key) or secret_name(m.group(1)):
                    values.append(os.environ.get(m.group(1)))
        for env_name in spec.auto_env:
            if secret_name(env_name):
                values.append(os.environ.get(env_name))
    register(*values)


def parse_hooks(data: "_Map", ctx: "_Ctx") -> Hooks:
    from agent.config import Range, _fields

    v = _fields(data.get("hooks"), data, "hooks", HOOKS_FIELDS, "hooks", ctx,
                limits={"timeout": Range(1, 86400, " of seconds")})
    return Hooks(pre_start=v["pre_start"], post_start=v["post_start"],
                 log=Path(v["log"]).absolute(), timeout=v["timeout"])
