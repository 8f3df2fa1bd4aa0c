"""ComfyUI-Manager snapshots: the format read and written, restores made real.

Upstreams are local git repositories with fixed authors and dates, so their commits are the
same on every machine: the hand-written fixtures in tests/fixtures/ (the Manager's JSON and YAML
formats) name them, and `https://github.com/podtest/<repo>` is mapped to the local folder with
git's `url.<base>.insteadOf` (GIT_CONFIG_COUNT in the environment). Registry nodes come from a
local fake of the Comfy Registry API (GET /nodes/<id>/install?version=V -> downloadUrl of a zip).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FIXED = {"GIT_AUTHOR_NAME": "podtest", "GIT_AUTHOR_EMAIL": "podtest@example.invalid",
         "GIT_COMMITTER_NAME": "podtest", "GIT_COMMITTER_EMAIL": "podtest@example.invalid",
         "GIT_AUTHOR_DATE": "2025-01-01T00:00:00+0000",
         "GIT_COMMITTER_DATE": "2025-01-01T00:00:00+0000"}
# name -> the files of each commit, oldest first
UPSTREAMS = {
    "ComfyUI-NodeA": [{"__init__.py": "VERSION = 1\n", "requirements.txt": "podtest-nodea\n"},
                      {"__init__.py": "VERSION = 2\n"}],
    "ComfyUI-NodeB": [{"__init__.py": "B = 1\n"}, {"__init__.py": "B = 2\n"}],
    "ComfyUI-NodeC": [{"__init__.py": "C = 1\n", "requirements.txt": "podtest-nodeb\n"}],
}


def _git(*args: str, cwd: Path | None = None) -> str:
    env = dict(os.environ, **FIXED)
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL).stdout.strip()


def det_repo(path: Path, versions: list[dict[str, str]]) -> list[str]:
    """A repository whose commits are the same everywhere (fixed author, committer, dates)."""
    path.mkdir(parents=True, exist_ok=True)
    _git("init", "-q", "-b", "main", str(path))
    commits = []
    for i, files in enumerate(versions):
        for rel, text in files.items():
            (path / rel).write_text(text)
        _git("add", "-A", cwd=path)
        _git("-c", "commit.gpgsign=false", "commit", "-q", "-m", f"v{i + 1}", cwd=path)
        commits.append(_git("rev-parse", "HEAD", cwd=path))
    return commits


from agent import snapshot as snapmod  # noqa: E402
from agent.config import load  # noqa: E402
from tests.helpers import git, run_cli  # noqa: E402

A1, A2 = "29ce3f84c7b11865e8cb88cf313435ec12c70d66", "57ea896f3621f1ef2d780eb8c5dd04a0eb19f5d4"
B1, B2 = "62698da511f242b43c217e3c139a9b81d2532fb1", "a3f483dfc36423d11a322be12a140e5a0ff039d4"
C1 = "d243a883e5553f4ea0c67a8723173c94c63750fa"
GH = "https://github.com/podtest/"


# ------------------------------------------------------------------ a fake Comfy Registry
def _cnr_zip(node_id: str, version: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pyproject.toml", f'[project]\nname = "{node_id}"\nversion = "{version}"\n')
        zf.writestr("__init__.py", f"CNR = {version!r}\n")
        zf.writestr("requirements.txt", "podtest-nodec\n")
        zf.writestr("web/x.js", "// js\n")
    return buf.getvalue()


class _Registry(BaseHTTPRequestHandler):
    packs: dict[tuple[str, str], bytes] = {}
    asked: list[str] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        parts = urlsplit(self.path)
        self.asked.append(self.path)
        segs = parts.path.strip("/").split("/")
        if len(segs) == 3 and segs[0] == "nodes" and segs[2] == "install":
            version = parse_qs(parts.query).get("version", [""])[0]
            if (segs[1], version) not in self.packs:
                return self._send(404, b'{"message": "not found"}', "application/json")
            host = self.headers["Host"]
            body = {"id": segs[1], "version": version,
                    "downloadUrl": f"http://{host}/zips/{segs[1]}-{version}.zip"}
            return self._send(200, json.dumps(body).encode(), "application/json")
        if len(segs) == 2 and segs[0] == "zips":
            for (nid, ver), data in self.packs.items():
                if segs[1] == f"{nid}-{ver}.zip":
                    return self._send(200, data, "application/zip")
        self._send(404, b"", "text/plain")

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def registry():
    handler = type("Reg", (_Registry,), {"packs": {("podtest-cnr-node", "1.0.2"):
                                                   _cnr_zip("podtest-cnr-node", "1.0.2")},
                                         "asked": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# ------------------------------------------------------------------ workspaces
@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    root = tmp_path_factory.mktemp("podtest-upstreams")
    commits = {name: det_repo(root / name, versions) for name, versions in UPSTREAMS.items()}
    for name in UPSTREAMS:  # a URL written with .git reaches the same repository
        (root / f"{name}.git").symlink_to(root / name)
    return root, commits


@pytest.fixture
def gh(upstreams, monkeypatch):
    """https://github.com/podtest/X is the local upstream X, for git in this process and the
    CLI's (the same environment)."""
    root, commits = upstreams
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", f"url.{root.as_uri()}/.insteadOf")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", GH)
    return commits


def _nodes(ws) -> Path:
    return ws.comfyui / "custom_nodes"


def _head(path: Path) -> str:
    return git("rev-parse", "HEAD", cwd=path)


def test_deterministic_upstreams_match_the_fixtures(gh):
    assert gh == {"ComfyUI-NodeA": [A1, A2], "ComfyUI-NodeB": [B1, B2], "ComfyUI-NodeC": [C1]}


def test_fixtures_parse_the_same_in_json_and_yaml():
    js = snapmod.read(FIXTURES / "manager_snapshot.json")
    ym = snapmod.read(FIXTURES / "manager_snapshot.yaml")
    assert js["git_custom_nodes"][GH + "ComfyUI-NodeB.git"] == {"hash": B2, "disabled": True}
    assert js["cnr_custom_nodes"] == {"podtest-cnr-node": "1.0.2", "podtest-cnr-absent": "9.9.9"}
    assert js["file_custom_nodes"] == [{"filename": "podtest_single.py", "disabled": True}]
    assert ym["comfyui"] is None and ym["pips"] == {"podtest-alpha==2.0": ""}
    assert ym["git_custom_nodes"][GH + "ComfyUI-NodeA"] == {"hash": A2, "disabled": False}
    assert snapmod.folder_for(GH + "ComfyUI-NodeB.git") == "ComfyUI-NodeB"


@pytest.mark.parametrize("text, expected", [
    ('{"git_custom_nodes": {"https://x/y": {"hash": "zz", "disabled": false}}}',
     "git_custom_nodes['https://x/y']: 'hash' must be a commit id, got 'zz'"),
    ('{"git_custom_nodes": {"https://x/y": {"hash": "abcdef1", "disabled": "no"}}}',
     "'disabled' must be true or false"),
    ('{"cnr_custom_nodes": {"../evil": "1.0"}}', "a registry node id is letters"),
    ('{"file_custom_nodes": [{"filename": "../x.py"}]}', "must be a plain file name"),
    ('{"models": []}', "not a ComfyUI-Manager snapshot"),
    ('{"git_custom_nodes": ', "not valid JSON"),
    ("[1, 2]", "a snapshot is a mapping"),
])
def test_a_bad_snapshot_is_one_line_naming_the_file(tmp_path, text, expected):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(snapmod.SnapshotError) as info:
        snapmod.read(path)
    msg = str(info.value)
    assert expected in msg and str(path) in msg and "\n" not in msg, msg


@pytest.mark.slow
def test_json_fixture_restore_names_what_failed_and_restores_the_rest(ws, gh, registry):
    url, reg = registry
    nodes = _nodes(ws)
    nodes.mkdir(parents=True)
    git("clone", "-q", GH + "ComfyUI-NodeA", str(nodes / "ComfyUI-NodeA"))  # at A2: goes to A1
    git("clone", "-q", GH + "ComfyUI-NodeB", str(nodes / "ComfyUI-NodeB"))  # B2, disabled
    git("checkout", "-q", "--detach", B1, cwd=nodes / "ComfyUI-NodeB")
    (nodes / "podtest_single.py").write_text("# a single-file node\n")
    (nodes / "Unlisted").mkdir()  # not in the snapshot, no --prune: left alone
    proc = run_cli("snapshot", "restore", str(FIXTURES / "manager_snapshot.json"),
                   "--registry", url, "--no-verify", *ws.args())
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    failed = [ln for ln in proc.stderr.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 2, proc.stderr
    assert any("ComfyUI-Gone" in ln and "git clone failed" in ln and "fatal:" in ln
               for ln in failed), failed
    assert any("podtest-cnr-absent@9.9.9" in ln and "404" in ln for ln in failed), failed
    # the others are restored
    assert _head(nodes / "ComfyUI-NodeA") == A1
    assert _head(nodes / ".disabled" / "ComfyUI-NodeB") == B2
    assert not (nodes / "ComfyUI-NodeB").exists() and not (nodes / "ComfyUI-Gone").exists()
    cnr = nodes / "podtest-cnr-node"
    assert snapmod.cnr_info(cnr) == ("podtest-cnr-node", "1.0.2")
    assert "web/x.js" in (cnr / ".tracking").read_text().splitlines()
    assert (nodes / "podtest_single.py.disabled").is_file()
    assert (nodes / "Unlisted").is_dir()
    assert not (nodes / "ComfyUI-Manager").exists()  # left to the comfyui_manager component
    assert "note: ComfyUI-Manager: left to the comfyui_manager component" in proc.stdout
    assert not [p for p in nodes.iterdir() if ".partial-" in p.name]
    from tests.helpers import installed_dists
    assert {"podtest-nodea", "podtest-nodec"} <= installed_dists(ws.python)
    assert "/nodes/podtest-cnr-node/install?version=1.0.2" in reg.asked
    # history says what was done and what failed
    from agent import history
    rec = history.read(load(ws.config_path, ws.root), kind="restore")[-1]
    assert rec["result"] == "failed" and {f["name"] for f in rec["failed"]} == {
        "ComfyUI-Gone", "podtest-cnr-absent@9.9.9"}
    # again, as a dry run: only what failed is left to do
    again = run_cli("snapshot", "restore", str(FIXTURES / "manager_snapshot.json"),
                    "--registry", url, "--dry-run", *ws.args())
    assert again.returncode == 0 and "would clone ComfyUI-Gone" in again.stdout
    assert "2 change(s), 4 already as in the snapshot" in again.stdout, again.stdout


@pytest.mark.slow
def test_yaml_fixture_restore_with_prune_and_pips(ws, gh, registry):
    url, _ = registry
    nodes = _nodes(ws)
    nodes.mkdir(parents=True)
    (nodes / ".disabled").mkdir()
    git("clone", "-q", GH + "ComfyUI-NodeC", str(nodes / ".disabled" / "ComfyUI-NodeC"))
    git("clone", "-q", GH + "ComfyUI-NodeB", str(nodes / "ComfyUI-NodeB"))  # unlisted
    proc = run_cli("snapshot", "restore", str(FIXTURES / "manager_snapshot.yaml"), "--prune",
                   "--pips", "--registry", url, "--no-verify", *ws.args())
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert _head(nodes / "ComfyUI-NodeA") == A2
    assert _head(nodes / "ComfyUI-NodeC") == C1  # enabled again
    assert not (nodes / ".disabled" / "ComfyUI-NodeC").exists()
    assert (nodes / ".disabled" / "ComfyUI-NodeB" / ".git").is_dir()  # pruned: disabled, kept
    assert not (nodes / "ComfyUI-NodeB").exists()
    assert snapmod.cnr_info(nodes / "podtest-cnr-node") == ("podtest-cnr-node", "1.0.2")
    out = subprocess.run([str(ws.python), "-m", "pip", "show", "podtest-alpha"],
                         capture_output=True, text=True).stdout
    assert "Version: 2.0" in out


@pytest.mark.slow
def test_save_then_restore_on_an_empty_workspace_gives_the_same_nodes(ws, gh, registry,
                                                                      tmp_path):
    url, _ = registry
    git("clone", "-q", ws.urls["comfyui"], str(ws.comfyui))
    nodes = _nodes(ws)
    nodes.mkdir()
    git("clone", "-q", GH + "ComfyUI-NodeA", str(nodes / "ComfyUI-NodeA"))
    git("checkout", "-q", "--detach", A1, cwd=nodes / "ComfyUI-NodeA")
    (nodes / ".disabled").mkdir()
    git("clone", "-q", GH + "ComfyUI-NodeB.git", str(nodes / ".disabled" / "ComfyUI-NodeB"))
    git("clone", "-q", GH + "ComfyUI-NodeC", str(nodes / "ComfyUI-NodeC"))
    cnr = nodes / "podtest-cnr-node"  # as the Manager leaves a registry node
    with zipfile.ZipFile(io.BytesIO(_cnr_zip("podtest-cnr-node", "1.0.2"))) as zf:
        zf.extractall(cnr)
        (cnr / ".tracking").write_text("\n".join(zf.namelist()))

    saved = run_cli("snapshot", "save", *ws.args())
    assert saved.returncode == 0, saved.stderr
    path = Path(saved.stdout.split("snapshot written: ")[1].split(" (")[0])
    assert path.parent == ws.comfyui / "user" / "default" / "ComfyUI-Manager" / "snapshots"
    assert path.name.endswith("_snapshot.json")
    snap = json.loads(path.read_text())
    assert snap["comfyui"] == _head(ws.comfyui)
    assert snap["git_custom_nodes"] == {
        GH + "ComfyUI-NodeA": {"hash": A1, "disabled": False},
        GH + "ComfyUI-NodeB.git": {"hash": B2, "disabled": True},
        GH + "ComfyUI-NodeC": {"hash": C1, "disabled": False}}
    assert snap["cnr_custom_nodes"] == {"podtest-cnr-node": "1.0.2"}
    assert any(k.startswith("podtest-alpha") or k.startswith("pytest") for k in snap["pips"])
    yaml_path = tmp_path / "same.yaml"
    assert run_cli("snapshot", "save", str(yaml_path), *ws.args()).returncode == 0
    assert snapmod.read(yaml_path)["git_custom_nodes"] == snap["git_custom_nodes"]

    empty = tmp_path / "ws2"
    empty.mkdir()
    args = ["--workspace", str(empty), "--config", str(ws.config_path)]
    proc = run_cli("snapshot", "restore", str(path), "--registry", url, "--no-verify", *args)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    again, _ = snapmod.current(load(ws.config_path, empty), pips=False)
    assert again["git_custom_nodes"] == snap["git_custom_nodes"]
    assert again["cnr_custom_nodes"] == snap["cnr_custom_nodes"]
    assert (empty / "ComfyUI" / "custom_nodes" / ".disabled" / "ComfyUI-NodeB").is_dir()


@pytest.mark.slow
def test_config_snapshot_is_a_source_of_the_custom_node_list(ws, gh, registry, monkeypatch):
    """custom_nodes.snapshot: the snapshot's nodes join the list; `nodes:` wins for the same
    repository (NodeA at A1, not the snapshot's A2); registry nodes come from the registry."""
    from tests.kit import install, status

    url, _ = registry
    monkeypatch.setenv("POD_AGENT_REGISTRY_URL", url)
    comps = ws.config["components"]
    comp = comps["custom_nodes"]
    comp.update(nodes=[{"repo": GH + "ComfyUI-NodeA", "ref": A1}], depends_on=["comfyui_core"],
                snapshot=str(FIXTURES / "manager_snapshot.yaml"))
    ws.config["components"] = {"comfyui_core": comps["comfyui_core"], "custom_nodes": comp}
    ws.save()
    install(ws, "custom_nodes")
    nodes = _nodes(ws)
    assert _head(nodes / "ComfyUI-NodeA") == A1 and _head(nodes / "ComfyUI-NodeC") == C1
    assert snapmod.cnr_info(nodes / "podtest-cnr-node") == ("podtest-cnr-node", "1.0.2")
    code, st = status(ws)
    assert st["components"]["custom_nodes"]["state"] == "installed", st["components"]
    assert st["components"]["custom_nodes"]["version"] == "3 nodes"
    (nodes / "podtest-cnr-node" / ".tracking").unlink()  # no longer the registry's node
    code, st = status(ws)
    assert "podtest-cnr-node" in st["components"]["custom_nodes"]["reason"]

    comp["snapshot"] = "no-such-snapshot.json"  # relative: to the workspace
    ws.save()
    proc = run_cli("status", *ws.args())
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(ws.root / "no-such-snapshot.json") in proc.stderr and "not found" in proc.stderr


@pytest.mark.slow
def test_a_restore_that_breaks_an_import_is_undone(ws, gh, registry):
    """A restore is an update: ComfyUI (the fake, importing its custom nodes) is started to
    check it; a node that no longer imports undoes the whole restore: the checkout back, the
    new clone moved to .disabled, the packages it brought removed."""
    import socket

    from tests.helpers import commit_files, installed_dists, make_repo
    from tests.kit import install

    fake = Path(__file__).parent / "fake_comfyui" / "main.py"
    commit_files(ws.upstreams / "ComfyUI", {"main.py": fake.read_text()}, "fake server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws.config["comfyui"].update({"args": ["--listen", "127.0.0.1", "--port", str(port)],
                                 "port": port, "env": {"FAKE_COMFY_LOAD_NODES": "1"}})
    ws.config["components"] = {"comfyui_core": ws.config["components"]["comfyui_core"]}
    ws.save()
    install(ws)
    up = ws.upstreams / "Breaker"
    make_repo(up, {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n"})
    good = git("rev-parse", "HEAD", cwd=up)
    bad = commit_files(up, {"__init__.py": "raise ImportError('broken on purpose')\n"})
    nodes = _nodes(ws)
    git("clone", "-q", up.as_uri(), str(nodes / "Breaker"))
    git("checkout", "-q", "--detach", good, cwd=nodes / "Breaker")
    snap = ws.root / "restore.json"
    snapmod.dump({"comfyui": None, "file_custom_nodes": [], "cnr_custom_nodes": {}, "pips": {},
                  "git_custom_nodes": {up.as_uri(): {"hash": bad, "disabled": False},
                                       GH + "ComfyUI-NodeC": {"hash": C1, "disabled": False}}},
                 snap)
    assert "podtest-nodeb" not in installed_dists(ws.python)
    proc = run_cli("snapshot", "restore", str(snap), "--registry", registry[0], *ws.args())
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "broken on purpose" in proc.stdout + proc.stderr
    assert "rolled back" in proc.stdout
    assert _head(nodes / "Breaker") == good
    assert not (nodes / "ComfyUI-NodeC").exists()
    assert _head(nodes / ".disabled" / "ComfyUI-NodeC") == C1  # set aside, not deleted
    assert "podtest-nodeb" not in installed_dists(ws.python)
    from agent import history
    rec = history.read(load(ws.config_path, ws.root), kind="restore")[-1]
    assert rec["result"] == "rolled back", rec
