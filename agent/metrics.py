"""Prometheus metrics for `GET /metrics`, on a CollectorRegistry of our own (never the global
default one): counters and histograms fed as things happen, plus a collector that reads the
current state (ComfyUI, components, checks) at scrape time. A rendering is reused for
RENDER_MAX_AGE seconds: any number of concurrent scrapes cost at most one rendering a second."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from agent.health import parse_time
from agent.model import State

COMFYUI_STATES = ("stopped", "starting", "running", "backoff", "stopping", "degraded")
CHECK_STATUSES = ("ok", "warn", "fail", "skip")
VERDICTS = ("healthy", "degraded", "failing")
RENDER_MAX_AGE = 1.0


@dataclass
class Sources:
    """Where the scrape-time values come from (the daemon's objects)."""

    started: float  # time.time() when the agent started
    version: str
    service: Callable[[], Mapping[str, Any]]  # supervisor.snapshot()
    checks: Callable[[], Mapping[str, Mapping[str, Any]]]  # check -> latest record
    components: Callable[[], Mapping[str, str]]  # component -> state
    quarantined: Callable[[], Mapping[str, Any]]
    verdict: Callable[[], str | None]
    job_events: Callable[[], Mapping[str, int]]
    observer_restarts: Callable[[], int]
    http: Callable[[], Mapping[str, int]] | None = None  # the endpoint's connection counts
    services: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None  # agent/services.py


class _State:
    def __init__(self, src: Sources):
        self.src = src

    def describe(self):
        return []

    def collect(self):
        src = self.src
        yield GaugeMetricFamily("pod_agent_up", "The agent answers (always 1 when scraped).",
                                value=1)
        yield GaugeMetricFamily("pod_agent_uptime_seconds", "Seconds since the agent started.",
                                value=max(0.0, time.time() - src.started))
        yield InfoMetricFamily("pod_agent", "The agent's version.",
                               value={"version": src.version})

        snap = dict(src.service() or {})
        state = GaugeMetricFamily("pod_agent_comfyui_state", "1 for ComfyUI's current "
                                  "supervisor state.", labels=["state"])
        for s in COMFYUI_STATES:
            state.add_metric([s], 1.0 if snap.get("state") == s else 0.0)
        yield state
        yield GaugeMetricFamily("pod_agent_comfyui_ready", "1 when ComfyUI is running and has "
                                "answered.", value=1.0 if snap.get("state") == "running"
                                and snap.get("ready") else 0.0)
        yield CounterMetricFamily("pod_agent_comfyui_restarts", "ComfyUI (re)starts after "
                                  "the first.", value=float(snap.get("restarts") or 0))
        yield GaugeMetricFamily("pod_agent_comfyui_consecutive_failures", "Failed starts or "
                                "crashes since ComfyUI was last healthy.",
                                value=float(snap.get("failures") or 0))
        yield GaugeMetricFamily("pod_agent_comfyui_uptime_seconds", "Seconds since ComfyUI "
                                "started (0 when not running).",
                                value=float(snap.get("uptime") or 0))

        comps = src.components()
        cs = GaugeMetricFamily("pod_agent_component_state", "1 for each component's observed "
                               "state (from the latest `components` check).",
                               labels=["component", "state"])
        for name, current in comps.items():
            for s in State:
                cs.add_metric([name, s.value], 1.0 if current == s.value else 0.0)
        yield cs

        checks = src.checks()
        st = GaugeMetricFamily("pod_agent_health_check_status", "1 for each check's latest "
                               "status.", labels=["check", "status"])
        dur = GaugeMetricFamily("pod_agent_health_check_last_duration_seconds", "How long "
                                "each check's latest run took.", labels=["check"])
        last = GaugeMetricFamily("pod_agent_health_check_last_run_timestamp_seconds",
                                 "When each check last ran (Unix time).", labels=["check"])
        fails = GaugeMetricFamily("pod_agent_health_check_consecutive_failures",
                                  "Consecutive failed runs of each check.", labels=["check"])
        for name, rec in checks.items():
            for s in CHECK_STATUSES:
                st.add_metric([name, s], 1.0 if rec.get("status") == s else 0.0)
            dur.add_metric([name], float(rec.get("duration") or 0.0))
            last.add_metric([name], parse_time(rec.get("time")))
            fails.add_metric([name], float(rec.get("failures") or 0))
        yield st
        yield dur
        yield last
        yield fails
        verdict = src.verdict()
        vd = GaugeMetricFamily("pod_agent_health_verdict", "1 for the overall health verdict.",
                               labels=["verdict"])
        for v in VERDICTS:
            vd.add_metric([v], 1.0 if verdict == v else 0.0)
        yield vd
        q = GaugeMetricFamily("pod_agent_quarantined", "1 for each component whose "
                              "self-healing is suspended (too many reinstalls).",
                              labels=["component"])
        for name in src.quarantined():
            q.add_metric([name], 1.0)
        yield q
        ev = CounterMetricFamily("pod_agent_scheduler_job_events", "APScheduler job errors, "
                                 "missed runs and max-instance skips.", labels=["kind"])
        for kind, n in src.job_events().items():
            ev.add_metric([kind], float(n))
        yield ev
        yield CounterMetricFamily("pod_agent_watch_observer_restarts", "Restarts of a dead "
                                  "watchdog observer.", value=float(src.observer_restarts()))
        if src.http is not None:
            conn = CounterMetricFamily("pod_agent_http_connections", "Connections to this "
                                       "endpoint: served (by a worker), busy (503 at once: "
                                       "every worker busy and the queue full), overdue (cut "
                                       "at the request deadline).", labels=["result"])
            counts = src.http()
            for result in ("served", "busy", "overdue"):
                conn.add_metric([result], float(counts.get(result, 0)))
            yield conn
        if src.services is not None:
            snapshot = src.services()
            if snapshot:
                from agent.services import metric_families

                yield from metric_families(snapshot)


class Metrics:
    def __init__(self, sources: Sources):
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.check_runs = Counter("pod_agent_health_check_runs", "Health check runs by result.",
                                  ["check", "status"], registry=r)
        self.check_duration = Histogram(
            "pod_agent_health_check_duration_seconds", "Health check run time.", ["check"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180), registry=r)
        self.actions = Counter("pod_agent_health_actions", "Self-healing actions taken.",
                               ["check", "action"], registry=r)
        self.reconcile_runs = Counter("pod_agent_reconcile_runs", "Reconcile runs by phase and "
                                      "result.", ["phase", "result"], registry=r)
        self.reconcile_duration = Histogram(
            "pod_agent_reconcile_duration_seconds", "Reconcile run time by phase.", ["phase"],
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600), registry=r)
        r.register(_State(sources))
        self._render_lock = threading.Lock()
        self._rendered: tuple[float, bytes] | None = None

    def on_check(self, entry: Mapping[str, Any]) -> None:
        name, status = entry.get("check", "?"), entry.get("status", "?")
        self.check_runs.labels(name, status).inc()
        self.check_duration.labels(name).observe(float(entry.get("duration") or 0.0))
        action = str(entry.get("action") or "none")
        if action != "none" and not action.startswith(("waiting", "none")):
            kind = action.split(" ")[0].rstrip(":;")
            self.actions.labels(name, kind).inc()

    def on_reconcile(self, phase: str, last: Mapping[str, Any] | None) -> None:
        if not last:
            return
        result = str(last.get("result") or "")
        self.reconcile_runs.labels(phase, "ok" if result == "ok" else
                                   "error" if result.startswith("error") else "failed").inc()
        self.reconcile_duration.labels(phase).observe(float(last.get("duration") or 0.0))

    def render(self, max_age: float = RENDER_MAX_AGE) -> bytes:
        """The text format; concurrent scrapes wait for one rendering and share it."""
        with self._render_lock:
            now = time.monotonic()
            if self._rendered is not None and now - self._rendered[0] < max_age:
                return self._rendered[1]
            body = generate_latest(self.registry)
            self._rendered = (now, body)
            return body
