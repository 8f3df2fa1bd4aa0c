"""`command` components: a shell command, proven by an optional `check` command."""

from __future__ import annotations

from typing import Any, Callable

from agent import procs
from agent.kinds.base import Ctx, InstallError, Problem
from agent.model import Component, Marker, State

FIELDS = {
    "run": ("str", None),
    "check": ("opt_str", None),
    "check_timeout": ("float", 60.0),
    "cwd": ("opt_path", None),
    "env": ("dict[str,str]", None),
    "version_cmd": ("opt_str", None),
}


def validate(values: dict[str, Any], expand: Callable[[str], str]) -> dict[str, Any]:
    if not values.get("run"):
        err = ValueError("missing 'run' (the command line that installs it)")
        err.key = "run"  # type: ignore[attr-defined]
        raise err
    values["env"] = values["env"] or {}
    return values


def inputs(comp: Component, ctx: Ctx) -> dict[str, Any]:
    s = comp.spec
    return {"run": s["run"], "check": s["check"], "cwd": str(s["cwd"]), "env": dict(s["env"])}


def _env(comp: Component, ctx: Ctx) -> dict[str, str]:
    cui = ctx.config.comfyui
    env = {"COMFYUI_DIR": str(cui.dir), "COMFYUI_PYTHON": str(cui.python),
           "POD_AGENT_WORKSPACE": str(ctx.config.workspace)}
    env.update(ctx.config.installer_env)
    env.update(comp.spec["env"])
    return env


def probe(comp: Component, ctx: Ctx, marker: Marker | None) -> Problem | None:
    check = comp.spec["check"]
    if not check:
        return None
    cwd = comp.spec["cwd"] if comp.spec["cwd"] and comp.spec["cwd"].is_dir() else None
    code, out = procs.quick(check, timeout=comp.spec["check_timeout"], cwd=cwd,
                            env=_env(comp, ctx))
    if code == 0:
        return None
    last = (out.strip().splitlines() or [""])[-1][:200]
    return Problem(State.BROKEN, f"check failed (exit {code}): {last}".rstrip(": "))


def install(comp: Component, ctx: Ctx, marker: Marker | None = None) -> dict[str, str]:
    cwd = comp.spec["cwd"]
    if cwd:
        cwd.mkdir(parents=True, exist_ok=True)
    result = procs.run(comp.spec["run"], log=comp.log, timeout=comp.timeout, cwd=cwd,
                       env=_env(comp, ctx), title=comp.name)
    ctx.invalidate()
    if not result.ok:
        why = f"timed out after {comp.timeout:g}s" if result.timed_out else \
            f"exit {result.returncode}"
        raise InstallError(f"{comp.name}: command failed ({why})")
    return current_meta(comp, ctx)


def current_meta(comp: Component, ctx: Ctx) -> dict[str, str]:
    cmd = comp.spec["version_cmd"]
    if not cmd:
        return {"version": "-"}
    code, out = procs.quick(cmd, timeout=comp.spec["check_timeout"], env=_env(comp, ctx))
    lines = out.strip().splitlines()
    return {"version": lines[-1][:200] if code == 0 and lines else "-"}
