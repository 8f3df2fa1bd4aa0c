"""Updates, rollback, history (issue 10): agent/history.py, agent/update.py, agent/cli_update.py.

Real git upstreams that gain commits, a real venv with small local wheels, the fake ComfyUI.
"""

from __future__ import annotations

import json

import pytest

from agent import drift, history
from agent.config import load
from tests.kit import install


# ---------------------------------------------------------------------- history
def test_history_records_filters_and_stays_bounded(ws, monkeypatch):
    conf = load(ws.config_path, ws.root)
    assert history.read(conf) == []  # no file yet
    history.record(conf, "update", component="node-a", frm="aaa", to="bbb", result="ok",
                   actor="cli", id="u1")
    drift.append(conf, drift.record("between checks", drift.diff({"x": "1"}, {"x": "2"}), "",
                                    ["dependencies_main"]))
    history.record(conf, history.event("rollback", "", "bbb", "aaa", "ok",
                                       components=["node-a", "node-b"]))
    assert [r["kind"] for r in history.read(conf)] == ["update", "drift", "rollback"]
    assert [r["kind"] for r in history.read(conf, "node-a")] == ["update", "rollback"]
    assert [r["kind"] for r in history.read(conf, "dependencies_main")] == ["drift"]
    assert history.read(conf, limit=1)[0]["kind"] == "rollback"
    rec = history.read(conf, "node-a")[0]
    assert (rec["from"], rec["to"], rec["result"], rec["actor"]) == ("aaa", "bbb", "ok", "cli")
    assert "aaa -> bbb" in history.line(rec)
    # bounded: trimmed to whole lines, newest kept
    monkeypatch.setattr(history, "MAX_BYTES", 4096)
    for i in range(200):
        history.record(conf, "install", component=f"c{i}", to=str(i))
    lines = history.path(conf).read_text().splitlines()
    assert history.path(conf).stat().st_size <= 4096 + 400
    assert all(json.loads(x) for x in lines)
    assert history.read(conf, limit=1)[0]["component"] == "c199"


def test_install_and_repair_go_to_history(ws):
    install(ws)
    conf = load(ws.config_path, ws.root)
    recs = history.read(conf, kind="install")
    names = {r["component"] for r in recs}
    assert {"comfyui_core", "dependencies_main", "custom_nodes", "gguf_node"} <= names
    assert all(r["actor"] == "cli" and r["result"] == "ok" for r in recs)
    core = next(r for r in recs if r["component"] == "comfyui_core")
    assert core["from"] == "-" and core["to"].startswith("git ")
    # a component broken on disk is repaired, and said so
    (ws.comfyui / "custom_nodes" / "ComfyUI-GGUF" / ".git").rename(ws.root / "gguf-git-aside")
    install(ws)
    rep = history.read(conf, "gguf_node", kind="repair")
    assert rep and rep[-1]["result"] == "ok", history.read(conf)
