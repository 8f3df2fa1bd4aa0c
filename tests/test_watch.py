"""The watcher: what it watches, what it ignores, how it recovers. Real inotify, real files."""

from __future__ import annotations

import shutil
import threading

import pytest

from agent import config as cfgmod
from agent import markers
from agent.watch import Events, Watcher
from tests.helpers import wait_for, write_yaml


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.markers: list[tuple[str, str]] = []
        self.nodes: list[tuple[str, str]] = []
        self.restarts: list[str] = []
        self.refreshes = 0

    def events(self) -> Events:
        def marker(name, kind, path):
            with self.lock:
                self.markers.append((name, kind))

        def node(name, why):
            with self.lock:
                self.nodes.append((name, why))

        def restart(why):
            with self.lock:
                self.restarts.append(why)

        def refresh():
            with self.lock:
                self.refreshes += 1

        return Events(marker, node, restart, refresh)


@pytest.fixture
def setup(tmp_path):
    ws = tmp_path / "ws"
    cn = ws / "ComfyUI" / "custom_nodes"
    for i in range(30):
        (cn / f"node{i}" / ".git").mkdir(parents=True)
    (ws / ".install_markers").mkdir(parents=True)
    conf_path = write_yaml(tmp_path / "c.yaml", {"comfyui": {"venv": None}, "components": {}})
    conf = cfgmod.load(conf_path, ws)
    rec = Recorder()
    watchers: list[Watcher] = []

    def make(poll=None) -> Watcher:
        w = Watcher(conf, rec.events(), poll=poll)
        watchers.append(w)
        w.start()
        return w

    yield ws, conf, rec, make
    for w in watchers:
        w.stop()


def test_watch_count_depends_on_nodes_not_on_files(setup):
    ws, conf, rec, make = setup
    w = make()
    # workspace, markers, ComfyUI, custom_nodes + (node, node/.git) x 30
    assert w.watch_count() == 4 + 60
    for sub in ("ComfyUI/models/checkpoints", "venv/lib/python3.11/site-packages/pkg",
                "ComfyUI/custom_nodes/node0/deep/er"):
        folder = ws / sub
        folder.mkdir(parents=True)
        for i in range(300):
            (folder / f"f{i}.bin").write_bytes(b"x")
    w.refresh()
    assert w.watch_count() == 4 + 60


def test_marker_deletion_reported_own_writes_ignored(setup):
    ws, conf, rec, make = setup
    make()
    markers.write(conf.markers_dir, "own", {"version": "1"})
    (conf.markers_dir / "theirs.done").write_text("2025-01-01 00:00:00\n")
    wait_for(lambda: ("theirs", "created") in rec.markers, 5, what="foreign marker event")
    (conf.markers_dir / "theirs.done").unlink()
    wait_for(lambda: ("theirs", "deleted") in rec.markers, 5, what="deletion event")
    assert not [m for m in rec.markers if m[0] == "own"]
    markers.path_for(conf.markers_dir, "own").unlink()
    wait_for(lambda: ("own", "deleted") in rec.markers, 5, what="user deleted our marker")


def test_node_changes_filtered(setup):
    ws, conf, rec, make = setup
    make()
    node = ws / "ComfyUI" / "custom_nodes" / "node3"
    (node / "__pycache__").mkdir()
    (node / "__pycache__" / "x.pyc").write_bytes(b"")
    (node / "notes.log").write_text("x")
    (node / ".git" / "index").write_text("x")
    (node / "nodes.py").write_text("x = 1\n")
    wait_for(lambda: ("node3", "nodes.py created") in rec.nodes or
             any(n == "node3" for n, _ in rec.nodes), 5, what="node event")
    assert all(n == "node3" and ("nodes.py" in why) for n, why in rec.nodes), rec.nodes
    (node / ".git" / "ORIG_HEAD").write_text("abc\n")
    wait_for(lambda: ("node3", "git HEAD moved") in rec.nodes, 5, what="git HEAD event")
    (ws / "ComfyUI" / "extra_model_paths.yaml").write_text("a: b\n")
    wait_for(lambda: rec.restarts, 5, what="extra_model_paths restart")


def test_new_node_folder_is_watched_and_recreated_marker_folder_watched_again(setup):
    ws, conf, rec, make = setup
    w = make()
    new = ws / "ComfyUI" / "custom_nodes" / "fresh"
    new.mkdir()
    wait_for(lambda: ("fresh", "node folder created") in rec.nodes, 5, what="new node event")
    w.refresh()  # the daemon does this when the watcher asks for it
    (new / "requirements.txt").write_text("x\n")
    wait_for(lambda: ("fresh", "requirements.txt created") in rec.nodes, 5,
             what="event inside the new node")
    before = rec.refreshes
    shutil.rmtree(conf.markers_dir)
    wait_for(lambda: conf.markers_dir in w._stale and rec.refreshes > before, 5,
             what="the deleted folder marked for a new watch")
    conf.markers_dir.mkdir()
    w.refresh()
    (conf.markers_dir / "x.done").write_text("t\n")
    (conf.markers_dir / "x.done").unlink()
    wait_for(lambda: ("x", "deleted") in rec.markers, 5, what="event in the re-created folder")


@pytest.mark.slow
def test_polling_mode_and_fallback_when_inotify_fails(setup, monkeypatch):
    ws, conf, rec, make = setup
    import watchdog.observers.inotify as ino

    class Broken(ino.InotifyObserver):
        def schedule(self, *a, **k):
            raise OSError(28, "inotify watch limit reached")

    monkeypatch.setattr(ino, "InotifyObserver", Broken)
    w = make()
    assert w.mode == "polling" and w.alive()
    (conf.markers_dir / "p.done").write_text("t\n")
    wait_for(lambda: ("p", "created") in rec.markers, 10, what="polled creation")
    (conf.markers_dir / "p.done").unlink()
    wait_for(lambda: ("p", "deleted") in rec.markers, 10, what="polled deletion")


def test_dead_observer_detected_and_restarted(setup):
    ws, conf, rec, make = setup
    w = make()
    w._observer.stop()
    w._observer.join(5)
    assert not w.alive()
    w.restart()
    assert w.alive() and w.restarts == 1
    (conf.markers_dir / "r.done").write_text("t\n")
    (conf.markers_dir / "r.done").unlink()
    wait_for(lambda: ("r", "deleted") in rec.markers, 5, what="event after restart")
