"""What the HTTP endpoint answers, from the running daemon's objects (agent/http.py serves it;
agent/metrics.py renders the metrics). Kept out of daemon.py so the wiring stays legible."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST

import agent as agent_pkg
from agent.http import Api, HttpServer
from agent.markers import atomic_write
from agent.metrics import Metrics, Sources

if TYPE_CHECKING:
    from agent.daemon import Daemon

HEARTBEAT_STALE = 30.0  # /healthz fails when the main loop has not turned for this long
HTTP_FILE = "http.json"
TOKEN_ENV = "POD_AGENT_HTTP_TOKEN"


class AgentApi:
    def __init__(self, daemon: "Daemon"):
        self.d = daemon
        self.server: HttpServer | None = None
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
        ok = snap.get("state") == "running" and bool(snap.get("ready"))
        body = {"ready": ok, "state": snap.get("state"), "pid": snap.get("pid")}
        if not ok:
            body["reason"] = snap.get("degraded_reason") or snap.get("last_failure") or (
                "ComfyUI is not managed by this agent (--no-comfyui)"
                if not self.d.start_comfyui else f"ComfyUI is {snap.get('state')}")
        return ok, body

    def status(self) -> dict:
        from agent.status import collect

        return collect(self.d.config)

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
        cfg = self.d.config
        if not cfg.http["enabled"]:
            return None
        api = Api(alive=self.alive, ready=self.ready, status=self.status,
                  metrics=self.render_metrics, reinstall=self.reinstall, restart=self.restart,
                  token=self.token)
        server = HttpServer(api, cfg.http["address"], cfg.http["port"])
        try:
            address, port = server.start()
        except OSError as exc:
            logger.error(f"http: cannot listen on {cfg.http['address']}:{cfg.http['port']}: "
                         f"{exc.strerror or exc}; running without the HTTP endpoint")
            return {"error": str(exc.strerror or exc)}
        self.server = server
        info = {"address": address, "port": port, "pid": os.getpid(),
                "url": f"http://{'[' + address + ']' if ':' in address else address}:{port}"}
        try:
            atomic_write(cfg.runtime_dir / HTTP_FILE, json.dumps(info, indent=1))
        except OSError as exc:
            logger.warning(f"http: cannot write {HTTP_FILE}: {exc}")
        return info

    def stop_http(self) -> None:
        if self.server is None:
            return
        self.server.stop()
        self.server = None
        try:
            (self.d.config.runtime_dir / HTTP_FILE).unlink()
        except FileNotFoundError:
            pass
