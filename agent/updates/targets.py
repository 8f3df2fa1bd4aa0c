"""What can be updated, and what an update of it would do (the dry run).

A unit is one git checkout: a `git` component (ComfyUI itself, a node with its own component),
one node of a `nodes` component (named by its folder), or a custom node cloned by hand or by
ComfyUI-Manager (a git checkout in custom_nodes that no component manages, fetched from its
`origin`). Fetching happens here, in `update` and `update --dry-run` only: never in `status`.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent.model import AgentError
from agent.updates import git

FETCH_THREADS = 8
REQ_FILES = ("requirements.txt",)


@dataclass(frozen=True)
class Unit:
    name: str
    path: Path
    component: str | None  # whose marker records the commit (None: an unmanaged node)
    repo: str | None  # fetched from (None: the checkout's origin)
    ref: str | None
    kind: str  # git | node | user
    requirements: bool


@dataclass
class Planned:
    unit: Unit
    head: str | None = None
    branch: str | None = None
    target: str | None = None
    count: int = 0
    dirty: list[str] = field(default_factory=list)
    requirements: dict[str, list[str]] = field(default_factory=dict)  # added / removed lines
    error: str | None = None
    note: str = ""

    @property
    def moves(self) -> bool:
        return bool(self.target and self.head and self.target != self.head and not self.error
                    and not self.note)

    def to_json(self) -> dict:
        return {"name": self.unit.name, "component": self.unit.component, "kind": self.unit.kind,
                "path": str(self.unit.path), "from": self.head, "to": self.target,
                "commits": self.count, "branch": self.branch, "dirty": self.dirty,
                "requirements": self.requirements, "error": self.error,
                "note": self.note or None, "update": self.moves}


def units(conf) -> list[Unit]:
    from agent import usernodes

    out: list[Unit] = []
    for name in conf.order():
        comp = conf.components[name]
        if not comp.enabled:
            continue
        s = comp.spec
        if comp.kind == "git":
            out.append(Unit(name, Path(s["dest"]), name, s["repo"], s.get("ref"), "git",
                            s.get("requirements") == "auto"))
        elif comp.kind == "manager" and (Path(s["dest"]) / ".git").exists():
            # ComfyUI-Manager v3 (a clone in custom_nodes); v4 is a package that follows
            # ComfyUI's manager_requirements.txt, so it moves with comfyui_core
            out.append(Unit(name, Path(s["dest"]), name, s["repo"], s.get("ref"), "git",
                            s.get("requirements") == "auto"))
        elif comp.kind == "nodes":
            for node in s["nodes"]:
                # a registry node (from a config snapshot) is a versioned zip, not a checkout
                if node["enabled"] and not node.get("cnr"):
                    out.append(Unit(node["name"], Path(s["dest"]) / node["name"], name,
                                    node["repo"], node.get("ref"), "node",
                                    s.get("requirements") == "auto"))
    for path in usernodes.discover(conf):
        if (path / ".git").exists():
            out.append(Unit(path.name, path, None, None, None, "user", True))
    return out


def select(conf, names: tuple[str, ...] | list[str], all_: bool) -> list[Unit]:
    """The units named (a unit's name, or a `nodes` component's name for all its nodes), or
    all with all_. An unknown name is an error listing the known ones."""
    every = units(conf)
    if all_ or not names:
        return every
    chosen: list[Unit] = []
    for n in names:
        hit = [u for u in every if u.name == n or (u.kind == "node" and u.component == n)]
        if not hit:
            known = sorted({u.name for u in every} | {u.component for u in every
                                                       if u.kind == "node" and u.component})
            raise AgentError(f"nothing to update is called {n!r} (known: {', '.join(known)})")
        chosen += [u for u in hit if u not in chosen]
    return chosen


_COMMENT = re.compile(r"\s+#.*$")


def _req_lines(text: str | None) -> set[str]:
    out = set()
    for line in (text or "").splitlines():
        line = _COMMENT.sub("", line).strip()
        if line and not line.startswith("#"):
            out.add(line)
    return out


def _name(line: str) -> str:
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return m.group(0).lower().replace("_", "-") if m else line


def requirement_changes(path: Path, old: str, new: str) -> dict[str, list[str]]:
    """Lines of requirements.txt added and removed between two commits (install.py too)."""
    out: dict[str, list[str]] = {}
    for f in REQ_FILES:
        a, b = _req_lines(git.show(path, old, f)), _req_lines(git.show(path, new, f))
        if a != b:
            added, removed = b - a, a - b
            by_name = {_name(x): x for x in removed}
            changed = [f"{by_name[_name(x)]} -> {x}" for x in sorted(added)
                       if _name(x) in by_name]
            gone = {by_name[_name(x)] for x in added if _name(x) in by_name}
            out["added"] = sorted(x for x in added if _name(x) not in by_name)
            out["removed"] = sorted(removed - gone)
            if changed:
                out["changed"] = changed
    a, b = git.show(path, old, "install.py"), git.show(path, new, "install.py")
    if a != b:
        out["install.py"] = ["added" if a is None else "removed" if b is None else "changed"]
    return out


def plan_one(unit: Unit, log: Path, fetch: bool = True) -> Planned:
    p = Planned(unit)
    p.head = git.head(unit.path)
    if p.head is None:
        p.error = f"{unit.path} is not a git checkout (run `pod-agent install` first)"
        return p
    p.branch = git.branch(unit.path)
    try:
        p.dirty = git.dirty(unit.path)
        p.target = git.fetch(unit.path, unit.repo, unit.ref, log) if fetch else p.head
    except AgentError as exc:
        p.error = str(exc)
        return p
    if p.target == p.head:
        return p
    p.count = git.count(unit.path, p.head, p.target)
    if p.count == 0 and git.is_ancestor(unit.path, p.target, p.head):
        p.note = f"local commits ahead of upstream ({p.head[:12]}): not moved back"
        return p
    p.requirements = requirement_changes(unit.path, p.head, p.target)
    return p


def plan(conf, chosen: list[Unit]) -> list[Planned]:
    """Fetch every unit (a few at a time) and say what an update would do; changes nothing
    in the work trees."""
    log = Path(conf.workspace) / "logs" / "update.log"
    if len(chosen) <= 1:
        return [plan_one(u, log) for u in chosen]
    with ThreadPoolExecutor(min(FETCH_THREADS, len(chosen))) as pool:
        return list(pool.map(lambda u: plan_one(u, log), chosen))
