"""The watcher: what it watches, what it ignores, how it recovers. Real inotify, real files."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import threading

import pytest
from loguru import logger

from agent import config as cfgmod
from agent import markers
from agent import watch as watchmod
from agent.watch import Events, Watcher
from tests.helpers import wait_for, write_yaml


def inotify_watches() -> int:
    """inotify watches this process holds, from the kernel's own count."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    total += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def watch_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("watch-"))


def started_since(before: set[threading.Thread]) -> list[str]:
    return sorted(t.name for t in set(threading.enumerate()) - before)


class FakeLimits:
    """The real inotify calls, with the kernel's limits made small: after `allow` more watches
    inotify_add_watch fails with ENOSPC (max_user_watches); `init_errno` fails inotify_init1."""

    def __init__(self, allow=None, init_errno=None):
        self.real = watchmod._lib()
        self.allow, self.init_errno = allow, init_errno

    def inotify_init1(self, flags):
        if self.init_errno:
            ctypes.set_errno(self.init_errno)
            return -1
        return self.real.inotify_init1(flags)

    def inotify_add_watch(self, fd, path, mask):
        if self.allow is not None:
            if self.allow <= 0:
                ctypes.set_errno(errno.ENOSPC)
                return -1
            self.allow -= 1
        return self.real.inotify_add_watch(fd, path, mask)

    def inotify_rm_watch(self, fd, wd):
        return self.real.inotify_rm_watch(fd, wd)


@pytest.fixture
def warnings():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).strip()), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


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


def test_watch_count_depends_on_nodes_not_on_files_and_one_thread_reads_them_all(setup):
    ws, conf, rec, make = setup
    before = set(threading.enumerate())
    held = inotify_watches()
    w = make()
    # workspace, markers, ComfyUI, custom_nodes + (node, node/.git) x 30
    assert w.watch_count() == 4 + 60 and w.mode == "inotify"
    assert inotify_watches() - held == 64  # the kernel's count: one instance holds them all
    assert watch_threads() == ["watch-inotify"] == started_since(before)
    for sub in ("ComfyUI/models/checkpoints", "venv/lib/python3.11/site-packages/pkg",
                "ComfyUI/custom_nodes/node0/deep/er"):
        folder = ws / sub
        folder.mkdir(parents=True)
        for i in range(300):
            (folder / f"f{i}.bin").write_bytes(b"x")
    w.refresh()
    assert w.watch_count() == 4 + 60 and inotify_watches() - held == 64
    for i in range(30, 130):  # more nodes: more watches, still one thread
        (ws / "ComfyUI" / "custom_nodes" / f"node{i}").mkdir()
    w.refresh()
    assert w.watch_count() == 4 + 60 + 100 and inotify_watches() - held == 164
    assert started_since(before) == ["watch-inotify"]
    for i in range(30, 130):  # and the watches of removed nodes are given back
        (ws / "ComfyUI" / "custom_nodes" / f"node{i}").rmdir()
    wait_for(lambda: w.refresh() or inotify_watches() - held == 64, 5, what="watches dropped")
    assert w.watch_count() == 64
    w.stop()
    assert inotify_watches() == held and watch_threads() == []


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
    (conf.markers_dir / "a.done").write_text("t\n")
    os.rename(conf.markers_dir / "a.done", conf.markers_dir / "b.done")
    wait_for(lambda: ("a", "moved") in rec.markers and ("b", "created") in rec.markers, 5,
             what="a rename: the old name moved, the new one created")
    os.rename(conf.markers_dir / "b.done", ws.parent / "b.done")  # to an unwatched folder
    wait_for(lambda: ("b", "deleted") in rec.markers, 5, what="a marker moved away")


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
    # a node folder that becomes a git checkout: its .git is watched once it appears
    count = w.watch_count()
    (new / ".git").mkdir()
    wait_for(lambda: w.refresh() or w.watch_count() == count + 1, 5, what=".git watched")
    (new / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    wait_for(lambda: ("fresh", "git HEAD moved") in rec.nodes, 5, what="HEAD of the new checkout")
    # a re-created ComfyUI folder is watched anew (once the kernel said the old one is gone:
    # a new folder may get the old inode number, so only that event tells the two apart)
    before = rec.refreshes
    shutil.rmtree(ws / "ComfyUI")
    wait_for(lambda: conf.comfyui.dir in w._stale and rec.refreshes > before, 10,
             what="the deleted ComfyUI folder marked for a new watch")
    (ws / "ComfyUI" / "custom_nodes").mkdir(parents=True)
    wait_for(lambda: w.refresh() or w.watch_count() == 4, 10, what="re-created ComfyUI watched")
    (ws / "ComfyUI" / "extra_model_paths.yaml").write_text("a: b\n")
    wait_for(lambda: rec.restarts, 5, what="an event in the re-created ComfyUI folder")


def test_polling_mode_one_thread_for_every_folder(setup):
    ws, conf, rec, make = setup
    before = set(threading.enumerate())
    w = make(poll=0.2)
    assert w.mode == "polling" and w.watch_count() == 64 and w.alive()
    assert watch_threads() == ["watch-poll"] == started_since(before)
    (conf.markers_dir / "p.done").write_text("t\n")
    wait_for(lambda: ("p", "created") in rec.markers, 10, what="polled creation")
    (conf.markers_dir / "p.done").unlink()
    wait_for(lambda: ("p", "deleted") in rec.markers, 10, what="polled deletion")
    (ws / "ComfyUI" / "custom_nodes" / "node7" / "nodes.py").write_text("x = 1\n")
    wait_for(lambda: ("node7", "nodes.py created") in rec.nodes, 10, what="polled node change")


def test_no_inotify_instance_falls_back_to_polling_with_one_line(setup, monkeypatch, warnings):
    ws, conf, rec, make = setup
    monkeypatch.setattr(watchmod, "_libc", FakeLimits(init_errno=errno.EMFILE))
    monkeypatch.setattr(watchmod, "FALLBACK_POLL", 0.2)
    w = make()
    assert w.mode == "polling" and w.alive() and watch_threads() == ["watch-poll"]
    assert [line for line in warnings if line.startswith("watch:")] == [
        "watch: inotify unavailable (inotify instance limit reached (fs.inotify.max_user_"
        f"instances = {watchmod._sysctl('max_user_instances')}, or the process's open files)); "
        "polling every 0.2 s instead (set agent.poll to choose the interval)"]
    (conf.markers_dir / "p.done").write_text("t\n")
    wait_for(lambda: ("p", "created") in rec.markers, 10, what="polled creation")


def test_watch_limit_polls_the_rest_and_inotify_takes_them_back(setup, monkeypatch, warnings):
    ws, conf, rec, make = setup
    limits = FakeLimits(allow=10)
    monkeypatch.setattr(watchmod, "_libc", limits)
    monkeypatch.setattr(watchmod, "FALLBACK_POLL", 0.2)
    held = inotify_watches()
    w = make()
    assert w.watch_count() == 64 and w.polled_count() == 54 and w.mode == "inotify+polling"
    assert inotify_watches() - held == 10 and watch_threads() == ["watch-inotify", "watch-poll"]
    limit = f"fs.inotify.max_user_watches = {watchmod._sysctl('max_user_watches')}"
    assert [line for line in warnings if line.startswith("watch:")] == [
        f"watch: inotify watch limit reached ({limit}): 54 of 64 folders are polled every "
        "0.2 s instead (raise it, e.g. sysctl -w fs.inotify.max_user_watches=524288, for "
        "events in under a second)"]
    # sorted: node0, node1 and node10 got inotify watches, node29 is polled; both are heard
    for n in ("node1", "node29"):
        (ws / "ComfyUI" / "custom_nodes" / n / "nodes.py").write_text("x = 1\n")
        wait_for(lambda: (n, "nodes.py created") in rec.nodes, 10, what=f"{n} change")
    w.refresh()
    assert len([line for line in warnings if line.startswith("watch:")]) == 1  # said once
    limits.allow = None  # watches to spare again (raised, or freed elsewhere)
    shutil.rmtree(ws / "ComfyUI" / "custom_nodes" / "node5")
    wait_for(lambda: w.refresh() or w.polled_count() == 0, 5, what="every folder on inotify")
    assert w.mode == "inotify" and inotify_watches() - held == 62 == w.watch_count()
    assert warnings[-1] == "watch: all 62 folders are watched by inotify again"
    (ws / "ComfyUI" / "custom_nodes" / "node29" / "install.py").write_text("")
    wait_for(lambda: ("node29", "install.py created") in rec.nodes, 5, what="inotify event")


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
