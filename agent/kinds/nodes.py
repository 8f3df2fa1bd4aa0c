"""`nodes` components: a list of custom node repositories cloned into ComfyUI/custom_nodes.

Per-node state (commit, inputs, requirement digest) is kept in the marker, so adding one node to
the list installs only that node. A node set to `enabled: false` is moved to
`custom_nodes/.disabled/` (ComfyUI-Manager's convention), never deleted.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

from agent.kinds import gitops
from agent.kinds.base import Ctx, InstallError, Problem
from agent.model import Component, Marker, State

FIELDS = {
    "nodes": ("any", []),
    "dest": ("path", "{comfyui}/custom_nodes"),
    "requirements": ("enum:auto|none", "auto"),
    "depth": ("opt_int", None),
    "update": ("bool", False),
    "snapshot": ("opt_path", None),  # a ComfyUI-Manager snapshot: more nodes (agent/snapshot.py)
}

_NODE_KEYS = {"repo", "ref", "enabled", "name"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _err(msg: str, key: str = "nodes", index: int | None = None) -> ValueError:
    err = ValueError(msg)
    err.key = key  # type: ignore[attr-defined]
    err.index = index  # type: ignore[attr-defined]
    return err


def validate(values: dict[str, Any], expand: Callable[[str], str]) -> dict[str, Any]:
    raw = values["nodes"]
    if not isinstance(raw, list):
        raise _err("'nodes' must be a list of repositories")
    nodes = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"repo": item}
        if not isinstance(item, dict) or not item.get("repo"):
            raise _err(f"nodes[{i}] needs a 'repo' URL", index=i)
        unknown = set(item) - _NODE_KEYS
        if unknown:
            raise _err(f"nodes[{i}]: unknown field '{sorted(unknown)[0]}' "
                       f"(known: {', '.join(sorted(_NODE_KEYS))})", index=i)
        repo = expand(str(item["repo"]))
        name = str(item.get("name") or gitops.repo_name(repo))
        if not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise _err(f"nodes[{i}]: cannot use {name!r} as a folder name; set 'name'",
                       index=i)
        if name in seen:
            raise _err(f"nodes[{i}]: two nodes would use the folder {name!r}; set 'name'",
                       index=i)
        seen.add(name)
        enabled = item.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _err(f"nodes[{i}]: 'enabled' must be true or false", index=i)
        ref = item.get("ref")
        nodes.append({"repo": repo, "name": name, "ref": None if ref is None else str(ref),
                      "enabled": enabled})
    if values.get("snapshot"):
        from pathlib import Path

        from agent.snapshot import SnapshotError, config_nodes

        path = Path(values["snapshot"])
        values["snapshot"] = path if path.is_absolute() else Path(expand("{workspace}")) / path
        try:
            nodes = config_nodes(values["snapshot"], nodes, seen)
        except SnapshotError as exc:
            raise _err(str(exc), key="snapshot") from None
    values["nodes"] = tuple(nodes)
    return values


def _node_fp(node: dict[str, Any], requirements: str) -> str:
    blob = json.dumps([node["repo"], node["ref"], requirements] + (
        [node["cnr"], node["version"]] if node.get("cnr") else []))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def enabled_nodes(comp: Component) -> list[dict[str, Any]]:
    return [n for n in comp.spec["nodes"] if n["enabled"]]


def inputs(comp: Component, ctx: Ctx) -> dict[str, Any]:
    s = comp.spec
    return {"dest": str(s["dest"]),
            "nodes": sorted(_node_fp(n, s["requirements"]) for n in enabled_nodes(comp))}


def _recorded(marker: Marker | None, name: str) -> tuple[str | None, str | None, str | None]:
    if not marker:
        return None, None, None
    parts = marker.meta.get(f"node.{name}", "").split()
    parts += [None] * (3 - len(parts))  # type: ignore[list-item]
    return parts[0], parts[1], parts[2]


def node_problem(comp: Component, ctx: Ctx, node: dict[str, Any],
                 marker: Marker | None) -> tuple[State, str] | None:
    dest = comp.spec["dest"] / node["name"]
    commit, fp, deps = _recorded(marker, node["name"])
    if marker and not marker.legacy and fp and fp != _node_fp(node, comp.spec["requirements"]):
        return State.STALE, f"{node['name']}: repo or ref changed"
    if node.get("cnr"):  # a registry node from a snapshot: folder, .tracking, version
        from agent.snapshot import registry_node_problem

        found = registry_node_problem(dest, node["cnr"], node["version"])
        if found is None and comp.spec["requirements"] == "auto":
            found = gitops.deps_problem(ctx, dest, deps)
        return found
    if marker and not marker.legacy and not fp:
        found = gitops.checkout_problem(dest, None, node["ref"])
        if found is None or found[1].endswith("is missing"):
            return State.STALE, f"{node['name']}: added to the list"
        return found[0], f"{node['name']}: {found[1]}"
    found = gitops.checkout_problem(dest, commit, node["ref"])
    if found:
        return found[0], f"{node['name']}: {found[1]}"
    if comp.spec["requirements"] == "auto":
        found = gitops.deps_problem(ctx, dest, deps)
        if found:
            return found[0], f"{node['name']}: {found[1]}" if not found[1].startswith(
                node["name"]) else found[1]
    return None


def probe(comp: Component, ctx: Ctx, marker: Marker | None) -> Problem | None:
    problems = [p for p in (node_problem(comp, ctx, n, marker) for n in enabled_nodes(comp)) if p]
    if not problems:
        return None
    state = State.BROKEN if any(p[0] == State.BROKEN for p in problems) else State.STALE
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return Problem(state, problems[0][1] + more)


def install(comp: Component, ctx: Ctx, marker: Marker | None = None) -> dict[str, str]:
    s = comp.spec
    meta: dict[str, str] = {}
    failures: list[str] = []
    for node in s["nodes"]:
        dest = s["dest"] / node["name"]
        if not node["enabled"]:
            _disable(dest)
            continue
        try:
            if node.get("cnr") and (node_problem(comp, ctx, node, marker) is not None
                                    or marker is None):
                from agent.snapshot import install_registry_node

                install_registry_node(comp, ctx, node["cnr"], node["version"], dest)
            elif node_problem(comp, ctx, node, marker) is not None or marker is None:
                gitops.ensure_checkout(comp, ctx, node["repo"], dest, node["ref"], s["depth"],
                                       s["update"], node["name"])
                if s["requirements"] == "auto":
                    gitops.install_deps(comp, ctx, dest, node["name"])
        except InstallError as exc:
            failures.append(str(exc))
            continue
        meta[f"node.{node['name']}"] = _node_line(comp, node)
    if failures:
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        raise InstallError(failures[0] + more)
    return _with_version(meta)


def _node_line(comp: Component, node: dict[str, Any]) -> str:
    dest = comp.spec["dest"] / node["name"]
    commit = gitops.head(dest) or "-"
    return f"{commit} {_node_fp(node, comp.spec['requirements'])} {gitops.deps_digest(dest)}"


def _with_version(meta: dict[str, str]) -> dict[str, str]:
    return {"version": f"{len(meta)} nodes", **meta}


def _disable(dest: Path) -> None:
    if dest.is_dir():
        target = dest.parent / ".disabled" / dest.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # never delete: keep both copies
            target = target.with_name(f"{dest.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        dest.rename(target)


def current_meta(comp: Component, ctx: Ctx) -> dict[str, str]:
    return _with_version({f"node.{n['name']}": _node_line(comp, n) for n in enabled_nodes(comp)})
