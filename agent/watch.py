"""The watcher: filter, hand over, return. Never recursive over big trees.

Watched, each non-recursively: the workspace root (to notice the marker folder or ComfyUI being
re-created), the marker folder, the ComfyUI folder (extra_model_paths.yaml), custom_nodes, every
node folder and every node's .git folder. The watch count depends on the number of nodes only,
never on files under models/, the venv, output/ or a node's subfolders.

Threads do not depend on the number of nodes: every folder is a watch on ONE inotify instance,
read by ONE thread (`watch-inotify`, blocked in poll(2) while nothing happens). Folders inotify
cannot take (the watch limit, fs.inotify.max_user_watches, reached) and every folder in polling
mode (`--poll`, network volumes; or no inotify instance to be had) are polled by ONE thread
(`watch-poll`) with watchdog's DirectorySnapshot diffs, the same comparison watchdog's polling
observer makes.

Why not watchdog's observers: its inotify observer runs one emitter thread per watched folder
(1,018 threads at 500 nodes), its polling observer likewise; and its inotify layer's classes
changed shape between the releases we accept (`Inotify`/`InotifyBuffer`, one instance per
folder, before 7; `InotifyFD` after), so the reader here is ~100 lines over ctypes and os that
depend on the kernel's interface only. The events handed to `classify` keep watchdog's names
(created, deleted, modified, moved with dest_path) and it stays the polling layer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import threading
import time
from pathlib import Path
from typing import Callable

from loguru import logger

from agent import markers
from agent.model import Config

IGNORED_DIRS = {"__pycache__", ".disabled", "node_modules", ".cache"}
NODE_FILES = {"requirements.txt", "install.py", "pyproject.toml"}
GIT_FILES = {"HEAD", "ORIG_HEAD"}
FALLBACK_POLL = 2.0  # seconds between polls of what inotify cannot watch
FULL_RESCAN = 60.0  # a refresh re-lists every node at least this often (else only on a change)


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


# ------------------------------------------------------------------ inotify over ctypes
IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF = 0x100, 0x200, 0x400
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_ONLYDIR, IN_EXCL_UNLINK = 0x01000000, 0x04000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
# No IN_OPEN / IN_ACCESS / IN_CLOSE_*: reading a node's files (ours, git's, ComfyUI's) wakes nobody
MASK = (IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        | IN_DELETE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK)
_HEADER = struct.Struct("iIII")
_libc = None


def _lib():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = lib
    return _libc


def _sysctl(name: str) -> str:
    try:
        return Path(f"/proc/sys/fs/inotify/{name}").read_text().strip()
    except OSError:
        return "?"


class FsEvent:
    """One change, with watchdog's field names (what `classify` reads)."""

    __slots__ = ("event_type", "src_path", "dest_path", "is_directory")

    def __init__(self, event_type: str, src_path: str, is_directory: bool, dest_path: str = ""):
        self.event_type, self.src_path = event_type, src_path
        self.is_directory, self.dest_path = is_directory, dest_path

    def __repr__(self) -> str:
        dest = f" -> {self.dest_path}" if self.dest_path else ""
        return f"<{self.event_type} {'dir' if self.is_directory else 'file'} {self.src_path}{dest}>"


class Inotify:
    """One inotify instance holding any number of watches, read by one thread."""

    def __init__(self, dispatch: Callable[[list[FsEvent]], None],
                 overflow: Callable[[], None]):
        self._dispatch, self._overflow = dispatch, overflow
        fd = _lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            if err == errno.EMFILE:
                raise OSError(err, "inotify instance limit reached (fs.inotify.max_user_"
                                   f"instances = {_sysctl('max_user_instances')}, or the "
                                   "process's open files)")
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._paths: dict[int, set[str]] = {}  # wd -> watched paths (two when one is a symlink)
        self._stop = threading.Event()
        self._closed = False  # the descriptors are closed (by the reader, as it ends)
        self.thread = threading.Thread(target=self._run, name="watch-inotify", daemon=True)

    def add(self, path: str) -> int:
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the inotify reader is stopped")
            wd = _lib().inotify_add_watch(self.fd, os.fsencode(path), MASK)
            if wd < 0:
                err = ctypes.get_errno()
                if err == errno.ENOSPC:
                    raise OSError(err, "inotify watch limit reached (fs.inotify.max_user_"
                                       f"watches = {_sysctl('max_user_watches')})")
                raise OSError(err, os.strerror(err), path)
            self._paths.setdefault(wd, set()).add(path)
            return wd

    def remove(self, wd: int, path: str) -> None:
        with self._lock:
            paths = self._paths.get(wd)
            if paths is None:
                return  # the kernel dropped it already (IN_IGNORED)
            paths.discard(path)
            if not paths and not self._closed:
                del self._paths[wd]
                _lib().inotify_rm_watch(self.fd, wd)  # EINVAL: gone meanwhile, fine

    def watches(self) -> int:
        with self._lock:
            return len(self._paths)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self._lock:
            if not self._stop.is_set() and not self._closed:
                self._stop.set()
                try:
                    os.write(self._wake_w, b"x")  # never after _close: the number may be reused
                except OSError:
                    pass
            self._stop.set()
        if not self.thread.is_alive() and self.thread.ident is None:
            self._close()  # never started

    def _close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._paths.clear()
            for fd in (self.fd, self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    poller.poll()  # no timeout: an idle watcher never wakes
                    data = os.read(self.fd, 65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if self._stop.is_set():
                        break
                    logger.warning(f"watch: reading inotify failed ({exc}); the watcher stops "
                                   "and is restarted by the agent check")
                    break
                if not self._stop.is_set():
                    self._dispatch(self._parse(data))
        finally:
            self._close()

    def _parse(self, data: bytes) -> list[FsEvent]:
        raw = []
        i = 0
        while i + 16 <= len(data):
            wd, mask, cookie, length = _HEADER.unpack_from(data, i)
            name = os.fsdecode(data[i + 16: i + 16 + length].rstrip(b"\0"))
            i += 16 + length
            raw.append((wd, mask, cookie, name))
        to_cookies = {c for _, m, c, _ in raw if m & IN_MOVED_TO}
        moved_from: dict[int, tuple[str, bool]] = {}
        out: list[FsEvent] = []
        overflowed = False
        with self._lock:
            for wd, mask, cookie, name in raw:
                if mask & IN_Q_OVERFLOW:
                    overflowed = True
                    continue
                paths = self._paths.get(wd, ())
                if mask & IN_IGNORED:
                    self._paths.pop(wd, None)
                    continue
                isdir = bool(mask & IN_ISDIR)
                for base in sorted(paths):
                    path = os.path.join(base, name) if name else base
                    if mask & IN_DELETE_SELF:
                        out.append(FsEvent("deleted", base, True))
                    elif mask & IN_MOVED_FROM:
                        if cookie in to_cookies:
                            moved_from[cookie] = (path, isdir)
                        else:
                            out.append(FsEvent("deleted", path, isdir))
                    elif mask & IN_MOVED_TO:
                        src = moved_from.pop(cookie, None)
                        out.append(FsEvent("moved", src[0], isdir, path) if src
                                   else FsEvent("created", path, isdir))
                    elif mask & IN_CREATE:
                        out.append(FsEvent("created", path, isdir))
                    elif mask & IN_DELETE:
                        out.append(FsEvent("deleted", path, isdir))
                    elif mask & (IN_MODIFY | IN_ATTRIB):
                        out.append(FsEvent("modified", path, isdir))
        if overflowed:
            self._overflow()
        return out


class Poller:
    """Polls folders, one thread for all of them: watchdog's non-recursive DirectorySnapshot
    diff per folder, every `interval` seconds."""

    def __init__(self, dispatch: Callable[[list[FsEvent]], None], interval: float):
        self._dispatch, self.interval = dispatch, interval
        self._lock = threading.Lock()
        self._snaps: dict[str, object] = {}
        self._failing: set[str] = set()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="watch-poll", daemon=True)

    @staticmethod
    def _snapshot(path: str):
        from watchdog.utils.dirsnapshot import DirectorySnapshot

        return DirectorySnapshot(path, recursive=False)

    def add(self, path: str) -> None:
        snap = self._snapshot(path)  # OSError when it is gone: the caller skips it
        with self._lock:
            self._snaps[path] = snap
        if self.thread.ident is None and not self._stop.is_set():
            self.thread.start()

    def remove(self, path: str) -> None:
        with self._lock:
            self._snaps.pop(path, None)

    def count(self) -> int:
        with self._lock:
            return len(self._snaps)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                paths = list(self._snaps)
            for path in paths:
                if self._stop.is_set():
                    return
                self._poll(path)

    def _poll(self, path: str) -> None:
        from watchdog.utils.dirsnapshot import DirectorySnapshotDiff

        try:
            new = self._snapshot(path)
        except (FileNotFoundError, NotADirectoryError):
            with self._lock:
                known = self._snaps.pop(path, None) is not None
            if known:
                self._dispatch([FsEvent("deleted", path, True)])
            return
        except OSError as exc:  # a network volume briefly away: keep the old snapshot
            if path not in self._failing:
                self._failing.add(path)
                logger.warning(f"watch: cannot list {path} ({exc}); retrying every "
                               f"{self.interval:g} s")
            return
        self._failing.discard(path)
        with self._lock:
            old = self._snaps.get(path)
            if old is None:
                return  # removed meanwhile
            self._snaps[path] = new
        diff = DirectorySnapshotDiff(old, new)
        out = [FsEvent("created", p, False) for p in diff.files_created]
        out += [FsEvent("created", p, True) for p in diff.dirs_created]
        out += [FsEvent("deleted", p, False) for p in diff.files_deleted]
        out += [FsEvent("deleted", p, True) for p in diff.dirs_deleted]
        out += [FsEvent("modified", p, False) for p in diff.files_modified]
        out += [FsEvent("modified", p, False) for p in getattr(diff, "files_attrib", [])]
        out += [FsEvent("modified", p, True) for p in diff.dirs_modified]
        out += [FsEvent("moved", s, False, d) for s, d in diff.files_moved]
        out += [FsEvent("moved", s, True, d) for s, d in diff.dirs_moved]
        if out:
            self._dispatch(out)


class Observer:
    """The inotify reader (None in polling mode) and the poller (started on first use)."""

    def __init__(self, dispatch: Callable[[list[FsEvent]], None], overflow: Callable[[], None],
                 poll: float | None):
        self.inotify = None if poll else Inotify(dispatch, overflow)
        self.poller = Poller(dispatch, poll or FALLBACK_POLL)

    def start(self) -> None:
        if self.inotify is not None:
            self.inotify.start()

    def stop(self) -> None:
        self.poller.stop()
        if self.inotify is not None:
            self.inotify.stop()

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads():
            t.join(timeout)

    def _threads(self) -> list[threading.Thread]:
        out = [self.poller.thread] if self.poller.thread.ident is not None else []
        return out + ([self.inotify.thread] if self.inotify is not None else [])

    def is_alive(self) -> bool:
        threads = self._threads()
        return not self.poller._stop.is_set() and all(t.is_alive() for t in threads)


class Watcher:
    def __init__(self, config: Config, events: Events, poll: float | None = None):
        self.config = config
        self.events = events
        self.poll = poll
        self._observer: Observer | None = None
        # folder -> (inotify wd, or None when polled; its identity when watched)
        self._watches: dict[Path, tuple[int | None, tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self._stale: set[Path] = set()  # watched folders seen deleted: watch them anew
        self._dirty = True  # an event asked for a refresh: list the nodes again
        self._top: tuple | None = None
        self._full_at = 0.0
        self._limit_logged = False
        self.restarts = 0

    @property
    def mode(self) -> str:
        if self.poll:
            return "polling"
        return "inotify+polling" if self.polled_count() else "inotify"

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

    def _top_key(self) -> tuple:
        """What changes when the set of folders to watch may have: the identity of the top
        folders and custom_nodes' mtime (a node folder added, removed or replaced)."""
        cfg = self.config
        out = []
        for p in (cfg.workspace, cfg.markers_dir, cfg.comfyui.dir, self.custom_nodes):
            try:
                st = os.stat(p)
                out.append((st.st_dev, st.st_ino,
                            st.st_mtime_ns if p == self.custom_nodes else 0))
            except OSError:
                out.append(None)
        return tuple(out)

    # -------------------------------------------------------------- lifecycle
    def _dispatch(self, batch: list[FsEvent]) -> None:
        for event in batch:
            try:
                self.classify(event)
            except Exception as exc:  # noqa: BLE001 - a handler never raises
                logger.warning(f"watch: ignored event {event!r}: {exc}")

    def _overflow(self) -> None:
        logger.warning("watch: the inotify queue overflowed and events were lost; the periodic "
                       "reconcile repairs what they would have triggered")
        self._request_refresh()

    def _request_refresh(self) -> None:
        self._dirty = True
        self.events.refresh()

    def start(self) -> None:
        try:
            observer = Observer(self._dispatch, self._overflow, self.poll)
        except OSError as exc:
            if self.poll:
                raise
            logger.warning(f"watch: inotify unavailable ({exc.strerror or exc}); polling every "
                           f"{FALLBACK_POLL:g} s instead (set agent.poll to choose the interval)")
            self.poll = FALLBACK_POLL
            observer = Observer(self._dispatch, self._overflow, self.poll)
        with self._lock:
            self._observer = observer
            self._watches = {}
            self._dirty, self._limit_logged = True, False
            observer.start()
        self.refresh()

    def refresh(self) -> None:
        """Watch what should be watched now; drop watches of folders that went away. Cheap
        when nothing moved: four stat calls, and the node folders listed at most every
        FULL_RESCAN seconds unless an event or custom_nodes' mtime says something changed."""
        with self._lock:
            observer = self._observer
            if observer is None:
                return
            top = self._top_key()
            now = time.monotonic()
            if not self._dirty and not self._stale and top == self._top \
                    and now - self._full_at < FULL_RESCAN:
                return
            self._dirty, self._top, self._full_at = False, top, now
            wanted = {p: _identity(p) for p in self.wanted()}
            for path, (wd, ident) in list(self._watches.items()):
                # gone, or deleted and re-created (a new inode the old watch does not see)
                if wanted.get(path) != ident or path in self._stale:
                    self._unwatch(observer, path, wd)
            self._stale.clear()
            limit: OSError | None = None
            for path, (wd, ident) in list(self._watches.items()):
                if wd is None and observer.inotify is not None and limit is None:
                    # polled for want of watches: inotify may have room again
                    try:
                        new_wd = observer.inotify.add(str(path))
                    except OSError as exc:
                        limit = exc
                        continue
                    observer.poller.remove(str(path))
                    self._watches[path] = (new_wd, ident)
            for path in sorted(set(wanted) - set(self._watches)):
                if wanted[path] is None:
                    continue
                wd = None
                if observer.inotify is not None and limit is None:
                    try:
                        wd = observer.inotify.add(str(path))
                    except FileNotFoundError:
                        continue  # gone since it was listed: an event brings it back
                    except OSError as exc:
                        limit = exc
                if wd is None:
                    try:
                        observer.poller.add(str(path))
                    except OSError:
                        continue
                self._watches[path] = (wd, wanted[path])
            self._log_limit(limit)

    def _unwatch(self, observer: Observer, path: Path, wd: int | None) -> None:
        del self._watches[path]
        if wd is None:
            observer.poller.remove(str(path))
        elif observer.inotify is not None:
            observer.inotify.remove(wd, str(path))

    def _log_limit(self, limit: OSError | None) -> None:
        if self.poll:
            return
        polled = sum(1 for wd, _ in self._watches.values() if wd is None)
        if polled and not self._limit_logged:
            self._limit_logged = True
            why = limit.strerror if limit is not None and limit.strerror else str(limit)
            logger.warning(
                f"watch: {why}: {polled} of {len(self._watches)} folders are polled every "
                f"{FALLBACK_POLL:g} s instead (raise it, e.g. sysctl -w "
                f"fs.inotify.max_user_watches=524288, for events in under a second)")
        elif not polled and self._limit_logged:
            self._limit_logged = False
            logger.info(f"watch: all {len(self._watches)} folders are watched by inotify again")

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
            observer.join(10)

    def watch_count(self) -> int:
        """Folders watched (by inotify or polled)."""
        return len(self._watches)

    def polled_count(self) -> int:
        """Folders polled while in inotify mode (inotify had no watch left for them)."""
        if self.poll:
            return 0
        return sum(1 for wd, _ in list(self._watches.values()) if wd is None)

    # -------------------------------------------------------------- filtering
    def classify(self, event: FsEvent) -> None:
        self._classify_path(event, Path(str(event.src_path)), event.event_type)
        if getattr(event, "dest_path", None):
            # the destination of a rename is a file that appeared
            self._classify_path(event, Path(str(event.dest_path)), "created")

    def _classify_path(self, event: FsEvent, path: Path, kind: str) -> None:
        cfg = self.config
        parent = path.parent
        if event.is_directory and kind in ("deleted", "moved") and path in self._watches:
            self._stale.add(path)
            self._request_refresh()
        if kind in ("opened", "closed", "closed_no_write"):
            return
        if event.is_directory and path in (cfg.markers_dir, cfg.comfyui.dir, self.custom_nodes):
            self._request_refresh()
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
                self._request_refresh()
                self.events.node(path.name, f"node folder {kind}")
            elif path.suffix == ".py":
                self.events.node(path.name, f"{path.name} {kind}")
            return
        if parent.parent == self.custom_nodes:
            if event.is_directory and path.name == ".git" and kind in ("created", "deleted"):
                self._request_refresh()  # a node became (or stopped being) a git checkout
            if event.is_directory or path.name in IGNORED_DIRS:
                return
            if path.suffix == ".py" or path.name in NODE_FILES:
                self.events.node(parent.name, f"{path.name} {kind}")
            return
        if parent.name == ".git" and parent.parent.parent == self.custom_nodes:
            if path.name in GIT_FILES:
                self.events.node(parent.parent.name, "git HEAD moved")
