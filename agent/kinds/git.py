"""`git` components: a repository checked out at `dest`, optionally with its requirements."""

from __future__ import annotations

from typing import Any, Callable

from agent.kinds import gitops
from agent.kinds.base import Ctx, Problem
from agent.model import Component, Marker

FIELDS = {
    "repo": ("str", None),
    "dest": ("path", None),
    "ref": ("opt_str", None),
    "depth": ("opt_int", None),
    "update": ("bool", False),
    "requirements": ("enum:auto|none", "none"),
}


def validate(values: dict[str, Any], expand: Callable[[str], str]) -> dict[str, Any]:
    for key in ("repo", "dest"):
        if not values.get(key):
            err = ValueError(f"missing '{key}'")
            err.key = key  # type: ignore[attr-defined]
            raise err
    return values


def inputs(comp: Component, ctx: Ctx) -> dict[str, Any]:
    s = comp.spec
    return {"repo": s["repo"], "ref": s["ref"], "dest": str(s["dest"]),
            "requirements": s["requirements"]}


def probe(comp: Component, ctx: Ctx, marker: Marker | None) -> Problem | None:
    s = comp.spec
    meta = marker.meta if marker else {}
    found = gitops.checkout_problem(s["dest"], meta.get("commit"), s["ref"])
    if found is None and s["requirements"] == "auto":
        found = gitops.deps_problem(ctx, s["dest"], meta.get("deps"))
    return Problem(*found) if found else None


def install(comp: Component, ctx: Ctx, marker: Marker | None = None) -> dict[str, str]:
    s = comp.spec
    commit = gitops.ensure_checkout(comp, ctx, s["repo"], s["dest"], s["ref"], s["depth"],
                                    s["update"], comp.name)
    meta = {"version": f"git {commit[:12]}", "commit": commit}
    if s["requirements"] == "auto":
        gitops.install_deps(comp, ctx, s["dest"], comp.name)
        meta["deps"] = gitops.deps_digest(s["dest"])
    return meta


def current_meta(comp: Component, ctx: Ctx) -> dict[str, str]:
    """Metadata describing what is on disk now (used to upgrade a legacy marker)."""
    s = comp.spec
    commit = gitops.head(s["dest"]) or ""
    meta = {"version": f"git {commit[:12]}", "commit": commit}
    if s["requirements"] == "auto":
        meta["deps"] = gitops.deps_digest(s["dest"])
    return meta
