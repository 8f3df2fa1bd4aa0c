"""watchdog handlers: filter, hand over, return. Never recursive over big trees.

Watched, each non-recursively: the workspace root (to notice the marker folder or ComfyUI being
re-created), the marker folder, the ComfyUI folder (extra_model_paths.yaml), custom_nodes, every
node folder and every node's .git folder. The watch count depends on the number of nodes only,
never on files under models/, the venv, output/ or a node's subfolders.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from loguru import logger
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.polling import PollingObserver

from agent import markers
from agent.model import Config

IGNORED_DIRS = {"__pycache__", ".disabled", "node_modules", ".cache"}
NODE_FILES = {"requirements.txt", "install.py", "pyproject.toml"}
GIT_FILES = {"HEAD", "ORIG_HEAD"}


def node_signature(node: Path) -> tuple | None:
    """What ComfyUI would load from a node folder, cheaply: HEAD and the top-level files that
    matter (name, mtime, size). None when the folder is gone."""
    if not node.is_dir():
        return None
    files = []
    try:
        for entry in sorted(node.iterdir()):
            if entry.suffix == ".py" or entry.name in NODE_FILES:
                st = entry.stat()
                files.append((entry.name, st.st_mtime_ns, st.st_size))
    except OSError:
        return None
    from agent.kinds.gitops import head as git_head

    return (git_head(node), tuple(files))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class Events:
    """What the daemon hears from the watcher (each callback must return at once)."""

    def __init__(self, marker: Callable[[str, str, str], None],
                 node: Callable[[str, str], None],
                 restart: Callable[[str], None], refresh: Callable[[], None]):
        self.marker = marker      # (component name, event type, path)
        self.node = node          # (node folder name, why)
        self.restart = restart    # (why)
        self.refresh = refresh    # watched folders may have changed


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "Watcher"):
        self.w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self.w.classify(event)
        except Exception as exc:  # noqa: BLE001 - a handler never raises
            logger.warning(f"watch: ignored event {event!r}: {exc}")


class Watcher:
    def __init__(self, config: Config, events: Events, poll: float | None = None):
        self.config = config
        self.events = events
        self.poll = poll
        self.mode = "polling" if poll else "inotify"
        self._observer = None
        self._watches: dict[Path, tuple[object, tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self._handler = _Handler(self)
        self._stale: set[Path] = set()  # watched folders seen deleted: watch them anew
        self.restarts = 0

    # -------------------------------------------------------------- folders
    @property
    def custom_nodes(self) -> Path:
        return self.config.comfyui.dir / "custom_nodes"

    def wanted(self) -> set[Path]:
        cui = self.config.comfyui.dir
        out = {self.config.workspace, self.config.markers_dir, cui, self.custom_nodes}
        try:
            for node in self.custom_nodes.iterdir():
                if node.is_dir() and node.name not in IGNORED_DIRS and \
                        not node.name.startswith("."):
                    out.add(node)
                    if (node / ".git").is_dir():
                        out.add(node / ".git")
        except OSError:
            pass
        return {p for p in out if p.is_dir()}

    # -------------------------------------------------------------- lifecycle
    def _new_observer(self):
        if self.poll:
            return PollingObserver(timeout=self.poll)
        from watchdog.observers.inotify import InotifyObserver

        return InotifyObserver()

    def start(self) -> None:
        with self._lock:
            self._observer = self._new_observer()
            self._watches = {}
            self._observer.start()
        try:
            self.refresh()
        except OSError as exc:
            if self.poll:
                raise
            logger.warning(f"watch: inotify unavailable ({exc}); falling back to polling "
                           f"every 2 s (set agent.poll to choose the interval)")
            self.stop()
            self.poll, self.mode = 2.0, "polling"
            self.start()

    def refresh(self) -> None:
        """Watch what should be watched now; drop watches of folders that went away."""
        with self._lock:
            if self._observer is None:
                return
            wanted = {p: _identity(p) for p in self.wanted()}
            for path, (watch, ident) in list(self._watches.items()):
                # gone, or deleted and re-created (a new inode the old watch does not see)
                if wanted.get(path) != ident or path in self._stale:
                    del self._watches[path]
                    try:
                        self._observer.unschedule(watch)
                    except (KeyError, OSError):
                        pass
            self._stale.clear()
            for path in sorted(set(wanted) - set(self._watches)):
                if wanted[path] is None:
                    continue
                watch = self._observer.schedule(self._handler, str(path), recursive=False)
                self._watches[path] = (watch, wanted[path])

    def alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def restart(self) -> None:
        logger.warning("watch: the observer thread died; starting a new one")
        self.restarts += 1
        self.stop()
        self.start()

    def stop(self) -> None:
        with self._lock:
            observer, self._observer = self._observer, None
            self._watches = {}
        if observer is not None:
            observer.stop()
            if observer.is_alive():
                observer.join(10)

    def watch_count(self) -> int:
        return len(self._watches)

    # -------------------------------------------------------------- filtering
    def classify(self, event: FileSystemEvent) -> None:
        self._classify_path(event, Path(str(event.src_path)), event.event_type)
        if getattr(event, "dest_path", None):
            # the destination of a rename is a file that appeared
            self._classify_path(event, Path(str(event.dest_path)), "created")

    def _classify_path(self, event: FileSystemEvent, path: Path, kind: str) -> None:
        cfg = self.config
        parent = path.parent
        if event.is_directory and kind in ("deleted", "moved") and path in self._watches:
            self._stale.add(path)
            self.events.refresh()
        if kind in ("opened", "closed", "closed_no_write"):
            return
        if event.is_directory and path in (cfg.markers_dir, cfg.comfyui.dir, self.custom_nodes):
            self.events.refresh()
            if path == cfg.markers_dir and kind in ("deleted", "moved"):
                self.events.marker("*", kind, str(path))
            return
        if parent == cfg.markers_dir:
            if path.name.endswith(markers.SUFFIX) and not markers.is_own_event(path):
                self.events.marker(path.name[: -len(markers.SUFFIX)], kind, str(path))
            return
        if path == cfg.comfyui.dir / "extra_model_paths.yaml":
            self.events.restart("extra_model_paths.yaml changed")
            return
        if parent == self.custom_nodes:
            if path.name in IGNORED_DIRS or path.name.startswith("."):
                return
            if event.is_directory and kind in ("created", "deleted", "moved"):
                self.events.refresh()
                self.events.node(path.name, f"node folder {kind}")
            elif path.suffix == ".py":
                self.events.node(path.name, f"{path.name} {kind}")
            return
        if parent.parent == self.custom_nodes:
            if event.is_directory or path.name in IGNORED_DIRS:
                return
            if path.suffix == ".py" or path.name in NODE_FILES:
                self.events.node(parent.name, f"{path.name} {kind}")
            return
        if parent.name == ".git" and parent.parent.parent == self.custom_nodes:
            if path.name in GIT_FILES:
                self.events.node(parent.parent.name, "git HEAD moved")
