"""ComfyUI-Manager, both generations: which one the installed ComfyUI expects, and where it lives.

- **v4** (current ComfyUI): ComfyUI ships `manager_requirements.txt` (one pinned line,
  `comfyui_manager==4.x`); the Manager is that package, installed into ComfyUI's interpreter, and
  is loaded only with `--enable-manager` (`--enable-manager-legacy-ui` adds the old menu). Its
  files live in `user/__manager/` (config.ini, snapshots/); a clone left in
  `custom_nodes/ComfyUI-Manager` is blocked by ComfyUI ("Blocked by policy").
- **v3** (older ComfyUI): a git clone in `custom_nodes/ComfyUI-Manager`, loaded as a custom node,
  its files in `user/default/ComfyUI-Manager/` (config.ini, snapshots/).

The `manager` component kind (agent/kinds/manager.py) installs the detected one;
`generation: v3|v4` in its config forces either. Readers here never install or spawn anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.model import Component, Config

KIND = "manager"
REQUIREMENTS = "manager_requirements.txt"  # in ComfyUI's folder: ComfyUI expects v4
PACKAGE = "comfyui-manager"  # the v4 distribution (canonical name)
V3_FOLDER = "ComfyUI-Manager"  # custom_nodes/<this> for v3
ENABLE = "--enable-manager"
LEGACY_UI = "--enable-manager-legacy-ui"
GENERATIONS = ("auto", "v3", "v4")


def component(config: Config) -> Component | None:
    """The enabled `manager` component (the first one, if a config has several)."""
    for comp in config.components.values():
        if comp.kind == KIND and comp.enabled:
            return comp
    return None


def requirements_file(config: Config) -> Path:
    return config.comfyui.dir / REQUIREMENTS


def expects_v4(config: Config) -> bool:
    """Does the installed ComfyUI expect the v4 Manager (it ships manager_requirements.txt)?"""
    try:
        return requirements_file(config).is_file()
    except OSError:
        return False


def generation(config: Config, comp: Component | None = None) -> tuple[str, str]:
    """("v3" | "v4", why). `comp` defaults to the config's manager component; without one the
    generation is the one the installed ComfyUI expects."""
    comp = comp if comp is not None else component(config)
    forced = comp.spec.get("generation", "auto") if comp is not None else "auto"
    if forced in ("v3", "v4"):
        return forced, f"forced by {comp.name}.generation" if comp else "forced"
    if expects_v4(config):
        return "v4", f"ComfyUI ships {REQUIREMENTS}"
    return "v3", f"ComfyUI has no {REQUIREMENTS}"


def user_dir(config: Config) -> Path:
    """ComfyUI's user folder: `--user-directory` from comfyui.args, else ComfyUI/user."""
    args = list(config.comfyui.args)
    for i, arg in enumerate(args):
        if arg == "--user-directory" and i + 1 < len(args):
            path = Path(args[i + 1])
            return path if path.is_absolute() else config.comfyui.dir / path
        if arg.startswith("--user-directory="):
            path = Path(arg.split("=", 1)[1])
            return path if path.is_absolute() else config.comfyui.dir / path
    return config.comfyui.dir / "user"


def files_dir(config: Config, gen: str) -> Path:
    """The Manager's own folder: config.ini, snapshots/, startup-scripts/."""
    return user_dir(config) / ("__manager" if gen == "v4" else "default/ComfyUI-Manager")


def snapshot_dir(config: Config, gen: str | None = None) -> Path:
    return files_dir(config, gen or generation(config)[0]) / "snapshots"


def config_ini(config: Config, gen: str | None = None) -> Path:
    return files_dir(config, gen or generation(config)[0]) / "config.ini"


def v3_dest(config: Config, comp: Component | None = None) -> Path:
    comp = comp if comp is not None else component(config)
    if comp is not None and comp.spec.get("dest"):
        return Path(comp.spec["dest"])
    return config.comfyui.dir / "custom_nodes" / V3_FOLDER


def manager_args(config: Config) -> list[str]:
    """What ComfyUI's command line needs for the Manager: `--enable-manager` (and the legacy
    UI flag when asked for) only for v4, only when ComfyUI knows the flag (it ships
    manager_requirements.txt), never twice. [] for v3 or without an enabled manager component."""
    comp = component(config)
    if comp is None or generation(config, comp)[0] != "v4" or not expects_v4(config):
        return []
    wanted = [ENABLE] + ([LEGACY_UI] if comp.spec.get("legacy_ui") else [])
    return [a for a in wanted if a not in config.comfyui.args]


def describe(config: Config) -> dict[str, Any] | None:
    """For `status`: which Manager, why, and where its files are. None without a manager
    component."""
    comp = component(config)
    if comp is None:
        return None
    gen, why = generation(config, comp)
    return {"component": comp.name, "generation": gen, "why": why,
            "args": manager_args(config), "config": str(config_ini(config, gen)),
            "snapshots": str(snapshot_dir(config, gen))}
