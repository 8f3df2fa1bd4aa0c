"""Soak: the agent under a steady stream of events (markers removed, node files touched,
ComfyUI killed) for a while (20 s in CI, 10 minutes with POD_AGENT_RELIABILITY=full). Its RSS,
open fds, threads and child processes must come back to where they were: flat, not growing."""

from __future__ import annotations

import os
import random
import signal
import time

import psutil

from tests.helpers import run_cli, wait_for
from tests.reliability.conftest import size
from tests.test_daemon import aws, install_all, running, service, starts  # noqa: F401 - fixture

MARKERS = ("dependencies_additional", "gguf_node", "custom_nodes")


def sample(agent: psutil.Process, comfy_pid: int | None) -> dict:
    kids = [p for p in agent.children(recursive=True) if p.pid != comfy_pid
            and p.status() != psutil.STATUS_ZOMBIE]
    return {"rss_mb": agent.memory_info().rss / 2**20, "fds": agent.num_fds(),
            "threads": agent.num_threads(), "children": len(kids) + (1 if comfy_pid else 0)}


def up_to_date(ws, n: int = 0) -> bool:
    """ComfyUI's start number n+1 (or later) runs, and the agent's state file says so."""
    seen = starts(ws)
    return len(seen) > n and running(ws) and service(ws).get("pid") == seen[-1]["pid"]


def settle(ws, agent: psutil.Process) -> dict:
    """Wait until nothing is in flight (ComfyUI running, no installer child), then sample."""
    def quiet():
        if not up_to_date(ws):
            return None
        pid = service(ws).get("pid")
        s = sample(agent, pid)
        return s if s["children"] == 1 else None
    return wait_for(quiet, 120, interval=0.2, what="the agent to settle")


def test_soak_resources_stay_flat(aws, tally):
    ws = aws
    ws.config["agent"].update({"degraded_after": 1000, "backoff_reset_after": 2.0,
                               "restart_quiet_period": 0.5})
    ws.save()
    install_all(ws)
    agent_run = ws.start_agent()
    agent = psutil.Process(agent_run.proc.pid)
    wait_for(lambda: running(ws), 60, what="ComfyUI running")
    duration = size(10, 600)
    rng = random.Random("soak")
    counts = {"marker removed": 0, "node touched": 0, "comfyui killed": 0}
    node = ws.comfyui / "custom_nodes" / "node-a" / "extra.py"

    def one_event() -> None:
        kind = rng.choice(list(counts))
        counts[kind] += 1
        if kind == "marker removed":
            name = rng.choice(MARKERS)
            ws.marker(name).unlink(missing_ok=True)
            wait_for(lambda: ws.marker(name).exists(), 120, what=f"{name} restored")
        elif kind == "node touched":
            node.write_text(f"# edit {counts[kind]}\n")
            n = len(starts(ws))
            wait_for(lambda: up_to_date(ws, n), 120, what="restart after edit")
        else:
            wait_for(lambda: up_to_date(ws), 120, what="ComfyUI up")
            n = len(starts(ws))
            try:
                os.kill(starts(ws)[-1]["pid"], signal.SIGKILL)
            except ProcessLookupError:  # already being restarted (a marker's reinstall)
                pass
            wait_for(lambda: up_to_date(ws, n), 120, what="crash restart")

    # warm-up: events until the first round of health checks has run (10 s after the start:
    # APScheduler's pool grows its threads then, up to its bound), so lazily created threads
    # and caches exist before the baseline
    warm = time.monotonic() + 15
    while time.monotonic() < warm:
        one_event()
    base = settle(ws, agent)
    samples = [base]
    end = time.monotonic() + duration
    while time.monotonic() < end:
        one_event()
        if len(samples) < 10000:
            samples.append(sample(agent, service(ws).get("pid")))
    final = settle(ws, agent)
    crashed = not agent.is_running() or "Traceback" in agent_run.log()
    growth = {k: final[k] - base[k] for k in base}
    leak = growth["rss_mb"] > 15 or growth["fds"] > 3 or growth["threads"] > 2 \
        or growth["children"] != 0
    status = run_cli("status", "--json", *ws.args())
    healthy = '"verdict": "healthy"' in status.stdout
    peak = {k: max(s[k] for s in samples) for k in base}
    quarters = [samples[min(len(samples) - 1, len(samples) * q // 4)]["rss_mb"]
                for q in (1, 2, 3, 4)]
    events = sum(counts.values())
    figures = (f"{duration}s, {events} events ({', '.join(f'{v} {k}' for k, v in counts.items())}): "
               + ", ".join(f"{k} {base[k]:.0f} -> {final[k]:.0f} (peak {peak[k]:.0f})"
                           for k in base)
               + "; rss_mb at each quarter: " + " ".join(f"{q:.1f}" for q in quarters))
    tally.info("soak", figures)
    assert tally.case("soak", crash=crashed, leak=leak, converged=healthy, note=figures), figures
