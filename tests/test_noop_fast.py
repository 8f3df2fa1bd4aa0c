"""Issue 9: a no-op check that is fast and still true.

HEAD is read from the files git writes (loose refs, packed-refs, detached, worktrees), the
interpreter's listing is cached and follows real pip and uv changes, a no-op `status` starts no
process and imports nothing heavy, a no-op `install` probes each component once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import pyenv
from agent.kinds import gitops
from agent.model import State
from tests import kit
from tests.helpers import build_wheel, commit_files, git, make_repo


def rev_parse(path: Path) -> str:
    return git("rev-parse", "HEAD", cwd=path)


# ----------------------------------------------------------------------------- HEAD
def test_head_is_read_from_files_as_git_resolves_it(tmp_path):
    repo = tmp_path / "repo"
    make_repo(repo, {"a.txt": "1"})
    first = rev_parse(repo)
    second = commit_files(repo, {"a.txt": "2"})
    assert gitops.read_head(repo) == (second, "")  # a loose ref
    git("pack-refs", "--all", cwd=repo)  # refs/heads/main only in packed-refs now
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert gitops.read_head(repo) == (second, "")
    git("tag", "v1", first, cwd=repo)
    git("checkout", "-q", "--detach", "v1", cwd=repo)  # detached: HEAD holds the sha
    assert gitops.read_head(repo) == (first, "")
    git("checkout", "-q", "main", cwd=repo)
    # a worktree: its .git is a file; its HEAD is its own, branches live in the common dir
    git("worktree", "add", "-q", "-b", "side", str(tmp_path / "wt"), first, cwd=repo)
    assert (tmp_path / "wt" / ".git").is_file()
    side = commit_files(tmp_path / "wt", {"b.txt": "x"})
    assert gitops.read_head(tmp_path / "wt") == (side, "") and side == rev_parse(tmp_path / "wt")
    git("pack-refs", "--all", cwd=repo)  # the worktree's branch packed in the common dir
    assert gitops.read_head(tmp_path / "wt") == (side, "")
    # a `.git` file with a relative gitdir (a submodule's shape)
    moved = tmp_path / "other"
    make_repo(moved, {"c.txt": "1"})
    (moved / ".git").rename(tmp_path / "other.git")
    (moved / ".git").write_text("gitdir: ../other.git\n")
    assert gitops.read_head(moved) == (rev_parse(moved), "")


def test_a_bad_head_is_a_broken_reason_never_an_exception(tmp_path):
    repo = tmp_path / "repo"
    make_repo(repo, {"a.txt": "1"})
    head = repo / ".git" / "HEAD"
    cases = {
        "garbage\n": "HEAD is 'garbage', not a commit",
        "ref: refs/heads/nowhere\n": "HEAD is refs/heads/nowhere, which has no commit yet",
        "ref: ../../etc/passwd\n": "HEAD points to",
        "\x00\xff" * 3000: "not a commit",
    }
    for text, reason in cases.items():
        head.write_text(text, encoding="utf-8", errors="surrogateescape")
        state, why = gitops.checkout_problem(repo, None, None)
        assert state == State.BROKEN and f"{repo} is not a git checkout" in why and reason in why
        assert "\n" not in why
    head.unlink()
    assert gitops.checkout_problem(repo, None, None) == (
        State.BROKEN, f"{repo} is not a git checkout ({head} cannot be read)")
    (repo / ".git").rename(tmp_path / "gitdir")
    (repo / ".git").write_text("not a gitdir line")
    assert gitops.checkout_problem(repo, None, None) == (
        State.BROKEN, f"{repo} is not a git checkout")
    assert gitops.checkout_problem(tmp_path / "nothing", None, None) == (
        State.BROKEN, f"{tmp_path / 'nothing'} is missing")
    # a symbolic ref that points to itself
    other = tmp_path / "loop"
    make_repo(other, {"a.txt": "1"})
    (other / ".git" / "refs" / "heads" / "main").write_text("ref: refs/heads/main\n")
    assert "HEAD points to 'refs/heads/main'" in gitops.checkout_problem(other, None, None)[1]


# ----------------------------------------------------------------------------- listing cache
def _site_packages(python: Path) -> Path:
    return next((python.parent.parent / "lib").glob("python*/site-packages"))


def _settle(python: Path) -> None:
    """The venv's site-packages last changed a minute ago (as on a pod between two checks):
    the listing may be cached (a folder changed in the last 2 s never is)."""
    old = time.time() - 60
    os.utime(_site_packages(python), (old, old))


def _uv() -> str | None:
    found = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    return found if Path(found).exists() else None


@pytest.mark.slow
def test_listing_cache_follows_real_pip_and_uv_changes(tmp_path, wheels):
    uv = _uv()
    if uv is None:
        pytest.skip("no uv binary")
    from tests.conftest import make_venv

    python = make_venv(tmp_path / "venv")
    cache = tmp_path / "cache"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    uvpip = [uv, "pip"]
    offline = ["--no-index", "--find-links", str(wheels)]

    def run(*cmd: str) -> None:
        subprocess.run(list(cmd), check=True, capture_output=True, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, UV_CACHE_DIR=str(tmp_path / "uv-cache")))

    def listing(settle: bool = False) -> tuple[dict, int]:
        if settle:
            _settle(python)
        before = pyenv.spawned
        found = pyenv.inspect(python, cache=cache).dists
        return found, pyenv.spawned - before

    run(*pip, "install", "-q", *offline, "podtest-alpha==1.0")
    dists, spawned = listing(settle=True)
    assert dists.get("podtest-alpha") == "1.0" and spawned == 1
    assert listing() == (dists, 0)  # nothing changed: read from the cache, no process
    steps = [
        ((*uvpip, "install", "--python", str(python), *offline, "podtest-beta"),
         "podtest-beta", "1.0"),
        ((*pip, "install", "-q", *offline, "podtest-alpha==2.0"), "podtest-alpha", "2.0"),
        ((*uvpip, "uninstall", "--python", str(python), "podtest-alpha"), "podtest-alpha", None),
        ((*pip, "uninstall", "-y", "-q", "podtest-beta"), "podtest-beta", None),
        ((*uvpip, "install", "--python", str(python), *offline, "podtest-alpha==1.0"),
         "podtest-alpha", "1.0"),
    ]
    for cmd, name, version in steps:
        run(*cmd)
        dists, spawned = listing()
        assert dists.get(name) == version and spawned == 1, (cmd, dists.get(name), spawned)
        dists, spawned = listing(settle=True)  # cached again once settled ...
        assert dists.get(name) == version and spawned == 1
        assert listing() == (dists, 0)  # ... and used
    # a cache file that is not what the agent wrote is listed again, never believed
    (path,) = cache.glob("pyenv-*.json")
    data = json.loads(path.read_text())
    data["dists"]["podtest-ghost"] = 7
    path.write_text(json.dumps(data))
    dists, spawned = listing()
    assert "podtest-ghost" not in dists and spawned == 1
    # another PYTHONPATH is another sys.path: not the cached listing
    _settle(python)
    listing()
    extra = tmp_path / "extra"
    build_wheel(tmp_path / "w2", "podtest-extra", "3.0")
    run(*pip, "install", "-q", "--no-index", "--find-links", str(tmp_path / "w2"),
        "--target", str(extra), "podtest-extra")
    os.environ["PYTHONPATH"] = str(extra)
    try:
        dists, spawned = listing()
    finally:
        del os.environ["PYTHONPATH"]
    assert dists.get("podtest-extra") == "3.0" and spawned == 1


# ----------------------------------------------------------------------------- no-op commands
class _Ws:
    def __init__(self, root: Path, python: Path, wheels: Path, config_path: Path):
        self.root, self.python, self.wheels, self.config_path = root, python, wheels, config_path
        self.comfyui = root / "ComfyUI"

    def args(self) -> list[str]:
        return ["--workspace", str(self.root), "--config", str(self.config_path)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A workspace of the default shape (ComfyUI, its requirements, packages, two custom
    nodes, a git node with requirements), installed once for this module's tests; a test that
    changes it puts it back."""
    from tests.conftest import make_venv
    from tests.helpers import write_yaml

    base = tmp_path_factory.mktemp("noop")
    wheels = base / "wheels"
    for name in ("podtest-alpha", "podtest-beta", "podtest-gamma", "podtest-delta",
                 "podtest-nodea", "podtest-nodeb"):
        build_wheel(wheels, name, "1.0")
    up = base / "upstreams"
    urls = {name: make_repo(up / name, files) for name, files in {
        "ComfyUI": {"main.py": "", "requirements.txt": "podtest-alpha>=1.0\npodtest-beta\n"},
        "node-a": {"__init__.py": "", "requirements.txt": "podtest-nodea\n"},
        "node-b": {"__init__.py": "", "requirements.txt": "podtest-nodeb\n"},
        "ComfyUI-GGUF": {"__init__.py": "", "requirements.txt": "podtest-delta\n"}}.items()}
    root = base / "ws"
    python = make_venv(root / "venv")
    config = write_yaml(base / "config.yaml", {
        "installer": "pip", "installer_args": ["--no-index", "--find-links", str(wheels)],
        "comfyui": {"venv": None, "python": str(python)},
        "defaults": {"retries": 0, "timeout": 120},
        "components": {
            "comfyui_core": {"kind": "git", "repo": urls["ComfyUI"], "dest": "{comfyui}",
                             "required": True},
            "dependencies_main": {"kind": "pip", "requirements": ["{comfyui}/requirements.txt"],
                                  "depends_on": ["comfyui_core"], "required": True},
            "dependencies_additional": {"kind": "pip", "packages": ["podtest-gamma>=1.0"],
                                        "depends_on": ["dependencies_main"]},
            "custom_nodes": {"kind": "nodes", "nodes": [urls["node-a"], urls["node-b"]],
                             "depends_on": ["comfyui_core", "dependencies_main"]},
            "gguf_node": {"kind": "git", "repo": urls["ComfyUI-GGUF"],
                          "dest": "{comfyui}/custom_nodes/ComfyUI-GGUF",
                          "requirements": "auto", "depends_on": ["comfyui_core"]},
            "overall_installation": {"kind": "overall"}}})
    w = _Ws(root, python, wheels, config)
    kit.install(w)
    _settle(w.python)
    return w


def _collect(w):
    from agent import config as cfg
    from agent.status import collect

    return collect(cfg.load(w.config_path, w.root), gpu=False)


@pytest.mark.slow
def test_noop_status_starts_no_process_and_still_sees_changes(installed, monkeypatch):
    w = installed
    assert _collect(w)["verdict"] == "healthy"  # the listing cached (the venv is settled)

    def refuse(*args, **kwargs):
        raise AssertionError(f"a no-op status started a process: {args[0] if args else ''}")

    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", refuse)
        before = pyenv.spawned
        data = _collect(w)
        assert data["verdict"] == "healthy" and pyenv.spawned == before
    # ... and still sees a removed package, a moved HEAD, a changed requirement file
    node = w.comfyui / "custom_nodes" / "node-a"
    pip = [sys.executable, "-m", "pip", "--python", str(w.python)]
    subprocess.run([*pip, "uninstall", "-y", "-q", "podtest-nodea"], check=True)
    try:
        comp = _collect(w)["components"]["custom_nodes"]
        assert comp["state"] == "broken" and "podtest-nodea not installed" in comp["reason"]
    finally:
        subprocess.run([*pip, "install", "-q", "--no-index", "--find-links", str(w.wheels),
                        "podtest-nodea"], check=True)
    old = rev_parse(node)
    commit_files(node, {"extra.py": "x = 1\n"})
    try:
        comp = _collect(w)["components"]["custom_nodes"]
        assert comp["state"] == "stale" and f"HEAD moved from {old[:12]}" in comp["reason"]
    finally:
        git("reset", "-q", "--hard", old, cwd=node)
    req = node / "requirements.txt"
    text = req.read_text()
    req.write_text(text + "podtest-nodeb\n")
    try:
        comp = _collect(w)["components"]["custom_nodes"]
        assert comp["state"] == "stale" and "requirements.txt or install.py changed" in \
            comp["reason"]
    finally:
        req.write_text(text)
    assert _collect(w)["verdict"] == "healthy"
    _settle(w.python)


@pytest.mark.slow
def test_noop_install_probes_each_checkout_once(installed, monkeypatch):
    from agent import config as cfg
    from agent.execute import Executor

    w = installed
    conf = cfg.load(w.config_path, w.root)
    reads: list[Path] = []
    real = gitops.read_head
    monkeypatch.setattr(gitops, "read_head", lambda dest: reads.append(dest) or real(dest))
    report = Executor(conf, gpu=False).run()
    assert report.ok and not report.changed
    checkouts = [w.comfyui, w.comfyui / "custom_nodes" / "node-a",
                 w.comfyui / "custom_nodes" / "node-b",
                 w.comfyui / "custom_nodes" / "ComfyUI-GGUF"]
    assert sorted(map(str, reads)) == sorted(map(str, checkouts))  # once each, not twice


@pytest.mark.slow
def test_noop_commands_import_nothing_heavy(installed):
    """A no-op `status --json` and `install` in a fresh process: GitPython, loguru, the health
    checks (no report exists) and pydantic are never imported."""
    heavy = ["git", "loguru", "agent.health", "pydantic", "typer", "watchdog", "apscheduler"]
    for args in (["status", "--json"], ["install"]):
        code = (f"import atexit, sys\n"
                f"atexit.register(lambda: sys.stderr.write('LOADED ' + ' '.join("
                f"m for m in {heavy!r} if m in sys.modules) + '\\n'))\n"
                f"sys.argv = ['pod-agent', *{args + installed.args()!r}]\n"
                f"from agent.cli import main\nmain()\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        loaded = proc.stderr.split("LOADED", 1)[1].split()
        assert loaded == [], (args, loaded)


@pytest.mark.slow
def test_listing_cache_sees_a_user_site_that_appears(tmp_path, wheels, monkeypatch):
    """An interpreter outside a venv (an image's python) gets a user site on sys.path only once
    that folder exists: `pip install --user` creating it must not go unseen."""
    python = Path(sys.base_prefix) / "bin" / "python3"
    probe = subprocess.run([str(python), "-c", "import site; print(site.ENABLE_USER_SITE)"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        pytest.skip("the base interpreter has no user site")
    monkeypatch.setenv("PYTHONUSERBASE", str(tmp_path / "userbase"))
    cache = tmp_path / "cache"
    before = pyenv.spawned
    assert "podtest-gamma" not in pyenv.inspect(python, cache=cache).dists
    assert "podtest-gamma" not in pyenv.inspect(python, cache=cache).dists
    assert pyenv.spawned - before == 1  # cached (the base interpreter's folders are settled)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--user", "--no-index",
                    "--find-links", str(wheels), "podtest-gamma"], check=True,
                   capture_output=True, stdin=subprocess.DEVNULL)
    assert pyenv.inspect(python, cache=cache).dists.get("podtest-gamma") == "1.0"
