"""What a health check gets and returns. No I/O here."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from agent.model import Config

STATUSES = ("ok", "warn", "fail", "skip")


@dataclass
class Result:
    status: str  # ok | warn | fail | skip
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ()  # components a `reinstall` acts on (failing, with a marker)
    healthy: tuple[str, ...] = ()  # components proven fine now (their quarantine ends)
    dead: bool = False  # ComfyUI is gone: a restart is urgent, not queue-aware
    actionable: bool = True  # False: failing, but the on_fail action cannot help
    action: str | None = None  # what the check itself did about it (e.g. restart_observer)


@dataclass
class Hooks:
    """What checks and actions may touch. The daemon fills all of it; `pod-agent health --now`
    leaves it empty: checks then read the agent's state files and actions are only reported."""

    service: Callable[[], dict | None] | None = None  # the supervisor's snapshot()
    comfy_expected: Callable[[], bool] | None = None  # the agent started (or adopted) ComfyUI
    request_restart: Callable[[str, bool], None] | None = None  # (reason, urgent)
    request_reconcile: Callable[[str], None] | None = None
    watcher: Any = None  # agent.watch.Watcher
    job_events: Callable[[], Mapping[str, int]] | None = None  # scheduler errors/misses/skips
    gpu: Callable[[], bool] | None = None
    reconciles: Callable[[], list[dict]] | None = None  # each worker's latest pass (its `last`)

    @property
    def in_agent(self) -> bool:
        return self.request_reconcile is not None


@dataclass
class CheckCtx:
    config: Config
    settings: Mapping[str, Any]  # this check's section of `health.checks`
    hooks: Hooks
    memo: dict[str, Any]  # survives between runs of the same check in one process
    force: bool = False  # ignore caches (`pod-agent health --now`)
    started: float = field(default_factory=time.monotonic)

    def remaining(self, floor: float = 0.5) -> float:
        """Seconds left of this run's timeout (a check bounds its own subprocesses with it)."""
        return max(floor, self.settings["timeout"] - (time.monotonic() - self.started))

    def gpu(self) -> bool:
        if self.hooks.gpu is not None:
            return self.hooks.gpu()
        from agent.gpu import has_gpu

        return has_gpu()
