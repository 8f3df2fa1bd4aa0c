"""`pod-agent run`: wiring, signals, shutdown.

Threads: the main thread (housekeeping every 0.5 s: debounced node changes, watch refresh,
SIGHUP reload, orphan reaping as PID 1, state files), the supervisor's tick thread, two reconcile
workers (foreground components, then background ones), the watcher's one thread, APScheduler's
timer and worker threads (periodic reconcile, one job per health check: agent/health.py) and the
HTTP endpoint's threads (agent/http.py: one accepting, a fixed pool of workers). Everything
that wants work done calls `request`; nothing else installs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from loguru import logger

from agent import drift as envdrift
from agent import updates
from agent import log as agent_log
from agent import procs
from agent import services
from agent.checks import sage
from agent.config import load
from agent.endpoints import AgentApi, AgentView
from agent.execute import Report
from agent.fserr import describe
from agent.health import Hooks, Monitor, report_path
from agent.kinds.base import Ctx
from agent.markers import atomic_write, clean_temps
from agent.locks import Lock, read_holder
from agent.model import AgentError, Config, ConfigError, State
from agent.observe import OK_STATES, observe_one
from agent.reconcile import Batch, Reconciler
from agent.supervisor import Supervisor
from agent.watch import Events, Watcher, node_signature

SAGE_FLAG = "--use-sage-attention"
MARKER_QUIET = 0.5  # a burst of events ends after this much quiet (or at marker_debounce)
HOUSEKEEPING_INTERVAL = 0.5  # node debounce, watch refresh, SIGHUP, reaping, state files
BOOT_GRACE = 10.0  # seconds before the first health checks: the boot reconcile goes first
SAGE_COMPONENT = "sageattention"
DRIFT_REPEATS = 3  # the same drift this many times in a row: reported, no longer re-checked


class Daemon:
    def __init__(self, config_path: Path | None, workspace: Path | None,
                 poll: float | None = None, start_comfyui: bool | None = None):
        self.config_path = config_path
        self.workspace = workspace
        self.config: Config = load(config_path, workspace)
        self.poll = poll if poll is not None else self.config.agent["poll"]
        self.start_comfyui = self.config.agent["start_comfyui"] if start_comfyui is None \
            else start_comfyui
        self.stop_event = threading.Event()
        self._hup = threading.Event()
        self._refresh = threading.Event()
        self._node_events: dict[str, tuple[float, str]] = {}
        self._node_lock = threading.Lock()
        self._node_sigs: dict[str, tuple | None] = {}
        self._comfy_started = False
        self._started = time.time()
        self.job_events: dict[str, int] = {"error": 0, "missed": 0, "max_instances": 0}
        self._last_state_write = 0.0
        self._last_service: dict | None = None
        self._heartbeat = time.monotonic()
        self._sage_flag: bool | None = None  # whether ComfyUI was last started with it
        self.http_info: dict | None = None
        self._state_write_failed = False
        self.failed: dict[str, str] = {}  # component -> why, from the latest reconcile passes
        # restart decision and drift (agent/drift.py): what the running ComfyUI loaded, the
        # dists as last known, and how many of the agent's own passes ran an installer
        self._loaded: tuple | None = None
        self._baseline: dict[str, str] | None = None
        self._touched = 0
        self._baseline_touched = 0
        self._updates_seen = updates.activity(self.config)  # `pod-agent update` is not drift
        self._drift_lock = threading.Lock()
        self._await_ready = False
        self._ready_checked_pid: int | None = None
        self._last_drift_key: str | None = None
        self._last_drift: tuple[str, dict] | None = None  # (source, diff) of the latest drift
        self._drift_repeats = 0
        self._history_failed = False
        # from right before a spawn until the after-ready comparison: who a drift is put down to
        self._start_window: str | None = None

    # ------------------------------------------------------------------ wiring
    def _build(self) -> None:
        cfg = self.config
        agent = cfg.agent
        self.supervisor = Supervisor(cfg.comfyui, agent, cfg.runtime_dir,
                                     extra_args=self.extra_args)
        # while `pod-agent update`/rollback/snapshot restore runs, passes wait for its end
        from agent.updates.defer import Deferral, DeferringReconciler

        self.deferral = Deferral(lambda: self.config)
        self.fg = DeferringReconciler("foreground", "foreground", lambda: self.config,
                                      self._after_fg, deferral=self.deferral,
                                      quiet=min(MARKER_QUIET, agent["marker_debounce"]),
                                      max_delay=agent["marker_debounce"])
        self.bg = DeferringReconciler("background", "background", lambda: self.config,
                                      self._after_bg, deferral=self.deferral,
                                      quiet=min(MARKER_QUIET, agent["marker_debounce"]),
                                      max_delay=agent["marker_debounce"])
        self.watcher = Watcher(cfg, Events(marker=self.on_marker, node=self.on_node,
                                           restart=self.on_restart_event,
                                           refresh=self._refresh.set), poll=self.poll)
        from apscheduler.events import (EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES,
                                        EVENT_JOB_MISSED)
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(16)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60})
        self.scheduler.add_job(self.periodic_reconcile, "interval", id="reconcile",
                               seconds=agent["reconcile_interval"])
        self.scheduler.add_job(self.check_watcher, "interval", id="watcher", seconds=5)
        self.scheduler.add_job(lambda: updates.recover_orphan(self.config, logger.warning),
                               "interval", id="updates", seconds=5)  # an update whose CLI died
        self.scheduler.add_listener(self._job_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED
                                    | EVENT_JOB_MAX_INSTANCES)
        self.health = Monitor(cfg, Hooks(
            service=self.supervisor.snapshot, comfy_expected=lambda: self.start_comfyui,
            request_restart=self.supervisor.request_restart,
            request_reconcile=self._health_reconcile, watcher=self.watcher,
            job_events=lambda: dict(self.job_events),
            reconciles=lambda: [r.last for r in (self.fg, self.bg) if r.last]))
        self.services = services.for_daemon(self)  # JupyterLab, sshd, ... (agent/services.py)
        self.api = AgentApi(self.view())
        self.health.listeners += [self.api.metrics.on_check, self._on_health]
        self._schedule_health()

    def view(self) -> AgentView:
        """What the HTTP endpoint may see of the agent (agent/endpoints.py), read-only."""
        sup = self.supervisor
        return AgentView(
            config=lambda: self.config, started=self._started,
            heartbeat=lambda: self._heartbeat, stopping=self.stop_event.is_set,
            service=sup.snapshot,
            request_restart=lambda reason, urgent: sup.request_restart(reason, urgent=urgent),
            failed=lambda: dict(self.failed), start_comfyui=lambda: self.start_comfyui,
            health=self.health, job_events=lambda: dict(self.job_events),
            observer_restarts=lambda: self.watcher.restarts,
            reconciles=lambda: [self.fg.last, self.bg.last],
            http_info=lambda: self.http_info,
            set_http_info=lambda info: setattr(self, "http_info", info),
            services=lambda: self.services.snapshot(),
            services_not_ready=lambda: self.services.not_ready())

    def _schedule_health(self) -> None:
        """One APScheduler job per enabled check (and the periodic summary); again on reload."""
        from datetime import datetime, timedelta

        for job in self.scheduler.get_jobs():
            if job.id.startswith("health:"):
                job.remove()
        health = self.config.health
        if not health["enabled"]:
            return
        now = datetime.now()
        for name in self.health.enabled():
            s = health["checks"][name]
            # every check runs once soon after start (min(interval, 10 s): the boot reconcile
            # goes first), then at its interval
            first = now + timedelta(seconds=min(s["interval"], BOOT_GRACE))
            self.scheduler.add_job(self._health_job, "interval", args=[name],
                                   id=f"health:{name}", seconds=s["interval"],
                                   next_run_time=first)
        self.scheduler.add_job(self.health.summary, "interval", id="health:summary",
                               seconds=health["summary_interval"])

    def _health_job(self, name: str) -> None:
        """A scheduled check; none while an update runs (ComfyUI restarts and checkouts move
        under it: its repairs would reinstall beside the update's installs)."""
        if self.deferral.running():
            logger.debug(f"health check {name} skipped: an update runs")
            return
        self.health.run(name)

    def _job_event(self, event) -> None:
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED

        kind = "error" if event.code == EVENT_JOB_ERROR else \
            "missed" if event.code == EVENT_JOB_MISSED else "max_instances"
        self.job_events[kind] += 1
        logger.warning(f"scheduler: job {event.job_id} {kind}"
                       + (f": {event.exception}" if getattr(event, "exception", None) else ""))

    def request_reconcile(self, reason: str) -> None:
        self.fg.request(reason)
        self.bg.request(reason)

    # ------------------------------------------------------------------ events (never block)
    def on_marker(self, name: str, kind: str, path: str) -> None:
        if kind in ("deleted", "moved"):
            reason = f"marker {name} {kind}"
            self.fg.request(reason)
            self.bg.request(reason)
            return
        comp = self.config.components.get(name)
        if comp is not None and comp.kind != "overall":
            # written by another process (e.g. `pod-agent install`): verify, then restart
            self.fg.request(f"marker {name} {kind} by another process",
                            restart=comp.restart_comfyui)

    def on_node(self, name: str, why: str) -> None:
        with self._node_lock:
            self._node_events[name] = (time.monotonic(), f"{name}: {why}")

    def on_restart_event(self, why: str) -> None:
        self.on_node("(comfyui)", why)

    # ------------------------------------------------------------------ reconcile results
    def _required_ok(self) -> bool:
        ctx = Ctx(self.config)
        return all(observe_one(c, ctx).state in OK_STATES
                   for c in self.config.components.values() if c.required and c.enabled)

    def _restart_worthy(self, report: Report) -> list[str]:
        comps = self.config.components
        return [n for n in report.changed
                if n.startswith("custom_nodes/") or (n in comps and comps[n].restart_comfyui)]

    def _note_failures(self, report: Report) -> None:
        """Components the last passes could not converge (for /readyz; status has details)."""
        for o in report.outcomes:
            if o.status in ("failed", "blocked"):
                self.failed[o.name] = o.message
            else:
                self.failed.pop(o.name, None)

    def _after_fg(self, rec: Reconciler, report: Report, batch: Batch) -> None:
        self._note_failures(report)
        self._agent_pass(report)
        self.api.metrics.on_reconcile(rec.phase, rec.last)
        self._write_agent_state()
        self.api.status_changed()  # /status: observe again (in the background)
        self.services.components_changed()  # those waiting for their components may start
        if not self._comfy_started:
            if self._required_ok():
                self._start_comfyui("required components installed")
                self.bg.request("ComfyUI started")
            else:
                logger.warning("ComfyUI not started: required components are not installed "
                               "(see `pod-agent status`)")
            return
        changed = self._restart_worthy(report)
        if changed:
            self._snapshot_nodes()
            changed = self._loaded_changed(changed)
        if changed or batch.restart:
            why = ("installed " + ", ".join(changed)) if changed else "; ".join(
                dict.fromkeys(batch.reasons))
            self._request_restart(why)

    def _after_bg(self, rec: Reconciler, report: Report, batch: Batch) -> None:
        self._note_failures(report)
        self._agent_pass(report)
        self.api.metrics.on_reconcile(rec.phase, rec.last)
        self._write_agent_state()
        self.api.status_changed()
        self.services.components_changed()
        changed = self._restart_worthy(report)
        if changed:
            self._snapshot_nodes()
        if changed and self._comfy_started:
            changed = self._loaded_changed(changed)
        if changed and self._comfy_started:
            self._request_restart("installed " + ", ".join(changed))

    def _request_restart(self, why: str) -> None:
        """A restart a reconcile pass asks for. While `pod-agent update` runs (agent/updates)
        it is the update's: it restarts ComfyUI itself once all its changes are in place."""
        if updates.running(self.config):
            logger.info(f"ComfyUI restart ({why}) left to the update in progress")
            return
        self.supervisor.request_restart(why, urgent=False)

    def _start_comfyui(self, why: str) -> None:
        if not self.start_comfyui or self._comfy_started:
            return
        # the supervisor logs what happens: `stopped -> starting: <why>`, or `adopted running
        # ComfyUI` on a resume that finds it running (no `starting` line before an adoption)
        self._snapshot_nodes()
        self._comfy_started = True
        self.supervisor.start(why)
        self._after_supervisor_start()

    def extra_args(self) -> list[str]:
        self._before_start()
        flag = self._want_sage_flag()
        self._sage_flag = flag
        from agent.manager import manager_args  # --enable-manager for ComfyUI-Manager v4

        return ([SAGE_FLAG] if flag else []) + manager_args(self.config)

    def _want_sage_flag(self) -> bool:
        cui = self.config.comfyui
        if SAGE_FLAG in cui.args or cui.sage_attention == "off":
            return False
        if cui.sage_attention == "on":
            return True
        comp = self.config.components.get(SAGE_COMPONENT)
        if comp is None or not comp.enabled:
            return False
        try:
            ok = observe_one(comp, Ctx(self.config)).state == State.INSTALLED
        except Exception as exc:  # noqa: BLE001 - a failing probe means "not in use"
            logger.warning(f"sageattention probe failed: {exc}")
            ok = False
        if ok and hasattr(self, "health"):
            blocked = sage.flag_blocked(self.health.latest_entry("sageattention"), self.config,
                                        SAGE_COMPONENT)
            if blocked:
                logger.warning(f"not passing {SAGE_FLAG}: the kernel check failed: {blocked}")
                return False
        return ok

    def _on_health(self, entry: dict) -> None:
        """A sageattention verdict that changes whether ComfyUI should run with the flag means
        a (queue-aware) restart; the reinstall itself is the check's on-fail action."""
        if entry.get("check") != "sageattention" or not self._comfy_started \
                or self._sage_flag is None or entry.get("status") not in ("ok", "fail"):
            return
        if self._want_sage_flag() != self._sage_flag:
            self.supervisor.request_restart(
                f"sageattention check {entry['status']}: "
                f"{'without' if self._sage_flag else 'with'} {SAGE_FLAG}", urgent=False)

    # ------------------------------------------------------------------ restart decision, drift
    def _dists(self) -> dict[str, str] | None:
        cache = self.config.state_dir / "cache"
        return envdrift.dists(self.config.comfyui.python,
                              cache=cache if self.config.state_dir.is_dir() else None)

    def _loaded_now(self, dists: dict[str, str] | None = None) -> tuple:
        return envdrift.loaded(self.config, self.watcher.custom_nodes,
                               self._dists() if dists is None else dists)

    def _loaded_changed(self, changed: list[str]) -> list[str]:
        """`changed` when what ComfyUI loads (its HEAD, the custom nodes, the dists) differs from
        what it was started with; [] (and one log line) when a restart could change nothing."""
        if self._loaded is None:
            return changed
        try:
            now = self._loaded_now()
        except Exception as exc:  # noqa: BLE001 - unsure: restart as before
            logger.warning(f"cannot tell what ComfyUI loads ({exc}): restarting to be sure")
            return changed
        what = envdrift.loaded_diff(self._loaded, now)
        if what and self._reverted_at_start(now):
            logger.warning(f"reinstalled {', '.join(changed)}: changed {'; '.join(what)}, which "
                           f"ComfyUI's start reverted {self._drift_repeats} times in a row: no "
                           "restart (it would be reverted again; fix or pin what does it)")
            return []
        if what:
            logger.info(f"reinstalled {', '.join(changed)}: changed {'; '.join(what)}: "
                        "ComfyUI restarts")
            return changed
        logger.info(f"reinstalled {', '.join(changed)}: nothing ComfyUI loads changed, "
                    "no restart needed")
        return []

    def _reverted_at_start(self, now: tuple) -> bool:
        """Past DRIFT_REPEATS identical drifts at start, a change that only undoes that drift
        (same commit and nodes; the packages back to what the drift changed) is not worth a
        restart: the start would undo it again."""
        last = self._last_drift
        if last is None or self._drift_repeats < DRIFT_REPEATS or self._loaded is None \
                or self._loaded[2] is None or now[2] is None \
                or self._loaded[:2] != now[:2] or last[0] != "during ComfyUI start":
            return False
        d = envdrift.diff(dict(self._loaded[2]), dict(now[2]))
        undo = last[1]
        return not envdrift.empty(d) and d["changed"] == {
            n: [new, old] for n, (old, new) in undo["changed"].items()} \
            and d["added"] == undo["removed"] and d["removed"] == undo["added"]

    def _agent_pass(self, report: Report) -> None:
        """A pass that ran an installer may have changed the dists: that is not drift, so the
        baseline moves to what is there now."""
        if not any(o.status in ("installed", "failed") for o in report.outcomes):
            return
        with self._drift_lock:
            self._touched += 1
            now = self._dists()
            if now is not None:
                self._baseline, self._baseline_touched = now, self._touched

    def _before_start(self) -> None:
        """Right before the supervisor spawns ComfyUI: drift since the last look, then what this
        ComfyUI is started with. Never stops a start."""
        try:
            # node changes made before this start are loaded by it: a node event that arrives
            # after it (an update's checkouts, debounced) is not a reason to restart again
            self._snapshot_nodes()
            dists = self._drift_check("between checks", None, wait=0.0)
            self._loaded = self._loaded_now(dists)
            self._await_ready = True
            self._start_window = "ComfyUI (starting) or a custom node it loaded"
        except Exception as exc:  # noqa: BLE001
            logger.warning(f"drift: cannot read the environment before ComfyUI starts: {exc}")

    def _after_supervisor_start(self) -> None:
        """An adopted ComfyUI (no spawn, no _before_start): assume it loaded what is there."""
        if self._loaded is not None:
            return
        try:
            dists = self._dists()
            self._loaded = self._loaded_now(dists)
            with self._drift_lock:
                if self._baseline is None and dists is not None:
                    self._baseline, self._baseline_touched = dists, self._touched
        except Exception as exc:  # noqa: BLE001
            logger.warning(f"drift: cannot read the environment of the adopted ComfyUI: {exc}")

    def _watch_ready(self, snap: dict) -> None:
        """Housekeeping: once a ComfyUI this agent spawned answers, compare the dists again."""
        pid = snap.get("pid")
        if not self._await_ready or snap.get("state") != "running" or not snap.get("ready") \
                or not pid or pid == self._ready_checked_pid:
            return
        self._await_ready = False
        self._ready_checked_pid = pid
        self._start_window = f"ComfyUI (pid {pid}) or a custom node it loaded"
        self.scheduler.add_job(self._after_ready, args=[pid], id=f"drift-ready-{pid}",
                               replace_existing=True)

    def _after_ready(self, pid: int) -> None:
        try:
            self._drift_check("during ComfyUI start",
                              f"ComfyUI (pid {pid}) or a custom node it loaded", wait=120.0,
                              started=True)
        finally:
            self._start_window = None

    def _health_reconcile(self, reason: str) -> None:
        """A health action's reconcile (a lying marker removed): look for drift first, or the
        repair would take the drifted packages for its own install and hide them."""
        try:
            self._drift_check("between checks", None, wait=0.0)
        except Exception as exc:  # noqa: BLE001 - the reconcile goes on
            logger.warning(f"drift: check failed: {exc}")
        self.request_reconcile(reason)

    def _loaded_dists(self, dists: dict[str, str]) -> None:
        """What ComfyUI imported is what was there once it answered (set before a drift is
        reported: the repair it asks for is then compared with this)."""
        if self._loaded is not None:
            self._loaded = (self._loaded[0], self._loaded[1], tuple(sorted(dists.items())))

    def _drift_between_checks(self) -> None:
        try:
            self._drift_check("between checks", None, wait=60.0)
        except Exception as exc:  # noqa: BLE001 - the periodic reconcile goes on
            logger.warning(f"drift: check failed: {exc}")

    def _drift_check(self, source: str, by: str | None, wait: float,
                     started: bool = False) -> dict[str, str] | None:
        """Compare the dists with the baseline and move the baseline; report a difference that
        no install pass of this agent made. Skipped (the baseline kept) while a pass runs and
        does not end within `wait` s. Returns the dists read (None: not read)."""
        deadline = time.monotonic() + wait
        while self.fg.busy or self.bg.busy:
            if time.monotonic() >= deadline or self.stop_event.wait(0.2):
                return None
        with self._drift_lock:
            if self.fg.busy or self.bg.busy:
                return None
            touched = self._touched
            now = self._dists()
            if now is None:
                return None
            before, self._baseline = self._baseline, now
            same = touched == self._baseline_touched == self._touched
            self._baseline_touched = self._touched
            seen, self._updates_seen = self._updates_seen, updates.activity(self.config)
            same = same and seen == self._updates_seen
            if started:
                self._loaded_dists(now)
        if before is None or not same:
            return now
        d = envdrift.diff(before, now)
        if not envdrift.empty(d):
            window = self._start_window
            if source == "between checks" and window:
                source, by = "during ComfyUI start", window
            self._report_drift(source, by, d)
        return now

    def _report_drift(self, source: str, by: str | None, d: dict) -> None:
        key = json.dumps(d, sort_keys=True)
        self._drift_repeats = self._drift_repeats + 1 if key == self._last_drift_key else 1
        self._last_drift_key = key
        self._last_drift = (source, d)
        affected = envdrift.affected(self.config, envdrift.names(d))
        rec = envdrift.record(source, d, by or "", affected, self._drift_repeats,
                              envdrift.installers(self.config.comfyui.python, d))
        who = envdrift.who(rec)
        text = f"environment drift {source}: {rec['summary']}" + (
            f" ({'by ' if by else ''}{who})" if who else "")
        try:
            envdrift.append(self.config, rec)
            self._history_failed = False
        except OSError as exc:
            if not self._history_failed:
                logger.warning(f"cannot write {envdrift.history_path(self.config)}: "
                               f"{describe(exc)}")
            self._history_failed = True
        if self._drift_repeats > DRIFT_REPEATS:
            logger.warning(f"{text}; the same change {self._drift_repeats} times in a row: not "
                           "re-checked again (something reverts it each time: see the history)")
        else:
            logger.warning(f"{text}; re-checking "
                           + (", ".join(affected) + " (their requirements name it)"
                              if affected else "every component"))
            self.request_reconcile(f"environment drift {source}: {rec['summary']}")
        health = self.config.health
        if health["enabled"] and health["checks"]["drift"]["enabled"]:
            self.health.run("drift")

    # ------------------------------------------------------------------ timers
    def periodic_reconcile(self) -> None:
        self._drift_between_checks()
        self.fg.request("periodic full reconcile")
        self.bg.request("periodic full reconcile")

    def check_watcher(self) -> None:
        # a dead observer is the `agent` health check's to notice, restart and report; without
        # that check this job does it
        agent_check = self.config.health["checks"]["agent"]
        if not (self.config.health["enabled"] and agent_check["enabled"]) \
                and not self.watcher.alive():
            self.watcher.restart()
        self._refresh.set()

    # ------------------------------------------------------------------ housekeeping
    def _housekeeping(self) -> None:
        now = time.monotonic()
        self._heartbeat = now
        quiet = self.config.agent["restart_quiet_period"]
        # While the foreground worker runs, node events are mostly its own clones and pulls;
        # judge them once it is done and has recorded what it changed.
        with self._node_lock:
            due = [] if self.fg.busy else \
                [k for k, (t, _) in self._node_events.items() if now - t >= quiet]
            reasons = [self._node_events.pop(k)[1] for k in due]
        changed = [r for k, r in zip(due, reasons) if k == "(comfyui)" or self._node_moved(k)]
        if changed:
            # before ComfyUI first starts, only the requirements matter: the start loads them
            self.fg.request("custom nodes changed: " + "; ".join(changed),
                            restart=self._comfy_started, settled=True)
        if self._refresh.is_set():
            self._refresh.clear()
            try:
                self.watcher.refresh()
            except OSError as exc:
                logger.warning(f"watch: refresh failed: {exc}")
        if self._hup.is_set():
            self._hup.clear()
            self.reload()
        if os.getpid() == 1:
            self._reap_orphans()
        snap = self.supervisor.snapshot()
        self._watch_ready(snap)
        comparable = {k: v for k, v in snap.items() if k not in ("uptime", "next_start_in")}
        if comparable != self._last_service or time.monotonic() - self._last_state_write > 10:
            self._last_service = comparable
            self._write_agent_state(snap)

    def _node_moved(self, name: str) -> bool:
        """Did the node change since ComfyUI last (re)started or the agent itself changed it?
        Events caused by the agent's own installs compare equal and are dropped."""
        sig = node_signature(self.watcher.custom_nodes / name)
        if self._node_sigs.get(name) == sig:
            return False
        self._node_sigs[name] = sig
        return True

    def _snapshot_nodes(self) -> None:
        root = self.watcher.custom_nodes
        try:
            names = [p.name for p in root.iterdir() if p.is_dir()]
        except OSError:
            names = []
        self._node_sigs = {n: node_signature(root / n) for n in names}

    def _reap_orphans(self) -> None:
        """As PID 1: reap re-parented orphans, never a child whose Popen wants its status."""
        sup = self.supervisor
        known = procs.known_pids() | sup.child_pids()
        known |= self.services.child_pids()
        for _ in range(64):
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in known:
                return
            try:
                os.waitpid(info.si_pid, os.WNOHANG)
            except ChildProcessError:
                return

    def reload(self) -> None:
        try:
            new = load(self.config_path, self.workspace)
        except ConfigError as exc:
            logger.error(f"SIGHUP: the new config is invalid, keeping the old one: {exc}")
            return
        old = self.config
        self.config = new
        self.watcher.config = new
        self._refresh.set()
        self.supervisor.settings = new.comfyui
        self.supervisor.agent = dict(new.agent)
        self.health.config = new
        self._schedule_health()
        self.services.reload(new)
        agent_log.add_secret(new.http.get("token"))
        logger.info("SIGHUP: config reloaded")
        if new.http != old.http:
            logger.warning("SIGHUP: http settings take effect when the agent restarts")
        if new.comfyui != old.comfyui and self._comfy_started:
            self.supervisor.request_restart("ComfyUI settings changed", urgent=False)
        self.fg.request("config reloaded")
        self.bg.request("config reloaded")

    def _write_agent_state(self, snap: dict | None = None) -> None:
        import psutil

        self._last_state_write = time.monotonic()
        last = [r.last for r in (self.fg, self.bg) if r.last]
        latest = max(last, key=lambda r: r["time"]) if last else None
        data = {
            "pid": os.getpid(), "create_time": psutil.Process().create_time(),
            "started": self._started,
            "last_reconcile": latest["time"] if latest else None,
            "last_result": latest["result"] if latest else None,
            "reconciles": {"foreground": self.fg.last, "background": self.bg.last,
                           "runs": self.fg.runs + self.bg.runs},
            "watch": {"mode": self.watcher.mode, "watches": self.watcher.watch_count(),
                      "observer_restarts": self.watcher.restarts},
            "scheduler_events": dict(self.job_events),
            "start_comfyui": self.start_comfyui,
            "http": self.http_info,
        }
        sd = self.config.runtime_dir
        try:
            atomic_write(sd / "agent.json", json.dumps(data, indent=1))
            atomic_write(sd / "service.json",
                         json.dumps(snap or self.supervisor.snapshot(), indent=1))
        except OSError as exc:
            if not self._state_write_failed:  # once until it works again, not every 10 s
                logger.warning(f"cannot write the agent's state files: {describe(exc)}")
            self._state_write_failed = True
            return
        if self._state_write_failed:
            logger.info("the agent's state files are written again")
        self._state_write_failed = False

    # ------------------------------------------------------------------ run
    def _signals(self) -> None:
        def stop(signum, frame):  # noqa: ARG001
            logger.info(f"received {signal.Signals(signum).name}: shutting down")
            self.stop_event.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda s, f: self._hup.set())

    def run(self) -> int:
        cfg = self.config
        agent_log.configure(level="INFO", file=cfg.workspace / "logs" / "agent.log")
        agent_log.add_secret(cfg.http.get("token"))
        agent_log.health_report(report_path(cfg), cfg.health["report_max_size"],
                                cfg.health["report_retention"])
        for folder in (cfg.markers_dir, cfg.runtime_dir, cfg.workspace / "logs"):
            folder.mkdir(parents=True, exist_ok=True)
        self._single = Lock(cfg.runtime_dir / "agent.lock")
        if not self._single.acquire(0):
            holder = read_holder(cfg.runtime_dir / "agent.lock") or {}
            raise AgentError(f"another pod-agent (pid {holder.get('pid', '?')}) already runs "
                             f"for {cfg.workspace} on this host; stop it first")
        clean_temps(cfg)  # temp files of writes a kill -9 cut short
        from agent import history
        history.set_actor("agent")  # what this process installs is the agent's (history.jsonl)
        from agent.updates import recover_at_start
        recover_at_start(cfg, logger.warning)  # an update a kill -9 cut short: finish or undo
        self._signals()
        services.run_hook("pre_start", cfg.hooks, self.stop_event)  # before anything else
        self._build()
        logger.info(f"pod-agent {__import__('agent').__version__} starting: workspace "
                    f"{cfg.workspace}, pid {os.getpid()}")
        sup_thread = threading.Thread(target=self.supervisor.run_forever,
                                      args=(self.stop_event, self._tick_interval()),
                                      name="supervisor",
                                      daemon=True)
        try:
            self.api.start_http()  # sets self.http_info, now and when a retry binds
            self.watcher.start()
            self.fg.start()
            self.bg.start()
            self.scheduler.start()
            sup_thread.start()
            self.services.start()  # before any verification: those without depends_on, and
            self.boot()            # on a resumed volume (markers there) all of them
            self._write_agent_state()
            while not self.stop_event.wait(HOUSEKEEPING_INTERVAL):
                try:
                    self._housekeeping()
                except Exception as exc:  # noqa: BLE001 - keep the agent alive
                    logger.exception(f"housekeeping failed: {exc}")
        finally:
            self.shutdown(sup_thread)
        return 0

    def _tick_interval(self) -> float:
        """The supervisor's clock: fine enough for its own polling intervals, and no finer
        (an idle agent should cost next to nothing)."""
        agent = self.config.agent
        return max(0.05, min(0.5, agent["ready_poll_interval"], agent["queue_poll_interval"]))

    def boot(self) -> None:
        if not self.start_comfyui:
            self.fg.request("agent started")
            return
        if self._required_ok():
            self._start_comfyui("resume: required components verified")
            self.fg.request("agent started (resume)")
            self.bg.request("agent started (resume)")
        else:
            logger.info("required components missing: installing them before ComfyUI starts")
            self.fg.request("agent started: installing required components")

    def shutdown(self, sup_thread: threading.Thread) -> None:
        self.stop_event.set()
        self.supervisor.wake()
        self.api.stop_http()
        self.health.close()
        try:
            self.scheduler.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - not started
            pass
        self.watcher.stop()
        killer = threading.Thread(target=procs.terminate_all, name="stop-installers")
        killer.start()
        stop_services = threading.Thread(target=self.services.shutdown, name="stop-services")
        stop_services.start()  # beside ComfyUI's stop: each has its own stop timeout
        for rec in (self.fg, self.bg):
            rec.stop(timeout=0.1)
        if sup_thread.is_alive():
            sup_thread.join(5)
        self.supervisor.shutdown()
        stop_services.join()
        killer.join(10)
        for rec in (self.fg, self.bg):
            rec.stop(timeout=10)
        for name in ("agent.json",):
            try:
                (self.config.runtime_dir / name).unlink()
            except OSError:  # gone already, or a folder / read-only: shutdown goes on
                pass
        self._write_service_stopped()
        self._single.release()
        logger.info("pod-agent stopped")
        agent_log.close_health_report()

    def _write_service_stopped(self) -> None:
        try:
            atomic_write(self.config.runtime_dir / "service.json",
                         json.dumps(self.supervisor.snapshot(), indent=1))
        except OSError:
            pass
