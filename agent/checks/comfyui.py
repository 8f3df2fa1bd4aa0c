"""`comfyui_http` and `comfyui_process`: is ComfyUI answering, and is its process sound?

In the agent both read the supervisor's snapshot: while ComfyUI starts they wait (startup grace:
liveness only counts after the first answer); in BACKOFF/DEGRADED the supervisor is already
restarting it, so they report the failure without acting. Without an agent (`pod-agent health
--now`) they read the agent's state files, or probe the configured port directly.
"""

from __future__ import annotations

import json
import time
import urllib.error
from typing import Any

import psutil

from agent.checks.base import CheckCtx, Result
from agent.markers import read_json
from agent.comfyhttp import ComfyClient
from agent.procs import alive
from agent.model import Config


def agent_running(config: Config) -> dict | None:
    """The running agent's agent.json, or None when no agent runs for this workspace here."""
    data = read_json(config.runtime_dir / "agent.json")
    if data and alive(data.get("pid"), data.get("create_time")):
        return data
    return None


def service(ctx: CheckCtx) -> tuple[dict | None, bool, bool]:
    """(supervisor snapshot or None, ComfyUI is expected to run, an agent supervises it)."""
    hooks = ctx.hooks
    if hooks.service is not None:
        expected = hooks.comfy_expected() if hooks.comfy_expected else True
        return hooks.service(), expected, True
    agent = agent_running(ctx.config)
    if agent is None:
        return None, True, False
    snap = read_json(ctx.config.runtime_dir / "service.json")
    return snap, bool(agent.get("start_comfyui", True)), True


def _not_running(snap: dict | None, expected: bool, supervised: bool, what: str
                 ) -> Result | None:
    """The verdict when the supervisor says ComfyUI is not up; None when it should be."""
    if not supervised:
        return None
    state = (snap or {}).get("state", "stopped")
    if not expected:
        return Result("skip", "ComfyUI is not managed by this agent (--no-comfyui)")
    if state == "stopped":
        return Result("skip", "ComfyUI waits for the required components (not started yet)")
    if state == "starting" and what == "http":
        return Result("skip", "ComfyUI is starting: checks begin after its first answer",
                      data={"state": state})
    if state in ("backoff", "degraded", "stopping"):
        why = (snap or {}).get("degraded_reason") or (snap or {}).get("last_failure") or ""
        return Result("fail", f"ComfyUI is in {state.upper()}" + (f": {why}" if why else "")
                      + " (the supervisor is restarting it)", data={"state": state},
                      actionable=False)
    return None


def http(ctx: CheckCtx) -> Result:
    snap, expected, supervised = service(ctx)
    early = _not_running(snap, expected, supervised, "http")
    if early is not None:
        return early
    client = ComfyClient(ctx.config.comfyui)
    url = client.url("/system_stats")
    start = time.monotonic()
    try:
        code, body = client.get("/system_stats", timeout=ctx.remaining(0.2))
    except urllib.error.HTTPError as exc:
        return Result("fail", f"GET /system_stats answered HTTP {exc.code}",
                      data={"url": url})
    except OSError as exc:  # urllib.error.URLError, a reply cut short
        reason = getattr(exc, "reason", exc)
        dead = "refused" in str(reason).lower()
        return Result("fail", f"GET /system_stats failed: {reason}"
                      + ("" if supervised else " (no pod-agent runs for this workspace)"),
                      data={"url": url}, dead=dead)
    latency = time.monotonic() - start
    try:
        data = json.loads(body)
        system = data["system"]
        devices = data.get("devices") or []
        if not isinstance(system, dict) or not isinstance(devices, list):
            raise TypeError("unexpected shape")
    except (ValueError, KeyError, TypeError) as exc:
        return Result("fail", f"GET /system_stats gave an unexpected answer ({exc})",
                      data={"url": url, "latency": round(latency, 4)})
    devs = []
    for d in devices:
        if isinstance(d, dict):
            devs.append({k: d.get(k) for k in ("name", "type", "vram_total", "vram_free")})
    info = {"latency": round(latency, 4), "http_status": code,
            "comfyui_version": system.get("comfyui_version"),
            "pytorch_version": system.get("pytorch_version"),
            "python_version": str(system.get("python_version", "")).split(" ")[0] or None,
            "devices": devs}
    parts = [f"answered in {latency * 1000:.0f} ms", f"ComfyUI {info['comfyui_version']}",
             f"torch {info['pytorch_version']}"]
    for d in devs:
        if _is_cpu(d):  # ComfyUI --cpu reports system RAM as the "cpu" device's VRAM
            parts.append("no GPU (runs on the CPU)")
        elif d.get("vram_total"):
            parts.append(f"{d.get('name')}: {_gib(d.get('vram_free'))}/"
                         f"{_gib(d.get('vram_total'))} GiB VRAM free")
    if not devs:
        parts.append("no devices")
    if latency > ctx.settings["warn_latency"]:
        return Result("warn", f"slow: {', '.join(parts)} (warn above "
                              f"{ctx.settings['warn_latency']:g}s)", data=info)
    return Result("ok", ", ".join(parts), data=info)


def _is_cpu(device: dict) -> bool:
    return str(device.get("type") or "").lower() == "cpu" or \
        str(device.get("name") or "").lower() == "cpu"


def _gib(n: Any) -> str:
    try:
        return f"{float(n) / 2**30:.1f}"
    except (TypeError, ValueError):
        return "?"


def process(ctx: CheckCtx) -> Result:
    snap, expected, supervised = service(ctx)
    early = _not_running(snap, expected, supervised, "process")
    if early is not None:
        return early
    pid, create_time = (snap or {}).get("pid"), None
    if not supervised or not pid:
        saved = read_json(ctx.config.runtime_dir / "comfyui.json") or {}
        pid, create_time = pid or saved.get("pid"), saved.get("create_time")
    if not pid:
        return Result("fail", "ComfyUI is not running"
                      + ("" if supervised else " (no pod-agent runs for this workspace)"),
                      dead=True)
    memo = ctx.memo
    proc = memo.get("proc") if memo.get("pid") == pid else None
    try:
        if proc is None:
            proc = psutil.Process(int(pid))
            if create_time is not None and abs(proc.create_time() - float(create_time)) > 1.0:
                raise psutil.NoSuchProcess(int(pid))
            memo.update(pid=pid, proc=proc)
            proc.cpu_percent(None)  # primes the counter; the next run reports a real value
            cpu = None
        else:
            cpu = proc.cpu_percent(None)
        with proc.oneshot():
            status = proc.status()
            if status == psutil.STATUS_ZOMBIE:
                return Result("fail", f"ComfyUI (pid {pid}) is a zombie: it exited and was not "
                                      "reaped", data={"pid": pid}, dead=True)
            rss = proc.memory_info().rss
            threads = proc.num_threads()
            try:
                files = proc.num_fds()
            except (psutil.Error, AttributeError):
                files = None
        zombies = []
        for child in proc.children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    zombies.append(child.pid)
            except psutil.Error:
                continue
    except psutil.NoSuchProcess:
        memo.clear()
        return Result("fail", f"ComfyUI (pid {pid}) is gone", data={"pid": pid}, dead=True)
    except psutil.AccessDenied as exc:
        return Result("warn", f"cannot inspect ComfyUI (pid {pid}): {exc}", data={"pid": pid})
    data = {"pid": pid, "status": status, "rss": rss, "cpu_percent": cpu, "threads": threads,
            "open_files": files, "zombie_children": zombies,
            "state": (snap or {}).get("state")}
    detail = (f"pid {pid} {status}, RSS {rss / 2**30:.2f} GiB, "
              + (f"CPU {cpu:.0f}%, " if cpu is not None else "")
              + f"{threads} threads" + (f", {files} open files" if files is not None else ""))
    problems = []
    if zombies:
        problems.append(f"{len(zombies)} zombie child process(es) not reaped by ComfyUI")
    max_rss = ctx.settings.get("max_rss_gb")
    if max_rss is not None and rss > max_rss * 2**30:
        problems.append(f"RSS above {max_rss:g} GiB")
    max_files = ctx.settings.get("max_open_files")
    if max_files is not None and files is not None and files > max_files:
        problems.append(f"more than {max_files} open files")
    if problems:
        return Result("warn", "; ".join(problems) + f" ({detail})", data=data)
    return Result("ok", detail, data=data)
