"""Per-component install locks that work across processes and pods sharing a volume.

fcntl.flock: the kernel (or the NFS lock manager, which maps flock to POSIX locks) releases the
lock when its holder dies, so a crashed installer never blocks forever. The holder writes its pid,
host, start time and a token into the file for `status`; release empties the file.

A holder that died (kill -9, a crashed agent) leaves its info behind, and its installers keep
running: they run in sessions of their own so that a timeout can kill their whole group. Every
process started through agent.procs while a lock is held carries the lock's token in its
environment (OWNER_ENV), so the next holder finds those leftovers on this host, ends them
(SIGTERM, SIGKILL after a grace period) and only then redoes the work.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from agent.model import AgentError


OWNER_ENV = "POD_AGENT_LOCK_OWNER"
END_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a dead holder's leftovers
_held = threading.local()


def current() -> "Lock | None":
    """The lock this thread acquired last and still holds (its installers carry its token)."""
    stack = getattr(_held, "stack", None)
    return stack[-1] if stack else None


class Lock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self.token = ""
        self.previous: dict | None = None  # what a holder that died left in the file
        self.ended: list[int] = []  # pids of that holder's leftover processes we ended

    def acquire(self, timeout: float, poll: float = 0.2, on_wait=None) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno == errno.ENOLCK:
                    os.close(fd)
                    raise AgentError(f"{self.path}: the filesystem does not support locks "
                                     "(mount the volume with locking enabled)") from None
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                os.close(fd)
                return False
            if on_wait and not told:
                on_wait(read_holder(self.path))
                told = True
            time.sleep(poll)
        self.previous = _read_fd(fd)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.time(), "token": self.token}).encode(), 0)
        except OSError:  # a full disk: the lock itself still holds; status just knows less
            pass
        self._fd = fd
        _held.stack = getattr(_held, "stack", []) + [self]
        self.ended = end_leftovers(self.previous) if self.previous else []
        return True

    def release(self) -> None:
        stack = getattr(_held, "stack", [])
        if self in stack:
            stack.remove(self)
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_fd(fd: int) -> dict | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def leftovers(holder: dict) -> list:
    """Processes on this host still carrying a (dead) holder's token."""
    import psutil

    token = holder.get("token")
    if not token or holder.get("host") != socket.gethostname():
        return []
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(OWNER_ENV) == token:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def end_leftovers(holder: dict, grace: float = END_GRACE) -> list[int]:
    """End what a holder that died left running (its installers); return their pids."""
    import psutil

    procs = leftovers(holder)
    if not procs:
        return []
    for proc in procs:
        try:
            os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            try:
                proc.terminate()
            except psutil.Error:
                pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
    return [p.pid for p in procs]


def read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def held_by_other(path: Path) -> dict | None:
    """The holder's info when someone holds the lock now, else None. Never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return read_holder(path) or {"pid": None}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
