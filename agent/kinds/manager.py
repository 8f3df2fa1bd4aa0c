"""`manager` components: ComfyUI-Manager, the generation the installed ComfyUI expects.

v3: a git checkout at `dest` (custom_nodes/ComfyUI-Manager) with its requirements, as the `git`
kind does (same inputs, so a marker written by the `git` kind stays valid). v4: the
`comfyui-manager` package pinned by ComfyUI's manager_requirements.txt, installed into ComfyUI's
interpreter; a v3 clone still enabled in custom_nodes is moved to custom_nodes/.disabled (ComfyUI
blocks it under v4; never deleted). `--enable-manager` comes from agent/manager.py
`manager_args`. See agent/manager.py for the facts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from agent import manager
from agent.kinds import gitops
from agent.kinds.base import Ctx, InstallError, Problem, requirement_problems
from agent.model import Component, Marker, State

FIELDS = {
    "generation": ("enum:auto|v3|v4", "auto"),
    "repo": ("str", "https://github.com/ltdrdata/ComfyUI-Manager"),
    "dest": ("path", "{comfyui}/custom_nodes/ComfyUI-Manager"),
    "ref": ("opt_str", None),
    "depth": ("opt_int", None),
    "update": ("bool", False),
    "requirements": ("enum:auto|none", "auto"),
    "legacy_ui": ("bool", False),  # v4: also pass --enable-manager-legacy-ui
    "registry": ("str", "https://api.comfy.org"),  # the Comfy Registry: snapshot restores
}


def validate(values: dict[str, Any], expand: Callable[[str], str]) -> dict[str, Any]:
    for key in ("repo", "dest"):
        if not values.get(key):
            err = ValueError(f"'{key}' must not be empty")
            err.key = key  # type: ignore[attr-defined]
            raise err
    return values


def _gen(comp: Component, ctx: Ctx) -> str:
    return manager.generation(ctx.config, comp)[0]


def _reqs_file(ctx: Ctx) -> Path:
    return manager.requirements_file(ctx.config)


def _reqs_digest(ctx: Ctx) -> str:
    from agent.reqs import files_digest

    path = _reqs_file(ctx)
    return files_digest([path]) if path.is_file() else "-"


def inputs(comp: Component, ctx: Ctx) -> dict[str, Any]:
    s = comp.spec
    if _gen(comp, ctx) == "v3":  # exactly the `git` kind's inputs
        return {"repo": s["repo"], "ref": s["ref"], "dest": str(s["dest"]),
                "requirements": s["requirements"]}
    return {"generation": "v4", "manager_requirements": _reqs_digest(ctx)}


def _v3_clone_enabled(comp: Component) -> bool:
    dest = Path(comp.spec["dest"])
    return dest.is_dir() and (dest / ".git").exists()


def probe(comp: Component, ctx: Ctx, marker: Marker | None) -> Problem | None:
    s = comp.spec
    meta = marker.meta if marker else {}
    if _gen(comp, ctx) == "v3":
        found = gitops.checkout_problem(s["dest"], meta.get("commit"), s["ref"])
        if found is None and s["requirements"] == "auto":
            found = gitops.deps_problem(ctx, s["dest"], meta.get("deps"))
        return Problem(*found) if found else None
    path = _reqs_file(ctx)
    if not path.is_file():
        return Problem(State.BROKEN, f"generation v4 wanted but {path} does not exist (this "
                                     "ComfyUI predates the v4 Manager: set generation: auto)")
    from agent.reqs import read_file

    reqs, _ = read_file(path)
    problems = requirement_problems(ctx, reqs)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Problem(State.BROKEN, problems[0] + more)
    if _v3_clone_enabled(comp):
        return Problem(State.STALE, f"the v3 clone {s['dest']} is still enabled (ComfyUI "
                                    "blocks it under v4): it goes to custom_nodes/.disabled")
    return None


def _disable_v3(comp: Component) -> Path | None:
    """Move an enabled v3 clone to custom_nodes/.disabled/ (as the Manager disables a node);
    a name already taken there gets a timestamp. Never deletes."""
    dest = Path(comp.spec["dest"])
    if not _v3_clone_enabled(comp):
        return None
    target = dest.parent / ".disabled" / dest.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target = target.with_name(f"{dest.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    dest.rename(target)
    return target


def _enable_v3(comp: Component) -> Path | None:
    """Back to v3 (a rollback of ComfyUI, generation: v3): the clone that v4 moved to
    custom_nodes/.disabled/ comes back to dest instead of a new clone (no copy left behind)."""
    dest = Path(comp.spec["dest"])
    parked = dest.parent / ".disabled" / dest.name
    if dest.exists() or not (parked / ".git").exists():
        return None
    parked.rename(dest)
    return parked


def install(comp: Component, ctx: Ctx, marker: Marker | None = None) -> dict[str, str]:
    s = comp.spec
    if _gen(comp, ctx) == "v3":
        parked = _enable_v3(comp)
        if parked is not None:
            with open(comp.log, "a") as fh:
                fh.write(f"=== {comp.name}: v3 in use; the clone {parked} moved back to "
                         f"{s['dest']}\n")
        commit = gitops.ensure_checkout(comp, ctx, s["repo"], s["dest"], s["ref"], s["depth"],
                                        s["update"], comp.name)
        meta = {"version": f"v3 git {commit[:12]}", "commit": commit, "generation": "v3"}
        if s["requirements"] == "auto":
            gitops.install_deps(comp, ctx, s["dest"], comp.name)
            meta["deps"] = gitops.deps_digest(s["dest"])
        return meta
    path = _reqs_file(ctx)
    if not path.is_file():
        raise InstallError(f"{comp.name}: generation v4 needs a ComfyUI that ships "
                           f"{manager.REQUIREMENTS} ({path} does not exist); set generation: "
                           "auto or v3")
    ctx.pip_install(comp, ["-r", str(path)], f"{comp.name}: {manager.REQUIREMENTS}")
    moved = _disable_v3(comp)
    if moved is not None:
        with open(comp.log, "a") as fh:
            fh.write(f"=== {comp.name}: v4 in use; the v3 clone {s['dest']} moved to {moved}\n")
    return current_meta(comp, ctx)


def current_meta(comp: Component, ctx: Ctx) -> dict[str, str]:
    """Metadata describing what is on disk now (used to upgrade a legacy marker)."""
    s = comp.spec
    if _gen(comp, ctx) == "v3":
        commit = gitops.head(s["dest"]) or ""
        meta = {"version": f"v3 git {commit[:12]}", "commit": commit, "generation": "v3"}
        if s["requirements"] == "auto":
            meta["deps"] = gitops.deps_digest(s["dest"])
        return meta
    try:
        version = ctx.pyenv().dists.get(manager.PACKAGE, "?")
    except Exception:  # noqa: BLE001 - the version line is informative only
        version = "?"
    return {"version": f"v4 {manager.PACKAGE} {version}", "generation": "v4"}
