"""`pod-agent status`: the truth about components, processes, logs, and an overall verdict.

Returns plain data (the `--json` contract); rendering lives in the CLI.
"""

from __future__ import annotations

import time
from typing import Any

from agent import manager, procs
from agent.kinds.base import Ctx
from agent.locks import held_by_other
from agent.markers import read_json
from agent.model import Config, State
from agent.observe import lock_path, observe
from agent.redact import redact

VERDICTS = ("healthy", "installing", "degraded", "broken")
HEALTH_FILE = "health.json"  # agent.health.STATE_FILE, named here to look without importing it


def _process(pid: int | None, create_time: float | None = None) -> dict[str, Any] | None:
    import psutil

    proc = procs.alive(pid, create_time or None) if pid else None
    if proc is None:
        return None
    try:
        return {"pid": proc.pid, "uptime": round(time.time() - proc.create_time(), 1),
                "cmdline": redact(" ".join(proc.cmdline()))[:300]}
    except psutil.Error:
        return None


def processes(config: Config, installing: list[str] | None = None) -> list[dict[str, Any]]:
    """The agent, ComfyUI and installers in progress (`installing`: the components whose lock
    is held, when the caller already knows; else every lock is checked)."""
    out: list[dict[str, Any]] = []
    # a pid alone proves nothing (pids are reused, the file may be hand-written): the files
    # the agent writes carry the process's start time, and both must match
    agent = read_json(config.runtime_dir / "agent.json")
    if agent and agent.get("create_time"):
        info = _process(agent.get("pid"), agent.get("create_time"))
        if info:
            out.append({"role": "agent", **info,
                        **{k: agent.get(k) for k in ("last_reconcile", "last_result")}})
    comfy = read_json(config.runtime_dir / "comfyui.json")
    if comfy and comfy.get("create_time"):
        info = _process(comfy.get("pid"), comfy.get("create_time"))
        if info:
            svc = read_json(config.runtime_dir / "service.json") or {}
            out.append({"role": "comfyui", **info, **{k: v for k, v in svc.items()
                                                      if k not in ("pid", "uptime")}})
    for name in config.components if installing is None else installing:
        holder = held_by_other(lock_path(config, name))
        if holder:
            info = _process(holder.get("pid")) or {"pid": holder.get("pid"), "uptime": None}
            since = holder.get("since")
            since = since if isinstance(since, (int, float)) and not isinstance(since, bool) \
                else None
            out.append({"role": "installer", "component": name, **info,
                        "host": holder.get("host"), "since": since,
                        "for": round(max(0.0, time.time() - since), 1) if since else None})
    return out


def logs(config: Config) -> list[dict[str, Any]]:
    import stat

    paths = [config.progress_log, config.comfyui.log]
    paths += [c.log for c in config.components.values() if c.kind != "overall"]
    out = []
    now = time.time()
    for path in dict.fromkeys(paths):
        try:
            st = path.stat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):  # a folder or a FIFO where a log goes: nothing to show
            continue
        last = " ".join(procs.tail(path, 1).split())
        out.append({"path": str(path), "size": st.st_size, "age": round(now - st.st_mtime, 1),
                    "last_line": redact(last)[:200]})
    return out


def service(config: Config, procs_: list[dict[str, Any]]) -> tuple[dict | None, dict | None]:
    """(agent, comfyui) as the running agent last wrote them; (None, None) without an agent."""
    agent = next((p for p in procs_ if p["role"] == "agent"), None)
    if agent is None:
        return None, None
    data = read_json(config.runtime_dir / "agent.json") or {}
    svc = read_json(config.runtime_dir / "service.json") or {}
    agent_info = {"pid": agent["pid"], "uptime": agent["uptime"],
                  "last_reconcile": _text(data.get("last_reconcile")),
                  "last_result": _text(data.get("last_result")), "watch": data.get("watch"),
                  "http": http_endpoint(config, agent["pid"])}
    keys = ("state", "pid", "uptime", "restarts", "failures", "last_exit", "pending_restart",
            "next_start_in", "degraded_reason", "last_failure", "adopted")
    return agent_info, _typed({k: svc.get(k) for k in keys})


def _typed(svc: dict[str, Any]) -> dict[str, Any]:
    """service.json is the agent's, but a reader never trusts its types (hand-edited,
    truncated, another version's): text fields one bounded line, numbers numbers."""
    out = dict(svc)
    for k in ("state", "degraded_reason", "last_failure"):
        out[k] = _text(out.get(k))
    for k in ("pid", "uptime", "restarts", "failures", "next_start_in"):
        if not isinstance(out.get(k), (int, float)) or isinstance(out.get(k), bool):
            out[k] = None
    for k in ("last_exit", "pending_restart"):
        if not isinstance(out.get(k), dict):
            out[k] = None
    return out


def _text(value: Any, limit: int = 500) -> str | None:
    """A value from a state file as one bounded line (None stays None)."""
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def http_endpoint(config: Config, pid: int | None) -> dict[str, Any]:
    """The running agent's HTTP endpoint: listening, or not listening and retrying (http.json,
    written by that agent; agent/http.py `describe`)."""
    from agent.http import HTTP_FILE, describe

    info = read_json(config.runtime_dir / HTTP_FILE)
    return describe(info if info and info.get("pid") == pid else None,
                    bool(config.http.get("enabled", True)))


def verdict(config: Config, comps: dict[str, dict[str, Any]],
            comfyui: dict | None = None) -> str:
    real = {n: c for n, c in comps.items() if config.components[n].kind != "overall"}
    if any(c["state"] == State.INSTALLING.value for c in real.values()):
        return "installing"
    bad = {n for n, c in real.items()
           if c["state"] not in (State.INSTALLED.value, State.SKIPPED.value,
                                 State.DISABLED.value)}
    if any(config.components[n].required for n in bad):
        return "broken"
    if comfyui and comfyui.get("state") in ("degraded", "backoff"):
        return "degraded"
    # an overall marker that cannot be what it should (a folder at its path): old scripts that
    # test for the file see an unfinished install, so the workspace is not healthy
    derived_bad = any(c["state"] == State.BROKEN.value for n, c in comps.items()
                      if config.components[n].kind == "overall")
    return "degraded" if bad or derived_bad else "healthy"


def health_summary(config: Config) -> dict[str, Any] | None:
    """The latest health report in brief (`pod-agent health` has the details)."""
    if not (config.runtime_dir / HEALTH_FILE).exists():
        return None  # no report: agent.health (and every check it registers) is not imported
    from agent.health import load_state, staleness

    state = load_state(config)
    if state is None:
        return None
    checks = {n: e.get("status") for n, e in state["checks"].items() if isinstance(e, dict)}
    fresh = staleness(config, state)  # a dead agent's last report is not HEALTHY now
    return {"verdict": "stale" if fresh["stale"] else state.get("verdict"),
            "time": state.get("time"), "checks": checks,
            "quarantined": sorted(state.get("quarantined") or {}),
            "stale": fresh["stale"], "stale_reason": fresh["reason"]}


def collect(config: Config, gpu: bool | None = None) -> dict[str, Any]:
    ctx = Ctx(config, gpu=gpu)
    observed = observe(ctx, check_locks=True)
    comps: dict[str, dict[str, Any]] = {}
    for name in config.order():
        obs = observed[name]
        comp = config.components[name]
        comps[name] = {
            "state": obs.state.value,
            "timestamp": obs.marker.timestamp if obs.marker else None,
            "version": obs.marker.meta.get("version") if obs.marker else None,
            "reason": redact(_text(obs.reason, 2000) or ""),
            "log": str(comp.log) if comp.kind != "overall" else None,
            "required": comp.required,
            "background": comp.background,
            "legacy_marker": obs.legacy,
        }
    procs_ = processes(config, [n for n, c in comps.items()
                                if c["state"] == State.INSTALLING.value])
    for p in procs_:  # the component being installed now: since when (its lock's time)
        if p["role"] == "installer" and p.get("since") and p["component"] in comps:
            c = comps[p["component"]]
            c["timestamp"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["since"]))
            c["installing_for"] = p["for"]
    agent, comfyui = service(config, procs_)
    return {
        "workspace": str(config.workspace),
        "workspace_missing": not config.workspace.exists(),  # looked at, never created
        "components": comps,
        "processes": procs_,
        "logs": logs(config),
        "agent": agent,
        "comfyui": comfyui,
        "services": _services_view(config, agent),  # JupyterLab, sshd, ... (agent/services.py)
        "health": health_summary(config),
        "manager": manager.describe(config),  # ComfyUI-Manager v3 or v4 (agent/manager.py)
        "verdict": verdict(config, comps, comfyui),
    }


def _services_view(config: Config, agent: dict | None) -> dict | None:
    if agent is None or not config.services:
        return None
    from agent.services import status_view

    return status_view(config, agent)
