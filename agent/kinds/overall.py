"""`overall` components: derived. Installed exactly when every other enabled component is."""

from __future__ import annotations

from typing import Any, Callable

from agent.kinds.base import Ctx, Problem
from agent.model import Component, Marker

FIELDS: dict[str, tuple[str, Any]] = {}


def validate(values: dict[str, Any], expand: Callable[[str], str]) -> dict[str, Any]:
    return values


def inputs(comp: Component, ctx: Ctx) -> dict[str, Any]:
    return {"components": sorted(n for n, c in ctx.config.components.items()
                                 if c.enabled and c.kind != "overall")}


def probe(comp: Component, ctx: Ctx, marker: Marker | None) -> Problem | None:
    return None  # judged by the observer from the other components' states


def install(comp: Component, ctx: Ctx, marker: Marker | None = None) -> dict[str, str]:
    return current_meta(comp, ctx)


def current_meta(comp: Component, ctx: Ctx) -> dict[str, str]:
    from agent import __version__

    return {"version": f"comfy-pod-agent {__version__}"}
