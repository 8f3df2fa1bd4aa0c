"""Parsed config files kept between commands, so that a no-op command does not import PyYAML
and parse the same bytes again (about 15 ms of a 100 ms `status`: issue 9, README Benchmarks).

Where: `<workspace>/.pod-agent/cache/config-<hash of the path>.json`, one file per config path,
only when `<workspace>/.pod-agent` exists already (nothing is created on a fresh volume; tests
and throwaway workspaces take their cache with them). What: the parsed mapping with every key's
and item's line (errors name the same lines as a fresh parse), keyed by the sha256 of the file's
text: any edit is a miss. Only plain data is kept (text, numbers, booleans, null, mappings,
lists, no aliases); anything else (a date, a set, a shared anchor) is simply not cached, and
neither is a file that holds a secret (agent/redact.py's rules: a token is never copied to a
second place). A cache
file that cannot be read or does not match is a miss; one that cannot be written is no cache.
The checks that follow a parse (agent/config.py `_inspect`) run on cached data too.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

VERSION = 1
MAX_BYTES = 2 << 20  # a cache file is never larger than this (config files are under 1 MiB)


class _NotPlain(Exception):
    pass


def entry(ws: Path | None, path: Path, text: str) -> tuple[Path, str, str] | None:
    """(cache file, text digest, path) for `path` read with workspace `ws`; None: no cache."""
    if ws is None:
        return None
    root = Path(ws) / ".pod-agent"
    try:
        if not root.is_dir():
            return None
    except (OSError, ValueError):
        return None
    key = str(path).encode("utf-8", "surrogatepass")
    name = f"config-{hashlib.sha256(key).hexdigest()[:16]}.json"
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return root / "cache" / name, digest, str(path)


def read(entry_: tuple[Path, str, str], name: str, map_cls: type, seq_cls: type) -> Any:
    file, digest, path = entry_
    try:
        if file.stat().st_size > MAX_BYTES:
            return None
        with open(file, encoding="utf-8") as fh:
            doc = json.load(fh)
        if doc.get("v") != VERSION or doc.get("sha") != digest or doc.get("path") != path:
            return None
        return _decode(doc["data"], name, map_cls, seq_cls)
    except Exception:  # noqa: BLE001 - a missing, foreign or damaged cache file is a miss
        return None


def write(entry_: tuple[Path, str, str], data: Any, map_cls: type, seq_cls: type) -> None:
    file, digest, path = entry_
    try:
        enc = _encode(data, map_cls, seq_cls, set())
    except (_NotPlain, RecursionError):
        return
    if _holds_secrets(data):  # never a second copy of a token, in another place
        return
    try:
        text = json.dumps({"v": VERSION, "sha": digest, "path": path, "data": enc},
                          ensure_ascii=True, separators=(",", ":"))
    except ValueError:
        return
    if len(text) > MAX_BYTES:
        return
    from agent.markers import atomic_write

    try:
        atomic_write(file, text)  # temp file, fsync, rename: a kill leaves the old or the new
    except OSError:
        pass  # a full or read-only volume: no cache, same answers


def _encode(obj: Any, map_cls: type, seq_cls: type, seen: set[int]) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int) or isinstance(obj, float):
        return obj if type(obj) in (int, float) else _plain_fail()
    if id(obj) in seen:  # an alias: the same object twice (the cache would copy it)
        raise _NotPlain
    if type(obj) is map_cls:
        seen.add(id(obj))
        return {"m": [[k, _encode(v, map_cls, seq_cls, seen), obj.src.get(k, ("", 0))[1]]
                      for k, v in obj.items()], "w": obj.where[1]}
    if type(obj) is seq_cls:
        seen.add(id(obj))
        return {"s": [_encode(v, map_cls, seq_cls, seen) for v in obj], "l": list(obj.lines)}
    raise _NotPlain


def _holds_secrets(data: Any) -> bool:
    """Anything agent/redact.py would treat as a secret: a value under a secret-looking key
    (token, password, ...), a secret flag's value in a list, a pattern (a URL with credentials,
    an hf_ token) in any text. Such a file is parsed every time instead of cached."""
    from agent.redact import secret_name, secrets_in_args, secrets_in_text

    stack = [data]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            for key, value in obj.items():
                if secret_name(str(key)) and _literal(value):
                    return True
                stack.append(value)
        elif isinstance(obj, list):
            if secrets_in_args(v for v in obj if isinstance(v, str)):
                return True
            stack.extend(obj)
        elif isinstance(obj, str) and secrets_in_text(obj):
            return True
    return False


def _literal(value: Any) -> bool:
    """A value given in the file itself: not empty, not only `${NAME}` references (expanded
    from the environment at load, never stored)."""
    if isinstance(value, str):
        return bool(_REFERENCE.sub("", value).strip())
    return value not in (None, [], {})


_REFERENCE = re.compile(r"\$\{[^}]*\}")


def _plain_fail() -> Any:
    raise _NotPlain


def _decode(obj: Any, name: str, map_cls: type, seq_cls: type) -> Any:
    if isinstance(obj, dict):
        if "m" in obj:
            out = map_cls()
            out.where, out.src = (name, obj["w"]), {}
            for key, value, line in obj["m"]:
                out[key] = _decode(value, name, map_cls, seq_cls)
                out.src[key] = (name, line)
            return out
        seq = seq_cls(_decode(v, name, map_cls, seq_cls) for v in obj["s"])
        seq.lines = list(obj["l"])
        return seq
    return obj
