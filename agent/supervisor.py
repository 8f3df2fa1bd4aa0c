"""The ComfyUI supervisor: ComfyUI's specifics on top of the process engine (agent/engine.py).

The engine does the state machine (STOPPED, STARTING, RUNNING, BACKOFF, STOPPING, DEGRADED),
the process group, the stop ladder, crash backoff and DEGRADED, adoption through
`<state_dir>/comfyui.json` (pid + create_time), the redacting log pipe, log rotation and the
state file. This module adds what is ComfyUI's:

- the command: `<python> main.py <args> <extra_args()>` in ComfyUI's folder; `extra_args` is the
  daemon's callback, asked at every start (the SageAttention flag);
- readiness and liveness on `GET /system_stats` (agent/comfyhttp.py, the client the health
  checks use too);
- queue-aware restarts: a restart that is not urgent waits until `/queue` has nothing running or
  pending, at most `restart_max_wait`;
- adoption also by a scan: a `main.py` with our port in its command line, in ComfyUI's folder;
- ComfyUI-Manager's restart protocol: ComfyUI runs with `__COMFY_CLI_SESSION__` set to
  `<state_dir>/comfyui-session`, so the Manager's restart (its Restart button, or its
  prestartup script after installing dependencies) writes `<state_dir>/comfyui-session.reboot`
  and exits with status 0; that exit is a requested restart (started again at once, no backoff,
  the file removed). A ComfyUI started without that variable (adopted from elsewhere) is
  restarted by the Manager with os.execv in place: the engine notices the new image and follows
  it from STARTING with a fresh ready timeout, not as a crash or a hang.

Threads: see agent/engine.py (`request_restart()` and `snapshot()` from any thread).
"""

from __future__ import annotations

import os
import random  # noqa: F401 - the engine's jitter; tests patch agent.supervisor.random.uniform
from pathlib import Path
from typing import Any, Callable, Mapping

import psutil
from loguru import logger

from agent.comfyhttp import ComfyClient, comfyui_url, connect_host  # noqa: F401 - re-exported
from agent.engine import (ALLOWED, LOG_MAX_BYTES, IllegalTransition, Service,  # noqa: F401
                          ServiceState, Spec, StartFailed, _Request, remove_file)
from agent.model import ComfyUISettings

STATE_FILE = "comfyui.json"
NAME = "comfyui"
SESSION_ENV = "__COMFY_CLI_SESSION__"  # ComfyUI-Manager: write <value>.reboot, then exit 0
SESSION_NAME = "comfyui-session"
S = ServiceState


def comfy_spec(settings: ComfyUISettings) -> Spec:
    """ComfyUI as the engine sees it (the command is built at each start: `_command`)."""
    return Spec(name=NAME, command=[str(settings.python), "main.py", *settings.args],
                log=Path(settings.log), cwd=Path(settings.dir), env=dict(settings.env),
                restart="always", port=settings.port, title="ComfyUI")


class Supervisor(Service):
    log_max_bytes = LOG_MAX_BYTES

    def __init__(
        self,
        settings: ComfyUISettings,
        agent: Mapping[str, Any],
        state_dir: Path,
        extra_args: Callable[[], list[str]] = lambda: [],
        http_timeout: float = 2.0,
    ) -> None:
        super().__init__(comfy_spec(settings), state_dir, timing=agent, http_timeout=http_timeout)
        self._settings = settings
        self.extra_args = extra_args
        self.client = ComfyClient(lambda: self._settings, http_timeout)

    # ------------------------------------------------------------------ settings
    @property
    def settings(self) -> ComfyUISettings:
        return self._settings

    @settings.setter
    def settings(self, value: ComfyUISettings) -> None:  # a reload: the next start uses it
        self._settings = value
        self.spec = comfy_spec(value)

    @property
    def agent(self) -> dict[str, Any]:
        return self.timing

    @agent.setter
    def agent(self, value: Mapping[str, Any]) -> None:
        self.timing = dict(value)

    @property
    def session_file(self) -> Path:
        """ComfyUI-Manager writes `<this>.reboot` before it exits to be restarted."""
        return self.state_dir / SESSION_NAME

    @property
    def reboot_file(self) -> Path:
        return self.state_dir / (SESSION_NAME + ".reboot")

    # ------------------------------------------------------------------ start
    def _preflight(self) -> None:
        s = self._settings
        if not Path(s.python).is_file() or not os.access(s.python, os.X_OK):
            raise StartFailed(f"python not found or not executable: {s.python}")
        if not (Path(s.dir) / "main.py").is_file():
            raise StartFailed(f"ComfyUI main.py not found in {s.dir}")
        self._check_port()

    def _command(self) -> tuple[list[str], dict[str, str], Path | None]:
        s = self._settings
        try:
            extra = list(self.extra_args())
        except Exception as exc:  # the daemon's callback must not stop ComfyUI starting
            logger.exception("extra_args failed: {}", exc)
            extra = []
        cmd = [str(s.python), "main.py", *s.args, *extra]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(s.env)
        env[SESSION_ENV] = str(self.session_file)
        self._remove_reboot()  # one left from before is not this process's request
        return cmd, env, Path(s.dir)

    def _connect_host(self) -> str:
        return connect_host(self._settings)

    def _state_extra(self) -> dict[str, Any]:
        return {"port": self._settings.port, "cwd": str(self._settings.dir)}

    # ------------------------------------------------------------------ adoption
    def _find_running(self) -> tuple[psutil.Process | None, str]:
        proc, how = super()._find_running()
        if proc is not None:
            return proc, how
        want_dir = _real(self._settings.dir)
        port = str(self._settings.port)
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

    # ------------------------------------------------------------------ ComfyUI-Manager
    def _requested_exit(self, code: int | None) -> str | None:
        """Exit 0 (or an unknown status: adopted) after writing the reboot file: ComfyUI-Manager
        asked for a restart."""
        if code not in (0, None) or not self.reboot_file.exists():
            return None
        self._remove_reboot()
        return "ComfyUI-Manager asked for a restart"

    def _remove_reboot(self) -> None:
        remove_file(self.reboot_file)

    # ------------------------------------------------------------------ HTTP
    def _url(self, path: str) -> str:
        return comfyui_url(self._settings, path)

    def _get_json(self, path: str) -> Any:
        return self.client.get_json(path)

    def _probe(self) -> bool:
        try:
            data = self.client.system_stats()
        except (OSError, ValueError) as exc:
            # said once per process and kind of error, not every poll while ComfyUI starts
            said = (self._pid, str(exc))
            if self._probe_said != said:
                self._probe_said = said
                logger.debug("ComfyUI /system_stats: {} (said once until it changes)", exc)
            return False
        self._probe_said = None
        return isinstance(data, dict)

    def _queue_idle(self) -> bool | None:
        """True when nothing runs or waits; None when the queue cannot be read."""
        try:
            data = self.client.get_json("/queue")
            return not data.get("queue_running") and not data.get("queue_pending")
        except (OSError, ValueError, AttributeError) as exc:
            logger.debug("ComfyUI /queue: {}", exc)
            return None

    # ------------------------------------------------------------------ queue-aware restarts
    def _waiting_for(self, req: _Request) -> str:
        return "queue" if self.state is S.RUNNING and not req.urgent else "start"

    def _pipe_restart_when(self) -> str:
        return "ComfyUI when its queue is empty"

    def _restart_ready(self, req: _Request, now: float) -> bool | str:
        wait = self._a("restart_max_wait")
        if now - req.since >= wait:
            logger.warning("ComfyUI queue still busy after {:g}s: restarting anyway ({})",
                           wait, req.reason)
            return f"forced after {wait:g}s"
        if now < self._next_queue_check:
            return False
        self._next_queue_check = now + self._a("queue_poll_interval")
        idle = self._queue_idle()
        if idle:
            return "queue empty"
        if idle is None:
            logger.debug("ComfyUI queue unreadable; restart ({}) waits", req.reason)
        return False


# ---------------------------------------------------------------------- helpers
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
