"""`agent`: the agent's own machinery. The watchdog observer thread is alive (a dead one is
restarted here), the scheduler's job errors, missed runs and max-instance skips (overruns)
since the last run, and a reconcile that keeps failing (a component that fails pass after pass
warns; a pass that crashes fails the check). Without a running agent it says so: nothing
supervises or heals the pod."""

from __future__ import annotations

import os

from agent.checks.base import CheckCtx, Result
from agent.checks.comfyui import agent_running
from agent.status import http_endpoint

RECONCILE_WARN_AFTER = 3  # passes in a row that did not converge before the check warns


def check(ctx: CheckCtx) -> Result:
    hooks = ctx.hooks
    if not hooks.in_agent:
        data = agent_running(ctx.config)
        if data is None:
            return Result("warn", "pod-agent is not running for this workspace: nothing "
                                  "supervises ComfyUI or heals the pod", actionable=False)
        http = http_endpoint(ctx.config, data.get("pid"))
        if http["state"] == "retrying":  # configured but not listening
            return Result("warn", f"pod-agent running (pid {data.get('pid')}); HTTP endpoint "
                                  f"{http['detail']}", data={"pid": data.get("pid"),
                                                             "http": http}, actionable=False)
        return Result("ok", f"pod-agent running (pid {data.get('pid')})",
                      data={"pid": data.get("pid")})
    notes, status, action = [], "ok", None
    watcher = hooks.watcher
    data: dict = {}
    if watcher is not None:
        data["watch_mode"] = watcher.mode
        if not watcher.alive():
            try:
                watcher.restart()
            except Exception as exc:  # noqa: BLE001 - report, do not raise
                return Result("fail", f"the watchdog observer died and could not be restarted: "
                                      f"{exc}", data=data, actionable=False,
                              action="restart_observer (failed)")
            status, action = "warn", "restart_observer"
            notes.append(f"the watchdog observer thread had died: restarted "
                         f"({watcher.restarts} restart(s) so far)")
        data["observer_restarts"] = watcher.restarts
    if hooks.job_events is not None:
        now = dict(hooks.job_events())
        before = ctx.memo.get("job_events", {k: 0 for k in now})
        ctx.memo["job_events"] = now
        new = {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0) > 0}
        data["scheduler_events"] = now
        if new:
            status = "warn"
            notes.append("scheduler since the last check: " + ", ".join(
                f"{v} {k.replace('_', ' ')}" for k, v in sorted(new.items())))
    for last in (hooks.reconciles() if hooks.reconciles is not None else []):
        runs = last.get("failures_in_a_row") or 0
        if runs >= RECONCILE_WARN_AFTER:
            crashed = str(last.get("result", "")).startswith("error:")
            status = "fail" if crashed else ("warn" if status == "ok" else status)
            notes.append(f"the {last.get('phase')} reconcile has not converged {runs} passes in a "
                         f"row (since {last.get('failing_since')}): {last.get('result')}")
    http = http_endpoint(ctx.config, os.getpid())
    if http["state"] == "retrying":  # configured but not listening (agent/http.py retries)
        status = "warn"
        data["http"] = http
        notes.append(f"HTTP endpoint {http['detail']}")
    overruns = ctx.memo.get("overruns")
    if overruns:
        status = "warn"
        notes.append("checks that overran their timeout: " + ", ".join(
            f"{k} ({v}x)" for k, v in sorted(overruns.items())))
        ctx.memo["overruns"] = {}
    detail = "; ".join(notes) if notes else (
        "watch observer alive" + (f" ({watcher.mode})" if watcher is not None else "")
        + ", no scheduler errors")
    return Result(status, detail, data=data, actionable=False, action=action)
