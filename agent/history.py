"""The workspace's history: every install, repair, update, rollback and drift, one JSON line each.

One file, `<state_dir>/history.jsonl` (the drift records of agent/drift.py go to the same file
through `append`). A record is a JSON object with at least:

    time       Unix time (float)          stamp   local "YYYY-MM-DD HH:MM:SS"
    kind       install | repair | update | rollback | drift | external (a change made by someone
               else, e.g. ComfyUI-Manager) | any other word a caller chooses
    component  the component (or `custom_nodes/<folder>` / node folder) it is about; "" for a
               record about several (`components` then lists them)
    from, to   what it was and what it became (a commit, a version, "-" when nothing)
    result     ok | failed | rolled back | completed | ...
    actor      cli | agent | external
    detail     one line for people (the status page shows it)

plus whatever the caller adds (`id` of an update's restore point, `error`, `changes`...).

Bound: past MAX_BYTES (512 KiB, about 1,500-3,000 records) the file is trimmed to its newest
half, whole lines only, under a lock (appends from the CLI and the agent never interleave with a
trim). Writing history never decides anything: a write that fails is the caller's warning, never
the end of its install.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

FILE = "history.jsonl"
MAX_BYTES = 512 * 1024  # trimmed to the newest half when it grows past this
KINDS = ("install", "repair", "update", "rollback", "drift", "external")
ACTORS = ("cli", "agent", "external")

_actor = "cli"  # the resident agent sets "agent" at its start (set_actor)
_during: str | None = None  # what this process is in the middle of (`update <id>`)


def set_actor(actor: str) -> None:
    """Who this process is, for the records it writes without naming an actor."""
    global _actor
    _actor = actor


def actor() -> str:
    return _actor


def set_during(what: str | None) -> None:
    """Records written until set_during(None) carry `during` (e.g. the installs an update
    runs: `update 20261129-100012-7be8`)."""
    global _during
    _during = what


def path(conf) -> Path:
    return Path(conf.state_dir) / FILE


def event(kind: str, component: str = "", frm: Any = "-", to: Any = "-", result: str = "ok",
          actor: str | None = None, detail: str = "", **extra: Any) -> dict[str, Any]:
    """A record (not yet written): see the module's docstring for the fields."""
    rec: dict[str, Any] = {
        "time": time.time(), "stamp": time.strftime("%Y-%m-%d %H:%M:%S"), "kind": kind,
        "component": component, "from": "-" if frm in (None, "") else frm,
        "to": "-" if to in (None, "") else to, "result": result, "actor": actor or _actor,
        "detail": detail}
    if _during and "during" not in extra:
        rec["during"] = _during
    rec.update(extra)
    if "summary" not in rec:  # what the status page shows
        change = f" {rec['from']} -> {rec['to']}" if (rec["from"], rec["to"]) != ("-", "-") else ""
        rec["summary"] = f"{kind} {component or '-'}{change}: {result}" + (
            f" ({detail})" if detail else "")
    return rec


def record(conf, event_or_kind: dict[str, Any] | str, **fields: Any) -> dict[str, Any]:
    """Append one record: `record(conf, event("install", "x", to="1.0"))` or the short form
    `record(conf, "install", component="x", to="1.0")` (keywords as in `event`, `from` spelled
    `frm`). Fills time, stamp and actor when missing. Returns the record. Raises OSError (the
    caller warns: history never stops the work it describes)."""
    if isinstance(event_or_kind, str):
        rec = event(event_or_kind, **fields)
    else:
        rec = dict(event_or_kind)
        rec.setdefault("time", time.time())
        rec.setdefault("stamp", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["time"])))
        rec.setdefault("actor", _actor)
    append(conf, rec)
    return rec


def quietly(conf, event_or_kind: dict[str, Any] | str, **fields: Any) -> str | None:
    """`record`, returning the one-line reason instead of raising when it cannot be written."""
    try:
        record(conf, event_or_kind, **fields)
        return None
    except (OSError, TypeError, ValueError) as exc:
        from agent.fserr import explain

        return f"history not written: {explain(exc)}"


def append(conf, rec: dict[str, Any], max_bytes: int | None = None) -> None:
    """One JSON line, under the history lock; trimmed to its newest half past max_bytes
    (default MAX_BYTES). Raises OSError."""
    from agent.markers import atomic_write

    limit = MAX_BYTES if max_bytes is None else max_bytes
    target = path(conf)
    target.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(rec, default=str) + "\n").encode()
    lock = os.open(target.with_name(FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, line)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > limit:
            data = target.read_bytes()
            keep = data[len(data) // 2:]
            keep = keep[keep.find(b"\n") + 1:]
            atomic_write(target, keep.decode("utf-8", "replace"))
    finally:
        os.close(lock)  # closing releases the flock


def _matches(rec: dict[str, Any], names: set[str]) -> bool:
    if str(rec.get("component") or "") in names:
        return True
    for key in ("components", "affected"):
        value = rec.get(key)
        if isinstance(value, list) and names & {str(v) for v in value}:
            return True
    return False


def read(conf, name: str | Iterable[str] | None = None, limit: int | None = None,
         kind: str | None = None) -> list[dict[str, Any]]:
    """Records, oldest first: all, or those about `name` (its `component`, or listed in its
    `components` / `affected`), of `kind` when given; the newest `limit` of them. A missing
    file is no records; a garbage or partial line is skipped. Reads the whole (bounded) file."""
    from agent.markers import tail_jsonl

    records = tail_jsonl(path(conf), None, MAX_BYTES + 64 * 1024)
    if name is not None:
        names = {name} if isinstance(name, str) else set(name)
        records = [r for r in records if _matches(r, names)]
    if kind is not None:
        records = [r for r in records if r.get("kind") == kind]
    return records if limit is None else records[-limit:] if limit > 0 else []


def line(rec: dict[str, Any]) -> str:
    """One line for people: `2026-11-29 10:01:02  update  ComfyUI-GGUF  abc123 -> def456  ok
    (cli)  detail`."""
    comp = rec.get("component") or ", ".join(map(str, rec.get("components") or [])) or "-"
    frm, to = rec.get("from", "-"), rec.get("to", "-")
    change = f"{frm} -> {to}" if (frm, to) != ("-", "-") else ""
    detail = rec.get("detail") or (rec.get("summary") if rec.get("kind") == "drift" else "")
    if rec.get("during"):
        detail = f"{detail} (during {rec['during']})".strip()
    parts = [str(rec.get("stamp") or "?"), str(rec.get("kind") or "?"), str(comp)]
    if change:
        parts.append(change)
    parts.append(str(rec.get("result") or ("noticed" if rec.get("kind") == "drift" else "-")))
    who = rec.get("actor") or ("external" if rec.get("kind") == "drift" else "")
    if who:
        parts.append(f"({who})")
    if detail:
        parts.append(str(detail))
    return "  ".join(parts)
