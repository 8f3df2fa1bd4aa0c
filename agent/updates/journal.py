"""The write-ahead journal and the restore points (design.md section 7).

    <state_dir>/updates/journal.json       the update (or rollback) in progress; at most one
    <state_dir>/updates/points/<id>.json   finished ones: the restore points `rollback` uses
    <state_dir>/updates/update.lock        one update at a time per workspace (flock)

The journal is written (temp file, fsync, rename, fsync of the folder: markers.atomic_write)
before the first change, names every change's before-state (commit, branch) and after-state, the
target interpreter's distributions and every component's marker text, and is rewritten as steps
finish (`phase`, each change's `moved`). Only after verification (or after a finished rollback)
does it become a restore point, by one rename. A journal found at the next start by a process
holding the lock is an interrupted run: agent/updates/engine.py `recover` finishes or undoes it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from agent.markers import atomic_write, fsync_dir, read_json
from agent.model import AgentError

VERSION = 1
POINTS_KEPT = 20  # restore points kept (oldest removed first)
PHASES = ("applying", "verifying", "verified", "rolling_back")


def folder(conf) -> Path:
    return Path(conf.state_dir) / "updates"


def journal_path(conf) -> Path:
    return folder(conf) / "journal.json"


def points_dir(conf) -> Path:
    return folder(conf) / "points"


def lock_path(conf) -> Path:
    return folder(conf) / "update.lock"


def pass_lock_path(conf) -> Path:
    """Held shared by the running agent's reconcile workers during each pass
    (agent/updates/defer.py); an update waits until it can take it exclusively, so that it never
    installs beside a pass that began before it."""
    return folder(conf) / "agent-pass.lock"


PASS_WAIT = 1800.0  # seconds an update waits for the agent's pass in progress
passes_here = [0]  # passes this process runs (holding the pass lock shared): never waited on


def wait_for_agent_pass(conf, say) -> None:
    """Called holding the update lock: the agent defers its new passes from now on; a pass it
    began before is waited for (said once). Never waits on this process's own pass."""
    import errno
    import fcntl

    if passes_here[0]:
        return
    try:
        fd = os.open(pass_lock_path(conf), os.O_RDONLY)
    except OSError:
        return  # no agent ever ran a pass here
    try:
        deadline = time.monotonic() + PASS_WAIT
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    return  # no locks on this filesystem: nothing to wait on
            if time.monotonic() >= deadline:
                say(f"warning: the running agent's reconcile pass still runs after "
                    f"{PASS_WAIT:g}s: going on beside it")
                return
            if not told:
                say("waiting for the running agent's reconcile pass to finish (it defers the "
                    "next ones until this ends)")
                told = True
            time.sleep(0.2)
    finally:
        os.close(fd)


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def new(op: str, reason: str, actor: str, python: str) -> dict[str, Any]:
    return {"version": VERSION, "id": new_id(), "op": op, "reason": reason, "actor": actor,
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "phase": "applying", "python": python, "before": {}, "changes": [],
            "packages": None, "markers": None, "steps": [], "result": None, "error": None}


def write(conf, j: dict[str, Any]) -> None:
    """Atomically (fsync + rename); raises OSError naming the path."""
    j["written"] = time.time()
    atomic_write(journal_path(conf), json.dumps(j, indent=1, default=str))


def load(conf) -> dict[str, Any] | None:
    """The journal, or None. One that exists but cannot be read is an error with the fix."""
    path = journal_path(conf)
    if not path.exists() and not path.is_symlink():
        return None
    data = read_json(path)
    if data is None or data.get("version") != VERSION or "changes" not in data:
        raise AgentError(f"{path}: the update journal cannot be read (not a journal of this "
                         "version): move it away to continue; the checkouts and packages may "
                         "be half-updated (`pod-agent status` shows what)")
    return data


def running_elsewhere(conf) -> dict[str, Any] | None:
    """The journal while its writer lives (cheap: one stat when there is none; for the agent's
    housekeeping). None when there is no journal or its writer is gone."""
    path = journal_path(conf)
    try:
        os.stat(path)
    except OSError:
        return None
    data = read_json(path)
    if not data:
        return None
    if data.get("host") != socket.gethostname():
        return data  # another pod's: cannot tell; assume it lives (its lock says the truth)
    from agent import procs

    return data if procs.alive(data.get("pid")) else None


def finish(conf, j: dict[str, Any], result: str) -> Path:
    """The journal becomes restore point <id>.json (one rename); old points pruned."""
    j["result"] = result
    j["finished"] = time.time()
    j["phase"] = "done"
    write(conf, j)
    dest = points_dir(conf) / f"{j['id']}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(journal_path(conf), dest)
    fsync_dir(dest.parent)
    prune(conf)
    return dest


def prune(conf) -> None:
    pts = sorted(points_dir(conf).glob("*.json"))
    for old in pts[:-POINTS_KEPT] if len(pts) > POINTS_KEPT else []:
        try:
            old.unlink()
        except OSError:
            pass


def points(conf) -> list[dict[str, Any]]:
    """Restore points, oldest first (unreadable ones skipped)."""
    out = []
    for p in sorted(points_dir(conf).glob("*.json")):
        data = read_json(p)
        if data and isinstance(data.get("changes"), list) and data.get("id"):
            out.append(data)
    return out
