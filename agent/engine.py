"""One process engine: a supervised process that knows nothing of ComfyUI.

A `Service` runs one command in its own session (process group == its pid, so it survives the
agent), with its output through the redacting log pipe (agent/logpipe.py) into its log file, and
follows it with a small state machine driven by `tick()`:

    STOPPED, STARTING, RUNNING, BACKOFF, STOPPING, DEGRADED

Only `_transition` changes the state and it refuses a transition that is not in `ALLOWED`. Time
is `time.monotonic()`; every timeout (readiness, liveness, backoff, restart wait) is decided in
`tick(now)`, so tests can drive it with a fake clock.

Constructing and driving a service
----------------------------------
::

    from agent.engine import HttpReady, Service, Spec, TcpReady

    spec = Spec(
        name="jupyter",                      # state file <state_dir>/jupyter.json; log lines say
        command=["jupyter", "lab", "--port", "8888"],   # argv list, or a shell line (bash -c)
        log=workspace / "logs" / "jupyter.log",         # appended to; rotated by tick()
        cwd=workspace, env={"JUPYTER_TOKEN": token},    # env: on top of the agent's environment
        ready=HttpReady(8888, "/api"),       # or TcpReady(22), a callable () -> bool, or None
        restart="always",                    # always | on-failure | never
        stop_timeout=20.0,                   # SIGTERM, this long, then SIGKILL (to the group)
        port=8888,                           # optional: never start while something else holds it
        secrets=(token,),                    # masked in its log, the state file and our logs
        title="JupyterLab",                  # how log lines name it (default: name)
    )
    svc = Service(spec, state_dir, timing={"ready_timeout": 60})  # timing: see TIMING
    svc.start("agent started")    # adopt the running one (same pid + create_time) or spawn
    # drive it: tick() from one thread, as often as its poll intervals need, e.g.
    threading.Thread(target=svc.run_forever, args=(stop_event, 0.5), daemon=True).start()
    svc.request_restart("config changed")          # thread-safe, never blocks; coalesces
    svc.request_restart("user asked", urgent=True) # (non-urgent waits for `_restart_ready`)
    svc.snapshot()   # a dict, any thread, never blocks on the process: state, pid, uptime,
                     # restarts, failures, last_exit, last_restart ({by: agent|itself, reason,
                     # time}), adopted, pending_restart, next_start_in, degraded_reason,
                     # last_failure, ready, port, log
    svc.stop()       # SIGTERM the group, SIGKILL after stop_timeout, wait; state STOPPED
    svc.shutdown()   # stop and ignore later restart requests until start() (agent shutdown)

`spec` and `timing` are read at each use: assign `svc.spec = new_spec` (a reload) and the next
start uses it. `child_pids()` gives the pids whose exit status belongs to this engine (a PID-1
reaper must leave them alone).

What it does
------------
- readiness: while STARTING, `ready` is polled every `ready_poll_interval` until it passes
  (RUNNING) or `ready_timeout` passes (a failed start). Without `ready`, the process is RUNNING
  at the first tick that finds it alive. While RUNNING it is the liveness check, every
  `liveness_interval`; `liveness_failures` misses in a row are a failure.
- failures (an exit the restart policy restarts, a ready timeout, liveness, a start that cannot
  spawn) go to BACKOFF: `backoff_initial` doubling to `backoff_max`, plus up to 10 % jitter; the
  count resets after `backoff_reset_after` healthy. More than `degraded_after` failures within
  `degraded_window` is DEGRADED (logged as an error) with a retry every `degraded_retry`; a
  successful start leaves it.
- restart policy on an exit: `always` restarts (an exit is a failure, with backoff);
  `on-failure` restarts a non-zero exit and leaves a zero exit STOPPED; `never` leaves STOPPED
  (the exit is recorded, a non-zero one as `last_failure`).
- a restart the process asks for itself is not a failure: an exit that `_requested_exit` calls
  requested starts again at once; a process that re-executes itself in place (os.execv: same pid
  and create_time) is noticed by its new image (the stack and argument addresses in
  /proc/PID/stat change with the exec) and followed from STARTING with a fresh ready timeout.
- adoption: `<state_dir>/<name>.json` holds pid + create_time (+ the log pipe's); a new engine
  (an agent restart) adopts that process instead of starting a second. Subclasses may also scan
  (`_find_running`).
- the stop ladder: SIGTERM to the group, `psutil.wait_procs` on its members for stop_timeout,
  SIGKILL to the group, then whatever is left in the group; the log pipe gets a moment to write
  the last words.
- the log: rotated (copytruncate, 3 kept) when over `log_max_bytes`.

Threads: `request_restart()`, `snapshot()` and `wake()` may be called from any thread and never
block on the process; `tick()`, `start()` and `stop()` serialise on one lock (a restart blocks
`tick` for at most the stop timeout).

Subclass hooks (agent/supervisor.py is the example): `_preflight` (raise `StartFailed` when a
start cannot work), `_command` (argv, env and cwd of a spawn), `_probe` (readiness and
liveness), `_find_running` (adoption), `_restart_ready` (may a non-urgent restart happen now),
`_requested_exit` (was this exit a restart the process asked for), `_state_extra` (more fields
for the state file), `_waiting_for` (what a pending restart waits for, in the snapshot).
"""

from __future__ import annotations

import enum
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import http.client
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import psutil
from loguru import logger

from agent.logpipe import NAME as LOGPIPE_NAME
from agent.markers import atomic_write, read_json
from agent.procs import stop_group, wait_gone
from agent.redact import redact, redact_argv, register, registered

LOG_MAX_BYTES = 20 * 1024 * 1024
LOG_KEEP = 3
KILL_WAIT = 5.0  # after SIGKILL, how long we wait for the leader to go
LOGPIPE = Path(__file__).with_name(LOGPIPE_NAME)
PIPE_START_WAIT = 10.0  # how long a start waits for the log pipe's bootstrap to exec the command
PIPE_DRAIN_WAIT = 2.0  # after the process died, how long its log pipe may take to write the rest
RESTART_POLICIES = ("always", "on-failure", "never")

# The timing a Service reads from its `timing` mapping (the agent's settings of the same names,
# agent/config.py AGENT_FIELDS, with these defaults).
TIMING: dict[str, float] = {
    "stop_timeout": 20.0,  # used when the Spec has none
    "ready_timeout": 600.0,
    "ready_poll_interval": 2.0,
    "liveness_interval": 10.0,
    "liveness_failures": 3,
    "backoff_initial": 5.0,
    "backoff_max": 300.0,
    "backoff_reset_after": 600.0,
    "degraded_after": 5,
    "degraded_window": 900.0,
    "degraded_retry": 600.0,
    "restart_max_wait": 1800.0,
    "queue_poll_interval": 3.0,
}


class ServiceState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    DEGRADED = "degraded"


S = ServiceState
ALLOWED: dict[ServiceState, frozenset[ServiceState]] = {
    # STOPPED -> RUNNING/STARTING: spawn or adopt.
    S.STOPPED: frozenset({S.STARTING, S.RUNNING}),
    # STARTING/RUNNING -> STOPPED: it exited and the restart policy (or the process's own
    # restart request) says so; RUNNING -> STARTING: it re-executed itself in place.
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.DEGRADED, S.STOPPING, S.STOPPED}),
    S.RUNNING: frozenset({S.BACKOFF, S.DEGRADED, S.STOPPING, S.STOPPED, S.STARTING}),
    S.BACKOFF: frozenset({S.STARTING, S.RUNNING, S.STOPPED}),
    S.DEGRADED: frozenset({S.STARTING, S.RUNNING, S.STOPPED}),
    # STOPPING -> BACKOFF/DEGRADED: a failed process (ready timeout, liveness) was stopped.
    S.STOPPING: frozenset({S.STOPPED, S.BACKOFF, S.DEGRADED}),
}


class IllegalTransition(RuntimeError):
    pass


class StartFailed(Exception):
    """Raised by `_preflight` or `_command`: the start cannot happen (the message is the failure's reason)."""


# ---------------------------------------------------------------------- readiness
@dataclass(frozen=True)
class HttpReady:
    """Ready when GET http://host:port/path answers 2xx or 3xx (no proxy)."""
    port: int
    path: str = "/"
    host: str = "127.0.0.1"
    timeout: float = 2.0

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path if self.path.startswith('/') else '/' + self.path}"

    def __call__(self) -> bool:
        opener = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.url(), timeout=self.timeout) as resp:
                return 200 <= resp.status < 400
        except urllib.error.HTTPError as exc:
            return 300 <= exc.code < 400
        except (OSError, ValueError, http.client.HTTPException):
            return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # a 3xx is an answer
        return None


@dataclass(frozen=True)
class TcpReady:
    """Ready when a TCP connection to host:port succeeds."""
    port: int
    host: str = "127.0.0.1"
    timeout: float = 1.0

    def __call__(self) -> bool:
        return port_busy(self.host, self.port, self.timeout)


Ready = Union[HttpReady, TcpReady, Callable[[], bool]]


@dataclass(frozen=True)
class Spec:
    """What to run. See the module docstring."""
    name: str
    command: Union[Sequence[str], str]
    log: Path
    cwd: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    ready: Ready | None = None
    restart: str = "always"
    stop_timeout: float | None = None  # None: timing["stop_timeout"]
    port: int | None = None
    secrets: tuple[str, ...] = ()
    title: str | None = None

    def __post_init__(self) -> None:
        if self.restart not in RESTART_POLICIES:
            raise ValueError(f"restart must be one of {', '.join(RESTART_POLICIES)}, "
                             f"not {self.restart!r}")

    @property
    def argv(self) -> list[str]:
        return ["bash", "-c", self.command] if isinstance(self.command, str) \
            else [str(a) for a in self.command]


@dataclass
class _Request:
    reason: str
    since: float  # monotonic, first request of a coalesced burst
    since_wall: float
    urgent: bool
    seq: int
    forced_logged: bool = False


class Service:
    """A supervised process (see the module docstring)."""

    log_max_bytes = LOG_MAX_BYTES

    def __init__(self, spec: Spec, state_dir: Path, timing: Mapping[str, Any] | None = None,
                 http_timeout: float = 2.0) -> None:
        self.spec = spec
        self.timing = dict(timing or {})
        self.state_dir = Path(state_dir)
        self.http_timeout = http_timeout
        self._lock = threading.RLock()  # serialises tick/start/stop/adopt
        self._req_lock = threading.Lock()  # guards _pending and _seq
        self._wake = threading.Event()  # cuts run_forever's wait short

        self.state = ServiceState.STOPPED
        self._state_since = time.monotonic()
        self._proc: subprocess.Popen | None = None  # our child
        self._ps: psutil.Process | None = None  # the process (child or adopted)
        self._pid: int | None = None
        self._pgid: int | None = None
        self._adopted = False
        self._started_mono: float | None = None
        self._cmdline: list[str] = []
        self._pipe: psutil.Process | None = None  # the redacting log pipe in its group
        self._pipe_misses = 0
        self._image: tuple | None = None  # the process image's signature (exec in place)

        self._ready_seen = False
        self._ready_deadline = 0.0
        self._next_probe = 0.0
        self._live_failures = 0
        self._running_since: float | None = None

        self._failures = 0  # consecutive, for the backoff delay
        self._failure_times: deque[float] = deque()  # for DEGRADED
        self._last_failure: str | None = None
        self._degraded_reason: str | None = None
        self._next_start: float | None = None
        self._last_exit: dict[str, Any] | None = None
        self._last_restart: dict[str, Any] | None = None  # the latest restart that was no failure
        self._starts = 0

        self._pending: _Request | None = None
        self._seq = 0
        self._next_queue_check = 0.0
        self._closed = False
        self._adopted_code: int | None = None
        self._probe_said: tuple | None = None

    # ------------------------------------------------------------------ settings
    @property
    def title(self) -> str:
        return self.spec.title or self.spec.name

    def _a(self, key: str) -> Any:
        if key == "stop_timeout" and self.spec.stop_timeout is not None:
            return self.spec.stop_timeout
        value = self.timing.get(key)
        return TIMING[key] if value is None else value

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"{self.spec.name}.json"

    @property
    def log_path(self) -> Path:
        return Path(self.spec.log)

    # ------------------------------------------------------------------ state machine
    def _transition(self, new: ServiceState, reason: str) -> None:
        old = self.state
        if new not in ALLOWED[old]:
            raise IllegalTransition(f"{self.title} supervisor: illegal transition {old.value} -> "
                                    f"{new.value} ({reason})")
        self.state = new
        self._state_since = time.monotonic()
        level = "ERROR" if new is S.DEGRADED else "INFO"
        logger.log(level, "{} {} -> {}: {}", self.title, old.value, new.value, redact(reason))

    # ------------------------------------------------------------------ public API
    def start(self, why: str = "start") -> None:
        """Adopt a running process or start one. Returns at once; `tick` follows readiness.
        `why` is logged with the transition that follows: `stopped -> starting: <why>`, or,
        when one already runs, only `adopted running ...` (never `starting` before it)."""
        with self._lock:
            self._closed = False
            if self.state is not S.STOPPED:
                logger.debug("{} start requested while {}: nothing to do", self.title,
                             self.state.value)
                return
            self._launch(time.monotonic(), why)

    def stop(self, timeout: float | None = None) -> None:
        """Stop it (SIGTERM to its group, SIGKILL after the timeout) and wait for it."""
        with self._lock:
            with self._req_lock:
                self._pending = None  # a restart asked for before a stop is moot
            if self.state in (S.BACKOFF, S.DEGRADED):
                self._next_start = None
                self._transition(S.STOPPED, "stop requested")
                return
            if self.state is S.STOPPED:
                return
            self._stop_process(timeout, "stop requested")
            self._transition(S.STOPPED, "stopped")

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop it and ignore later restart requests until `start()` (agent shutdown)."""
        with self._req_lock:
            self._closed = True
            self._pending = None
        self.stop(timeout)

    def request_restart(self, reason: str, urgent: bool = False) -> None:
        """Ask for a restart (thread-safe, never blocks). Requests coalesce; `tick` acts."""
        now = time.monotonic()
        with self._req_lock:
            if self._closed:
                logger.info("{} restart requested ({}) after shutdown: ignored", self.title,
                            reason)
                return
            self._seq += 1
            self._wake.set()
            req = self._pending
            if req is None:
                self._pending = _Request(reason, now, time.time(), urgent, self._seq)
                self._next_queue_check = 0.0
            else:
                if reason not in req.reason.split("; "):
                    req.reason = f"{req.reason}; {reason}"
                req.urgent = req.urgent or urgent
                req.seq = self._seq
        logger.info("{} restart requested{}: {}", self.title, " (urgent)" if urgent else "",
                    reason)

    def run_forever(self, stop_event: threading.Event, interval: float = 0.5) -> None:
        """Tick every `interval`, and at once after a restart request or `wake()`."""
        while not stop_event.is_set():
            try:
                self.tick()
            except Exception:  # keep supervising whatever one tick did
                logger.exception("{} supervisor tick failed", self.title)
            self._wake.wait(interval)
            self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def child_pids(self) -> set[int]:
        """Pids whose exit status this engine collects (a PID-1 reaper leaves them alone)."""
        proc = self._proc
        return {proc.pid} if proc is not None else set()

    def _waiting_for(self, req: _Request) -> str:
        return "start"

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._req_lock:
            req = self._pending
            pending = None
            if req is not None:
                pending = {"reason": redact(req.reason), "since": req.since_wall,
                           "waiting_for": self._waiting_for(req),
                           "urgent": req.urgent}
        state = self.state
        next_start = self._next_start
        started = self._started_mono
        return {
            "state": state.value,
            "pid": self._pid,
            "uptime": round(now - started, 3) if started is not None and self._pid else None,
            "restarts": max(0, self._starts - 1),
            "failures": self._failures,
            "last_exit": dict(self._last_exit) if self._last_exit else None,
            "last_restart": dict(self._last_restart) if self._last_restart else None,
            "adopted": self._adopted,
            "pending_restart": pending,
            "next_start_in": round(max(0.0, next_start - now), 3)
            if next_start is not None and state in (S.BACKOFF, S.DEGRADED) else None,
            "degraded_reason": redact(self._degraded_reason or "") or None,
            "last_failure": redact(self._last_failure or "") or None,
            "ready": self._ready_seen,
            "port": self.spec.port,
            "log": str(self.spec.log),
        }

    # ------------------------------------------------------------------ tick
    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._rotate_log()
            if self.state in (S.STARTING, S.RUNNING) and self._check_exit(now):
                pass
            elif self.state is S.RUNNING and self._check_exec(now):
                pass
            elif self.state is S.STARTING:
                self._tick_starting(now)
            elif self.state is S.RUNNING:
                self._tick_running(now)
            elif self.state in (S.BACKOFF, S.DEGRADED):
                if self._next_start is not None and now >= self._next_start:
                    self._launch(now, "retry after " + self.state.value)
            self._tick_pending(now)

    def _became_ready(self, now: float, what: str) -> None:
        self._running_since = now
        self._live_failures = 0
        self._ready_seen = True
        self._next_probe = now + self._a("liveness_interval")
        # taken once it answers (long after its exec): an exec in place changes it
        self._image = image_signature(self._pid) if self._pid else None
        self._transition(S.RUNNING, what)
        if self._degraded_reason:
            logger.info("{} left DEGRADED after a successful start", self.title)
            self._degraded_reason = None
            self._failure_times.clear()

    def _tick_starting(self, now: float) -> None:
        if now >= self._ready_deadline:
            self._fail(now, f"not ready within {self._a('ready_timeout'):g}s", running=True)
            return
        if now < self._next_probe:
            return
        ok = self._probe()
        self._next_probe = now + self._a("ready_poll_interval")
        if ok:
            self._became_ready(now, f"ready (pid {self._pid})")

    def _tick_running(self, now: float) -> None:
        if self._failures and self._running_since is not None \
                and now - self._running_since >= self._a("backoff_reset_after"):
            logger.info("{} healthy for {:g}s: failure count reset", self.title,
                        self._a("backoff_reset_after"))
            self._failures = 0
        if now < self._next_probe:
            return
        ok = self._probe()
        self._next_probe = now + self._a("liveness_interval")
        if ok:
            self._live_failures = 0
            self._check_pipe()
            return
        if self._check_exec(now):  # it went quiet because it just re-executed itself
            return
        self._live_failures += 1
        limit = self._a("liveness_failures")
        logger.warning("{} liveness check failed ({}/{})", self.title, self._live_failures, limit)
        if self._live_failures >= limit:
            self._fail(now, f"{self._live_failures} consecutive liveness failures", running=True)

    def _tick_pending(self, now: float) -> None:
        with self._req_lock:
            req = self._pending
            if req is None:
                return
            if self._closed:
                self._pending = None
                return
        state = self.state
        if state in (S.STOPPED, S.BACKOFF, S.DEGRADED):
            self._launch(now, f"requested: {req.reason}")
        elif state is S.STARTING:
            self._restart(now, f"requested while starting: {req.reason}")
        elif state is S.RUNNING:
            if req.urgent:
                self._restart(now, f"urgent: {req.reason}")
                return
            why = self._restart_ready(req, now)
            if why:
                self._restart(now, f"{why}: {req.reason}" if why is not True else req.reason)

    def _restart_ready(self, req: _Request, now: float) -> bool | str:
        """May a non-urgent restart happen now? True, or a short reason (logged with the
        restart), or False to wait (asked again at the next tick). The default: at once."""
        return True

    # ------------------------------------------------------------------ start / adopt
    def _launch(self, now: float, why: str) -> None:
        """Adopt or spawn, from STOPPED, BACKOFF or DEGRADED."""
        with self._req_lock:
            seq = self._seq
        self._next_start = None
        if self.adopt():
            self._clear_pending(seq)
            return
        self._transition(S.STARTING, why)
        self._spawn(now, seq)
        # the attempt answers the requests made before it, also when it failed before a process
        # existed: the backoff (or DEGRADED's slow retry) decides the next start, not a request
        # left pending that would restart on every tick
        self._clear_pending(seq)

    def adopt(self) -> bool:
        """Take over a process that is already running (saved pid + create_time, or
        `_find_running`'s scan)."""
        with self._lock:
            if self.state not in (S.STOPPED, S.BACKOFF, S.DEGRADED):
                return False
            saved = read_json(self.state_file) or {}
            proc, how = self._find_running()
            if proc is None:
                return False
            try:
                cmdline = proc.cmdline()
                create_time = proc.create_time()
                pgid = os.getpgid(proc.pid)
            except (psutil.Error, OSError):
                return False
            self._proc = None
            self._ps = proc
            self._pid = proc.pid
            self._pgid = pgid
            self._adopted = True
            self._cmdline = cmdline
            self._pipe = self._saved_pipe(saved.get("log_pipe"), pgid) or self._find_pipe(pgid)
            self._pipe_misses = 0
            self._starts += 1
            now = time.monotonic()
            self._started_mono = now - max(0.0, time.time() - create_time)
            self._write_state(proc.pid, create_time, cmdline, create_time)
            self._live_failures = 0
            self._ready_seen = False
            self._ready_deadline = now + self._a("ready_timeout")
            if self._probe():
                self._became_ready(now, f"adopted running {self.title} pid {proc.pid} ({how})")
            else:
                self._next_probe = now + self._a("ready_poll_interval")
                self._transition(S.STARTING, f"adopted {self.title} pid {proc.pid} ({how}), "
                                             "not answering yet")
            return True

    def _find_running(self) -> tuple[psutil.Process | None, str]:
        """The process to adopt: the saved pid when it is still the same process."""
        saved = read_json(self.state_file)
        if saved is not None and isinstance(saved.get("pid"), int):
            try:
                proc = psutil.Process(saved["pid"])
                if proc.status() != psutil.STATUS_ZOMBIE and \
                        abs(proc.create_time() - float(saved.get("create_time", -1))) < 0.05:
                    return proc, "saved pid"
            except (psutil.Error, TypeError, ValueError):
                pass
        return None, ""

    def _preflight(self) -> None:
        """Raise StartFailed(reason) when a start cannot work (nothing is started then)."""
        spec = self.spec
        argv = spec.argv
        if not argv:
            raise StartFailed("empty command")
        exe = argv[0]
        if os.sep in exe:
            path = Path(spec.cwd or ".") / exe  # a relative path is the service's cwd's
            if not os.access(path, os.X_OK) or not path.is_file():
                raise StartFailed(f"command not found or not executable: {exe}")
        elif shutil.which(exe, path=(spec.env or {}).get("PATH") or os.environ.get("PATH")) \
                is None:
            raise StartFailed(f"command not found on PATH: {exe}")
        if spec.cwd and not Path(spec.cwd).is_dir():
            raise StartFailed(f"working directory not found: {spec.cwd}")
        self._check_port()

    def _check_port(self) -> None:
        port = self.spec.port
        if port and port_busy(self._connect_host(), port):
            raise StartFailed(f"port {port} is already in use by a process that is not an "
                              f"adoptable {self.title}")

    def _command(self) -> tuple[list[str], dict[str, str], Path | None]:
        """(argv, environment, cwd) of the next spawn (after `_preflight`)."""
        spec = self.spec
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update({str(k): str(v) for k, v in (spec.env or {}).items()})
        return spec.argv, env, Path(spec.cwd) if spec.cwd else None

    def _spawn(self, now: float, seq: int) -> None:
        self._clear_process()
        try:
            self._preflight()
            cmd, env, cwd = self._command()
        except StartFailed as exc:
            self._fail(now, str(exc))
            return
        port = self.spec.port
        if self.spec.secrets:
            register(*self.spec.secrets)
        log = self.log_path
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            self._fail(now, f"cannot open log {log}: {exc.strerror}")
            return
        shown = redact(" ".join(redact_argv(cmd)))
        try:
            os.write(fd, f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} pod-agent starts "
                         f"{self.title}: {shown}\n".encode())
            proc, pipe_pid = self._popen(cmd, env, fd, cwd)
        except OSError as exc:
            self._fail(now, f"cannot start {self.title}: {redact(str(exc))}")
            return
        finally:
            os.close(fd)
        self._proc = proc
        self._pid = proc.pid
        self._pgid = proc.pid
        self._adopted = False
        self._cmdline = cmd
        self._pipe = self._saved_pipe({"pid": pipe_pid}, proc.pid) if pipe_pid else None
        self._pipe_misses = 0
        self._starts += 1
        self._started_mono = time.monotonic()
        self._ready_seen = False
        self._live_failures = 0
        self._ready_deadline = now + self._a("ready_timeout")
        self._next_probe = now
        try:
            self._ps = psutil.Process(proc.pid)
            create_time = self._ps.create_time()
        except psutil.Error:
            self._ps, create_time = None, time.time()
        self._write_state(proc.pid, create_time, cmd, time.time())
        self._clear_pending(seq)
        logger.info("{} started: pid {}{} ({})", self.title, proc.pid,
                    f" port {port}" if port else "", shown)

    def _popen(self, cmd: list[str], env: dict[str, str], log_fd: int,
               cwd: Path | None) -> tuple[subprocess.Popen, int | None]:
        """Start cmd through the redacting log pipe (agent/logpipe.py); return the process
        (the command itself once the bootstrap exec'd it) and the pipe's pid when it
        reported."""
        status_r, status_w = os.pipe()
        try:
            try:
                proc = subprocess.Popen(
                    [sys.executable or "python3", "-I", str(LOGPIPE), str(self.log_path),
                     str(status_w)],
                    cwd=str(cwd) if cwd else None, env=env, stdin=subprocess.PIPE,
                    stdout=log_fd, stderr=log_fd, start_new_session=True, close_fds=True,
                    pass_fds=(status_w,))
            finally:
                os.close(status_w)
            request = json.dumps({"cmd": cmd, "secrets": registered()}).encode()
            try:
                assert proc.stdin is not None
                proc.stdin.write(request)
                proc.stdin.close()
            except OSError:  # the bootstrap died at once: tick notices its exit
                pass
            return proc, self._read_pipe_status(status_r, proc.pid)
        finally:
            os.close(status_r)

    def _read_pipe_status(self, fd: int, pid: int) -> int | None:
        """Read the bootstrap's status fd until EOF (the command exec'd, or the bootstrap
        ended)."""
        import select

        data = b""
        deadline = time.monotonic() + PIPE_START_WAIT
        poller = select.poll()  # not select(): the agent's fds may number over 1024
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning("{} pid {}: the log pipe did not report within {:g}s", self.title,
                               pid, PIPE_START_WAIT)
                break
            if not poller.poll(left * 1000):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        pipe_pid = None
        for line in data.decode("utf-8", "replace").splitlines():
            word, _, rest = line.partition(" ")
            if word == "pipe" and rest.strip().isdigit():
                pipe_pid = int(rest)
            elif word == "error":
                logger.error("{} did not start: {}", self.title, redact(rest))
        return pipe_pid

    def _saved_pipe(self, info: Any, pgid: int) -> psutil.Process | None:
        """The log pipe recorded in the state file, if it still runs in the process group."""
        if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
            return None
        try:
            proc = psutil.Process(info["pid"])
            ctime = info.get("create_time")
            if ctime is not None and abs(proc.create_time() - float(ctime)) > 0.05:
                return None
            if os.getpgid(proc.pid) != pgid or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.Error, OSError, TypeError, ValueError):
            return None

    def _find_pipe(self, pgid: int) -> psutil.Process | None:
        """The log pipe in the group, found by its command line (adoption by scan)."""
        for proc in group_members(pgid):
            try:
                if any(Path(a).name == LOGPIPE_NAME for a in proc.cmdline()):
                    return proc
            except psutil.Error:
                continue
        return None

    def _pipe_alive(self) -> bool:
        try:
            return self._pipe is not None and self._pipe.is_running() and \
                self._pipe.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _check_pipe(self) -> None:
        """A log pipe that died under a live process: its writes now fail (EPIPE), so ask
        for a (non-urgent) restart, which gives it a new pipe. Two misses in a row, so that a
        process exiting right now is not mistaken for it."""
        if self._pipe is None or self._pipe_alive():
            self._pipe_misses = 0
            return
        self._pipe_misses += 1
        if self._pipe_misses < 2 or not self._leader_alive():
            return
        logger.warning("{}'s log pipe (pid {}) is gone: its output cannot reach {}; "
                       "restarting {}", self.title, self._pipe.pid, self.log_path,
                       self._pipe_restart_when())
        self._pipe = None
        self._pipe_misses = 0
        self.request_restart(f"log pipe to {self.log_path.name} ended")

    def _pipe_restart_when(self) -> str:
        return "it"

    def _clear_pending(self, seq: int) -> None:
        """A (re)start satisfies every request made before it read its command."""
        with self._req_lock:
            if self._pending is not None and self._pending.seq <= seq:
                self._pending = None

    def _note_restart(self, by: str, reason: str) -> None:
        self._last_restart = {"by": by, "reason": redact(reason), "time": time.time()}

    def _restart(self, now: float, why: str) -> None:
        """Agent-requested: graceful stop, then spawn. Never counts as a failure."""
        self._note_restart("agent", why)
        self._stop_process(None, why)
        self._transition(S.STOPPED, "stopped for restart")
        self._launch(time.monotonic(), f"restart: {why}")

    # ------------------------------------------------------------------ failure / exit
    def _fail(self, now: float, reason: str, running: bool = False) -> None:
        """A failed start or a dead/sick process: stop what is left, then BACKOFF or DEGRADED
        (or STOPPED when the restart policy is `never`)."""
        if running and self._pid is not None:
            self._stop_process(None, reason)
        self._clear_process()
        self._last_failure = reason
        if self.spec.restart == "never":
            self._next_start = None
            self._transition(S.STOPPED, f"{reason}; not restarted (restart: never)")
            return
        self._failures += 1
        self._failure_times.append(now)
        window = self._a("degraded_window")
        while self._failure_times and now - self._failure_times[0] > window:
            self._failure_times.popleft()
        recent = len(self._failure_times)
        if recent > self._a("degraded_after"):
            self._next_start = now + self._a("degraded_retry")
            self._degraded_reason = (f"{recent} failed starts within {window:g}s; last: {reason}")
            self._transition(S.DEGRADED, f"{self._degraded_reason}; retrying every "
                                         f"{self._a('degraded_retry'):g}s")
        else:
            delay = min(self._a("backoff_initial") * 2 ** (self._failures - 1),
                        self._a("backoff_max"))
            delay += random.uniform(0, delay * 0.1)
            self._next_start = now + delay
            self._transition(S.BACKOFF, f"{reason}; failure {self._failures}, next start in "
                                        f"{delay:.1f}s")

    def _requested_exit(self, code: int | None) -> str | None:
        """Was this exit a restart the process asked for? A reason (it starts again at once,
        not a failure), or None. The default: never."""
        return None

    def _check_exit(self, now: float) -> bool:
        """Notice an exit; returns True when the process was found gone."""
        if self._leader_alive():
            return False
        code = self._exit_status()
        pid = self._pid
        self._record_exit(code)
        self._kill_leftovers()
        self._remove_state()
        what = f"exited with status {code}" if code is not None and code >= 0 else \
            f"killed by signal {-code}" if code is not None else "exited"
        requested = self._requested_exit(code)
        if requested:
            self._clear_process()
            self._transition(S.STOPPED, f"pid {pid} {what}: {requested}")
            self._note_restart("itself", requested)
            with self._req_lock:
                closed = self._closed
            if not closed:  # (an agent shutting down starts nothing)
                self._launch(time.monotonic(), f"restart: {requested}")
            return True
        policy = self.spec.restart
        if policy == "never" or (policy == "on-failure" and code == 0):
            self._clear_process()
            if code != 0:
                self._last_failure = f"{self.title} (pid {pid}) {what}"
            self._transition(S.STOPPED, f"pid {pid} {what}; not restarted (restart: {policy})")
            return True
        self._fail(now, f"{self.title} (pid {pid}) {what} unexpectedly")
        return True

    def _check_exec(self, now: float) -> bool:
        """A running process that re-executed itself in place (same pid and create_time, a new
        image): a restart it asked for. It is followed from STARTING with a fresh ready timeout,
        never counted as a failure."""
        before = self._image
        if before is None or self._pid is None:
            return False
        after = image_signature(self._pid)
        if after is None or after == before:
            return False
        self._image = None  # taken again when it answers
        try:
            self._cmdline = self._ps.cmdline() if self._ps is not None else self._cmdline
            create_time = self._ps.create_time() if self._ps is not None else time.time()
        except psutil.Error:
            create_time = time.time()
        self._starts += 1
        self._ready_seen = False
        self._live_failures = 0
        self._running_since = None
        self._ready_deadline = now + self._a("ready_timeout")
        self._next_probe = now
        self._transition(S.STARTING, f"pid {self._pid} re-executed itself in place (a restart "
                                     "it asked for)")
        self._note_restart("itself", "re-executed in place")
        self._write_state(self._pid, create_time, self._cmdline, time.time())
        return True

    def _leader_alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        if self._ps is None:
            return False
        try:
            if not self._ps.is_running() or self._ps.status() == psutil.STATUS_ZOMBIE:
                self._reap_adopted()
                return False
            return True
        except psutil.Error:
            return False

    def _reap_adopted(self) -> int | None:
        """An adopted process may still be our child (same agent process); reap it if so."""
        if self._pid is None or self._proc is not None:
            return None
        try:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            return None
        if pid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
        self._adopted_code = code
        return code

    def _exit_status(self) -> int | None:
        if self._proc is not None:
            return self._proc.returncode
        return self._adopted_code

    def _record_exit(self, code: int | None) -> None:
        self._last_exit = {
            "code": code if code is not None and code >= 0 else None,
            "signal": -code if code is not None and code < 0 else None,
            "time": time.time(),
            "pid": self._pid,
        }

    # ------------------------------------------------------------------ stopping
    def _stop_process(self, timeout: float | None, reason: str) -> None:
        """SIGTERM the group, SIGKILL it after the timeout, reap. State ends STOPPING."""
        timeout = self._a("stop_timeout") if timeout is None else timeout
        if self.state is not S.STOPPING:
            self._transition(S.STOPPING, reason)
        pid = self._pid
        if pid is None:
            self._clear_process()
            return
        members = self._members()
        if not self._leader_alive() and not members:
            self._record_exit(self._exit_status())
            self._remove_state()
            self._clear_process()
            return
        logger.info("Stopping {} pid {} (SIGTERM, SIGKILL after {:g}s)", self.title, pid,
                    timeout)
        if stop_group(pid, members, timeout, KILL_WAIT, send=self._signal,
                      on_gone=self._note_gone):
            logger.warning("{} pid {} was still running after {:g}s: SIGKILL", self.title, pid,
                           timeout)
        self._kill_leftovers()
        if self._proc is not None and self._proc.returncode is None:
            try:  # SIGKILLed or gone: reap our child for its status (a zombie counted as gone
                self._proc.wait(KILL_WAIT)  # by wait_gone has none yet)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
                pass
        self._leader_alive()  # reap
        self._record_exit(self._exit_status())
        self._remove_state()
        self._clear_process()

    def _members(self) -> list[psutil.Process]:
        """The leader and the live members of its group (one scan), to wait on."""
        out: list[psutil.Process] = []
        if self._ps is not None and self._leader_alive():
            out.append(self._ps)
        pgid = self._own_group()
        if pgid is not None:
            for proc in group_members(pgid):
                if all(proc.pid != p.pid for p in out):
                    out.append(proc)
        return out

    def _note_gone(self, proc: psutil.Process) -> None:
        """wait_procs reaped our child itself: give its status to the Popen (which would
        otherwise find no child and say 0)."""
        if proc.pid != self._pid:
            return
        code = getattr(proc, "returncode", None)
        if isinstance(code, int):
            if self._proc is not None and self._proc.returncode is None:
                self._proc.returncode = int(code)
            elif self._proc is None and self._adopted_code is None:
                self._adopted_code = int(code)

    def _own_group(self) -> int | None:
        """The process group we may signal: only the service's own session group, never
        ours."""
        pgid = self._pgid
        if pgid is None or pgid != self._pid or pgid == os.getpgrp():
            return None
        return pgid

    def _signal(self, sig: int) -> None:
        pgid = self._own_group()
        try:
            if pgid is not None:
                os.killpg(pgid, sig)
            elif self._pid is not None and self._leader_alive():
                os.kill(self._pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_leftovers(self) -> None:
        """Whatever outlived the leader in its group goes with it. The log pipe goes last: it
        is given a moment to write what the others said before they died."""
        pgid = self._own_group()
        if pgid is None:
            return
        members = group_members(pgid)
        if not members:
            return
        if self._pipe_alive():
            pipe = self._pipe
            others = [p for p in members if p.pid != pipe.pid]
            for proc in others:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            wait_gone([pipe], PIPE_DRAIN_WAIT)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _clear_process(self) -> None:
        self._proc = None
        self._ps = None
        self._pid = None
        self._pgid = None
        self._adopted = False
        self._started_mono = None
        self._ready_seen = False
        self._running_since = None
        self._adopted_code = None
        self._pipe = None
        self._pipe_misses = 0
        self._image = None

    # ------------------------------------------------------------------ readiness
    def _connect_host(self) -> str:
        ready = self.spec.ready
        return getattr(ready, "host", None) or "127.0.0.1"

    def _probe(self) -> bool:
        """Readiness and liveness: the spec's `ready` (None: alive is ready)."""
        ready = self.spec.ready
        if ready is None:
            return self._leader_alive()
        try:
            ok = bool(ready())
        except Exception as exc:  # noqa: BLE001 - a probe that raises is a failed probe
            said = (self._pid, str(exc))
            if self._probe_said != said:
                self._probe_said = said
                logger.debug("{} readiness check: {} (said once until it changes)", self.title,
                             redact(str(exc)))
            return False
        return ok

    # ------------------------------------------------------------------ files
    def _state_extra(self) -> dict[str, Any]:
        """More fields for the state file (informational)."""
        return {"port": self.spec.port, "cwd": str(self.spec.cwd) if self.spec.cwd else None}

    def _write_state(self, pid: int, create_time: float, cmdline: list[str],
                     started: float) -> None:
        pipe = None
        if self._pipe is not None:
            try:
                pipe = {"pid": self._pipe.pid, "create_time": self._pipe.create_time()}
            except psutil.Error:
                pipe = None
        # The command line is informational (adoption matches pid + create_time, or scans):
        # stored redacted, like everything the agent writes.
        data = {"pid": pid, "create_time": create_time,
                "cmdline": [redact(a) for a in redact_argv(cmdline)],
                **self._state_extra(), "started": started, "log_pipe": pipe}
        try:
            atomic_write(self.state_file, json.dumps(data, indent=2))
        except OSError as exc:
            logger.warning("Cannot write {}: {}", self.state_file, exc)

    def _remove_state(self) -> None:
        remove_file(self.state_file)

    def _rotate_log(self) -> None:
        log = self.log_path
        try:
            if log.stat().st_size <= self.log_max_bytes:
                return
            for i in range(LOG_KEEP - 1, 0, -1):
                older = log.with_name(f"{log.name}.{i}")
                if older.exists():
                    os.replace(older, log.with_name(f"{log.name}.{i + 1}"))
            shutil.copyfile(log, log.with_name(f"{log.name}.1"))
            os.truncate(log, 0)
            logger.info("Rotated {} (copytruncate)", log)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("Cannot rotate {}: {}", log, exc)


# ---------------------------------------------------------------------- helpers
def group_members(pgid: int) -> list[psutil.Process]:
    """The live (non-zombie) processes of a process group (one scan of the process table)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    out = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                out.append(proc)
        except (psutil.Error, OSError):
            continue
    return out


def remove_file(path: Path) -> None:
    """Remove a state or request file; one that is already gone is fine, one that cannot be
    removed is a warning (the next start or stop tries again)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("Cannot remove {}: {}", path, exc)


def image_signature(pid: int) -> tuple | None:
    """What changes when a process execs a new image while its pid and create_time stay: the
    addresses of its stack and of its arguments and environment (/proc/PID/stat fields 28 and
    48-51, laid out anew by every exec, randomised by ASLR). None when unreadable (another
    user's process, not Linux) or all zero (hidden)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        # fields[0] is field 3 (state): field N is fields[N - 3]
        sig = (fields[25], *fields[45:49])
    except IndexError:
        return None
    if not any(int(v) for v in sig):
        return None
    return sig


def port_busy(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def shell_words(command: Union[Sequence[str], str]) -> str:
    """A command as one line, for messages."""
    return command if isinstance(command, str) else shlex.join(str(a) for a in command)
