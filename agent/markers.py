"""The only code that reads and writes marker files.

Format: first line `YYYY-MM-DD HH:MM:SS` exactly as the original template wrote it (old scripts
still read it), then `key: value` metadata lines. A file with only the first line is a legacy
marker.

Reading is bounded and total: whatever sits at a marker's path (an empty, binary or 50 MB file,
a symlink, a folder, a FIFO, a file we may not read) gives an answer, never an exception and
never more than READ_LIMIT bytes. Anything that is not a regular file is not a marker: `inspect`
says what it is and what to do. Writes never follow a symlink (os.replace replaces the link
itself) and removals refuse folders.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Mapping, NamedTuple

from agent.fserr import FsError, describe
from agent.model import Marker

# a marker is a few hundred bytes, a `nodes` marker ~90 bytes a node (500 nodes: 45 KB);
# nothing beyond this is read (it was 16 KiB: ~180 nodes, whose marker then lost its tail)
READ_LIMIT = 1024 * 1024
FIELD_LIMIT = 200  # longest timestamp or metadata value kept from a marker
JSON_LIMIT = 8 * 1024 * 1024  # state files (.pod-agent/...) larger than this are ignored

SUFFIX = ".done"

# What this process itself wrote or removed, so a watcher can ignore its own events:
# path -> (mtime_ns, size) after a write, or None after a removal.
_own: dict[str, object] = {}


def is_own_event(path: Path) -> bool:
    """True when the marker at path is exactly as this process left it."""
    key = str(path)
    if key not in _own:
        return False
    if _own[key] == "writing":
        return True
    try:
        st = path.stat()
    except FileNotFoundError:
        return _own[key] is None
    return _own[key] == (st.st_mtime_ns, st.st_size)


def now_stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def path_for(markers_dir: Path, name: str) -> Path:
    return markers_dir / f"{name}{SUFFIX}"


def _printable(text: str) -> str:
    """Control characters (NUL included) dropped, bounded: safe on one line of a table."""
    text = text[:64 * FIELD_LIMIT]
    if not text.isprintable():  # the common case (every line the agent writes) is one C call
        text = "".join(ch for ch in text if ch.isprintable() or ch == " ")
    text = text.strip()
    return text[:FIELD_LIMIT]


def parse(text: str) -> Marker:
    """Any text as a marker. The timestamp is the first line as written (printable characters
    only, bounded); `key: value` lines after it are metadata."""
    lines = text.splitlines()
    stamp = _printable(lines[0]) if lines else ""
    meta: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        key = _printable(key)
        if sep and key:
            meta[key] = _printable(value)
    return Marker(timestamp=stamp, meta=meta)


class Reading(NamedTuple):
    """What sits at a marker's path: a marker, nothing (both None/""), or something that is not
    a usable marker (marker None, problem: one line naming the path and what to do)."""

    marker: Marker | None
    problem: str = ""


def what_is(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def not_a_file(path: Path, mode: int) -> str:
    """One line: what stands at a marker path instead of a file, and what to do."""
    what = what_is(mode)
    if stat.S_ISLNK(mode):
        return (f"{path}: is a symbolic link (to {_link_target(path)}), not a marker file: "
                "the agent neither follows nor trusts it; remove the link (`pod-agent install` "
                "then writes a real marker)")
    if stat.S_ISDIR(mode):
        return (f"{path}: is a folder, not a marker file: move it away (the agent never "
                "removes a folder)")
    return f"{path}: is {what}, not a marker file: remove it"


def blocking_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of path that is not a folder (ENOTDIR's real culprit)."""
    for parent in path.parents:
        try:
            mode = os.lstat(parent).st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            return None
        if stat.S_ISLNK(mode):
            try:
                if parent.is_dir():
                    return None
            except OSError:
                pass
        return parent
    return None


def _describe(exc: OSError, path: Path, what: str) -> str:
    """describe(), naming the ancestor that is a file when the error is ENOTDIR."""
    if exc.errno == errno.ENOTDIR:
        culprit = blocking_ancestor(path)
        if culprit is not None:
            return (f"{culprit}: is a file, not a folder (needed for {path}): move that file "
                    "away")
    if exc.filename is None:
        exc.filename = str(path)
    return describe(exc, what)


def inspect(markers_dir: Path, name: str) -> Reading:
    """The marker at markers_dir/<name>.done, read without following a symlink and without
    reading more than READ_LIMIT bytes. Never raises."""
    path = path_for(markers_dir, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Reading(None)
    except OSError as exc:
        return Reading(None, _describe(exc, path, "cannot read the marker"))
    if not stat.S_ISREG(st.st_mode):
        return Reading(None, not_a_file(path, st.st_mode))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Reading(None)  # removed meanwhile
    except OSError as exc:
        return Reading(None, _describe(exc, path, "cannot read the marker"))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between lstat and open
            return Reading(None, not_a_file(path, st.st_mode))
        data = os.read(fd, READ_LIMIT)
    except OSError as exc:
        return Reading(None, _describe(exc, path, "cannot read the marker"))
    finally:
        os.close(fd)
    return Reading(parse(data.decode("utf-8", errors="replace")))


def read(markers_dir: Path, name: str) -> Marker | None:
    """The marker, or None when there is none or what is there is not a usable marker file
    (`inspect` says why). Never raises."""
    return inspect(markers_dir, name).marker


def render(marker: Marker) -> str:
    body = [marker.timestamp]
    for key, value in marker.meta.items():
        value = str(value).replace("\n", " ")
        body.append(f"{key}: {value}")
    return "\n".join(body) + "\n"


def _named(exc: OSError, path: Path) -> OSError:
    """The same error, naming the file being written (not the temp file, not nothing)."""
    if exc.filename is None or str(exc.filename).endswith(".tmp"):
        named = OSError(exc.errno, exc.strerror or str(exc), str(path))
        return named
    return exc


def atomic_write(path: Path, text: str) -> None:
    """Temp file in the same folder, fsync, os.replace, fsync the folder.

    A symlink at path is replaced by the file (never followed); a folder at path is an error.
    Errors are OSError naming path (a full disk during fsync, a read-only folder); nothing is
    left behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        import tempfile  # writers only: a reader never imports it

        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _named(exc, path) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _named(exc, path) from None
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename into `folder` durable (best effort: some network filesystems refuse a
    directory fsync)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover
        pass


TEMP_MAX_AGE = 60.0  # seconds: an atomic_write temp file older than this was left by a crash
_TEMP_NAME = re.compile(r"\.[^/]+\.[a-z0-9_]{8}\.tmp")  # mkstemp in atomic_write


def clean_stale_temps(folders, max_age: float = TEMP_MAX_AGE,
                      now: float | None = None) -> list[Path]:
    """Remove the temp files atomic_write leaves when its process is killed mid-write (kill -9):
    regular files directly in folders named like `.<name>.<8 chars>.tmp` and not modified for
    max_age seconds (a write in progress takes milliseconds). Nothing else is touched; symlinks,
    folders and younger files are left; errors are ignored. Returns what was removed."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    for folder in dict.fromkeys(Path(f) for f in folders):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not _TEMP_NAME.fullmatch(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < max_age:
                    continue
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(Path(entry.path))
    return removed


def clean_temps(config) -> list[Path]:
    """clean_stale_temps in the folders the agent writes state to (state dir, runtime dir,
    markers folder), logged; called at agent start and at `pod-agent install` start."""
    removed = clean_stale_temps((config.state_dir, config.runtime_dir, config.markers_dir))
    if removed:
        from loguru import logger

        logger.info("removed {} stale temporary file(s) left by an interrupted write: {}",
                    len(removed), ", ".join(str(p) for p in removed[:10]))
    return removed


def tail_jsonl(path: Path, limit: int | None = 50, tail_bytes: int = 64 * 1024) -> list[dict]:
    """The newest JSON objects of a JSON-lines file (oldest first), read from its last
    tail_bytes only; a missing, unreadable or non-regular file (a FIFO, a link) is no records,
    a partial first line or a garbage line is skipped."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return []
        os.lseek(fd, max(0, st.st_size - tail_bytes), os.SEEK_SET)
        data = os.read(fd, tail_bytes)
    except OSError:
        return []
    finally:
        os.close(fd)
    out = []
    for raw in data.decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out if limit is None else out[-limit:]


def read_json(path: Path) -> dict | None:
    """A small JSON state file as a dict; None when it is absent, unreadable, not a regular file
    (a folder, a FIFO), larger than JSON_LIMIT, not JSON or not a mapping. Never raises."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > JSON_LIMIT:
            return None
        chunks, total = [], 0
        while total <= JSON_LIMIT:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > JSON_LIMIT:
            return None
        data = json.loads(b"".join(chunks).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else None


def write(markers_dir: Path, name: str, meta: Mapping[str, str], stamp: str | None = None) -> Marker:
    marker = Marker(timestamp=stamp or now_stamp(), meta=dict(meta))
    path = path_for(markers_dir, name)
    key = str(path)
    previous = _own.get(key, "absent")
    _own[key] = "writing"
    try:
        atomic_write(path, render(marker))
        st = os.lstat(path)
    except BaseException:
        # a failed write must not leave the watcher ignoring this marker's events for good
        if previous == "absent":
            _own.pop(key, None)
        else:
            _own[key] = previous
        raise
    _own[key] = (st.st_mtime_ns, st.st_size)
    return marker


def remove(markers_dir: Path, name: str) -> bool:
    """Remove the marker: True when one was removed, False when there was none.

    A symlink is removed itself (its target is never touched). A folder is refused. Raises
    FsError (one line: the path, what it is or what failed, what to do) when it cannot be
    removed: a folder, an immutable file, a read-only volume, a marker folder that is a file."""
    path = path_for(markers_dir, name)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise FsError(_describe(exc, path, "cannot remove the marker")) from None
    if stat.S_ISDIR(mode):
        raise FsError(f"{path}: is a folder, not a marker file: not removed (the agent never "
                      "removes a folder); move it away yourself")
    key = str(path)
    previous = _own.get(key, "absent")
    _own[key] = None  # before the unlink: the watcher may see the event at once
    try:
        os.unlink(path)
        return True
    except OSError as exc:
        if previous == "absent":
            _own.pop(key, None)
        else:
            _own[key] = previous
        if isinstance(exc, FileNotFoundError):
            return False
        raise FsError(_describe(exc, path, "cannot remove the marker")) from None


def present(markers_dir: Path) -> list[str]:
    """Names of everything called <name>.done in the marker folder, whatever it is (a folder
    named x.done is listed too: `reset --all` reports it instead of skipping it silently).
    Never raises: a marker folder that is missing, a file or unreadable has none."""
    try:
        with os.scandir(markers_dir) as it:
            names = [e.name[: -len(SUFFIX)] for e in it
                     if e.name.endswith(SUFFIX) and len(e.name) > len(SUFFIX)]
    except (OSError, ValueError):
        return []
    return sorted(names)
