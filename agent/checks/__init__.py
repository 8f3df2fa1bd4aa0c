"""Health checks: one function per check, `fn(CheckCtx) -> Result` (see agent/health.py)."""

from __future__ import annotations

from typing import Callable

from agent.checks import comfyui, components, drift, sage, selfcheck, system
from agent.checks.base import CheckCtx, Hooks, Result

REGISTRY: dict[str, Callable[[CheckCtx], Result]] = {
    "comfyui_http": comfyui.http,
    "comfyui_process": comfyui.process,
    "sageattention": sage.check,
    "components": components.check,
    "disk": system.disk,
    "gpu": system.gpu,
    "agent": selfcheck.check,
    "drift": drift.check,
}

__all__ = ["REGISTRY", "CheckCtx", "Hooks", "Result"]
