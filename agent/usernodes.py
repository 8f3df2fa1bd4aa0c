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
        own = _update_running(config)  # an update's or rollback's moves are not external
        for path in nodes:
            try:
                done = _converge_one(ctx, comp, path, state, own)
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
                if not own:
                    _external(config, name, gone.get("commit"), None, "ok",
                              "removed or disabled outside the agent")
        try:
            atomic_write(_state_path(config), json.dumps(state, indent=1))
        except OSError as exc:  # the nodes are installed; only the record of it is missing
            failures.append(f"user_nodes: {explain(exc)} (their requirements are checked "
                            "again next time)")
    return changed, failures


def _update_running(config: Config) -> bool:
    """An update, rollback or snapshot restore is under way (its journal exists): the node
    moves seen now are its own, recorded by it."""
    from agent.updates.journal import journal_path

    try:
        return journal_path(config).exists()
    except OSError:
        return False


def _agent_moved(config: Config, path: Path, before: str | None, after: str | None) -> bool:
    """Was this move (before -> after) made by an update, rollback or restore the agent
    recorded (its restore point names it)? Then it is not an external change. (The restore
    points of external changes are left out: a move seen again is seen again.)"""
    if not before or not after or before == after:
        return False
    from agent.updates import journal

    try:
        points = journal.points(config)[-5:]
    except (OSError, AgentError):
        return False
    where = str(path)
    return any(e.get("path") == where and e.get("from") == before and e.get("to") == after
               for p in points if p.get("op") != "external" for e in p.get("changes") or ())


def _restore_point(config: Config, path: Path, before: str, after: str,
                   dists: dict[str, str]) -> bool:
    """A node moved by someone else (a `git pull` in ComfyUI-Manager's UI) becomes a restore
    point with the packages as they were (agent/updates `record_external`, which also writes
    its history record), so `pod-agent rollback` puts it back. False when it cannot be
    recorded (the caller then writes the history record itself)."""
    try:
        from agent.updates.engine import Change, record_external

        record_external(config, [Change(path.name, path, before, after)],
                        "moved outside the agent (ComfyUI-Manager's UI, a git pull); "
                        "`pod-agent rollback` puts it back", before_dists=dists)
        return True
    except (OSError, AgentError, ValueError) as exc:
        from loguru import logger

        logger.warning(f"custom_nodes/{path.name}: no restore point for its move: {exc}")
        return False


def _external(config: Config, name: str, before: str | None, after: str | None, result: str,
              detail: str, **extra) -> None:
    """One history record for a node changed by someone else (ComfyUI-Manager, a hand-made
    clone or pull): kind and actor `external`, component the node's folder name (as updates
    and rollbacks name it), from -> to commits. Never stops the install."""
    from agent import history

    warn = history.quietly(config, history.event(
        "external", name, frm=(before or "-")[:12], to=(after or "-")[:12],  # as updates name it
        result=result, actor="external", detail=detail,
        commit_before=before, commit_after=after, **extra))
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


def _converge_one(ctx: Ctx, comp: Component, path: Path, state: dict,
                  own: bool = False) -> str | None:
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
    commit_moved = (new or before != commit) and not own \
        and not _agent_moved(ctx.config, path, before, commit)
    dists = None
    if commit_moved and before and commit:  # what the packages were, for a rollback
        try:
            dists = dict(ctx.pyenv().dists)
        except Exception:  # noqa: BLE001 - no restore point then; history still says it
            dists = None
    recorded = False
    if commit_moved and not new and before and commit and dists is not None:
        recorded = _restore_point(ctx.config, path, before, commit, dists)
    try:
        gitops.install_deps(comp, ctx, path, path.name)
    except InstallError as exc:
        if commit_moved:
            _external(ctx.config, path.name, before, commit, "failed", str(exc))
        raise
    state[path.name] = {"commit": commit, "deps": digest}
    if commit_moved and not recorded:  # a new clone (or no restore point): into history
        _external(ctx.config, path.name, before, commit, "ok",
                  "new node" if new else "moved outside the agent")
    done = [w for w, yes in (("requirements installed", has_req),
                             ("install.py run", has_script)) if yes]
    if done:
        return ", ".join(done)
    return ("new node, nothing to install (no requirements.txt or install.py)" if new else
            "changed, nothing to install (no requirements.txt or install.py)")
