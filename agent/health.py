"""Health checks, self-healing actions and the health report.

Each check (agent/checks: comfyui_http, comfyui_process, sageattention, components, disk, gpu,
agent) is one APScheduler job in `pod-agent run` with its own interval, timeout, failure
threshold and on-fail action (`health.checks.<name>` in the config). `pod-agent health --now`
runs the same checks in the CLI process, report-only.

- A run is bounded: the check runs in its own thread and is given up after its timeout (plus a
  short grace for the subprocess kill); a check still stuck is not started again until it ends,
  and the `agent` check reports the overrun. Subprocesses inside checks carry their own timeouts.
- After `failures` consecutive failed runs the on-fail action fires once and the count restarts:
  `restart_comfyui` asks the supervisor for a restart (queue-aware; urgent only when ComfyUI is
  dead), `reinstall` removes the component's marker and requests a reconcile. Both are
  rate-limited (`health.reinstall_limit` per component, `health.restart_limit` for ComfyUI, per
  `health.limit_window`); a component over its limit is quarantined and reported until the
  window has passed, it is proven healthy, or someone reinstalls it by hand.
- <workspace>/logs/health.jsonl (a loguru sink, see agent/log.py) holds one JSON object per line
  with stable keys: a check record (time, check, status ok/warn/fail/skip, detail, duration,
  action, failures, data, previous) when a check's result *changes* - its status, or the class of
  its detail (the detail with its numbers blanked: `12.3 GiB free` and `11.9 GiB free` are one
  class, a different failure is another) - or when an on-fail action is taken; an unchanged
  result is not written again. A `summary` record (verdict, checks, runs: how many runs of each
  check since the previous summary) is written whenever the verdict changes and every
  `health.summary_interval`. `pod-agent health --now` writes every result it ran. The latest
  result of every check is kept in <state_dir>/run/<host>/health.json, replaced atomically at
  every run, with the writing agent's pid and start time.
- A report is stale (`staleness`) when the agent that wrote it is gone, or a check's result is
  older than STALE_FACTOR x its interval (plus its timeout): `pod-agent health` and `status` then
  say so and never call it healthy.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from loguru import logger

from agent import markers
from agent.checks import REGISTRY
from agent.checks.base import STATUSES, CheckCtx, Hooks, Result
from agent.log import HEALTH_KEY, scrub
from agent.redact import MIN_REGISTERED
from agent.markers import atomic_write, read_json
from agent.model import AgentError, Config

VERDICTS = ("healthy", "degraded", "failing", "stale")
EXIT_CODES = {"healthy": 0, "degraded": 1, "failing": 2, "stale": 1}
STALE_FACTOR = 3.0  # a check's result older than this many intervals (+ its timeout) is stale
GRACE = 8.0  # beyond a check's timeout: room for killing its subprocess group
STATE_FILE = "health.json"
ACTIONS_FILE = "health-actions.json"

__all__ = ["Monitor", "Hooks", "Result", "verdict", "report_path", "state_path", "load_state",
           "EXIT_CODES", "staleness", "detail_class"]


# ---------------------------------------------------------------------- paths and helpers
def report_path(config: Config) -> Path:
    return config.workspace / "logs" / "health.jsonl"


def state_path(config: Config) -> Path:
    return config.runtime_dir / STATE_FILE


def iso(ts: float | None = None) -> str:
    ts = time.time() if ts is None else ts
    return datetime.fromtimestamp(ts, tz=timezone.utc).astimezone().isoformat(
        timespec="milliseconds")


def parse_time(text: Any) -> float:
    """A report's ISO time as a Unix timestamp; 0.0 when unreadable."""
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return 0.0


def clean(value: Any) -> Any:
    """JSON-safe and secret-free: strings scrubbed, non-finite floats None, paths as text."""
    if isinstance(value, str):
        # nothing shorter than a registered secret can hold one
        return scrub(value) if len(value) >= MIN_REGISTERED else value
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}  # keys are names, not data
    if isinstance(value, (list, tuple, set)):
        return [clean(v) for v in value]
    return scrub(str(value))


def verdict(statuses: Iterable[str], quarantined: bool = False) -> str:
    statuses = list(statuses)
    if "fail" in statuses:
        return "failing"
    if "warn" in statuses or quarantined:
        return "degraded"
    return "healthy"


def load_state(config: Config) -> dict | None:
    """The latest health.json, or None. Whatever the file holds (hand-edited, truncated,
    another version's), what comes back has the expected shape: checks a mapping of mappings,
    quarantined a mapping of strings."""
    data = read_json(state_path(config))
    if data is None or not isinstance(data.get("checks"), dict):
        return None
    checks = {str(n): e for n, e in data["checks"].items() if isinstance(e, dict)}
    quarantined = data.get("quarantined")
    quarantined = {str(k): str(v) for k, v in quarantined.items()} \
        if isinstance(quarantined, dict) else {}
    return dict(data, checks=checks, quarantined=quarantined)


_NUMBER = re.compile(r"\d+(?:[.:]\d+)*")
# a process's scheduler state as sampled (psutil): `running` one run, `sleeping` the next
_SAMPLED = re.compile(r"\b(?:running|sleeping|idle|disk-sleep|waking)\b")


def detail_class(status: str, detail: Any) -> tuple[str, str]:
    """What makes a check result a new event in health.jsonl: its status and its detail with the
    numbers (and a sampled process state) blanked: a free-space figure, a latency or a process
    caught running instead of sleeping is the same result; another message is a different one."""
    text = _NUMBER.sub("#", " ".join(str(detail or "").split()))
    return status, _SAMPLED.sub("~", text)


def _writer_alive(state: dict) -> tuple[bool | None, int | None]:
    """Whether the agent that wrote the report's agent results still runs: (None, None) when no
    agent wrote it; else (alive, its pid). pid and start time must both match (pids are reused)."""
    from agent.procs import alive

    agent = state.get("agent")
    if not isinstance(agent, dict):  # a report from before `agent` was recorded
        if state.get("source") != "agent":
            return None, None
        agent = {"pid": state.get("pid"), "create_time": state.get("create_time")}
    pid, created = agent.get("pid"), agent.get("create_time")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False, None
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        created = None
    return alive(pid, created) is not None, pid


def staleness(config: Config, state: dict, names: Iterable[str] | None = None,
              now: float | None = None) -> dict[str, Any]:
    """Whether a saved report (load_state) can be believed now: {"stale": bool, "reason": one
    line or None, "checks": {name: why} for each stale check, "agent_gone": pid or None}.

    A check's result is stale when the agent that wrote it no longer runs (pid and start time),
    or it is older than STALE_FACTOR x its interval plus its timeout (an agent that hangs, a
    scheduler that stopped, a disabled health section)."""
    now = time.time() if now is None else now
    checks = state.get("checks") or {}
    names = list(checks) if names is None else [n for n in names if n in checks]
    alive_, writer = _writer_alive(state)
    settings = config.health["checks"]
    out: dict[str, str] = {}
    gone_ages: list[float] = []
    for name in names:
        e = checks[name]
        when = parse_time(e.get("time"))
        age = now - when if when else None
        if e.get("source", state.get("source")) == "agent" and alive_ is not None:
            pid = e.get("pid", writer)
            if not alive_ or pid != writer:
                out[name] = f"written by pod-agent pid {pid}, which is no longer running"
                gone_ages.append(age if age is not None else float("inf"))
                continue
        s = settings.get(name)
        if age is None:
            out[name] = "its time is unreadable"
        elif s is not None and age > STALE_FACTOR * s["interval"] + s["timeout"]:
            out[name] = (f"{_ago(age)} old; it runs every {_ago(s['interval'])} "
                         f"(stale after {STALE_FACTOR:g} intervals)")
    reason = None
    if gone_ages:
        reason = (f"report from pod-agent pid {writer if not alive_ else '?'}, which is no "
                  f"longer running, {_ago(min(gone_ages))} ago")
        if alive_:  # a newer agent runs: these results are its predecessor's
            pids = sorted({str(checks[n].get('pid', '?')) for n in out
                           if n in checks and 'no longer' in out[n]})
            reason = (f"results from pod-agent pid {', '.join(pids)}, which is no longer "
                      f"running, {_ago(min(gone_ages))} ago (pod-agent pid {writer} runs now "
                      "and has not run those checks yet)")
    elif out:
        reason = "stale: " + ", ".join(f"{n} ({why})" for n, why in out.items())
    return {"stale": bool(out), "reason": reason, "checks": out,
            "agent_gone": writer if gone_ages and not alive_ else None}


def _ago(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


REPORT_MIN_FREE = 1 << 20  # bytes: below this the CLI does not open the health report


def open_report(config: Config) -> str | None:
    """Open the health report sink for `pod-agent health --now`; returns None, or one line
    saying why the report is not written this time (a full or read-only disk, a file where
    the logs folder goes). The checks run and print either way."""
    import shutil

    from agent import log as agent_log
    from agent.fserr import describe

    path = report_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise OSError(30 if _read_only(path.parent) else 13,
                          "Read-only file system" if _read_only(path.parent)
                          else "Permission denied", str(path.parent))
        free = shutil.disk_usage(path.parent).free
        if free < REPORT_MIN_FREE:
            raise OSError(28, "No space left on device", str(path))
        agent_log.health_report(path, config.health["report_max_size"],
                                config.health["report_retention"])
    except OSError as exc:
        return describe(exc, "health report not written")
    return None


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def close_report() -> None:
    """Close the report sink; a flush that fails (a full disk) is not an error of the check."""
    from agent import log as agent_log

    try:
        agent_log.close_health_report()
    except (OSError, ValueError):
        pass


_CREATED: dict[int, float] = {}


def _create_time() -> float | None:
    """This process's start time (psutil's, as agent.json and procs.alive use it)."""
    pid = os.getpid()
    if pid not in _CREATED:
        try:
            import psutil

            _CREATED[pid] = psutil.Process(pid).create_time()
        except Exception:  # noqa: BLE001 - without it staleness falls back to the pid
            return None
    return _CREATED[pid]


# ---------------------------------------------------------------------- rate limit
class Limiter:
    """Self-healing budget per target, kept on the volume so an agent restart loop cannot
    reset it. `allow` records an action or refuses it (and quarantines the target)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        """The saved budget; a file that is garbage (or not this shape) counts as empty."""
        data = read_json(self.path) or {}
        events = data.get("events")
        events = {str(k): [float(t) for t in v if isinstance(t, (int, float))
                           and not isinstance(t, bool) and math.isfinite(t)]
                  for k, v in events.items() if isinstance(v, list)} \
            if isinstance(events, dict) else {}
        quarantine = data.get("quarantine")
        quarantine = {str(k): v for k, v in quarantine.items() if isinstance(v, dict)
                      and isinstance(v.get("until", 0), (int, float))} \
            if isinstance(quarantine, dict) else {}
        return {"events": events, "quarantine": quarantine}

    def _save(self, data: dict[str, Any]) -> None:
        try:
            atomic_write(self.path, json.dumps(data, indent=1))
        except OSError as exc:
            logger.warning(f"health: cannot write {self.path}: {exc}")

    def allow(self, kind: str, target: str, limit: int, window: float,
              now: float | None = None) -> tuple[bool, str]:
        now = time.time() if now is None else now
        key = f"{kind}:{target}"
        with self._lock:
            data = self._load()
            recent = [t for t in data["events"].get(key, []) if now - t < window]
            if len(recent) >= limit:
                until = min(recent) + window
                when = time.strftime('%H:%M:%S', time.localtime(until))
                if kind != "reinstall":  # only components are quarantined
                    return False, f"{len(recent)} {kind}s of {target} within " \
                                  f"{window / 60:g} min; next allowed at {when}"
                why = (f"{len(recent)} {kind}s of {target} within {window / 60:g} min; "
                       f"quarantined until {when}")
                new = key not in data["quarantine"]
                data["quarantine"][key] = {"kind": kind, "target": target, "until": until,
                                           "since": data["quarantine"].get(key, {}).get(
                                               "since", now),
                                           "reason": why}
                data["events"][key] = recent
                self._save(data)
                if new:
                    logger.error(f"health: {target} quarantined: {why}. Fix the cause, then "
                                 f"`pod-agent reset {target}` (or POST "
                                 f"/components/{target}/reinstall) to try again")
                return False, why
            recent.append(now)
            data["events"][key] = recent
            if data["quarantine"].pop(key, None) is not None:
                logger.info(f"health: {target}: quarantine lifted (window passed)")
            self._save(data)
            return True, ""

    def clear(self, kind: str, target: str, history: bool = False) -> bool:
        key = f"{kind}:{target}"
        with self._lock:
            data = self._load()
            had = data["quarantine"].pop(key, None) is not None
            if history:
                data["events"].pop(key, None)
            if had or history:
                self._save(data)
            return had

    def quarantined(self, now: float | None = None) -> dict[str, dict]:
        now = time.time() if now is None else now
        with self._lock:
            data = self._load()
        return {str(v.get("target", k)): v for k, v in data["quarantine"].items()
                if v.get("until", 0) > now}


# ---------------------------------------------------------------------- the monitor
class Monitor:
    """Runs checks, decides and takes on-fail actions, writes the reports."""

    def __init__(self, config: Config, hooks: Hooks | None = None, source: str = "agent"):
        self.config = config
        self.hooks = hooks or Hooks()
        self.source = source
        self.latest: dict[str, dict[str, Any]] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.RLock()
        self._consecutive: dict[str, int] = {}
        self._running: dict[str, float] = {}
        self._memo: dict[str, dict[str, Any]] = {name: {} for name in REGISTRY}
        self._verdict: str | None = None
        self._last_summary: tuple | None = None
        self._written: dict[str, tuple[str, str]] = {}  # check -> class of its last record
        self._runs: dict[str, int] = {}  # runs of each check since the last summary
        self.limiter = Limiter(config.state_dir / ACTIONS_FILE)
        self.grace = GRACE
        self._stop = threading.Event()

    def close(self) -> None:
        """Agent shutdown: runs in progress stop waiting for their checks (whose subprocesses
        the daemon kills) so no scheduler thread holds the exit up."""
        self._stop.set()

    # -------------------------------------------------------------- settings
    def enabled(self) -> list[str]:
        return [n for n, s in self.config.health["checks"].items() if s["enabled"]]

    def settings(self, name: str) -> dict[str, Any]:
        return self.config.health["checks"][name]

    # -------------------------------------------------------------- running
    def run(self, name: str, force: bool = False) -> dict[str, Any]:
        """Run one check now (bounded), act on it, report it; returns its record."""
        if name not in REGISTRY:
            raise AgentError(f"unknown check '{name}' (known: {', '.join(REGISTRY)})")
        s = self.settings(name)
        started = time.monotonic()
        with self._lock:
            busy = self._running.get(name)
            if busy is None:
                self._running[name] = started
        if busy is not None:
            result = Result("fail", f"the previous run is still going after "
                                    f"{started - busy:.0f}s (timeout {s['timeout']:g}s)",
                            actionable=False)
            return self._record(name, s, result, 0.0)
        ctx = CheckCtx(self.config, s, self.hooks, self._memo[name], force=force)
        result = self._bounded(name, ctx, s["timeout"] + self.grace)
        return self._record(name, s, result, time.monotonic() - started)

    def run_many(self, names: Iterable[str] | None = None, force: bool = False
                 ) -> list[dict[str, Any]]:
        """Run checks concurrently (one round), then write a summary record."""
        names = list(names) if names is not None else self.enabled()
        started = time.monotonic()
        out: dict[str, dict] = {}
        threads = [threading.Thread(target=lambda n=n: out.__setitem__(n, self.run(n, force)),
                                    name=f"health-round-{n}") for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.summary(time.monotonic() - started)
        return [out[n] for n in names if n in out]

    def _bounded(self, name: str, ctx: CheckCtx, limit: float) -> Result:
        done = threading.Event()
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = REGISTRY[name](ctx)
            except Exception as exc:  # noqa: BLE001 - a check never takes the agent down
                box["error"] = exc
                logger.opt(exception=exc).warning(f"health: check {name} crashed: {exc}")
            finally:
                with self._lock:
                    self._running.pop(name, None)
                done.set()

        threading.Thread(target=target, name=f"health-{name}", daemon=True).start()
        deadline = time.monotonic() + limit
        while not done.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
            if self._stop.is_set():
                return Result("skip", "the agent is stopping", actionable=False)
            if time.monotonic() >= deadline:
                break
        if not done.is_set():
            overruns = self._memo["agent"].setdefault("overruns", {})
            overruns[name] = overruns.get(name, 0) + 1
            return Result("fail", f"did not finish within {limit:g}s (left running; not "
                                  "started again until it ends)", actionable=False)
        if "error" in box:
            exc = box["error"]
            return Result("fail", f"check crashed: {type(exc).__name__}: {exc}",
                          actionable=False)
        result = box.get("result")
        if not isinstance(result, Result) or result.status not in STATUSES:
            return Result("fail", f"check returned {result!r}", actionable=False)
        return result

    # -------------------------------------------------------------- actions
    def _act(self, name: str, s: dict[str, Any], r: Result, failures: int) -> str:
        how = s["on_fail"]
        if how == "none" or not r.actionable or not self.hooks.in_agent:
            return "none"  # without the agent (`health --now`) nothing is healed: report only
        if how == "reinstall" and not r.targets:
            return "none"
        if failures < s["failures"]:
            return f"waiting ({failures}/{s['failures']} failures before {how})"
        self._consecutive[name] = 0
        h = self.config.health
        if how == "restart_comfyui":
            ok, why = self.limiter.allow("restart", "comfyui", h["restart_limit"],
                                         h["limit_window"])
            if not ok:
                return f"rate-limited: {why}"
            assert self.hooks.request_restart is not None
            self.hooks.request_restart(f"health check {name} failed: {r.detail[:200]}", r.dead)
            return "restart_comfyui (urgent)" if r.dead else "restart_comfyui"
        done, held = [], []
        for target in r.targets:
            ok, why = self.limiter.allow("reinstall", target, h["reinstall_limit"],
                                         h["limit_window"])
            if ok:
                try:
                    markers.remove(self.config.markers_dir, target)
                except AgentError as exc:  # a folder, an immutable file: say so, act on the rest
                    held.append(f"{target} (marker not removed: {exc})")
                    continue
                done.append(target)
            else:
                held.append(f"{target} ({why})")
        if done:
            logger.warning(f"health: {name} failed: reinstalling {', '.join(done)} "
                           f"({r.detail[:200]})")
            assert self.hooks.request_reconcile is not None
            self.hooks.request_reconcile(f"health check {name}: reinstall {', '.join(done)}")
        parts = (["reinstall " + ", ".join(done)] if done else []) + \
            (["quarantined " + "; ".join(held)] if held else [])
        return "; ".join(parts)

    def reinstall(self, component: str, why: str) -> None:
        """A reinstall asked for by a person (HTTP): not rate-limited, lifts a quarantine."""
        comp = self.config.components.get(component)
        if comp is None or comp.kind == "overall":
            raise KeyError(component)
        self.limiter.clear("reinstall", component, history=True)
        markers.remove(self.config.markers_dir, component)  # FsError: the caller says why
        logger.warning(f"health: reinstall of {component} requested ({why})")
        if self.hooks.request_reconcile is not None:
            self.hooks.request_reconcile(f"{why}: reinstall {component}")

    # -------------------------------------------------------------- reporting
    def _record(self, name: str, s: dict[str, Any], r: Result, duration: float
                ) -> dict[str, Any]:
        with self._lock:
            failures = self._consecutive.get(name, 0) + 1 if r.status == "fail" else 0
            self._consecutive[name] = failures
            action = r.action or "none"
            if r.status == "fail" and r.action is None:
                action = self._act(name, s, r, failures)
            for target in r.healthy:
                if self.limiter.clear("reinstall", target):
                    logger.info(f"health: {target} is healthy again: quarantine lifted")
            prev = self.latest.get(name)
            entry = clean({"time": iso(), "check": name, "status": r.status,
                           "detail": r.detail, "duration": round(duration, 3),
                           "action": action, "failures": self._consecutive.get(name, 0),
                           "data": r.data})
            self.latest[name] = entry
            self._runs[name] = self._runs.get(name, 0) + 1
            # health.jsonl gets what changed: a new status or kind of detail, an action taken
            # (a person's `health --now` gets every result it ran)
            key = detail_class(entry["status"], entry["detail"])
            last = self._written.get(name)
            acted = action != "none" and not action.startswith("waiting")
            write = self.source != "agent" or acted or last != key
            if write:
                self._written[name] = key
        if write:
            self._emit(dict(entry, previous=last[0] if last else None))
        if self.source != "agent":
            pass  # the CLI prints the report itself
        elif prev is None or prev["status"] != entry["status"]:
            level = {"fail": "ERROR", "warn": "WARNING"}.get(entry["status"], "INFO")
            logger.log(level, f"health: {name} "
                              f"{prev['status'] + ' -> ' if prev else ''}{entry['status']}: "
                              f"{entry['detail'][:300]}")
        elif action != "none" and not action.startswith(("waiting", "none")):
            logger.warning(f"health: {name}: {action}")
        for listener in list(self.listeners):
            try:
                listener(entry)
            except Exception as exc:  # noqa: BLE001 - metrics never break a check
                logger.warning(f"health: listener failed: {exc}")
        self._save_state()
        with self._lock:
            changed = self._summary_key() != self._last_summary
        if changed:
            self.summary()
        return entry

    def _summary_key(self) -> tuple[str, tuple[str, ...]]:
        """What a summary reports: a new one is written when it changes."""
        enabled = set(self.enabled())
        quarantined = tuple(sorted(self.limiter.quarantined()))
        return verdict((e["status"] for n, e in self.latest.items() if n in enabled),
                       bool(quarantined)), quarantined

    @property
    def verdict(self) -> str | None:
        return self._verdict

    def summary(self, duration: float = 0.0) -> dict[str, Any]:
        """Write a summary record with the overall verdict (and remember the verdict)."""
        enabled = self.enabled()
        with self._lock:
            checks = {n: self.latest[n]["status"] for n in enabled if n in self.latest}
            quarantined = self.limiter.quarantined()
            v = verdict(checks.values(), bool(quarantined))
            self._verdict = v
            self._last_summary = (v, tuple(sorted(quarantined)))
            runs, self._runs = self._runs, {}
        counts = {st: sum(1 for x in checks.values() if x == st) for st in STATUSES}
        bad = [f"{n} {st}" for n, st in checks.items() if st in ("fail", "warn")]
        detail = ", ".join(f"{counts[st]} {st}" for st in STATUSES if counts[st]) or "no checks"
        if bad:
            detail += " (" + ", ".join(bad) + ")"
        if quarantined:
            detail += "; quarantined: " + ", ".join(sorted(quarantined))
        rec = clean({"time": iso(), "check": "summary",
                     "status": {"healthy": "ok", "degraded": "warn", "failing": "fail"}[v],
                     "verdict": v, "detail": detail, "duration": round(duration, 3),
                     "action": "none", "checks": checks,
                     "runs": {n: runs.get(n, 0) for n in enabled},
                     "quarantined": {k: q.get("reason") for k, q in quarantined.items()}})
        self._emit(rec)
        return rec

    def _emit(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, separators=(",", ":"), ensure_ascii=False)
        logger.bind(**{HEALTH_KEY: line}).info("health report: {}", rec.get("check"))

    def _save_state(self) -> None:
        """Merge this process's latest results into health.json (atomically replaced)."""
        from agent.locks import Lock

        path = state_path(self.config)
        lock = Lock(path.with_name(f".{STATE_FILE}.lock"))
        try:
            got = lock.acquire(5.0, poll=0.05)
        except (OSError, AgentError):
            got = False
        try:
            atomic_write(path, json.dumps(self.state(), indent=1))
        except OSError as exc:
            self._warn_once(f"health: cannot write {path}: {exc.strerror or exc} (the report "
                            "is kept in memory; `pod-agent status` may show an older one)")
        finally:
            if got:
                lock.release()

    def _warn_once(self, text: str) -> None:
        """A full or read-only disk is said once per process, not once per check run."""
        if text != getattr(self, "_last_warning", None):
            self._last_warning = text
            logger.warning(text)

    def state(self) -> dict[str, Any]:
        """What health.json holds: the saved results merged with this process's latest
        (the newer result of each check wins), the verdict and the quarantined components."""
        old = load_state(self.config) or {"checks": {}}
        enabled = set(self.enabled())
        with self._lock:
            mine = {n: dict(e) for n, e in self.latest.items()}
        merged = {n: e for n, e in old["checks"].items() if n in enabled}
        for n, e in mine.items():
            if n not in merged or parse_time(e.get("time")) >= \
                    parse_time(merged[n].get("time")):
                merged[n] = dict(e, source=self.source, pid=os.getpid())
        keep = enabled | set(mine)  # a disabled check run by hand (--check) is kept too
        merged = {n: merged[n] for n in REGISTRY if n in merged and n in keep}
        quarantined = self.limiter.quarantined()
        # the agent whose results these are (kept when `health --now` merges its own in), so a
        # reader can tell a report from an agent that is gone (`staleness`)
        agent = old.get("agent") if isinstance(old.get("agent"), dict) else None
        if self.source == "agent":
            agent = {"pid": os.getpid(), "create_time": _create_time()}
        return clean({"time": iso(), "host": socket.gethostname(), "pid": os.getpid(),
                      "source": self.source, "agent": agent,
                      "verdict": verdict((e.get("status", "fail") for e in merged.values()),
                                         bool(quarantined)),
                      "checks": merged,
                      "quarantined": {k: q.get("reason") for k, q in quarantined.items()}})

    # -------------------------------------------------------------- for the daemon
    def latest_entry(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self.latest.get(name)
            return dict(entry) if entry else None

    def component_states(self) -> dict[str, str]:
        entry = self.latest_entry("components")
        return dict(((entry or {}).get("data") or {}).get("states") or {})
