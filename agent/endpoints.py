"""What the HTTP endpoint answers, from the running daemon's objects (agent/http.py serves it;
agent/metrics.py renders the metrics). Kept out of daemon.py so the wiring stays legible.

Readers never do work (design.md section 7): /healthz and /readyz read the heartbeat and the
supervisor's in-memory snapshot; /status is the agent's cached `status` (an `Observed` value:
computed in one place, one computation at a time, at most once per STATUS_FRESH seconds however
many readers ask, again after every reconcile pass) served with its age; /metrics renders at
most once a second; the status page (`/`, agent/page.py) is rendered at most once a second from
that same cached status and a second cached value (the health checks' latest results from the
monitor's memory, the recent history read from the tails of health.jsonl and history.jsonl, the
latest reconcile passes), observed the same way.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST

import agent as agent_pkg
from agent import page
from agent.health import iso, parse_time, report_path
from agent.health import verdict as health_verdict
from agent.http import HTTP_FILE, Api, HttpServer
from agent.markers import atomic_write, tail_jsonl
from agent.metrics import Metrics, Sources
from agent.redact import redact

HEARTBEAT_STALE = 30.0  # /healthz fails when the main loop has not turned for this long
TOKEN_ENV = "POD_AGENT_HTTP_TOKEN"
STATUS_FRESH = 5.0  # a copy younger than this is served as it is
STATUS_USABLE = 60.0  # older: served at once while a new one is computed
STATUS_WAIT = 10.0  # no usable copy: a reader waits this long for the computation...
STATUS_WAITERS = 2  # ...but at most this many readers wait; the others get 503 at once
TAIL_BYTES = 64 * 1024  # how much of health.jsonl and history.jsonl the page reads
RECONCILES_KEPT = 20  # the latest reconcile passes remembered for the page


class Observed:
    """A value the agent computes in one place for many readers: one computation at a time, in
    a thread of its own (never a reader's), at most once per `fresh` seconds however many
    readers ask. Readers get the latest value with its age; a copy older than `usable` (or
    none) is waited for, by at most `waiters` readers for at most `wait` seconds."""

    def __init__(self, compute: Callable[[], Any], name: str, fresh: float = STATUS_FRESH,
                 usable: float = STATUS_USABLE, wait: float = STATUS_WAIT,
                 waiters: int = STATUS_WAITERS):
        self._compute = compute
        self.name = name
        self.fresh, self.usable, self.wait, self.waiters = fresh, usable, wait, waiters
        self._cond = threading.Condition(threading.RLock())
        self._value: Any = None
        self._at: float | None = None  # time.monotonic() when the computation began
        self._wall: float | None = None
        self._error: str | None = None
        self._running = False
        self._again = False
        self._waiting = 0
        self._gen = 0
        self.computations = 0

    def refresh(self) -> None:
        """Ask for a new value; never blocks. One asked for while a computation runs is done
        right after it (what changed may have been missed)."""
        with self._cond:
            if self._running:
                self._again = True
                return
            self._running = True
        threading.Thread(target=self._run, name=f"{self.name}-refresh", daemon=True).start()

    def _run(self) -> None:
        while True:
            began, wall = time.monotonic(), time.time()
            try:
                value, error = self._compute(), None
            except Exception as exc:  # noqa: BLE001 - reported to readers, never raised
                value, error = None, redact(f"{type(exc).__name__}: {exc}")[:300]
            with self._cond:
                self.computations += 1
                if error is None:
                    self._value, self._at, self._wall = value, began, wall
                elif error != self._error:
                    logger.warning(f"http: cannot observe {self.name}: {error}")
                self._error = error
                self._gen += 1
                self._cond.notify_all()
                if not self._again:
                    self._running = False
                    return
                self._again = False

    def get(self) -> tuple[Any, float | None, float | None, str | None]:
        """(value or None, its age in seconds, when it was observed (Unix time), the latest
        computation's error)."""
        with self._cond:
            age = None if self._at is None else time.monotonic() - self._at
            if age is not None and age < self.fresh:
                return self._value, age, self._wall, self._error
            if not self._running:
                self.refresh()
            if (age is None or age >= self.usable) and self._waiting < self.waiters:
                gen = self._gen
                self._waiting += 1
                try:
                    self._cond.wait_for(lambda: self._gen != gen, self.wait)
                finally:
                    self._waiting -= 1
            age = None if self._at is None else time.monotonic() - self._at
            return self._value, age, self._wall, self._error


def status_answer(observed: Observed) -> tuple[int, dict]:
    """GET /status: the latest observed status with when it was observed and its age."""
    value, age, wall, error = observed.get()
    if value is None:
        if error:
            return 500, {"error": f"status could not be observed: {error}"}
        return 503, {"error": "status is being observed for the first time; retry in a few "
                              "seconds"}
    body = dict(value)
    body["observed_at"] = iso(wall)
    body["age"] = round(age or 0.0, 2)
    if error:
        body["observe_error"] = error
    return 200, body


def _local(stamp: Any) -> float | None:
    """'YYYY-mm-dd HH:MM:SS' local time (the reconcile passes' stamps) as a Unix time."""
    try:
        return time.mktime(time.strptime(str(stamp), "%Y-%m-%d %H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def history_events(health_records: list[dict], history_records: list[dict],
                   reconciles: list[dict]) -> list[dict]:
    """What happened lately, newest first, as the page shows it ({"time", "source", "status",
    "text"}): health results that changed (health.jsonl) and verdict changes, history.jsonl
    records (environment drift, ...), and reconcile passes that changed something or failed."""
    events: list[dict] = []
    last_verdict = None
    for r in health_records:
        check = str(r.get("check") or "?")
        if check == "summary":
            if r.get("verdict") != last_verdict:
                events.append({"time": parse_time(r.get("time")) or None, "source": "health",
                               "status": r.get("verdict"),
                               "text": f"verdict {r.get('verdict')}: {r.get('detail') or ''}"})
            last_verdict = r.get("verdict")
            continue
        prev = r.get("previous")
        action = r.get("action")
        events.append({"time": parse_time(r.get("time")) or None, "source": "health",
                       "status": r.get("status"),
                       "text": f"{check}{' (was ' + str(prev) + ')' if prev else ''}: "
                               f"{r.get('detail') or ''}"
                               + (f" (action: {action})" if action and action != "none"
                                  else "")})
    for r in history_records:
        kind = str(r.get("kind") or "event")
        what = r.get("summary") or r.get("detail") or r.get("message") or ""
        extra = []
        if r.get("by"):
            extra.append(f"by {r['by']}")
        if r.get("affected"):
            extra.append("affects " + ", ".join(map(str, r["affected"]))
                         if isinstance(r["affected"], list) else str(r["affected"]))
        if isinstance(r.get("repeats"), int) and r["repeats"] > 1:
            extra.append(f"{r['repeats']} times")
        events.append({"time": r.get("time") if isinstance(r.get("time"), (int, float))
                       else parse_time(r.get("time")) or _local(r.get("stamp")),
                       "source": kind, "status": "warn" if kind == "drift" else None,
                       "text": f"{what}" + (f" ({'; '.join(extra)})" if extra else "")})
    for r in reconciles:
        result = str(r.get("result") or "?")
        changed = r.get("changed") or []
        if result == "ok" and not changed:
            continue  # a pass that found everything as it should be is not news
        events.append({"time": _local(r.get("time")), "source": "reconcile",
                       "status": "ok" if result == "ok" else "fail",
                       "text": f"{r.get('phase') or ''} pass {result}"
                               + (f", changed {', '.join(map(str, changed))}" if changed
                                  else "")
                               + (f" ({r['duration']} s)" if r.get("duration") is not None
                                  else "")})
    events.sort(key=lambda e: e.get("time") or 0.0, reverse=True)
    return events[:page.MAX_EVENTS]


@dataclass(frozen=True)
class AgentView:
    """All the endpoint may see of the running agent: read-only values and callables, plus the
    two requests it may make (a restart, a reinstall through `health`). The daemon builds it
    (`Daemon.view()`); the endpoint reads no field of the daemon or the supervisor."""

    config: Callable[[], Any]  # the current Config (a reload replaces it)
    started: float  # time.time() when the agent started
    heartbeat: Callable[[], float]  # time.monotonic() of the main loop's latest turn
    stopping: Callable[[], bool]
    service: Callable[[], dict]  # ComfyUI's supervisor snapshot
    request_restart: Callable[[str, bool], None]  # (reason, urgent)
    failed: Callable[[], dict]  # component -> why, from the latest reconcile passes
    start_comfyui: Callable[[], bool]
    health: Any  # the health Monitor (enabled, latest_entry, component_states, limiter,
    #              verdict, reinstall)
    job_events: Callable[[], dict]
    observer_restarts: Callable[[], int]
    reconciles: Callable[[], list]  # the reconcile workers' latest results (dicts or None)
    http_info: Callable[[], Any]
    set_http_info: Callable[[Any], None]
    services: Callable[[], dict] = dict  # service -> its snapshot (agent/services.py)
    services_not_ready: Callable[[], Any] = lambda: None  # a required_for_ready one, or None

    @classmethod
    def of(cls, agent: Any) -> "AgentView":
        """A view of an object with the daemon's public attributes (a test's stand-in)."""
        return cls(
            config=lambda: agent.config, started=getattr(agent, "started", time.time()),
            heartbeat=lambda: getattr(agent, "heartbeat", time.monotonic()),
            stopping=lambda: agent.stop_event.is_set(),
            service=lambda: agent.supervisor.snapshot(),
            request_restart=lambda r, u: agent.supervisor.request_restart(r, urgent=u),
            failed=lambda: dict(agent.failed), start_comfyui=lambda: agent.start_comfyui,
            health=agent.health, job_events=lambda: dict(agent.job_events),
            observer_restarts=lambda: agent.watcher.restarts,
            reconciles=lambda: [getattr(getattr(agent, n, None), "last", None)
                                for n in ("fg", "bg")],
            http_info=lambda: agent.http_info,
            set_http_info=lambda info: setattr(agent, "http_info", info))


class AgentApi:
    def __init__(self, view: AgentView | Any):
        self.v = view if isinstance(view, AgentView) else AgentView.of(view)
        self.server: HttpServer | None = None
        self.observed = Observed(self._collect, "status")
        self.page_data = Observed(self._page_data, "page", wait=2.0)  # cheap: no long wait
        self._reconciles: collections.deque = collections.deque(maxlen=RECONCILES_KEPT)
        self._reconciles_lock = threading.Lock()
        self._page_cache: tuple[tuple, bytes] | None = None
        self._http_write_failed = False
        v = self.v
        health = v.health
        self.metrics = Metrics(Sources(
            started=v.started,
            version=agent_pkg.__version__,
            service=v.service,
            checks=lambda: {n: e for n in health.enabled()
                            if (e := health.latest_entry(n)) is not None},
            components=health.component_states,
            quarantined=health.limiter.quarantined,
            verdict=lambda: health.verdict,
            job_events=v.job_events,
            observer_restarts=v.observer_restarts,
            http=lambda: self.server.counts if self.server is not None else {},
            services=v.services,
        ))

    # -------------------------------------------------------------- answers
    def token(self) -> str | None:
        return os.environ.get(TOKEN_ENV) or self.v.config().http.get("token") or None

    def alive(self) -> tuple[bool, dict]:
        age = time.monotonic() - self.v.heartbeat()
        ok = age < HEARTBEAT_STALE and not self.v.stopping()
        return ok, {"status": "ok" if ok else "stuck", "pid": os.getpid(),
                    "uptime": round(time.time() - self.v.started, 1),
                    "main_loop_age": round(age, 2)}

    def ready(self) -> tuple[bool, dict]:
        snap = self.v.service()
        failed = dict(self.v.failed())
        comps = self.v.config().components
        required = sorted(n for n in failed if n in comps and comps[n].required)
        serving = snap.get("state") == "running" and bool(snap.get("ready"))
        ok = serving and not required
        body = {"ready": ok, "state": snap.get("state"), "pid": snap.get("pid"),
                "failed_components": {n: redact(why)[:200] for n, why in sorted(failed.items())}}
        if not ok:
            body["reason"] = (f"required component {required[0]} failed: "
                              f"{redact(failed[required[0]])[:200]}" if serving else
                              snap.get("degraded_reason") or snap.get("last_failure") or (
                                  "ComfyUI is not managed by this agent (--no-comfyui)"
                                  if not self.v.start_comfyui()
                                  else f"ComfyUI is {snap.get('state')}"))
        waiting = self.v.services_not_ready() if ok else None  # only those required_for_ready
        if waiting:
            ok = body["ready"] = False
            body["reason"] = waiting
        return ok, body

    def _collect(self) -> dict:
        from agent.status import collect

        return collect(self.v.config())

    def status_changed(self) -> None:
        """The daemon after each reconcile pass: observe again (in the background)."""
        self._note_reconciles()
        self.observed.refresh()
        self.page_data.refresh()

    def _note_reconciles(self) -> None:
        """Remember the reconcile passes' latest results (the page's history)."""
        with self._reconciles_lock:
            for last in self.v.reconciles():
                if isinstance(last, dict) and not any(r is last for r in self._reconciles):
                    self._reconciles.append(last)

    def _page_data(self) -> dict:
        """What the page shows besides `status`: the health checks' latest results (the
        monitor's memory), the quarantined components and the recent history."""
        health = self.v.health
        checks = {n: e for n in health.enabled() if (e := health.latest_entry(n)) is not None}
        quarantined = {k: q.get("reason") for k, q in health.limiter.quarantined().items()}
        verdict = health_verdict((e.get("status", "fail") for e in checks.values()),
                                 bool(quarantined)) if checks or quarantined else None
        from agent import drift

        self._note_reconciles()
        with self._reconciles_lock:
            reconciles = list(self._reconciles)
        config = self.v.config()
        events = history_events(tail_jsonl(report_path(config), 200, TAIL_BYTES),
                                tail_jsonl(drift.history_path(config), 50, TAIL_BYTES), reconciles)
        return {"health": {"verdict": verdict, "checks": checks, "quarantined": quarantined},
                "events": events}

    def page(self) -> tuple[int, bytes]:
        """GET /: the status page, rendered at most once a second from the cached values."""
        value, _age, wall, error = self.observed.get()
        extra, _, extra_wall, _ = self.page_data.get()
        now = time.time()
        key = (wall, extra_wall, error, int(now))  # the observations' times: new ones, new page
        cached = self._page_cache
        if cached is not None and cached[0] == key:
            body = cached[1]
        else:
            extra = extra or {}
            body = page.render(value, extra.get("health"), extra.get("events"), now=now,
                               observed_at=wall, observe_error=error,
                               version=agent_pkg.__version__).encode()
            self._page_cache = (key, body)
        return (200 if value is not None else 503), body

    def status(self) -> tuple[int, dict]:
        return status_answer(self.observed)

    def render_metrics(self) -> tuple[bytes, str]:
        return self.metrics.render(), CONTENT_TYPE_LATEST

    def reinstall(self, name: str) -> tuple[int, dict]:
        try:
            self.v.health.reinstall(name, "HTTP request")
        except KeyError:
            return 404, {"error": f"no such component: {name}",
                         "components": [n for n, c in self.v.config().components.items()
                                        if c.kind != "overall"]}
        return 202, {"accepted": True, "component": name,
                     "detail": "marker removed; the reconcile loop reinstalls it"}

    def restart(self, urgent: bool) -> dict:
        self.v.request_restart("HTTP request", urgent)
        return {"accepted": True, "urgent": urgent,
                "detail": "restarting now" if urgent else
                "restart when ComfyUI's queue is empty"}

    # -------------------------------------------------------------- server
    def start_http(self) -> dict | None:
        """Serve, or keep trying to bind in the background (agent/http.py); the state goes to
        <runtime_dir>/http.json for `status` and health. Never raises."""
        cfg = self.v.config()
        if not cfg.http["enabled"]:
            return None
        api = Api(alive=self.alive, ready=self.ready, status=self.status,
                  metrics=self.render_metrics, reinstall=self.reinstall, restart=self.restart,
                  token=self.token, page=self.page)
        self.server = HttpServer(api, cfg.http["address"], cfg.http["port"])
        self.observed.refresh()  # the first /status does not wait for a whole observe
        self.page_data.refresh()
        self.server.start_retrying(self._http_changed)
        return self.v.http_info()

    def _http_changed(self, state: dict) -> None:
        info = {**state, "pid": os.getpid()}
        self.v.set_http_info(info)
        try:
            atomic_write(self.v.config().runtime_dir / HTTP_FILE, json.dumps(info, indent=1))
            self._http_write_failed = False
        except OSError as exc:
            if not self._http_write_failed:
                logger.warning(f"http: cannot write {HTTP_FILE}: {exc}")
            self._http_write_failed = True

    def stop_http(self) -> None:
        if self.server is None:
            return
        self.server.stop()
        self.server = None
        try:
            (self.v.config().runtime_dir / HTTP_FILE).unlink()
        except OSError:
            pass
