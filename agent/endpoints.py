"""What the HTTP endpoint answers, from the running daemon's objects (agent/http.py serves it;
agent/metrics.py renders the metrics). Kept out of daemon.py so the wiring stays legible.

Readers never do work (design.md section 7): /healthz and /readyz read the heartbeat and the
supervisor's in-memory snapshot; /status is the agent's cached `status` (an `Observed` value:
computed in one place, one computation at a time, at most once per STATUS_FRESH seconds however
many readers ask, again after every reconcile pass) served with its age; /metrics renders at
most once a second.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST

import agent as agent_pkg
from agent.health import iso
from agent.http import HTTP_FILE, Api, HttpServer
from agent.markers import atomic_write
from agent.metrics import Metrics, Sources
from agent.redact import redact

if TYPE_CHECKING:
    from agent.daemon import Daemon

HEARTBEAT_STALE = 30.0  # /healthz fails when the main loop has not turned for this long
TOKEN_ENV = "POD_AGENT_HTTP_TOKEN"
STATUS_FRESH = 5.0  # a copy younger than this is served as it is
STATUS_USABLE = 60.0  # older: served at once while a new one is computed
STATUS_WAIT = 10.0  # no usable copy: a reader waits this long for the computation...
STATUS_WAITERS = 2  # ...but at most this many readers wait; the others get 503 at once


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


class AgentApi:
    def __init__(self, daemon: "Daemon"):
        self.d = daemon
        self.server: HttpServer | None = None
        self.observed = Observed(self._collect, "status")
        self._http_write_failed = False
        health = daemon.health
        self.metrics = Metrics(Sources(
            started=daemon._started,
            version=agent_pkg.__version__,
            service=daemon.supervisor.snapshot,
            checks=lambda: {n: e for n in health.enabled()
                            if (e := health.latest_entry(n)) is not None},
            components=health.component_states,
            quarantined=health.limiter.quarantined,
            verdict=lambda: health.verdict,
            job_events=lambda: dict(daemon.job_events),
            observer_restarts=lambda: daemon.watcher.restarts,
            http=lambda: self.server.counts if self.server is not None else {},
        ))

    # -------------------------------------------------------------- answers
    def token(self) -> str | None:
        return os.environ.get(TOKEN_ENV) or self.d.config.http.get("token") or None

    def alive(self) -> tuple[bool, dict]:
        age = time.monotonic() - self.d._heartbeat
        ok = age < HEARTBEAT_STALE and not self.d.stop_event.is_set()
        return ok, {"status": "ok" if ok else "stuck", "pid": os.getpid(),
                    "uptime": round(time.time() - self.d._started, 1),
                    "main_loop_age": round(age, 2)}

    def ready(self) -> tuple[bool, dict]:
        snap = self.d.supervisor.snapshot()
        failed = dict(self.d.failed)
        comps = self.d.config.components
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
                                  if not self.d.start_comfyui
                                  else f"ComfyUI is {snap.get('state')}"))
        return ok, body

    def _collect(self) -> dict:
        from agent.status import collect

        return collect(self.d.config)

    def status_changed(self) -> None:
        """The daemon after each reconcile pass: observe again (in the background)."""
        self.observed.refresh()

    def status(self) -> tuple[int, dict]:
        return status_answer(self.observed)

    def render_metrics(self) -> tuple[bytes, str]:
        return self.metrics.render(), CONTENT_TYPE_LATEST

    def reinstall(self, name: str) -> tuple[int, dict]:
        try:
            self.d.health.reinstall(name, "HTTP request")
        except KeyError:
            return 404, {"error": f"no such component: {name}",
                         "components": [n for n, c in self.d.config.components.items()
                                        if c.kind != "overall"]}
        return 202, {"accepted": True, "component": name,
                     "detail": "marker removed; the reconcile loop reinstalls it"}

    def restart(self, urgent: bool) -> dict:
        self.d.supervisor.request_restart("HTTP request", urgent=urgent)
        return {"accepted": True, "urgent": urgent,
                "detail": "restarting now" if urgent else
                "restart when ComfyUI's queue is empty"}

    # -------------------------------------------------------------- server
    def start_http(self) -> dict | None:
        """Serve, or keep trying to bind in the background (agent/http.py); the state goes to
        <runtime_dir>/http.json for `status` and health. Never raises."""
        cfg = self.d.config
        if not cfg.http["enabled"]:
            return None
        api = Api(alive=self.alive, ready=self.ready, status=self.status,
                  metrics=self.render_metrics, reinstall=self.reinstall, restart=self.restart,
                  token=self.token)
        self.server = HttpServer(api, cfg.http["address"], cfg.http["port"])
        self.observed.refresh()  # the first /status does not wait for a whole observe
        self.server.start_retrying(self._http_changed)
        return self.d.http_info

    def _http_changed(self, state: dict) -> None:
        info = {**state, "pid": os.getpid()}
        self.d.http_info = info
        try:
            atomic_write(self.d.config.runtime_dir / HTTP_FILE, json.dumps(info, indent=1))
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
            (self.d.config.runtime_dir / HTTP_FILE).unlink()
        except OSError:
            pass
