"""Safe updates with automatic rollback (issue 10). See agent/updates/engine.py for the
contract of `apply`, `rollback` and `recover`; targets.py plans (the dry run), journal.py keeps
the write-ahead journal and the restore points, packages.py and git.py do the work, verify.py
restarts ComfyUI and reads its import results.

Importing this package is cheap (the engine is imported on first use): `install` and `run`
call `recover_at_start` at every start, which costs one stat when no journal was left."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

__all__ = ["Change", "Report", "apply", "exclusive", "record_external", "recover",
           "recover_at_start", "rollback"]


def recover_at_start(conf, say: Callable[[str], None]) -> None:
    """For `install` and `run`: finish or undo an update a crash left, saying which; never
    raises."""
    if not (Path(conf.state_dir) / "updates" / "journal.json").exists():
        return
    from agent.updates import engine

    engine.recover_at_start(conf, say)


def running(conf) -> bool:
    """An update, rollback or snapshot restore is under way: a live process holds the update
    lock (from before its restore point is recorded until its result is known), or its journal
    names a writer that still runs on this host. A journal whose writer died is not running
    (the agent's recovery job, or the next start, finishes or undoes it), so nothing waits on a
    dead update. Cheap: a stat and a non-blocking flock."""
    from agent.locks import held_by_other

    base = Path(conf.state_dir) / "updates"
    if held_by_other(base / "update.lock") is not None:
        return True
    from agent.markers import read_json

    data = read_json(base / "journal.json") if (base / "journal.json").exists() else None
    if not data or data.get("host") != __import__("socket").gethostname():
        return False  # another pod's journal: its lock (on the shared volume) says the truth
    from agent import procs

    proc = procs.alive(data.get("pid"))
    try:  # a pid reused by a later process is not the writer
        return proc is not None and proc.create_time() <= float(data.get("started") or 0) + 1
    except Exception:  # noqa: BLE001 - psutil errors, a bad journal field
        return False


def recover_orphan(conf, say: Callable[[str], None]) -> None:
    """For the running agent (a job every few seconds): a journal whose writer died while the
    agent runs (the CLI killed, or interrupted twice) is finished or undone now, not at the next
    start; an update in progress holds the lock and is left alone. One stat when there is no
    journal; never raises."""
    if not (Path(conf.state_dir) / "updates" / "journal.json").exists():
        return
    from agent.updates import engine, verify

    said: list[str] = []
    engine.recover_at_start(conf, lambda text: (said.append(text), say(text)))
    if said and not running(conf):  # ComfyUI back on what is on disk now (queue-aware)
        try:
            verify.request_restart(conf, wait_answer=10.0)
        except OSError as exc:
            say(f"cannot ask for a ComfyUI restart after the recovery: {exc}")


def activity(conf) -> tuple:
    """Changes whenever an update or a rollback runs or finishes (the journal's and the restore
    points folder's mtimes): the agent's drift check does not report the packages they change
    as drift. Cheap: two stats."""
    import os

    base = Path(conf.state_dir) / "updates"
    out = []
    for path in (base / "journal.json", base / "points"):
        try:
            out.append(os.stat(path).st_mtime_ns)
        except OSError:
            out.append(None)
    return tuple(out)


def __getattr__(name: str) -> Any:
    if name in __all__:
        from agent.updates import engine

        return getattr(engine, name)
    raise AttributeError(name)
