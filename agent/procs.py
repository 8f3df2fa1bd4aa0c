"""Run installer commands in their own session, with a timeout that kills the whole group.

Output is streamed through secret redaction into the component's log file. A pipe is read by a
thread so a grandchild that keeps the pipe open cannot hang us after the group was killed
(CPython bpo-37424).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from agent.redact import redact, secrets_in_env

KILL_GRACE = 5.0

_active: set[subprocess.Popen] = set()
_active_lock = threading.Lock()


@dataclass(frozen=True)
class Result:
    returncode: int
    timed_out: bool
    duration: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    from agent.locks import OWNER_ENV, current

    env = dict(os.environ)
    held = current()
    if held is not None:  # the next holder can find us if our holder dies (agent/locks.py)
        env[OWNER_ENV] = held.token
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="true",
        SSH_ASKPASS="true",
        GIT_SSH_COMMAND=env.get("GIT_SSH_COMMAND", "ssh -oBatchMode=yes"),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PYTHONHOME", None)
    if extra:
        env.update(extra)
    return env


def stop_group(pgid: int, members: list, timeout: float, kill_wait: float = KILL_GRACE,
               send: Callable[[int], None] | None = None,
               on_gone: Callable[[Any], None] | None = None) -> bool:
    """The stop ladder: SIGTERM to the process group, wait up to `timeout` for `members` (the
    psutil.Process objects to wait on: the leader and whatever else counts) with `wait_gone`
    (psutil.wait_procs), then SIGKILL to the group and wait up to `kill_wait` more. `send(sig)`
    replaces os.killpg(pgid, sig); `on_gone(proc)` is called for each member that ended (a
    child's exit status is in proc.returncode: psutil reaped it). Returns True when SIGKILL was
    needed."""

    def killpg(sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    send = send or killpg
    send(signal.SIGTERM)
    alive = wait_gone(members, timeout, on_gone)
    if not alive:
        return False
    send(signal.SIGKILL)
    wait_gone(alive, kill_wait, on_gone)
    return True


def wait_gone(members: list, timeout: float,
              on_gone: Callable[[Any], None] | None = None) -> list:
    """psutil.wait_procs on `members` (our children are reaped, their status in
    proc.returncode), except that a zombie counts as gone: a process that is not our child
    stays a zombie until its own parent reaps it, which a container's init may do late or
    never. Checks each member, never the process table, with a backoff up to 50 ms. Returns
    the members still alive after `timeout`."""
    import psutil

    deadline = time.monotonic() + timeout
    alive = list(members)
    delay = 0.002
    while alive:
        _gone, alive = psutil.wait_procs(alive, 0, callback=on_gone)
        still = []
        for proc in alive:
            try:
                zombie = proc.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                zombie = True
            except psutil.Error:
                zombie = False
            if zombie:
                if on_gone is not None:
                    on_gone(proc)
            else:
                still.append(proc)
        alive = still
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            break
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)
    return alive


def kill_group(proc: subprocess.Popen, grace: float = KILL_GRACE) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds (the stop ladder), then
    whatever is left in the group."""
    import psutil

    try:
        leader = [psutil.Process(proc.pid)] if proc.poll() is None else []
    except psutil.Error:
        leader = []

    def gone(p: Any) -> None:  # psutil reaped our child: its status belongs to the Popen
        code = getattr(p, "returncode", None)
        if isinstance(code, int) and proc.returncode is None:
            proc.returncode = int(code)

    stop_group(proc.pid, leader, grace, grace, on_gone=gone)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
        pass


def terminate_all() -> None:
    """Stop every installer still running (agent shutdown)."""
    with _active_lock:
        procs = list(_active)
    for proc in procs:
        kill_group(proc)


def run(
    cmd: Sequence[str] | str,
    *,
    log: Path,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Result:
    """Run cmd (a list, or a shell string run by bash) and append its output to log."""
    shell = isinstance(cmd, str)
    argv = ["bash", "-c", cmd] if shell else list(cmd)
    shown = cmd if shell else " ".join(cmd)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    hide = secrets_in_env(env)  # the caller's own env (a component's, installer_env)
    with open(log, "a", encoding="utf-8", errors="replace") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {title or ''} $ "
                  f"{redact(shown, hide)}\n")
        out.flush()
        proc = subprocess.Popen(
            argv,
            cwd=str(cwd) if cwd else None,
            env=base_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with _active_lock:
            _active.add(proc)

        def pump() -> None:
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):
                out.write(redact(raw.decode("utf-8", "replace"), hide))
                out.flush()

        reader = threading.Thread(target=pump, name=f"pump-{proc.pid}", daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
        except BaseException:
            kill_group(proc)
            raise
        finally:
            with _active_lock:
                _active.discard(proc)
            # Whatever outlived the leader in its group goes with it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            reader.join(2.0)
            if proc.stdout:
                proc.stdout.close()
        duration = time.monotonic() - start
        if timed_out:
            out.write(f"=== timed out after {timeout:g}s; process group killed\n")
        else:
            out.write(f"=== exit {proc.returncode} after {duration:.1f}s\n")
    return Result(proc.returncode if not timed_out else -9, timed_out, duration)


def quick(cmd: Sequence[str] | str, timeout: float = 30.0, cwd: Path | None = None,
          env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run a short probe command in its own session; return (exit status, redacted output)."""
    argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    try:
        proc = subprocess.Popen(
            argv, cwd=str(cwd) if cwd else None, env=base_env(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
    except OSError as exc:
        return 127, str(exc)
    with _active_lock:
        _active.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc, grace=1.0)
        return -9, f"timed out after {timeout:g}s"
    finally:
        with _active_lock:
            _active.discard(proc)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return proc.returncode, redact(out.decode("utf-8", "replace"), secrets_in_env(env))


def known_pids() -> set[int]:
    """Children started through this module (their exit codes belong to their Popen)."""
    with _active_lock:
        return {p.pid for p in _active}


def alive(pid, create_time=None):
    """The psutil.Process for a recorded pid when it still runs (not a zombie) and, given its
    recorded start time, is the same process (pids are reused); else None."""
    import psutil

    try:
        proc = psutil.Process(int(pid))
        if create_time is not None and abs(proc.create_time() - float(create_time)) > 1.0:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.Error, TypeError, ValueError):
        return None


def tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
