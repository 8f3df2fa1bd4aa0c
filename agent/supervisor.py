"""The ComfyUI process supervisor: a small state machine driven by `tick()`.

States: STOPPED, STARTING, RUNNING, BACKOFF, STOPPING, DEGRADED. Only `_transition` changes the
state and it refuses a transition that is not in `ALLOWED`. Time is `time.monotonic()`; every
timeout (readiness, liveness, backoff, queue wait) is decided in `tick(now)`.

ComfyUI runs in its own session (process group == its pid), so it survives the agent; a new agent
adopts it through `<state_dir>/comfyui.json` (pid + create_time) or a cmdline/cwd/port scan
instead of starting a second one on the port. Its output reaches its log file through a redacting
pipe: a small process in ComfyUI's own process group (agent/logpipe.py) that survives the agent
too, drains ComfyUI's last words on a stop, and exits on EOF.

Threads: `request_restart()` and `snapshot()` may be called from any thread and never block on the
process; `tick()`, `start()` and `stop()` serialise on one lock (a restart blocks `tick` for at most
the stop timeout).
"""

from __future__ import annotations

import enum
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import psutil
from loguru import logger

from agent.markers import atomic_write, read_json
from agent.model import ComfyUISettings
from agent.logpipe import NAME as LOGPIPE_NAME
from agent.redact import redact, redact_argv, registered

STATE_FILE = "comfyui.json"
LOG_MAX_BYTES = 20 * 1024 * 1024
LOG_KEEP = 3
KILL_WAIT = 5.0  # after SIGKILL, how long we wait for the leader to go
LOGPIPE = Path(__file__).with_name(LOGPIPE_NAME)
PIPE_START_WAIT = 10.0  # how long a start waits for the log pipe's bootstrap to exec ComfyUI
PIPE_DRAIN_WAIT = 2.0  # after ComfyUI died, how long its log pipe may take to write the rest


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
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.DEGRADED, S.STOPPING}),
    S.RUNNING: frozenset({S.BACKOFF, S.DEGRADED, S.STOPPING}),
    S.BACKOFF: frozenset({S.STARTING, S.RUNNING, S.STOPPED}),
    S.DEGRADED: frozenset({S.STARTING, S.RUNNING, S.STOPPED}),
    # STOPPING -> BACKOFF/DEGRADED: a failed process (ready timeout, liveness) was stopped.
    S.STOPPING: frozenset({S.STOPPED, S.BACKOFF, S.DEGRADED}),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class _Request:
    reason: str
    since: float  # monotonic, first request of a coalesced burst
    since_wall: float
    urgent: bool
    seq: int
    forced_logged: bool = False


class Supervisor:
    log_max_bytes = LOG_MAX_BYTES

    def __init__(
        self,
        settings: ComfyUISettings,
        agent: Mapping[str, Any],
        state_dir: Path,
        extra_args: Callable[[], list[str]] = lambda: [],
        http_timeout: float = 2.0,
    ) -> None:
        self.settings = settings
        self.agent = dict(agent)
        self.state_dir = Path(state_dir)
        self.extra_args = extra_args
        self.http_timeout = http_timeout
        self._lock = threading.RLock()  # serialises tick/start/stop/adopt
        self._req_lock = threading.Lock()  # guards _pending and _seq
        self._wake = threading.Event()  # cuts run_forever's wait short
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        self.state = ServiceState.STOPPED
        self._state_since = time.monotonic()
        self._proc: subprocess.Popen | None = None  # our child
        self._ps: psutil.Process | None = None  # the ComfyUI process (child or adopted)
        self._pid: int | None = None
        self._pgid: int | None = None
        self._adopted = False
        self._started_mono: float | None = None
        self._cmdline: list[str] = []
        self._pipe: psutil.Process | None = None  # the redacting log pipe in ComfyUI's group
        self._pipe_misses = 0

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
        self._starts = 0

        self._pending: _Request | None = None
        self._seq = 0
        self._next_queue_check = 0.0
        self._closed = False
        self._adopted_code: int | None = None

    # ------------------------------------------------------------------ settings
    def _a(self, key: str) -> Any:
        return self.agent[key]

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    # ------------------------------------------------------------------ state machine
    def _transition(self, new: ServiceState, reason: str) -> None:
        old = self.state
        if new not in ALLOWED[old]:
            raise IllegalTransition(f"ComfyUI supervisor: illegal transition {old.value} -> "
                                    f"{new.value} ({reason})")
        self.state = new
        self._state_since = time.monotonic()
        level = "ERROR" if new is S.DEGRADED else "INFO"
        logger.log(level, "ComfyUI {} -> {}: {}", old.value, new.value, reason)

    # ------------------------------------------------------------------ public API
    def start(self, why: str = "start") -> None:
        """Adopt a running ComfyUI or start one. Returns at once; `tick` follows readiness.
        `why` is logged with the transition that follows: `stopped -> starting: <why>`, or,
        when one already runs, only `adopted running ComfyUI` (never `starting` before it)."""
        with self._lock:
            self._closed = False
            if self.state is not S.STOPPED:
                logger.debug("ComfyUI start requested while {}: nothing to do", self.state.value)
                return
            self._launch(time.monotonic(), why)

    def stop(self, timeout: float | None = None) -> None:
        """Stop ComfyUI (SIGTERM to its group, SIGKILL after the timeout) and wait for it."""
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
        """Stop ComfyUI and ignore later restart requests until `start()` (agent shutdown)."""
        with self._req_lock:
            self._closed = True
            self._pending = None
        self.stop(timeout)

    def request_restart(self, reason: str, urgent: bool = False) -> None:
        """Ask for a restart (thread-safe, never blocks). Requests coalesce; `tick` acts."""
        now = time.monotonic()
        with self._req_lock:
            if self._closed:
                logger.info("ComfyUI restart requested ({}) after shutdown: ignored", reason)
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
        logger.info("ComfyUI restart requested{}: {}", " (urgent)" if urgent else "", reason)

    def run_forever(self, stop_event: threading.Event, interval: float = 0.5) -> None:
        """Tick every `interval`, and at once after a restart request or `wake()`."""
        while not stop_event.is_set():
            try:
                self.tick()
            except Exception:  # keep supervising whatever one tick did
                logger.exception("ComfyUI supervisor tick failed")
            self._wake.wait(interval)
            self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._req_lock:
            req = self._pending
            pending = None
            if req is not None:
                waiting = "queue" if self.state is S.RUNNING and not req.urgent else "start"
                pending = {"reason": redact(req.reason), "since": req.since_wall,
                           "waiting_for": waiting,
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
            "adopted": self._adopted,
            "pending_restart": pending,
            "next_start_in": round(max(0.0, next_start - now), 3)
            if next_start is not None and state in (S.BACKOFF, S.DEGRADED) else None,
            "degraded_reason": redact(self._degraded_reason or "") or None,
            "last_failure": redact(self._last_failure or "") or None,
            "ready": self._ready_seen,
            "port": self.settings.port,
            "log": str(self.settings.log),
        }

    # ------------------------------------------------------------------ tick
    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._rotate_log()
            if self.state in (S.STARTING, S.RUNNING) and self._check_exit(now):
                pass
            elif self.state is S.STARTING:
                self._tick_starting(now)
            elif self.state is S.RUNNING:
                self._tick_running(now)
            elif self.state in (S.BACKOFF, S.DEGRADED):
                if self._next_start is not None and now >= self._next_start:
                    self._launch(now, "retry after " + self.state.value)
            self._tick_pending(now)

    def _tick_starting(self, now: float) -> None:
        if now >= self._ready_deadline:
            self._fail(now, f"not ready within {self._a('ready_timeout'):g}s", running=True)
            return
        if now < self._next_probe:
            return
        ok = self._probe()
        self._next_probe = now + self._a("ready_poll_interval")
        if ok:
            self._running_since = now
            self._live_failures = 0
            self._ready_seen = True
            self._next_probe = now + self._a("liveness_interval")
            self._transition(S.RUNNING, f"ready (pid {self._pid})")
            if self._degraded_reason:
                logger.info("ComfyUI left DEGRADED after a successful start")
                self._degraded_reason = None
                self._failure_times.clear()

    def _tick_running(self, now: float) -> None:
        if self._failures and self._running_since is not None \
                and now - self._running_since >= self._a("backoff_reset_after"):
            logger.info("ComfyUI healthy for {:g}s: failure count reset",
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
        self._live_failures += 1
        limit = self._a("liveness_failures")
        logger.warning("ComfyUI liveness check failed ({}/{})", self._live_failures, limit)
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
            elif now - req.since >= self._a("restart_max_wait"):
                logger.warning("ComfyUI queue still busy after {:g}s: restarting anyway ({})",
                               self._a("restart_max_wait"), req.reason)
                self._restart(now, f"forced after {self._a('restart_max_wait'):g}s: {req.reason}")
            elif now >= self._next_queue_check:
                self._next_queue_check = now + self._a("queue_poll_interval")
                idle = self._queue_idle()
                if idle:
                    self._restart(now, f"queue empty: {req.reason}")
                elif idle is None:
                    logger.debug("ComfyUI queue unreadable; restart ({}) waits", req.reason)

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
        """Take over a ComfyUI that is already running (saved pid, else cmdline scan)."""
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
                self._ready_seen = True
                self._running_since = now
                self._next_probe = now + self._a("liveness_interval")
                self._transition(S.RUNNING, f"adopted running ComfyUI pid {proc.pid} ({how})")
                if self._degraded_reason:
                    self._degraded_reason = None
                    self._failure_times.clear()
            else:
                self._next_probe = now + self._a("ready_poll_interval")
                self._transition(S.STARTING, f"adopted ComfyUI pid {proc.pid} ({how}), "
                                             "not answering yet")
            return True

    def _find_running(self) -> tuple[psutil.Process | None, str]:
        saved = read_json(self.state_file)
        if saved is not None and isinstance(saved.get("pid"), int):
            try:
                proc = psutil.Process(saved["pid"])
                if proc.status() != psutil.STATUS_ZOMBIE and \
                        abs(proc.create_time() - float(saved.get("create_time", -1))) < 0.05:
                    return proc, "saved pid"
            except (psutil.Error, TypeError, ValueError):
                pass
        want_dir = _real(self.settings.dir)
        port = str(self.settings.port)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = proc.info["cmdline"] or []
                if proc.pid == os.getpid() or not any(Path(a).name == "main.py" for a in cmd):
                    continue
                if not _has_port(cmd, port):
                    continue
                if proc.status() == psutil.STATUS_ZOMBIE or _real(proc.cwd()) != want_dir:
                    continue
                return proc, "cmdline scan"
            except (psutil.Error, OSError):
                continue
        return None, ""

    def _spawn(self, now: float, seq: int) -> None:
        s = self.settings
        self._clear_process()
        if not Path(s.python).is_file() or not os.access(s.python, os.X_OK):
            self._fail(now, f"python not found or not executable: {s.python}")
            return
        if not (Path(s.dir) / "main.py").is_file():
            self._fail(now, f"ComfyUI main.py not found in {s.dir}")
            return
        if _port_busy(self._connect_host(), s.port):
            self._fail(now, f"port {s.port} is already in use by a process that is not an "
                            "adoptable ComfyUI")
            return
        try:
            extra = list(self.extra_args())
        except Exception as exc:  # the daemon's callback must not stop ComfyUI starting
            logger.exception("extra_args failed: {}", exc)
            extra = []
        cmd = [str(s.python), "main.py", *s.args, *extra]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(s.env)
        try:
            Path(s.log).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(s.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            self._fail(now, f"cannot open log {s.log}: {exc.strerror}")
            return
        shown = " ".join(redact_argv(cmd))
        try:
            os.write(fd, f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} pod-agent starts ComfyUI: "
                         f"{shown}\n".encode())
            proc, pipe_pid = self._popen(cmd, env, fd)
        except OSError as exc:
            self._fail(now, f"cannot start ComfyUI: {redact(str(exc))}")
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
        logger.info("ComfyUI started: pid {} port {} ({})", proc.pid, s.port, shown)

    def _popen(self, cmd: list[str], env: dict[str, str], log_fd: int) -> tuple[subprocess.Popen,
                                                                                 int | None]:
        """Start cmd through the redacting log pipe (agent/logpipe.py); return the process
        (ComfyUI itself once the bootstrap exec'd it) and the pipe's pid when it reported."""
        status_r, status_w = os.pipe()
        try:
            try:
                proc = subprocess.Popen(
                    [sys.executable or "python3", "-I", str(LOGPIPE), str(self.settings.log),
                     str(status_w)],
                    cwd=str(self.settings.dir), env=env, stdin=subprocess.PIPE, stdout=log_fd,
                    stderr=log_fd, start_new_session=True, close_fds=True, pass_fds=(status_w,))
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

    @staticmethod
    def _read_pipe_status(fd: int, pid: int) -> int | None:
        """Read the bootstrap's status fd until EOF (ComfyUI exec'd, or the bootstrap ended)."""
        import select

        data = b""
        deadline = time.monotonic() + PIPE_START_WAIT
        poller = select.poll()  # not select(): the agent's fds may number over 1024
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning("ComfyUI pid {}: the log pipe did not report within {:g}s", pid,
                               PIPE_START_WAIT)
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
                logger.error("ComfyUI did not start: {}", redact(rest))
        return pipe_pid

    def _saved_pipe(self, info: Any, pgid: int) -> psutil.Process | None:
        """The log pipe recorded in comfyui.json, if it still runs in ComfyUI's group."""
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
        """The log pipe in ComfyUI's group, found by its command line (adoption by scan)."""
        for proc in self._group_members(pgid):
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
        """A log pipe that died under a live ComfyUI: ComfyUI's writes now fail (EPIPE), so ask
        for a queue-aware restart, which gives it a new pipe. Two misses in a row, so that a
        ComfyUI exiting right now is not mistaken for it."""
        if self._pipe is None or self._pipe_alive():
            self._pipe_misses = 0
            return
        self._pipe_misses += 1
        if self._pipe_misses < 2 or not self._leader_alive():
            return
        logger.warning("ComfyUI's log pipe (pid {}) is gone: its output cannot reach {}; "
                       "restarting ComfyUI when its queue is empty", self._pipe.pid,
                       self.settings.log)
        self._pipe = None
        self._pipe_misses = 0
        self.request_restart("log pipe to comfyui.log ended")

    def _clear_pending(self, seq: int) -> None:
        """A (re)start satisfies every request made before it read extra_args()."""
        with self._req_lock:
            if self._pending is not None and self._pending.seq <= seq:
                self._pending = None

    def _restart(self, now: float, why: str) -> None:
        """Agent-requested: graceful stop, then spawn. Never counts as a failure."""
        self._stop_process(None, why)
        self._transition(S.STOPPED, "stopped for restart")
        self._launch(time.monotonic(), f"restart: {why}")

    # ------------------------------------------------------------------ failure / exit
    def _fail(self, now: float, reason: str, running: bool = False) -> None:
        """A failed start or a dead/sick ComfyUI: stop what is left, then BACKOFF or DEGRADED."""
        if running and self._pid is not None:
            self._stop_process(None, reason)
        self._clear_process()
        self._failures += 1
        self._last_failure = reason
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

    def _check_exit(self, now: float) -> bool:
        """Notice an unexpected exit; returns True when ComfyUI was found gone."""
        if self._leader_alive():
            return False
        code = self._exit_status()
        self._record_exit(code)
        self._kill_leftovers()
        self._remove_state()
        what = f"exited with status {code}" if code is not None and code >= 0 else \
            f"killed by signal {-code}" if code is not None else "exited"
        self._fail(now, f"ComfyUI (pid {self._pid}) {what} unexpectedly")
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
        return getattr(self, "_adopted_code", None)

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
        if not self._leader_alive() and not self._group_alive():
            self._record_exit(self._exit_status())
            self._remove_state()
            self._clear_process()
            return
        logger.info("Stopping ComfyUI pid {} (SIGTERM, SIGKILL after {:g}s)", pid, timeout)
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._leader_alive() and not self._group_alive():
                break
            time.sleep(0.05)
        else:
            logger.warning("ComfyUI pid {} still running after {:g}s: SIGKILL", pid, timeout)
            self._signal(signal.SIGKILL)
            end = time.monotonic() + KILL_WAIT
            while time.monotonic() < end and self._leader_alive():
                time.sleep(0.05)
        self._kill_leftovers()
        self._leader_alive()  # reap
        self._record_exit(self._exit_status())
        self._remove_state()
        self._clear_process()

    def _own_group(self) -> int | None:
        """The process group we may signal: only ComfyUI's own session group, never ours."""
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

    def _group_alive(self) -> bool:
        pgid = self._own_group()
        if pgid is None:
            return False
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                    return True
            except (psutil.Error, OSError):
                continue
        return False

    @staticmethod
    def _group_members(pgid: int) -> list[psutil.Process]:
        out = []
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                    out.append(proc)
            except (psutil.Error, OSError):
                continue
        return out

    def _kill_leftovers(self) -> None:
        """Whatever outlived the leader in its group goes with it. The log pipe goes last: it
        is given a moment to write what the others said before they died."""
        pgid = self._own_group()
        if pgid is None or not self._group_alive():
            return
        if self._pipe_alive():
            pipe = self._pipe
            for proc in self._group_members(pgid):
                if proc.pid != pipe.pid:
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
            try:
                pipe.wait(PIPE_DRAIN_WAIT)
            except (psutil.Error, psutil.TimeoutExpired):
                pass
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

    # ------------------------------------------------------------------ HTTP
    def _connect_host(self) -> str:
        return connect_host(self.settings)

    def _url(self, path: str) -> str:
        return comfyui_url(self.settings, path)

    def _get_json(self, path: str) -> Any:
        try:
            with self._opener.open(self._url(path), timeout=self.http_timeout) as resp:
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
                return json.loads(resp.read())
        except http.client.HTTPException as exc:  # a reply cut short: ComfyUI died mid-answer
            raise OSError(f"{path}: incomplete reply ({type(exc).__name__})") from None

    def _probe(self) -> bool:
        try:
            data = self._get_json("/system_stats")
        except (OSError, ValueError, urllib.error.URLError) as exc:
            # said once per process and kind of error, not every poll while ComfyUI starts
            said = (self._pid, str(exc))
            if getattr(self, "_probe_said", None) != said:
                self._probe_said = said
                logger.debug("ComfyUI /system_stats: {} (said once until it changes)", exc)
            return False
        self._probe_said = None
        return isinstance(data, dict)

    def _queue_idle(self) -> bool | None:
        """True when nothing runs or waits; None when the queue cannot be read."""
        try:
            data = self._get_json("/queue")
            return not data.get("queue_running") and not data.get("queue_pending")
        except (OSError, ValueError, AttributeError, urllib.error.URLError) as exc:
            logger.debug("ComfyUI /queue: {}", exc)
            return None

    # ------------------------------------------------------------------ files
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
        data = {"pid": pid, "create_time": create_time, "cmdline": redact_argv(cmdline),
                "port": self.settings.port, "cwd": str(self.settings.dir), "started": started,
                "log_pipe": pipe}
        try:
            atomic_write(self.state_file, json.dumps(data, indent=2))
        except OSError as exc:
            logger.warning("Cannot write {}: {}", self.state_file, exc)

    def _remove_state(self) -> None:
        try:
            self.state_file.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("Cannot remove {}: {}", self.state_file, exc)

    def _rotate_log(self) -> None:
        log = Path(self.settings.log)
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
def connect_host(settings: ComfyUISettings) -> str:
    """Where to reach ComfyUI: a wildcard listen address is reached on loopback."""
    host = settings.host or "127.0.0.1"
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def comfyui_url(settings: ComfyUISettings, path: str) -> str:
    host = connect_host(settings)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}{path}"


def _real(path: str | Path) -> str:
    try:
        return os.path.realpath(path)
    except OSError:
        return str(path)


def _has_port(cmd: list[str], port: str) -> bool:
    for i, arg in enumerate(cmd):
        if arg == "--port" and i + 1 < len(cmd) and cmd[i + 1] == port:
            return True
        if arg == f"--port={port}":
            return True
    return port == "8188" and "--port" not in cmd and not any(a.startswith("--port=") for a in cmd)


def _port_busy(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
