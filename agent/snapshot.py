"""ComfyUI-Manager snapshots: read, write, compare with the workspace, restore.

The format is the Manager's (glob/manager_core.py `get_current_snapshot`, v3 and v4 alike):

    {"comfyui": "<commit>",
     "git_custom_nodes": {"<url>": {"hash": "<commit>", "disabled": false}},
     "cnr_custom_nodes": {"<registry id>": "<version>"},
     "file_custom_nodes": [{"filename": "x.py", "disabled": false}],
     "pips": {"<freeze line or name>": "<url or ''>"}}

as `.json` (indent 4), or the same under a top-level `custom_nodes:` key as `.yaml`. The Manager
keeps them in `user/default/ComfyUI-Manager/snapshots` (v3) or `user/__manager/snapshots` (v4),
named `YYYY-MM-DD_HH-MM-SS_snapshot.json`.

A node lives in `custom_nodes/<folder>`, disabled in `custom_nodes/.disabled/<folder>` (the
Manager's own convention; a registry node disabled there is `<id>@<version_with_underscores>`).
A registry (CNR) node is a folder extracted from the registry's zip with a `.tracking` file (the
extracted paths) and a `pyproject.toml` naming it (`[project] name`, `version`).

`plan` compares a snapshot with the workspace and lists changes; `execute` carries them out one
node at a time (a node's failure is that node's, named with its reason). Nothing is deleted:
`--prune` and `disabled: true` move folders to `.disabled`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.model import AgentError, Component, Config

DEFAULT_REGISTRY = "https://api.comfy.org"
REGISTRY_ENV = "POD_AGENT_REGISTRY_URL"
SHA_RE = re.compile(r"[0-9a-fA-F]{7,40}")
NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
SKIP = {"__pycache__", ".disabled", "node_modules"}
MAX_ZIP = 4 << 30  # a registry archive larger than 4 GiB is refused
HTTP_TIMEOUT = 60.0


class SnapshotError(AgentError):
    """A snapshot file that cannot be read or used; one line naming the file and the value."""


# --------------------------------------------------------------------------- read and write
def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read(path: Path) -> dict[str, Any]:
    """The snapshot at path, checked and normalised; SnapshotError (one line) when unusable."""
    from agent.config import load_yaml, read_text
    from agent.model import ConfigError

    path = Path(path)
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data: Any = load_yaml(path, "snapshot")
        else:
            text = read_text(path, "snapshot")
            try:
                data = json.loads(text)
            except ValueError as exc:
                line = getattr(exc, "lineno", 0)
                raise SnapshotError(f"{path}:{line}: not valid JSON ({str(exc).split(':')[0]}); "
                                    "a snapshot is the Manager's .json or .yaml") from None
    except ConfigError as exc:
        raise SnapshotError(str(exc)) from None
    return parse(data, str(path))


def parse(data: Any, where: str) -> dict[str, Any]:
    """Check a loaded snapshot: the Manager's keys with the right types (unknown keys are
    ignored: later Manager versions may add some). The YAML form's `custom_nodes:` wrapper is
    taken off."""
    if isinstance(data, dict) and isinstance(data.get("custom_nodes"), dict) \
            and "git_custom_nodes" not in data:
        data = data["custom_nodes"]
    if not isinstance(data, dict):
        raise SnapshotError(f"{where}: a snapshot is a mapping with git_custom_nodes, "
                            "cnr_custom_nodes, file_custom_nodes, pips; got "
                            f"{type(data).__name__}")
    known = ("comfyui", "git_custom_nodes", "cnr_custom_nodes", "file_custom_nodes", "pips")
    if not any(k in data for k in known):
        raise SnapshotError(f"{where}: not a ComfyUI-Manager snapshot (none of {', '.join(known)}"
                            " at the top level)")

    def bad(key: str, problem: str) -> SnapshotError:
        return SnapshotError(f"{where}: {key}: {problem}")

    comfy = data.get("comfyui")
    if comfy is not None and not (isinstance(comfy, str) and SHA_RE.fullmatch(comfy)):
        raise bad("comfyui", f"must be a commit id or null, got {_short(comfy)}")
    git_nodes: dict[str, dict[str, Any]] = {}
    raw = data.get("git_custom_nodes") or {}
    if not isinstance(raw, dict):
        raise bad("git_custom_nodes", f"must be a mapping of URL to {{hash, disabled}}, got "
                  f"{_short(raw)}")
    for url, info in raw.items():
        key = f"git_custom_nodes[{_short(url)}]"
        if not isinstance(url, str) or not url.strip():
            raise bad(key, "a node's key must be its repository URL")
        if not isinstance(info, dict):
            raise bad(key, f"must be a mapping with 'hash' and 'disabled', got {_short(info)}")
        commit, disabled = info.get("hash"), info.get("disabled", False)
        if not (isinstance(commit, str) and SHA_RE.fullmatch(commit)):
            raise bad(key, f"'hash' must be a commit id, got {_short(commit)}")
        if not isinstance(disabled, bool):
            raise bad(key, f"'disabled' must be true or false, got {_short(disabled)}")
        name = folder_for(url)
        if not NAME_RE.fullmatch(name) or name in (".", ".."):
            raise bad(key, f"cannot make a folder name of it (got {_short(name)})")
        git_nodes[url] = {"hash": commit.lower(), "disabled": disabled}
    cnr: dict[str, str] = {}
    raw = data.get("cnr_custom_nodes") or {}
    if not isinstance(raw, dict):
        raise bad("cnr_custom_nodes", f"must be a mapping of node id to version, got "
                  f"{_short(raw)}")
    for node_id, version in raw.items():
        key = f"cnr_custom_nodes[{_short(node_id)}]"
        if not isinstance(node_id, str) or not NAME_RE.fullmatch(node_id) \
                or node_id in (".", ".."):
            raise bad(key, "a registry node id is letters, digits, '_', '.', '-'")
        if not isinstance(version, (str, int, float)) or isinstance(version, bool):
            raise bad(key, f"the version must be text such as '1.2.0', got {_short(version)}")
        cnr[node_id] = str(version)
    files: list[dict[str, Any]] = []
    raw = data.get("file_custom_nodes") or []
    if not isinstance(raw, list):
        raise bad("file_custom_nodes", f"must be a list of {{filename, disabled}}, got "
                  f"{_short(raw)}")
    for i, item in enumerate(raw):
        key = f"file_custom_nodes[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
            raise bad(key, f"must be a mapping with 'filename', got {_short(item)}")
        fname, disabled = item["filename"], item.get("disabled", False)
        if "/" in fname or fname in (".", "..") or not fname:
            raise bad(key, f"'filename' must be a plain file name, got {_short(fname)}")
        if not isinstance(disabled, bool):
            raise bad(key, f"'disabled' must be true or false, got {_short(disabled)}")
        files.append({"filename": fname, "disabled": disabled})
    pips: dict[str, str] = {}
    raw = data.get("pips") or {}
    if not isinstance(raw, dict):
        raise bad("pips", f"must be a mapping of freeze line to URL or '', got {_short(raw)}")
    for spec, url in raw.items():
        if not isinstance(spec, str) or (url is not None and not isinstance(url, str)):
            raise bad(f"pips[{_short(spec)}]", "must map text to a URL or ''")
        pips[spec] = url or ""
    return {"comfyui": comfy.lower() if comfy else None, "git_custom_nodes": git_nodes,
            "cnr_custom_nodes": cnr, "file_custom_nodes": files, "pips": pips}


def dump(snap: dict[str, Any], path: Path) -> None:
    """Write in the Manager's format: `.yaml` under `custom_nodes:`, anything else JSON."""
    from agent.markers import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump({"custom_nodes": snap}, allow_unicode=True, sort_keys=False)
    else:
        text = json.dumps(snap, indent=4) + "\n"
    atomic_write(path, text)


def default_path(config: Config) -> Path:
    """Where the Manager of the detected generation keeps its snapshots, named as it does."""
    from agent import manager

    return manager.snapshot_dir(config) / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_snapshot.json"


# --------------------------------------------------------------------------- the workspace now
def folder_for(url: str) -> str:
    """The folder a git node is cloned to (the Manager: the URL's last part, no .git)."""
    tail = url.strip().rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return tail[:-4] if tail.endswith(".git") else tail


def norm_url(url: str) -> str:
    """A repository URL compared loosely: no credentials, no trailing / or .git, ssh form
    as https, lower case."""
    from agent.kinds.gitops import anonymous

    text = anonymous(url.strip()).rstrip("/")
    m = re.fullmatch(r"(?:ssh://)?git@([^:/]+)[:/](.+)", text)
    if m:
        text = f"https://{m.group(1)}/{m.group(2)}"
    if text.endswith(".git"):
        text = text[:-4]
    return text.lower()


@dataclass
class Node:
    folder: str  # its name in custom_nodes or custom_nodes/.disabled
    path: Path
    disabled: bool
    kind: str  # git | cnr | other
    url: str | None = None
    commit: str | None = None
    cnr_id: str | None = None
    version: str | None = None


def custom_nodes(config: Config) -> Path:
    return config.comfyui.dir / "custom_nodes"


def _remote_url(path: Path) -> str | None:
    """The URL of the remote the checkout tracks (else origin, else the first remote)."""
    from git import Repo
    from git.exc import GitError

    try:
        with Repo(path) as repo:
            names = [r.name for r in repo.remotes]
            if not names:
                return None
            name = None
            try:
                if not repo.head.is_detached:
                    tracking = repo.active_branch.tracking_branch()
                    name = tracking.remote_name if tracking is not None else None
            except (GitError, TypeError, ValueError):
                name = None
            name = name or ("origin" if "origin" in names else names[0])
            return repo.remotes[name].url
    except (GitError, ValueError, OSError, IndexError):
        return None


def version_key(version: str) -> str:
    """A registry version as the Manager compares it: `2.5` -> `2.5.0`."""
    parts = version.strip().split(".")
    if all(p.isdigit() for p in parts) and len(parts) < 3:
        parts += ["0"] * (3 - len(parts))
    return ".".join(parts)


def cnr_info(path: Path) -> tuple[str, str] | None:
    """(id, version) of a registry node folder (`.tracking` + pyproject.toml), else None."""
    toml_path, tracking = path / "pyproject.toml", path / ".tracking"
    if not (toml_path.is_file() and tracking.is_file()):
        return None
    try:
        text = toml_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    try:
        import tomllib

        project = tomllib.loads(text).get("project", {})
        name, version = project.get("name"), project.get("version")
    except Exception:  # noqa: BLE001 - Python 3.10 (no tomllib) or a broken file: by hand
        section = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        body = section.group(1) if section else ""
        name = (re.search(r'^name\s*=\s*["\']([^"\']+)', body, re.M) or [None, None])[1]
        version = (re.search(r'^version\s*=\s*["\']([^"\']+)', body, re.M) or [None, None])[1]
    if not isinstance(name, str) or not isinstance(version, str):
        return None
    return name.strip().lower(), version_key(version)


def inventory(config: Config) -> tuple[list[Node], list[dict[str, Any]]]:
    """Every node folder (enabled and in .disabled) and every single-file node."""
    from agent.kinds.gitops import head

    root = custom_nodes(config)
    nodes: list[Node] = []
    files: list[dict[str, Any]] = []
    for base, disabled in ((root, False), (root / ".disabled", True)):
        try:
            entries = sorted(base.iterdir())
        except OSError:
            continue
        for p in entries:
            name = p.name
            if name in SKIP or name.startswith("."):
                continue  # .disabled itself, partial clones and downloads (.X.partial-...)
            if p.is_file():
                if base == root and name.endswith(".py"):
                    files.append({"filename": name, "disabled": False})
                elif base == root and name.endswith(".py.disabled"):
                    files.append({"filename": name[:-len(".disabled")], "disabled": True})
                continue
            if not p.is_dir():
                continue
            off = disabled or name.endswith(".disabled")  # the Manager's old style too
            if (p / ".git").exists():
                nodes.append(Node(name, p, off, "git", url=_remote_url(p), commit=head(p)))
                continue
            info = cnr_info(p)
            if info:
                nodes.append(Node(name, p, off, "cnr", cnr_id=info[0], version=info[1]))
            else:
                nodes.append(Node(name, p, off, "other"))
    return nodes, files


def _is_manager(url: str) -> bool:
    return "comfyui-manager" in url.lower()


def pip_freeze(config: Config) -> dict[str, str]:
    """The target interpreter's packages as the Manager records them: a `name @ url` line is
    name -> url, any other freeze line -> ''. Without pip, `name==version` from dist-info."""
    from agent import procs
    from agent.pyenv import inspect

    python = config.comfyui.python
    code, out = procs.quick([str(python), "-m", "pip", "freeze", "--disable-pip-version-check"],
                            timeout=120, env={"PIP_NO_INPUT": "1"})
    res: dict[str, str] = {}
    if code == 0:
        for line in out.splitlines():
            line = line.strip()
            if not line or line.startswith(("#", "WARNING", "DEPRECATION", "ERROR")):
                continue
            if " @ " in line:
                name, url = line.split(" @ ", 1)
                res[name.strip()] = url.strip()
            else:
                res[line] = ""
        return res
    try:
        return {f"{n}=={v}": "" for n, v in sorted(inspect(python).dists.items()) if v}
    except Exception:  # noqa: BLE001 - no interpreter: no packages to record
        return {}


def current(config: Config, pips: bool = True) -> tuple[dict[str, Any], list[str]]:
    """The workspace as a snapshot, and warnings for what a snapshot cannot hold (a folder with
    no git remote and no registry record, a disabled registry node as the Manager skips)."""
    from agent.kinds.gitops import anonymous, head

    nodes, files = inventory(config)
    git_nodes: dict[str, dict[str, Any]] = {}
    cnr: dict[str, str] = {}
    warnings: list[str] = []
    for n in nodes:
        if n.kind == "git":
            if not n.url or not n.commit:
                warnings.append(f"custom_nodes/{n.folder}: not in the snapshot (a git checkout "
                                "with no remote or no commit)")
                continue
            git_nodes[anonymous(n.url)] = {"hash": n.commit, "disabled": n.disabled}
        elif n.kind == "cnr":
            if n.disabled:
                warnings.append(f"custom_nodes/.disabled/{n.folder}: a disabled registry node is "
                                "not in the snapshot (as the Manager does)")
                continue
            cnr[n.cnr_id or n.folder] = n.version or ""
        else:
            warnings.append(f"custom_nodes/{n.folder}: not in the snapshot (neither a git "
                            "checkout nor a registry node)")
    snap = {"comfyui": head(config.comfyui.dir), "git_custom_nodes": git_nodes,
            "cnr_custom_nodes": cnr, "file_custom_nodes": files,
            "pips": pip_freeze(config) if pips else {}}
    return snap, warnings


def save(config: Config, path: Path | None = None) -> tuple[Path, dict[str, Any], list[str]]:
    """Write the workspace's snapshot (default: the Manager's folder); (path, snapshot,
    warnings). Raises OSError when it cannot be written."""
    snap, warnings = current(config)
    target = Path(path) if path else default_path(config)
    dump(snap, target)
    return target, snap, warnings


# --------------------------------------------------------------------------- plan
@dataclass
class Change:
    """One thing a restore does. action: clone | checkout | enable | disable | cnr-install |
    cnr-switch | file-enable | file-disable | pips."""
    action: str
    name: str  # what it is about, for people: a folder, `id@version`, a file, "pips"
    path: Path | None = None  # the folder or file as it is now (None: not there yet)
    url: str | None = None
    commit: str | None = None  # the commit to check out
    before: str | None = None  # the commit or version it had
    disabled: bool = False  # where it ends: custom_nodes/.disabled
    cnr_id: str | None = None
    version: str | None = None
    specs: tuple[str, ...] = ()  # pips: requirement specs to install

    def text(self) -> str:
        if self.action in ("clone", "checkout"):
            where = " (disabled)" if self.disabled else ""
            frm = f"{self.before[:12]} -> " if self.before else ""
            return f"{self.action} {self.name}: {frm}{(self.commit or '')[:12]}{where}"
        if self.action in ("cnr-install", "cnr-switch"):
            frm = f"{self.before} -> " if self.before else ""
            return f"{self.action} {self.cnr_id}: {frm}{self.version}"
        if self.action == "pips":
            return f"pips: install {len(self.specs)} package(s)"
        return f"{self.action} {self.name}"


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (name, why) known already
    notes: list[str] = field(default_factory=list)  # said, not done, not failures
    unchanged: int = 0


def _pip_specs(snap: dict[str, Any], config: Config, plan: Plan) -> list[str]:
    """Requirement specs for the snapshot's packages that the interpreter does not have."""
    from packaging.requirements import InvalidRequirement, Requirement

    from agent.pyenv import canonical, inspect

    try:
        have = inspect(config.comfyui.python).dists
    except Exception as exc:  # noqa: BLE001
        plan.failures.append(("pips", f"cannot read the interpreter's packages: {exc}"))
        return []
    specs: list[str] = []
    for key, url in snap["pips"].items():
        line = key.strip()
        if line.startswith("-e") or line.startswith("--editable"):
            plan.failures.append((f"pip {line[:60]}", "an editable install cannot be restored "
                                  "from a snapshot"))
            continue
        spec = f"{line} @ {url}" if url else line
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            plan.failures.append((f"pip {line[:60]}", "not a requirement pip understands"))
            continue
        installed = have.get(canonical(req.name))
        if installed is not None and not url and req.specifier and \
                req.specifier.contains(installed, prereleases=True):
            continue
        if installed is not None and not req.specifier and not url:
            continue
        specs.append(spec)
    return specs


def plan(config: Config, snap: dict[str, Any], prune: bool = False,
         pips: bool = False) -> Plan:
    """What it takes for the workspace to match the snapshot. Pure comparison (reads the
    workspace, changes nothing). Nodes a component manages are never pruned; ComfyUI-Manager
    itself is left to the comfyui_manager component (as the Manager's own restore does)."""
    from agent.usernodes import managed

    out = Plan()
    root = custom_nodes(config)
    nodes, files = inventory(config)
    owned = managed(config)
    by_url: dict[str, list[Node]] = {}
    for n in nodes:
        if n.kind == "git" and n.url:
            by_url.setdefault(norm_url(n.url), []).append(n)
    by_cnr = {n.cnr_id: n for n in nodes if n.kind == "cnr" and not n.disabled}
    wanted_urls: set[str] = set()
    for url, info in snap["git_custom_nodes"].items():
        key = norm_url(url)
        wanted_urls.add(key)
        name = folder_for(url)
        if _is_manager(url):
            out.notes.append(f"{name}: left to the comfyui_manager component")
            continue
        found = by_url.get(key, [])
        # prefer the copy in the state the snapshot wants, then the enabled one
        found.sort(key=lambda n: (n.disabled != info["disabled"], n.disabled))
        node = found[0] if found else None
        if node is None:
            dest = root / (".disabled" if info["disabled"] else "") / name
            if dest.exists():
                out.failures.append((name, f"{dest} exists and is not a clone of {url}: not "
                                     "replaced (move it away)"))
                continue
            out.changes.append(Change("clone", name, None, url, info["hash"],
                                      disabled=info["disabled"]))
            continue
        todo = False
        if not (node.commit or "").startswith(info["hash"]):
            out.changes.append(Change("checkout", node.folder, node.path, url, info["hash"],
                                      before=node.commit, disabled=node.disabled))
            todo = True
        if info["disabled"] and not node.disabled:
            out.changes.append(Change("disable", node.folder, node.path, url))
            todo = True
        elif not info["disabled"] and node.disabled:
            out.changes.append(Change("enable", name, node.path, url))
            todo = True
        out.unchanged += not todo
    for node_id, version in snap["cnr_custom_nodes"].items():
        if _is_manager(node_id):
            out.notes.append(f"{node_id}: left to the comfyui_manager component")
            continue
        have = by_cnr.get(node_id)
        if have is None:
            dest = root / node_id
            if dest.exists():
                out.failures.append((f"{node_id}@{version}", f"{dest} exists and is not the "
                                     "registry node: not replaced (move it away)"))
                continue
            out.changes.append(Change("cnr-install", f"{node_id}@{version}", cnr_id=node_id,
                                      version=version))
        elif version_key(have.version or "") != version_key(version):
            out.changes.append(Change("cnr-switch", f"{node_id}@{version}", have.path,
                                      cnr_id=node_id, version=version, before=have.version))
        else:
            out.unchanged += 1
    present = {f["filename"]: f["disabled"] for f in files}
    for item in snap["file_custom_nodes"]:
        fname, off = item["filename"], item["disabled"]
        if fname not in present:
            out.failures.append((fname, "a single-file node is not in the workspace and a "
                                 "snapshot does not hold its contents"))
        elif present[fname] != off:
            out.changes.append(Change("file-disable", fname, root / fname) if off else
                               Change("file-enable", fname, root / f"{fname}.disabled"))
        else:
            out.unchanged += 1
    if prune:
        wanted_cnr = set(snap["cnr_custom_nodes"])
        for n in nodes:
            if n.disabled:
                continue
            listed = (n.kind == "git" and n.url and norm_url(n.url) in wanted_urls) or \
                (n.kind == "cnr" and n.cnr_id in wanted_cnr)
            if listed or (n.url and _is_manager(n.url)) or "comfyui-manager" in n.folder.lower():
                continue
            if n.path.absolute() in owned:
                out.notes.append(f"{n.folder}: not in the snapshot, kept (a component lists it)")
                continue
            out.changes.append(Change("disable", n.folder, n.path, n.url))
    if snap["comfyui"]:
        from agent.kinds.gitops import head

        now = head(config.comfyui.dir)
        if now and not now.startswith(snap["comfyui"]) and not snap["comfyui"].startswith(now):
            out.notes.append(f"ComfyUI is at {now[:12]}, the snapshot was taken at "
                             f"{snap['comfyui'][:12]}: ComfyUI is not changed by a restore "
                             "(pin comfyui_core's ref to move it)")
    if pips:
        specs = _pip_specs(snap, config, out)
        if specs:
            out.changes.append(Change("pips", "pips", specs=tuple(specs)))
    return out


# --------------------------------------------------------------------------- execute
@dataclass
class Result:
    done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    touched: list[Path] = field(default_factory=list)  # enabled node folders it changed
    # how to undo what was done, in order: ("aside", path, None) moves a folder it made to
    # .disabled (never deleted); ("move", now, before) moves a folder or file back
    undo: list[tuple[str, Path, Path | None]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def pseudo_component(config: Config) -> Component:
    return Component(name="snapshot", kind="nodes", timeout=1800.0, retries=0,
                     log=config.workspace / "logs" / "install" / "snapshot.log")


def registry_url(config: Config, given: str | None = None) -> str:
    """--registry, else POD_AGENT_REGISTRY_URL, else the manager component's `registry`, else
    the Comfy Registry."""
    from agent import manager

    if given:
        return given.rstrip("/")
    if os.environ.get(REGISTRY_ENV):
        return os.environ[REGISTRY_ENV].rstrip("/")
    comp = manager.component(config)
    if comp is not None and comp.spec.get("registry"):
        return str(comp.spec["registry"]).rstrip("/")
    return DEFAULT_REGISTRY


def _move_to_disabled(path: Path, name: str | None = None) -> Path:
    """custom_nodes/x -> custom_nodes/.disabled/x (a taken name gets a timestamp)."""
    target = path.parent / ".disabled" / (name or path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target = target.with_name(f"{target.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(target)
    return target


def _dirty(path: Path) -> bool:
    from agent import procs

    code, out = procs.quick(["git", "-C", str(path), "status", "--porcelain",
                             "--untracked-files=no"], timeout=60)
    return code != 0 or bool(out.strip())


def _checkout(comp: Component, ctx, path: Path, url: str, commit: str, label: str) -> None:
    """Check out commit in an existing clone, fetching it when missing (branches first, then
    the commit itself)."""
    from agent.kinds.base import InstallError

    if _dirty(path):
        raise InstallError(f"{label}: has local changes: not checked out (commit or discard "
                           "them first)")
    _fetch_commit(comp, ctx, path, url, commit, label)
    ctx.git(comp, ["checkout", "--detach", "--quiet", commit], f"{label}: checkout "
            f"{commit[:12]}", cwd=path)


def _http_json(url: str) -> Any:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Accept": "application/json",
                                               "User-Agent": "pod-agent"})
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:  # noqa: S310 - http(s) only
        return json.loads(resp.read(1 << 20).decode("utf-8", "replace"))


def _download(url: str, target: Path) -> None:
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "pod-agent"})
    size = 0
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp, open(target, "wb") as fh:  # noqa: S310
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_ZIP:
                raise OSError(f"the archive is larger than {MAX_ZIP >> 30} GiB")
            fh.write(chunk)


def _extract(archive: Path, dest: Path) -> list[str]:
    """Extract a zip into dest, refusing absolute paths and `..`; the extracted names."""
    import zipfile

    names: list[str] = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = info.filename
            parts = Path(name).parts
            if name.startswith("/") or ".." in parts:
                raise OSError(f"unsafe path in the archive: {name!r}")
        zf.extractall(dest)
        names = [i.filename for i in zf.infolist()]
    return names


def _cnr_install(comp: Component, ctx, registry: str, node_id: str, version: str,
                 old: Path | None, root: Path | None = None,
                 undo: list | None = None) -> None:
    """The Manager's registry install: GET {registry}/nodes/{id}/install?version=V gives a
    downloadUrl to a zip, extracted into custom_nodes/{id} with a .tracking file; then the
    node's requirements and install.py. A previous version goes to .disabled/{id}@{ver}."""
    import urllib.error
    from urllib.parse import quote

    from agent.kinds import gitops
    from agent.kinds.base import InstallError

    label = f"{node_id}@{version}"
    url = f"{registry}/nodes/{quote(node_id)}/install?version={quote(version)}"
    try:
        info = _http_json(url)
    except urllib.error.HTTPError as exc:
        raise InstallError(f"{label}: the registry answered {exc.code} for {url}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        raise InstallError(f"{label}: the registry {registry} is not reachable ({why})") from None
    download = info.get("downloadUrl") if isinstance(info, dict) else None
    if not isinstance(download, str) or not download.startswith(("http://", "https://")):
        raise InstallError(f"{label}: the registry gave no download URL for this version")
    root = root or custom_nodes(ctx.config)
    root.mkdir(parents=True, exist_ok=True)
    tmp_zip = root / f".{node_id}.partial-{os.getpid()}.zip"
    tmp_dir = root / f".{node_id}.partial-{os.getpid()}"
    try:
        try:
            _download(download, tmp_zip)
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", None) or exc
            raise InstallError(f"{label}: download failed ({why})") from None
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
        try:
            names = _extract(tmp_zip, tmp_dir)
        except (OSError, ValueError) as exc:
            raise InstallError(f"{label}: the archive cannot be extracted ({exc})") from None
        if not names:
            raise InstallError(f"{label}: the archive is empty")
        (tmp_dir / ".tracking").write_text("\n".join(names))
        dest = root / node_id
        if old is not None and old.exists():
            was = (cnr_info(old) or ("", "unknown"))[1]
            aside = _move_to_disabled(old, f"{node_id}@{was.replace('.', '_')}")
            if undo is not None:
                undo.append(("move", aside, old))
        if dest.exists():
            raise InstallError(f"{label}: {dest} exists: not replaced")
        os.replace(tmp_dir, dest)
        if undo is not None:
            undo.append(("aside", dest, None))
    finally:
        tmp_zip.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    gitops.install_deps(comp, ctx, dest, label)


def execute(config: Config, the_plan: Plan, registry: str | None = None,
            progress=None) -> Result:
    """Carry out the plan's changes, one at a time; a change that fails is named with its
    reason and the others still run. Plan failures are carried into the result."""
    from agent.fserr import explain
    from agent.kinds import gitops
    from agent.kinds.base import Ctx, InstallError

    say = progress or (lambda text: None)
    comp = pseudo_component(config)
    comp.log.parent.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(config)
    result = Result(failed=list(the_plan.failures))
    root = custom_nodes(config)
    reg = registry_url(config, registry)
    def failed(name: str, why: str) -> None:
        why = why[len(name) + 2:] if why.startswith(f"{name}: ") else why
        result.failed.append((name, why))  # told at the end, with the plan's failures

    for ch in the_plan.changes:
        mark = len(result.touched)  # a change that fails touched nothing to remember
        try:
            if ch.action == "clone":
                dest = root / (".disabled" if ch.disabled else "") / ch.name
                gitops.ensure_checkout(comp, ctx, ch.url or "", dest, ch.commit, None, False,
                                       ch.name)
                if not ch.disabled:
                    result.undo.append(("aside", dest, None))
                    result.touched.append(dest)
                    gitops.install_deps(comp, ctx, dest, ch.name)
            elif ch.action == "checkout":
                assert ch.path is not None
                _checkout(comp, ctx, ch.path, ch.url or "", ch.commit or "", ch.name)
                if not ch.disabled:
                    result.touched.append(ch.path)
                    gitops.install_deps(comp, ctx, ch.path, ch.name)
            elif ch.action == "disable":
                assert ch.path is not None
                result.undo.append(("move", _move_to_disabled(ch.path), ch.path))
            elif ch.action == "enable":
                assert ch.path is not None
                dest = root / ch.name
                if dest.exists():
                    raise InstallError(f"{ch.name}: cannot enable, {dest} exists")
                ch.path.rename(dest)
                result.undo.append(("move", dest, ch.path))
                result.touched.append(dest)
                gitops.install_deps(comp, ctx, dest, ch.name)
            elif ch.action in ("cnr-install", "cnr-switch"):
                result.touched.append(root / (ch.cnr_id or ""))
                _cnr_install(comp, ctx, reg, ch.cnr_id or "", ch.version or "", ch.path,
                             undo=result.undo)
            elif ch.action == "file-disable":
                assert ch.path is not None
                ch.path.rename(ch.path.with_name(ch.path.name + ".disabled"))
                result.undo.append(("move", ch.path.with_name(ch.path.name + ".disabled"),
                                    ch.path))
            elif ch.action == "file-enable":
                assert ch.path is not None
                ch.path.rename(ch.path.with_name(ch.path.name[:-len(".disabled")]))
                result.undo.append(("move", ch.path.with_name(ch.path.name[:-len(".disabled")]),
                                    ch.path))
            elif ch.action == "pips":
                _install_pips(comp, ctx, ch.specs, result)
                continue
            else:  # pragma: no cover - plan() makes only the actions above
                raise InstallError(f"unknown change {ch.action}")
        except InstallError as exc:
            why = str(exc)
            last = _git_error(comp.log) if "git " in why else ""
            why += f": {last}" if last else ""
            failed(ch.name, why)
            del result.touched[mark:]
            continue
        except (OSError, AgentError) as exc:
            failed(ch.name, explain(exc))
            del result.touched[mark:]
            continue
        result.done.append(ch.text())
        say(ch.text())
    return result


def _git_error(log: Path) -> str:
    """git's own reason (its last `fatal:`/`error:` line in the log), for a failed step."""
    from agent import procs

    lines = [ln.strip() for ln in procs.tail(log, 20).splitlines()
             if ln.strip().startswith(("fatal:", "error:"))]
    return lines[-1][:300] if lines else ""


def _install_pips(comp: Component, ctx, specs: tuple[str, ...], result: Result) -> None:
    """All at once; when that fails, one by one, so each failing package is named."""
    from agent.kinds.base import InstallError

    try:
        ctx.pip_install(comp, list(specs), "snapshot: pips")
        result.done.append(f"pips: {len(specs)} package(s) installed")
        return
    except InstallError:
        pass
    good = 0
    for spec in specs:
        try:
            ctx.pip_install(comp, [spec], f"snapshot: pip {spec}")
            good += 1
        except InstallError as exc:
            result.failed.append((f"pip {spec}", str(exc)))
    if good:
        result.done.append(f"pips: {good} package(s) installed")


def restore(config: Config, snap: dict[str, Any], prune: bool = False, pips: bool = False,
            registry: str | None = None, progress=None) -> tuple[Plan, Result]:
    the_plan = plan(config, snap, prune=prune, pips=pips)
    return the_plan, execute(config, the_plan, registry, progress)


def restore_cli(config: Config, snap: dict[str, Any], source: Path, prune: bool = False,
                pips: bool = False, registry: str | None = None, progress=None,
                verify: bool = True) -> dict[str, Any]:
    """`snapshot restore` under the update lock, all of it (clones, registry installs, moves,
    packages and their undo, not only the commit moves): the running agent defers its own
    installs meanwhile, as for an update (agent/updates `exclusive`)."""
    from agent.updates import exclusive

    with exclusive(config, say=progress):
        return _restore_locked(config, snap, source, prune, pips, registry, progress, verify)


def _restore_locked(config: Config, snap: dict[str, Any], source: Path, prune: bool,
                    pips: bool, registry: str | None, progress, verify: bool) -> dict[str, Any]:
    """`snapshot restore`: a restore is an update like any other.

    1. the packages and ComfyUI's latest imports are recorded, and the commits the existing
       checkouts need are fetched (nothing visible changes);
    2. clones, enables, disables, registry nodes, files and packages are done one node at a
       time under the lock the agent's own node installs take; each keeps its undo;
    3. the commit moves of existing checkouts go through the update engine
       (agent/updates `apply`: restore point, journal, requirements, ComfyUI restarted and every
       node that imported before still imports, rolled back by itself on failure); without
       such moves, ComfyUI is restarted and checked the same way (`verify=False` skips it);
    4. when that check fails, everything of step 2 is undone too (new folders go to
       .disabled, moved ones back, packages to the recorded versions).
    A node that could not be restored is a failure of its own (named with its reason), not a
    reason to undo the others. One history record says what was done, failed, rolled back."""
    from agent.kinds.base import InstallError
    from agent.locks import Lock
    from agent.updates import engine
    from agent.updates import git as ugit
    from agent.updates import packages
    from agent.updates import verify as checks
    from agent.usernodes import remember

    say = progress or (lambda text: None)
    reason = f"snapshot restore {source}"
    the_plan = plan(config, snap, prune=prune, pips=pips)
    result = Result(failed=list(the_plan.failures))
    out: dict[str, Any] = {"plan": the_plan, "result": result, "rolled_back": False}
    if not the_plan.changes:
        _restore_history(config, source, result, out)
        return out
    checkouts = [c for c in the_plan.changes if c.action == "checkout"]
    others = Plan(changes=[c for c in the_plan.changes if c.action != "checkout"])
    before = packages.snapshot(config.comfyui.python)  # AgentError: before anything changed
    baseline = checks.baseline(config)
    # 1. the commits the checkouts need (objects only)
    comp = pseudo_component(config)
    comp.log.parent.mkdir(parents=True, exist_ok=True)
    from agent.kinds.base import Ctx

    ctx = Ctx(config)
    ready: list[Change] = []
    for ch in checkouts:
        assert ch.path is not None
        try:
            edits = ugit.dirty(ch.path)
            if edits:
                raise InstallError(f"has local changes ({', '.join(edits[:3])}): not checked "
                                   "out (commit or stash them first)")
            _fetch_commit(comp, ctx, ch.path, ch.url or "", ch.commit or "", ch.name)
            ready.append(ch)
        except (InstallError, AgentError) as exc:
            why = str(exc)
            last = _git_error(comp.log) if "git " in why else ""
            why = why[len(ch.name) + 2:] if why.startswith(f"{ch.name}: ") else why
            result.failed.append((ch.name, why + (f": {last}" if last else "")))
    # 2. everything else, node by node
    lock = Lock(config.state_dir / "locks" / "user_nodes.lock")
    if not lock.acquire(600):
        raise AgentError(f"another install holds the custom nodes' lock ({lock.path}); try "
                         "again when it is done")
    with lock:
        step = execute(config, others, registry, say)
        try:  # the agent's user-node pass must not take these for changes made by others
            remember(config, step.touched)
        except OSError:
            pass
    result.done += step.done
    result.failed += step.failed
    result.undo += step.undo
    moved = {before: now for action, now, before in step.undo if action == "move" and before}
    for c in ready:  # a node also enabled or disabled above: its checkout is where it went
        if c.path in moved:
            c.path = moved[c.path]
    # 3. the commit moves as an update, or the same check of ComfyUI
    problem = None
    if ready:
        owners = {p: c.name for c in config.components.values() for p in _component_paths(c)}
        changes = [engine.Change(name=c.name, path=c.path, from_commit=c.before,
                                 to_commit=c.commit or "", component=owners.get(
                                     c.path.absolute())) for c in ready if c.path]
        try:
            report = engine.apply(config, changes, reason, "cli", say=say,
                                  verify_comfyui=verify)
        except AgentError as exc:  # refused before it changed anything
            report = None
            problem = str(exc)
        if report is not None:
            out["report"] = report
            if report.ok:
                result.done += [c.text() for c in ready]
            else:
                problem = "; ".join(report.failed) or "the update failed"
                out["rolled_back"] = True
    elif verify and (step.done or step.undo):
        names = {p.name for _, p, _ in step.undo} | {c.name for c in others.changes}
        check = checks.restart_and_check(config, reason, names, False, say, before=baseline)
        out["verification"] = check.detail
        if not check.ok:
            problem = check.detail
    # 4. undo the rest when the check failed
    if problem:
        result.failed.append(("verification", problem))
        say(f"failed: {problem}; undoing the restore")
        undo_problems = undo(config, result.undo, say)
        try:
            done, pkg_problems = packages.restore(config, before, comp.log)
            say(f"packages: {done}")
            undo_problems += pkg_problems
        except AgentError as exc:
            undo_problems.append(str(exc))
        out["rolled_back"] = True
        out["undo_problems"] = undo_problems
        result.failed += [("undo", p) for p in undo_problems]
        result.done = []
    _restore_history(config, source, result, out)
    return out


def _component_paths(comp: Component) -> list[Path]:
    if comp.kind in ("git", "manager") and comp.spec.get("dest"):
        return [Path(comp.spec["dest"]).absolute()]
    if comp.kind == "nodes":
        return [(comp.spec["dest"] / n["name"]).absolute() for n in comp.spec["nodes"]]
    return []


def _fetch_commit(comp: Component, ctx, path: Path, url: str, commit: str, label: str) -> None:
    """Make commit present in the checkout (branches first, then the commit itself)."""
    from agent.kinds import gitops
    from agent.kinds.base import InstallError

    if gitops._has_commit(comp, ctx, path, commit):
        return
    fetch_url, auth, env = gitops.credentials(url)
    try:
        ctx.git(comp, auth + ["fetch", "--no-progress", "--tags", fetch_url,
                              "+refs/heads/*:refs/remotes/origin/*"],
                f"{label}: git fetch", cwd=path, env=env)
    except InstallError:
        pass
    if not gitops._has_commit(comp, ctx, path, commit):
        ctx.git(comp, auth + ["fetch", "--no-progress", fetch_url, commit],
                f"{label}: git fetch {commit[:12]}", cwd=path, env=env)


def undo(config: Config, steps: list[tuple[str, Path, Path | None]], say) -> list[str]:
    """Undo a restore's folder changes, newest first; what could not be undone."""
    from agent.usernodes import remember

    problems: list[str] = []
    touched: list[Path] = []
    for action, path, back in reversed(steps):
        try:
            if action == "aside":
                if path.exists():
                    where = _move_to_disabled(path)
                    say(f"{path.name}: moved to {where} (undone)")
                    touched.append(path)
            elif back is not None:
                if back.exists():
                    problems.append(f"{back} exists: {path} not moved back")
                    continue
                path.rename(back)
                say(f"{back.name}: back in {back.parent} (undone)")
                touched += [path, back]
        except OSError as exc:
            from agent.fserr import explain

            problems.append(f"{path}: {explain(exc)}")
    try:
        remember(config, touched)
    except OSError:
        pass
    return problems


def _restore_history(config: Config, source: Path, result: Result, out: dict) -> None:
    from agent import history

    detail = f"{len(result.done)} change(s) from {source}"
    if out.get("rolled_back"):
        detail += "; rolled back"
    if result.failed:
        detail += "; failed: " + ", ".join(n for n, _ in result.failed[:5]) + (
            f" (+{len(result.failed) - 5} more)" if len(result.failed) > 5 else "")
    warn = history.quietly(config, history.event(
        "restore", "custom_nodes",
        result="rolled back" if out.get("rolled_back") else "ok" if result.ok else "failed",
        detail=detail, snapshot=str(source), changes=result.done,
        failed=[{"name": n, "reason": r} for n, r in result.failed]))
    if warn:
        out["message"] = f"warning: {warn}"


# --------------------------------------------------------------------------- config: `snapshot:`
def config_nodes(path: Path, nodes: list[dict[str, Any]], seen: set[str]) -> list[dict[str, Any]]:
    """The `nodes` component's list with a snapshot's nodes added (`custom_nodes.snapshot`):
    each git node at its commit (`ref`), `enabled: false` when the snapshot has it disabled;
    each registry node at its version. A node written in `nodes:` wins over the snapshot's
    (same folder or same repository): the config can move one to another ref or disable it.
    ComfyUI-Manager itself is left to its component; file nodes and pips are not used."""
    snap = read(path)
    out = list(nodes)
    names = set(seen)
    listed = {norm_url(n["repo"]) for n in nodes if n.get("repo")}
    for url, info in snap["git_custom_nodes"].items():
        name = folder_for(url)
        if _is_manager(url) or name in names or norm_url(url) in listed:
            continue
        names.add(name)
        out.append({"repo": url, "name": name, "ref": info["hash"],
                    "enabled": not info["disabled"]})
    for node_id, version in snap["cnr_custom_nodes"].items():
        if _is_manager(node_id) or node_id in names:
            continue
        names.add(node_id)
        out.append({"repo": f"cnr:{node_id}", "name": node_id, "ref": None, "enabled": True,
                    "cnr": node_id, "version": version})
    return out


def registry_node_problem(dest: Path, node_id: str, version: str):
    """(State, reason) when dest is not registry node `node_id` at `version`, else None."""
    from agent.model import State

    if not dest.exists():
        return State.BROKEN, f"{node_id}: {dest} is missing"
    info = cnr_info(dest)
    if info is None:
        return State.BROKEN, f"{node_id}: {dest} is not a registry node (no .tracking or " \
                             "pyproject.toml)"
    if info[1] != version_key(version):
        return State.STALE, f"{node_id}: version {info[1]} installed, {version} wanted"
    return None


def install_registry_node(comp: Component, ctx, node_id: str, version: str, dest: Path) -> None:
    """Install registry node `node_id` at `version` into dest's folder (the `nodes` kind);
    what is there already goes to .disabled (never deleted). Raises InstallError."""
    from agent.kinds.base import InstallError

    if dest.name != node_id:
        raise InstallError(f"{node_id}: a registry node's folder is its id, not {dest.name}")
    _cnr_install(comp, ctx, registry_url(ctx.config), node_id, version,
                 dest if dest.exists() else None, dest.parent)
