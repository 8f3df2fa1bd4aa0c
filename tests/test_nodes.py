"""The `nodes` kind: per-node state, so one added node installs only that node; disabled nodes are
moved aside, never deleted."""

from __future__ import annotations

import pytest

import shutil

from tests.helpers import commit_files, git, installed_dists, make_repo
from tests.kit import install, marker_lines, status, use


def _count(log: str, header: str) -> int:
    return sum(1 for line in log.splitlines() if line.startswith("=== ") and header in line)


@pytest.mark.slow
def test_nodes_add_one_disable_one_repair_one(ws):
    comps = ws.config["components"]
    nodes = {"kind": "nodes", "nodes": [ws.urls["node_a"], ws.urls["node_b"]],
             "depends_on": ["comfyui_core"]}
    use(ws, {"comfyui_core": comps["comfyui_core"], "custom_nodes": nodes})
    install(ws)
    cn = ws.comfyui / "custom_nodes"
    log_path = ws.root / "logs" / "install" / "custom_nodes.log"
    head_a = git("rev-parse", "HEAD", cwd=cn / "node-a")
    head_b = git("rev-parse", "HEAD", cwd=cn / "node-b")
    line_a = marker_lines(ws.marker("custom_nodes"))[1]["node.node-a"]
    assert line_a.startswith(head_a)
    assert {"podtest-nodea", "podtest-nodeb"} <= installed_dists(ws.python)
    log = log_path.read_text()
    assert _count(log, "node-a: requirements") == 1 and _count(log, "node-b: requirements") == 1

    # Upstream of node-a moves on; a third node is added to the list.
    commit_files(ws.upstreams / "node-a", {"new.py": "x = 1\n"})
    url_c = make_repo(ws.upstreams / "node-c", {"__init__.py": "",
                                                "requirements.txt": "podtest-nodec\n"})
    nodes["nodes"] = [ws.urls["node_a"], ws.urls["node_b"], url_c]
    use(ws, {"comfyui_core": comps["comfyui_core"], "custom_nodes": nodes})
    code, data = status(ws)
    assert code == 1
    assert data["components"]["custom_nodes"]["state"] == "stale"
    assert "nodes" in data["components"]["custom_nodes"]["reason"]

    proc = install(ws)
    assert "custom_nodes: reinstalling (stale" in proc.stdout
    log = log_path.read_text()
    assert _count(log, "node-c: git clone") == 1 and _count(log, "node-c: requirements") == 1
    for other in ("node-a", "node-b"):  # not cloned, pulled or pip-installed again
        assert _count(log, f"{other}: git") == 1, other
        assert _count(log, f"{other}: requirements") == 1, other
    assert git("rev-parse", "HEAD", cwd=cn / "node-a") == head_a
    assert git("rev-parse", "HEAD", cwd=cn / "node-b") == head_b
    assert not (cn / "node-a" / "new.py").exists()
    assert marker_lines(ws.marker("custom_nodes"))[1]["node.node-a"] == line_a
    assert "podtest-nodec" in installed_dists(ws.python)
    assert "Nothing to do" in install(ws).stdout

    # node-b is disabled: moved to custom_nodes/.disabled/, not deleted, nothing installed.
    (cn / "node-b" / "user-edit.txt").write_text("keep me\n")
    nodes["nodes"] = [ws.urls["node_a"], {"repo": ws.urls["node_b"], "enabled": False}, url_c]
    use(ws, {"comfyui_core": comps["comfyui_core"], "custom_nodes": nodes})
    before = log_path.read_text()
    install(ws)
    assert not (cn / "node-b").exists()
    assert (cn / ".disabled" / "node-b" / "user-edit.txt").read_text() == "keep me\n"
    assert (cn / ".disabled" / "node-b" / ".git").is_dir()
    after = log_path.read_text()
    assert _count(after, "requirements") == _count(before, "requirements")
    assert "node.node-b" not in marker_lines(ws.marker("custom_nodes"))[1]
    code, data = status(ws)
    assert (code, data["verdict"]) == (0, "healthy")

    # node-a's folder is deleted by hand: broken, and only node-a is cloned again.
    shutil.rmtree(cn / "node-a")
    code, data = status(ws)
    reason = data["components"]["custom_nodes"]["reason"]
    assert data["components"]["custom_nodes"]["state"] == "broken"
    assert reason.startswith("marker present but broken: node-a:") and "missing" in reason
    install(ws)
    log = log_path.read_text()
    assert _count(log, "node-a: git clone") == 2
    assert _count(log, "node-c: git clone") == 1
    assert (cn / "node-a" / "new.py").exists()  # a fresh clone gets upstream's HEAD
    code, data = status(ws)
    assert (code, data["verdict"]) == (0, "healthy")
