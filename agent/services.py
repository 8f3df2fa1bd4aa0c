"""The pod's other services (JupyterLab, sshd, the user's own) and the image's start hooks.

Services are declared in the config's `services:` (agent/service_config.py). The manager starts
each one on the process engine (agent/engine.py) at the right moment: on a resumed volume all of
them at once, before any verification; on a fresh volume those with no `depends_on` at once and
the others once their components are installed. It restarts them per their policy and stops
them when the agent stops.

Also here: `ensure_authorized_keys` (sshd's PUBLIC_KEY, added once with the right permissions)
and the `/pre_start.sh` / `/post_start.sh` hooks (agent/service_config.Hooks).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Mapping

from loguru import logger

from agent.model import AgentError
from agent.service_config import Hooks, ServiceSpec, expand_env


# --------------------------------------------------------------------------- authorized_keys
def _key_lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def ensure_authorized_keys(keys_text: str, home: Path) -> list[str]:
    """Put each key of `keys_text` (one per line) in `home`/.ssh/authorized_keys unless it is
    there already: ~/.ssh is mode 700 and the file 600 (sshd's StrictModes refuses looser ones).
    Returns the keys added (none when all were there). AgentError (one line) when it cannot."""
    keys = _key_lines(keys_text)
    ssh = home / ".ssh"
    path = ssh / "authorized_keys"
    try:
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(ssh, 0o700)
        try:
            existing = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            existing = ""
        have = set(_key_lines(existing))
        added = [k for k in dict.fromkeys(keys) if k not in have]
        if added:
            text = existing + ("" if not existing or existing.endswith("\n") else "\n")
            text += "".join(k + "\n" for k in added)
            tmp = ssh / ".authorized_keys.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        if path.exists():
            os.chmod(path, 0o600)
    except OSError as exc:
        raise AgentError(f"cannot set up {path}: {exc.strerror or exc}") from None
    return added


def prepare(spec: ServiceSpec, environ: Mapping[str, str]) -> None:
    """What a service needs before each start (today: its authorized_keys)."""
    if spec.authorized_keys:
        text = expand_env(spec.authorized_keys, environ)
        home = Path(environ.get("HOME") or os.path.expanduser("~"))
        if text.strip():
            added = ensure_authorized_keys(text, home)
            if added:
                logger.info(f"service {spec.name}: added {len(added)} key(s) to "
                            f"{home / '.ssh' / 'authorized_keys'}")


# --------------------------------------------------------------------------- hooks
def run_hook(which: str, hooks: Hooks | None, stop: threading.Event | None = None) -> int | None:
    """Run the `pre_start` or `post_start` hook with bash when its file exists, its output in
    hooks.log; wait for it (up to hooks.timeout, or until `stop` is set: then its process group
    is ended). Returns its exit status (None: no such hook)."""
    from agent import procs

    if hooks is None:
        return None
    path = getattr(hooks, which)
    if path is None or not Path(path).is_file():
        return None
    logger.info(f"hook {which}: running {path} (output in {hooks.log})")
    result: list = []

    def work() -> None:
        try:
            result.append(procs.run(["bash", str(path)], log=hooks.log, timeout=hooks.timeout,
                                    title=f"hook {which}"))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=work, name=f"hook-{which}", daemon=True)
    thread.start()
    stopped = False
    while thread.is_alive():
        if stop is not None and stop.wait(0.2):
            stopped = True
            procs.terminate_all()
            thread.join(10)
            break
        thread.join(0.2)
    if stopped or not result:
        logger.warning(f"hook {which}: {path} ended: the agent is shutting down")
        return None
    res = result[0]
    if isinstance(res, OSError):
        logger.warning(f"hook {which}: cannot run {path}: {res.strerror or res}")
        return None
    if res.timed_out:
        logger.warning(f"hook {which}: {path} did not finish within {hooks.timeout:g}s: ended "
                       f"(see {hooks.log})")
    elif res.returncode != 0:
        logger.warning(f"hook {which}: {path} exited {res.returncode} (see {hooks.log})")
    else:
        logger.info(f"hook {which}: {path} done in {res.duration:.1f}s")
    return res.returncode


# --------------------------------------------------------------------------- the manager
SERVICES_DIR = "services"  # <runtime_dir>/services/<name>.json: the engine's state files
STATE_FILE = "services.json"  # <runtime_dir>/services.json: every service's snapshot
REQUESTS_DIR = "requests"  # <runtime_dir>/requests/restart-*.json: `pod-agent restart`
TICK = 0.5
STATE_REFRESH = 10.0  # services.json is written on a change, and at least this often
SNAPSHOT_KEYS = ("state", "pid", "uptime", "restarts", "failures", "last_exit", "ready",
                 "port", "log", "next_start_in", "last_failure", "degraded_reason",
                 "pending_restart", "adopted")


class Manager:
    """Every configured service on the engine: started at the right moment, ticked by one
    thread, restarted per its policy, stopped at shutdown. `snapshot()` is what status,
    /status, /readyz and /metrics show."""

    def __init__(self, config, *, installed=None, comfy_ready=None, comfy_restart=None,
                 environ: Mapping[str, str] | None = None, tick: float = TICK) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self._installed = installed or (lambda name: False)
        self._comfy_ready = comfy_ready or (lambda: False)
        self._comfy_restart = comfy_restart
        self.tick_interval = tick
        self.services: dict = {}  # name -> engine.Service (enabled ones, once started)
        self.off: dict[str, str] = {}  # name -> why it does not run
        self.waiting: dict[str, tuple[str, ...]] = {}  # name -> components it waits for
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._hook_thread: threading.Thread | None = None
        self._post_start_done = False
        self._last_written: dict | None = None
        self._last_write = 0.0
        self._write_failed = False

    @property
    def runtime_dir(self) -> Path:
        return self.config.runtime_dir

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Decide which services run here, start those whose components are there (all of
        them on a resumed volume: their markers exist), then tick in a thread of our own."""
        with self._lock:
            for name, spec in self.config.services.items():
                why = spec.auto_off(self.environ)
                if why:
                    self.off[name] = why
                    if spec.enabled == "auto":
                        logger.debug(f"service {name} not started: {why}")
                    continue
                self.waiting[name] = tuple(spec.depends_on)
            self._start_due("agent started")
        self._thread = threading.Thread(target=self._run, name="services", daemon=True)
        self._thread.start()

    def components_changed(self) -> None:
        """After a reconcile pass: start the services whose components are now installed."""
        self._wake.set()

    def _start_due(self, why: str) -> None:
        for name, deps in list(self.waiting.items()):
            missing = [d for d in deps if not self._installed(d)]
            if missing:
                continue
            del self.waiting[name]
            self._start_one(name, why if not deps else f"{why}: {', '.join(deps)} installed")

    def _start_one(self, name: str, why: str) -> None:
        from agent import engine

        spec = self.config.services[name]
        try:
            prepare(spec, self.environ)
        except AgentError as exc:
            logger.warning(f"service {name}: {exc}")
        svc = self.services.get(name)
        if svc is None:
            svc = engine.Service(self._engine_spec(spec), self.runtime_dir / SERVICES_DIR,
                                 timing=self._timing(spec))
            self.services[name] = svc
        else:
            svc.spec = self._engine_spec(spec)
            svc.timing = self._timing(spec)
        svc.start(why)

    def _engine_spec(self, spec: ServiceSpec):
        from agent import engine
        from agent.redact import secret_name

        env = spec.environment(self.environ)
        secrets = tuple(v for k, v in env.items() if v and secret_name(k))
        ready = None
        if spec.ready == "tcp":
            ready = engine.TcpReady(spec.port)
        elif spec.ready:
            ready = engine.HttpReady(spec.port, spec.ready)
        return engine.Spec(name=spec.name, command=spec.argv(self.environ), log=spec.log,
                           cwd=spec.cwd, env=env, ready=ready, restart=spec.restart,
                           stop_timeout=spec.stop_timeout, port=spec.port, secrets=secrets,
                           title=f"service {spec.name}")

    def _timing(self, spec: ServiceSpec) -> dict:
        agent = dict(self.config.agent)
        timing = {k: agent[k] for k in ("ready_poll_interval", "liveness_interval",
                                        "liveness_failures", "backoff_initial", "backoff_max",
                                        "backoff_reset_after", "degraded_after",
                                        "degraded_window", "degraded_retry") if k in agent}
        timing["ready_timeout"] = spec.ready_timeout
        timing["stop_timeout"] = spec.stop_timeout
        return timing

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - keep supervising whatever one tick did
                logger.exception("services: tick failed")
            self._wake.wait(self.tick_interval)
            self._wake.clear()

    def _tick(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            if self.waiting:
                self._start_due("components installed")
            for svc in list(self.services.values()):
                svc.tick()
        self._take_requests()
        self._post_start()
        self.write_state()

    def _post_start(self) -> None:
        if self._post_start_done or not self._comfy_ready():
            return
        self._post_start_done = True
        hooks = getattr(self.config, "hooks", None)
        if hooks is None or hooks.post_start is None or not Path(hooks.post_start).is_file():
            return
        self._hook_thread = threading.Thread(target=run_hook,
                                             args=("post_start", hooks, self._stop),
                                             name="hook-post_start", daemon=True)
        self._hook_thread.start()

    # ------------------------------------------------------------------ requests
    def request_restart(self, name: str, why: str, urgent: bool = False) -> dict:
        """Restart one service (`comfyui`: through its supervisor, queue-aware unless urgent).
        Returns the answer written for `pod-agent restart`."""
        if name == "comfyui":
            if self._comfy_restart is None:
                return {"ok": False, "error": "ComfyUI is not managed by this agent "
                        "(it runs with --no-comfyui)"}
            self._comfy_restart(why, urgent)
            return {"ok": True, "detail": "restarting now" if urgent else
                    "restart when ComfyUI's queue is empty"}
        if name not in self.config.services:
            return {"ok": False, "error": f"no such service: {name} (known: "
                    f"{', '.join(['comfyui', *self.config.services])})"}
        with self._lock:
            svc = self.services.get(name)
            if svc is None:
                if name in self.waiting:
                    return {"ok": False, "error": f"service {name} waits for "
                            f"{', '.join(self.waiting[name])} to be installed"}
                return {"ok": False, "error": f"service {name} does not run here: "
                        f"{self.off.get(name, 'not started')}"}
            svc.request_restart(why, urgent=True)
        self._wake.set()
        return {"ok": True, "detail": "restarting now"}

    def _take_requests(self) -> None:
        import json

        folder = self.runtime_dir / REQUESTS_DIR
        try:
            names = sorted(p for p in os.listdir(folder)
                           if p.startswith("restart-") and p.endswith(".json"))
        except OSError:
            return
        from agent.markers import atomic_write, read_json

        for fname in names[:20]:
            path = folder / fname
            req = read_json(path) or {}
            try:
                path.unlink()
            except OSError:
                continue
            name = req.get("name")
            if not isinstance(name, str):
                answer = {"ok": False, "error": "a restart request without a service name"}
            else:
                answer = self.request_restart(name, f"`pod-agent restart {name}`",
                                              urgent=bool(req.get("now")))
            answer["pid"] = os.getpid()
            try:
                atomic_write(folder / (fname[:-5] + ".answer"), json.dumps(answer))
            except OSError:
                pass

    # ------------------------------------------------------------------ views
    def snapshot(self) -> dict[str, dict]:
        """name -> what status and the endpoint show (no env, no command: nothing secret)."""
        out: dict[str, dict] = {}
        with self._lock:
            for name, spec in self.config.services.items():
                svc = self.services.get(name)
                entry = dict.fromkeys(SNAPSHOT_KEYS)
                entry.update(port=spec.port, log=str(spec.log), ready=False, reason=None,
                             waiting_for=None, required_for_ready=spec.required_for_ready)
                if svc is not None:
                    snap = svc.snapshot()
                    entry.update({k: snap.get(k) for k in SNAPSHOT_KEYS})
                elif name in self.waiting:
                    entry.update(state="waiting", waiting_for=list(self.waiting[name]))
                elif name in self.off:
                    entry.update(state="off", reason=self.off[name])
                else:
                    entry.update(state="stopped", reason="not started yet")
                out[name] = entry
        return out

    def not_ready(self) -> str | None:
        """Why a service marked required_for_ready is not serving (None: all are)."""
        for name, entry in self.snapshot().items():
            if entry.get("required_for_ready") and not (entry.get("state") == "running"
                                                        and entry.get("ready")):
                return f"service {name} is {entry.get('state')}" + (
                    f": {entry['reason']}" if entry.get("reason") else "")
        return None

    def child_pids(self) -> set[int]:
        with self._lock:
            return set().union(*(s.child_pids() for s in self.services.values())) \
                if self.services else set()

    def write_state(self, force: bool = False) -> None:
        import json
        import time

        from agent.markers import atomic_write

        if not self.config.services:
            return
        snap = self.snapshot()
        comparable = {n: {k: v for k, v in e.items() if k not in ("uptime", "next_start_in")}
                      for n, e in snap.items()}
        now = time.monotonic()
        # on a change; else every STATE_REFRESH s while something runs (its uptime), or never
        if not force and comparable == self._last_written and (
                now - self._last_write < STATE_REFRESH
                or not any(e.get("pid") for e in snap.values())):
            return
        self._last_written, self._last_write = comparable, now
        data = {"pid": os.getpid(), "time": time.time(), "services": snap}
        try:
            atomic_write(self.runtime_dir / STATE_FILE, json.dumps(data, indent=1))
            self._write_failed = False
        except OSError as exc:
            if not self._write_failed:
                logger.warning(f"cannot write {self.runtime_dir / STATE_FILE}: {exc}")
            self._write_failed = True

    def reload(self, config) -> None:
        """A new config (SIGHUP): changed services restart with it, new ones start, removed
        or now disabled ones stop."""
        with self._lock:
            old, self.config = self.config, config
            for name, svc in list(self.services.items()):
                spec = config.services.get(name)
                if spec is None or spec.auto_off(self.environ):
                    svc.shutdown()
                    del self.services[name]
                    self.off[name] = "removed from the config" if spec is None \
                        else spec.auto_off(self.environ)
                elif spec != old.services.get(name):
                    svc.spec = self._engine_spec(spec)
                    svc.timing = self._timing(spec)
                    svc.request_restart("config changed", urgent=True)
            for name, spec in config.services.items():
                if name in self.services:
                    continue
                self.off.pop(name, None)
                self.waiting.pop(name, None)
                why = spec.auto_off(self.environ)
                if why:
                    self.off[name] = why
                else:
                    self.waiting[name] = tuple(spec.depends_on)
            for name in [n for n in self.off if n not in config.services]:
                del self.off[name]
            self._start_due("config reloaded")
        self._wake.set()

    # ------------------------------------------------------------------ stop
    def shutdown(self) -> None:
        """Stop every service (in parallel: each has its own stop timeout) and the loop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            services = list(self.services.values())
        stoppers = [threading.Thread(target=s.shutdown, name=f"stop-{s.spec.name}")
                    for s in services]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        if self._hook_thread is not None:
            self._hook_thread.join(15)
        self.write_state(force=True)


def for_daemon(daemon) -> Manager:
    """The manager wired to the running agent (agent/daemon.py): a component counts as
    installed once its marker exists and the latest pass did not fail it (no probe: on a
    resumed volume the services start before any verification)."""
    from agent.markers import path_for

    def installed(name: str) -> bool:
        return path_for(daemon.config.markers_dir, name).is_file() and name not in daemon.failed

    def comfy_ready() -> bool:
        snap = daemon.supervisor.snapshot()
        return snap.get("state") == "running" and bool(snap.get("ready"))

    def comfy_restart(why: str, urgent: bool) -> None:
        daemon.supervisor.request_restart(why, urgent=urgent)

    return Manager(daemon.config, installed=installed, comfy_ready=comfy_ready,
                   comfy_restart=comfy_restart if daemon.start_comfyui else None)


# --------------------------------------------------------------------------- readers
def status_view(config, agent: dict | None) -> dict[str, dict] | None:
    """`status`'s `services`: what the running agent last wrote (services.json, when its pid
    is the running agent's); None without an agent. A reader never trusts the file's types."""
    from agent.markers import read_json

    if agent is None or not config.services:
        return None
    data = read_json(config.runtime_dir / STATE_FILE) or {}
    saved = data.get("services") if data.get("pid") == agent.get("pid") else None
    saved = saved if isinstance(saved, dict) else {}
    out: dict[str, dict] = {}
    for name, spec in config.services.items():
        entry = saved.get(name)
        entry = entry if isinstance(entry, dict) else {"state": "unknown"}
        view = {"state": _text(entry.get("state")) or "unknown"}
        for key in ("pid", "uptime", "restarts", "failures", "port", "next_start_in"):
            value = entry.get(key)
            view[key] = value if isinstance(value, (int, float)) \
                and not isinstance(value, bool) else None
        view["ready"] = entry.get("ready") is True
        for key in ("reason", "last_failure", "degraded_reason"):
            view[key] = _text(entry.get(key))
        last = entry.get("last_exit")
        view["last_exit"] = {k: v for k, v in last.items() if k in ("code", "signal", "time", "pid")
                             and isinstance(v, (int, float)) and not isinstance(v, bool)} \
            if isinstance(last, dict) else None
        waiting = entry.get("waiting_for")
        view["waiting_for"] = [str(w) for w in waiting][:20] if isinstance(waiting, list) \
            else None
        view["log"] = str(spec.log)
        view["required_for_ready"] = spec.required_for_ready
        out[name] = view
    return out


def _text(value, limit: int = 300) -> str | None:
    from agent.redact import redact

    if value is None:
        return None
    text = redact(" ".join(str(value).split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render_lines(services: dict[str, dict] | None) -> list[str]:
    """`pod-agent status`'s SERVICES lines."""
    if not services:
        return []
    lines = ["", "SERVICES"]
    for name, s in services.items():
        state = str(s.get("state") or "?")
        parts = [f"  {name:<10} {state.upper():<8}"]
        if s.get("pid"):
            parts.append(f"pid {s['pid']}")
        if s.get("port"):
            parts.append(f"port {s['port']}" + ("" if s.get("ready") or state != "running"
                                                else " (not answering yet)"))
        if s.get("restarts"):
            parts.append(f"restarts {s['restarts']}")
        last = s.get("last_exit") or {}
        if last.get("signal") is not None:
            parts.append(f"last exit: signal {last['signal']}")
        elif last.get("code") is not None:
            parts.append(f"last exit: code {last['code']}")
        if s.get("waiting_for"):
            parts.append(f"waiting for {', '.join(s['waiting_for'])}")
        why = s.get("reason") or s.get("degraded_reason") or (
            s.get("last_failure") if state in ("backoff", "degraded", "stopped") else None)
        if why:
            parts.append(f"({why})")
        lines.append("  ".join(parts))
    return lines


SERVICE_STATES = ("stopped", "starting", "running", "backoff", "stopping", "degraded", "waiting",
                  "off")


def metric_families(snapshot: dict[str, dict]):
    """/metrics for the services (agent/metrics.py yields these): state, ready, pid, uptime,
    restarts and the last exit, each labelled by service."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    state = GaugeMetricFamily("pod_agent_service_state", "1 for each service's current state.",
                              labels=["service", "state"])
    ready = GaugeMetricFamily("pod_agent_service_ready", "1 when the service runs and answers "
                              "its readiness check.", labels=["service"])
    pid = GaugeMetricFamily("pod_agent_service_pid", "The service's process id (0: none).",
                            labels=["service"])
    uptime = GaugeMetricFamily("pod_agent_service_uptime_seconds", "Seconds since the service "
                               "started (0 when not running).", labels=["service"])
    restarts = CounterMetricFamily("pod_agent_service_restarts", "Service (re)starts after the "
                                   "first.", labels=["service"])
    last = GaugeMetricFamily("pod_agent_service_last_exit_code", "The exit status of the "
                             "service's last exit (-N: killed by signal N; absent: none yet).",
                             labels=["service"])
    for name, s in snapshot.items():
        for st in SERVICE_STATES:
            state.add_metric([name, st], 1.0 if s.get("state") == st else 0.0)
        ready.add_metric([name], 1.0 if s.get("state") == "running" and s.get("ready") else 0.0)
        pid.add_metric([name], float(s.get("pid") or 0))
        uptime.add_metric([name], float(s.get("uptime") or 0))
        restarts.add_metric([name], float(s.get("restarts") or 0))
        exit_ = s.get("last_exit") or {}
        if exit_.get("signal") is not None:
            last.add_metric([name], -float(exit_["signal"]))
        elif exit_.get("code") is not None:
            last.add_metric([name], float(exit_["code"]))
    return [state, ready, pid, uptime, restarts, last]
