"""Environment drift: the target interpreter's distributions changing outside the agent's installs.

A fingerprint is the name -> version listing agent/pyenv.py already reads (one short subprocess,
no pip). The daemon compares fingerprints right before ComfyUI starts, once it answered, and at
each periodic reconcile; a difference its own install passes did not make is drift: one record in
<state_dir>/history.jsonl (bounded), the `drift` health check's WARN, and a reconcile request
(every component's probe runs again; the ones whose requirements name a changed distribution are
listed as affected).

Also here: what ComfyUI loads (its HEAD, the custom node signatures, the dists), for the restart
decision after a reinstall.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Iterable

from agent import history
from agent.markers import tail_jsonl
from agent.model import Component, Config
from agent.pyenv import PythonUnavailable, canonical, inspect

HISTORY_FILE = history.FILE  # the one history: agent/history.py
HISTORY_MAX_BYTES = history.MAX_BYTES  # trimmed to the newest half when it grows past this
TAIL_BYTES = 64 * 1024  # how much of the history the `drift` check reads
SHOWN = 8  # distributions named in a summary line


def dists(python: Path, timeout: float = 15.0, cache: Path | None = None) -> dict[str, str] | None:
    """name -> version of the interpreter's distributions; None when it cannot be read. With
    `cache` (a folder, agent/pyenv.py), an unchanged interpreter is read without a process."""
    try:
        return dict(inspect(python, timeout=timeout, cache=cache).dists)
    except PythonUnavailable:
        return None
    except Exception:  # noqa: BLE001 - a timeout or an odd interpreter: no fingerprint
        return None


def diff(before: dict[str, str], after: dict[str, str]) -> dict[str, dict]:
    """{"changed": {name: [old, new]}, "added": {name: ver}, "removed": {name: ver}}."""
    changed = {n: [before[n], after[n]] for n in sorted(before.keys() & after.keys())
               if before[n] != after[n]}
    added = {n: after[n] for n in sorted(after.keys() - before.keys())}
    removed = {n: before[n] for n in sorted(before.keys() - after.keys())}
    return {"changed": changed, "added": added, "removed": removed}


def empty(d: dict[str, dict]) -> bool:
    return not (d["changed"] or d["added"] or d["removed"])


def names(d: dict[str, dict]) -> list[str]:
    return sorted(set(d["changed"]) | set(d["added"]) | set(d["removed"]))


def summary(d: dict[str, dict]) -> str:
    """`numpy 2.1.0 -> 1.26.4, foo added (1.0), bar removed (2.0)`, at most SHOWN named."""
    parts = [f"{n} {old} -> {new}" for n, (old, new) in d["changed"].items()]
    parts += [f"{n} added ({v})" for n, v in d["added"].items()]
    parts += [f"{n} removed ({v})" for n, v in d["removed"].items()]
    more = len(parts) - SHOWN
    return ", ".join(parts[:SHOWN]) + (f" (+{more} more)" if more > 0 else "")


def installers(python: Path, d: dict[str, dict]) -> list[str]:
    """The tools that wrote the changed and added distributions (their dist-info INSTALLER
    file: pip, uv, conda...), read from the interpreter's venv site-packages; best effort."""
    wanted = {canonical(n): v for n, (_, v) in d["changed"].items()} | \
        {canonical(n): v for n, v in d["added"].items()}
    if not wanted:
        return []
    found: set[str] = set()
    for site in Path(python).parent.parent.glob("lib*/python*/site-packages"):
        try:
            entries = list(site.iterdir())
        except OSError:
            continue
        for entry in entries:
            if not entry.name.endswith(".dist-info"):
                continue
            name, _, ver = entry.name[:-10].partition("-")
            if wanted.get(canonical(name)) != ver:
                continue
            try:
                with open(entry / "INSTALLER", encoding="utf-8", errors="replace") as fh:
                    tool = fh.read(64).strip().splitlines()[0:1]
            except OSError:
                continue
            if tool and re.fullmatch(r"[A-Za-z0-9._-]{1,40}", tool[0]):
                found.add(tool[0])
    return sorted(found)


# ---------------------------------------------------------------------- who may be affected
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _file_names(path: Path) -> set[str]:
    from agent.reqs import read_file

    try:
        reqs, _ = read_file(path)
    except (OSError, ValueError):
        return set()
    return {r.name for r in reqs}


def requirement_names(comp: Component) -> set[str]:
    """Canonical distribution names a component's requirements mention (best effort)."""
    spec = comp.spec
    out: set[str] = set()
    if comp.kind == "pip":
        for path in spec.get("requirements", ()):
            out |= _file_names(Path(path))
        for text in spec.get("packages", ()):
            m = _WORD.match(str(text).strip())
            if m:
                out.add(canonical(re.split(r"[\[<>=!~;@ ]", m.group(0))[0]))
    elif comp.kind == "git" and spec.get("requirements") == "auto":
        out |= _file_names(Path(spec["dest"]) / "requirements.txt")
    elif comp.kind == "nodes" and spec.get("requirements") == "auto":
        for node in spec.get("nodes", ()):
            if node.get("enabled", True):
                out |= _file_names(Path(spec["dest"]) / node["name"] / "requirements.txt")
    elif comp.kind == "command":
        for key in ("run", "check"):
            out |= {canonical(w) for w in _WORD.findall(str(spec.get(key) or ""))}
    return out


def affected(config: Config, changed: Iterable[str]) -> list[str]:
    """Enabled components whose requirements mention one of the changed distributions."""
    wanted = {canonical(n) for n in changed}
    out = []
    for name, comp in config.components.items():
        if not comp.enabled or comp.kind == "overall":
            continue
        try:
            if requirement_names(comp) & wanted:
                out.append(name)
        except Exception:  # noqa: BLE001 - a config shape we do not know: not listed
            continue
    return out


# ---------------------------------------------------------------------- what ComfyUI loads
def loaded(config: Config, custom_nodes: Path, dist_listing: dict[str, str] | None) -> tuple:
    """ComfyUI's HEAD, every custom node folder's signature, the dists: compared before and after
    a reconcile pass to decide whether a restart can change anything ComfyUI runs."""
    from agent.kinds.gitops import head
    from agent.watch import node_signature

    try:
        nodes = sorted(p.name for p in custom_nodes.iterdir() if p.is_dir())
    except OSError:
        nodes = []
    sigs = tuple((n, node_signature(custom_nodes / n)) for n in nodes)
    dist_items = tuple(sorted(dist_listing.items())) if dist_listing is not None else None
    return (head(config.comfyui.dir), sigs, dist_items)


def loaded_diff(before: tuple, after: tuple) -> list[str]:
    """What differs between two `loaded` fingerprints, in words (empty: nothing)."""
    out = []
    if before[0] != after[0]:
        out.append("ComfyUI's commit")
    b, a = dict(before[1]), dict(after[1])
    nodes = sorted(n for n in b.keys() | a.keys() if b.get(n) != a.get(n))
    if nodes:
        out.append("custom nodes " + ", ".join(nodes[:SHOWN]))
    if before[2] is None or after[2] is None:
        if before[2] != after[2]:
            out.append("the package listing (unreadable)")
    else:
        d = diff(dict(before[2]), dict(after[2]))
        if not empty(d):
            out.append("packages " + summary(d))
    return out


# ---------------------------------------------------------------------- history
def history_path(config: Config) -> Path:
    return history.path(config)


def append(config: Config, record: dict[str, Any]) -> None:
    """One JSON line in the workspace's one history (agent/history.py: installs, updates,
    rollbacks and drift share it); trimmed to its newest half past HISTORY_MAX_BYTES.
    Raises OSError (the caller logs it)."""
    history.append(config, record, HISTORY_MAX_BYTES)


def recent(config: Config, kind: str | None = None, limit: int = 50) -> list[dict]:
    """The newest records (oldest first), read from the file's tail only."""
    records = tail_jsonl(history_path(config), None, TAIL_BYTES)
    return [r for r in records if kind is None or r.get("kind") == kind][-limit:]


def record(source: str, d: dict[str, dict], by: str, affected_names: list[str],
           repeats: int = 1, installer: list[str] | None = None) -> dict[str, Any]:
    return {"time": time.time(), "stamp": time.strftime("%Y-%m-%d %H:%M:%S"), "kind": "drift",
            "source": source, "by": by, "actor": "external", "result": "noticed",
            "installer": list(installer or ()),
            "summary": summary(d), **d, "affected": affected_names, "repeats": repeats}


def who(rec: dict[str, Any]) -> str:
    """`ComfyUI (pid 7) or a custom node it loaded, with pip` / `with pip` / ``."""
    by = str(rec.get("by") or "")
    tools = rec.get("installer") or []
    if isinstance(tools, list) and tools:
        by += (", " if by else "") + "with " + " and ".join(map(str, tools))
    return by
