"""Custom nodes that no component manages: cloned by hand or by ComfyUI-Manager.

Each is treated as ComfyUI-Manager would: its requirements.txt installed into ComfyUI's
interpreter and its install.py run, whenever it is new, its HEAD moved, or its requirement files
changed. Their state lives in <state_dir>/user_nodes.json (not in markers: they have no
component name).
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.fserr import explain
from agent.kinds import gitops
from agent.kinds.base import Ctx, InstallError
from agent.locks import Lock
from agent.markers import atomic_write, read_json
from agent.model import AgentError, Component, Config

SKIP = {"__pycache__", ".disabled", "node_modules"}


def custom_nodes_dir(config: Config) -> Path:
    return config.comfyui.dir / "custom_nodes"


def managed(config: Config) -> set[Path]:
    out: set[Path] = set()
    for comp in config.components.values():
        if comp.kind in ("git", "manager"):  # a v3 Manager's clone is its component's
            out.add(Path(comp.spec["dest"]).absolute())
        elif comp.kind == "nodes":
            for node in comp.spec["nodes"]:
                out.add((comp.spec["dest"] / node["name"]).absolute())
    return out


def discover(config: Config) -> list[Path]:
    root = custom_nodes_dir(config)
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    owned = managed(config)
    return [p for p in entries if p.is_dir() and not p.name.startswith(".")
            and p.name not in SKIP and not p.name.endswith(".disabled")
            and p.absolute() not in owned]


def _state_path(config: Config) -> Path:
    return config.state_dir / "user_nodes.json"


def _load(config: Config) -> dict:
    return read_json(_state_path(config)) or {}


def pseudo_component(config: Config) -> Component:
    return Component(name="user_nodes", kind="nodes", timeout=1800.0, retries=0,
                     log=config.workspace / "logs" / "install" / "user_nodes.log")


def converge(ctx: Ctx) -> tuple[dict[str, str], list[str]]:
    """Install what unmanaged nodes need. Returns ({changed node: what was done}, failure
    messages)."""
    config = ctx.config
    nodes = discover(config)
    if not nodes and not _state_path(config).exists():
        return {}, []  # (with a state file, the nodes that went away are recorded below)
    comp = pseudo_component(config)
    changed: dict[str, str] = {}
    failures: list[str] = []
    lock = Lock(config.state_dir / "locks" / "user_nodes.lock")
    try:
        got = lock.acquire(comp.timeout + 60)
    except (OSError, AgentError) as exc:  # a read-only or full volume, a folder as lock file
        return {}, [f"user_nodes: {explain(exc)}"]
    if not got:
        return {}, ["user_nodes: another installer holds the lock"]
    with lock:
        state = _load(config)
        for path in nodes:
            try:
                done = _converge_one(ctx, comp, path, state)
                if done:
                    changed[path.name] = done
            except InstallError as exc:
                failures.append(str(exc))
            except (OSError, AgentError) as exc:  # one node's problem stays its own
                failures.append(f"custom_nodes/{path.name}: {explain(exc)}")
        for name in list(state):
            if not (custom_nodes_dir(config) / name).is_dir():
                gone = state.pop(name)
                gone = gone if isinstance(gone, dict) else {}
                _external(config, name, gone.get("commit"), None, "ok",
                          "removed or disabled outside the agent")
        try:
            atomic_write(_state_path(config), json.dumps(state, indent=1))
        except OSError as exc:  # the nodes are installed; only the record of it is missing
            failures.append(f"user_nodes: {explain(exc)} (their requirements are checked "
                            "again next time)")
    return changed, failures


def _external(config: Config, name: str, before: str | None, after: str | None, result: str,
              detail: str) -> None:
    """One history record for a node changed by someone else (ComfyUI-Manager, a hand-made
    clone or pull): kind and actor `external`, from -> to commits. Never stops the install."""
    from agent import history

    warn = history.quietly(config, history.event(
        "external", f"custom_nodes/{name}", frm=(before or "-")[:12], to=(after or "-")[:12],
        result=result, actor="external", detail=detail,
        commit_before=before, commit_after=after))
    if warn:
        from loguru import logger

        logger.warning(f"custom_nodes/{name}: {warn}")


def remember(config: Config, paths) -> None:
    """Record the current commit and requirement digest of nodes the agent itself just changed
    (a snapshot restore, an update), so converge does not take them for external changes. Call
    it holding the user_nodes lock, or not at all."""
    state = _load(config)
    for path in paths:
        path = Path(path)
        if path.parent != custom_nodes_dir(config):
            continue
        if not path.is_dir():  # moved away by the agent (an undone restore)
            state.pop(path.name, None)
            continue
        state[path.name] = {"commit": gitops.head(path), "deps": gitops.deps_digest(path)}
    atomic_write(_state_path(config), json.dumps(state, indent=1))


def _converge_one(ctx: Ctx, comp: Component, path: Path, state: dict) -> str | None:
    """Install one node's requirements when needed; what was done (None: nothing needed)."""
    if (path / ".git").is_dir() and not (path / ".git" / "index").exists():
        return None  # a clone still in progress: its files are not all there yet
    rec = state.get(path.name)
    rec = rec if isinstance(rec, dict) else {}  # a hand-edited state file is not trusted
    commit = gitops.head(path)
    digest = gitops.deps_digest(path)
    moved = rec.get("commit") != commit or rec.get("deps") != digest
    problem = gitops.deps_problem(ctx, path, None)
    if not moved and problem is None:
        return None
    new = path.name not in state
    has_req = gitops.requirements_file(path).is_file()
    has_script = (path / "install.py").is_file()
    before = rec.get("commit")
    commit_moved = new or before != commit
    try:
        gitops.install_deps(comp, ctx, path, path.name)
    except InstallError as exc:
        if commit_moved:
            _external(ctx.config, path.name, before, commit, "failed", str(exc))
        raise
    state[path.name] = {"commit": commit, "deps": digest}
    if commit_moved:  # a `git pull` in the Manager's UI, a new clone: noticed, into history
        _external(ctx.config, path.name, before, commit, "ok",
                  "new node" if new else "moved outside the agent")
    done = [w for w, yes in (("requirements installed", has_req),
                             ("install.py run", has_script)) if yes]
    if done:
        return ", ".join(done)
    return ("new node, nothing to install (no requirements.txt or install.py)" if new else
            "changed, nothing to install (no requirements.txt or install.py)")
