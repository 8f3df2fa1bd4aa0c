"""The only code that reads and writes marker files.

Format: first line `YYYY-MM-DD HH:MM:SS` exactly as the original template wrote it (old scripts
still read it), then `key: value` metadata lines. A file with only the first line is a legacy
marker.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Mapping

from agent.model import Marker

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


def parse(text: str) -> Marker:
    lines = text.splitlines()
    stamp = lines[0].strip() if lines else ""
    meta: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip():
            meta[key.strip()] = value.strip()
    return Marker(timestamp=stamp, meta=meta)


def read(markers_dir: Path, name: str) -> Marker | None:
    try:
        text = path_for(markers_dir, name).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return parse(text)


def render(marker: Marker) -> str:
    body = [marker.timestamp]
    for key, value in marker.meta.items():
        value = str(value).replace("\n", " ")
        body.append(f"{key}: {value}")
    return "\n".join(body) + "\n"


def atomic_write(path: Path, text: str) -> None:
    """Temp file in the same folder, fsync, os.replace, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some network filesystems refuse a directory fsync
        pass


def read_json(path: Path) -> dict | None:
    """A small JSON state file as a dict; None when it is absent, unreadable or not a mapping."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write(markers_dir: Path, name: str, meta: Mapping[str, str], stamp: str | None = None) -> Marker:
    marker = Marker(timestamp=stamp or now_stamp(), meta=dict(meta))
    path = path_for(markers_dir, name)
    _own[str(path)] = "writing"
    atomic_write(path, render(marker))
    st = path.stat()
    _own[str(path)] = (st.st_mtime_ns, st.st_size)
    return marker


def remove(markers_dir: Path, name: str) -> bool:
    path = path_for(markers_dir, name)
    key = str(path)
    previous = _own.get(key, "absent")
    _own[key] = None  # before the unlink: the watcher may see the event at once
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        if previous == "absent":
            del _own[key]
        else:
            _own[key] = previous
        return False


def present(markers_dir: Path) -> list[str]:
    try:
        return sorted(p.name[: -len(SUFFIX)] for p in markers_dir.iterdir()
                      if p.name.endswith(SUFFIX) and p.is_file())
    except FileNotFoundError:
        return []
