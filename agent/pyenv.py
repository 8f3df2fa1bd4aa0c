"""What is installed in the target interpreter, read without importing anything heavy there.

One short subprocess lists `*.dist-info` / `*.egg-info` folder names on the interpreter's sys.path
(name and version are in the folder name) and its PEP 508 marker environment. No pip call.

The listing is cached between calls in a JSON file (`<state_dir>/cache/`), keyed by what can
change it: the mtime of every folder on that sys.path (installing, upgrading or removing a
distribution adds or removes a `*.dist-info` folder there, which changes the folder's mtime, with
pip and uv alike), the interpreter and its `pyvenv.cfg`, the environment variables that move
sys.path, and this host's kernel (the marker environment names it). A no-op check therefore
spawns no process when nothing changed. The folder mtimes are taken in the listing process before
each folder is listed, and a listing is not cached while any of them is younger than RACY seconds
(a change in the same clock tick as the listing would otherwise go unseen: git's "racy" rule).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from agent import procs

CACHE_VERSION = 1
RACY = 2.0  # seconds: a folder changed this recently may change again within its mtime's tick
_KEY_ENV = ("PYTHONPATH", "PYTHONUSERBASE", "PYTHONNOUSERSITE", "PYTHONSAFEPATH")

_SCRIPT = r"""
import json, os, sys, platform
dists = {}
paths = []
now = __import__('time').time()
for p in sys.path:
    if not p:
        continue  # the current folder (python -c): not where a distribution is installed
    try:
        mtime = os.stat(p).st_mtime_ns
    except OSError:
        mtime = None
    paths.append([p, mtime])
    try:
        names = os.listdir(p)
    except OSError:
        continue
    for n in names:
        if n.endswith('.dist-info'):
            stem = n[:-10]
            name, _, ver = stem.partition('-')
        elif n.endswith('.egg-info'):
            stem = n[:-9]
            parts = stem.split('-')
            name, ver = parts[0], (parts[1] if len(parts) > 1 else '')
        else:
            continue
        key = name.lower().replace('_', '-').replace('.', '-')
        dists.setdefault(key, ver)
try:  # the user site is on sys.path only once it exists: watch for it to appear
    import site
    if site.ENABLE_USER_SITE is not False:
        user = site.getusersitepackages()
        if user not in sys.path:
            paths.append([user, os.stat(user).st_mtime_ns if os.path.isdir(user) else None])
except Exception:
    pass
iv = sys.implementation.version
impl_ver = '%d.%d.%d' % (iv.major, iv.minor, iv.micro)
if iv.releaselevel != 'final':
    impl_ver += iv.releaselevel[0] + str(iv.serial)
env = {
    'implementation_name': sys.implementation.name,
    'implementation_version': impl_ver,
    'os_name': os.name,
    'platform_machine': platform.machine(),
    'platform_release': platform.release(),
    'platform_system': platform.system(),
    'platform_version': platform.version(),
    'python_full_version': platform.python_version(),
    'platform_python_implementation': platform.python_implementation(),
    'python_version': '.'.join(platform.python_version_tuple()[:2]),
    'sys_platform': sys.platform,
}
print(json.dumps({'dists': dists, 'env': env, 'prefix': sys.prefix, 'paths': paths,
                  'now': now}))
"""


@functools.lru_cache(maxsize=8192)
def canonical(name: str) -> str:
    """The PEP 503 normalized name (asked for every requirement of every check: cached)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class PyEnv:
    python: Path
    dists: dict[str, str]
    env: dict[str, str]
    prefix: str


class PythonUnavailable(Exception):
    pass


def inspect(python: Path, timeout: float = 30.0, cache: Path | None = None) -> PyEnv:
    """The interpreter's distributions and marker environment. With `cache` (a folder), the
    listing is read from there when nothing that changes it changed (no process), else listed
    and saved there (best effort: a folder that cannot be written just means no cache)."""
    if not python.exists():
        raise PythonUnavailable(f"interpreter {python} does not exist")
    path = cache / f"pyenv-{hashlib.sha256(str(python).encode()).hexdigest()[:16]}.json" \
        if cache is not None else None
    key = _key(python)
    if path is not None:
        hit = _load(path, python, key)
        if hit is not None:
            return hit
    data = _list(python, timeout)
    found = PyEnv(python=python, dists=data["dists"], env=data["env"], prefix=data["prefix"])
    if path is not None:
        _save(path, data, key)
    return found


def _list(python: Path, timeout: float) -> dict:
    global spawned
    spawned += 1
    code, out = procs.quick([str(python), "-c", _SCRIPT], timeout=timeout)
    if code != 0:
        last = out.strip().splitlines()[-1:] or ["no output"]
        raise PythonUnavailable(f"interpreter {python} does not run: {last[0]}")
    try:
        data = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise PythonUnavailable(f"interpreter {python} gave no package listing") from None
    if not isinstance(data, dict) or not all(k in data for k in ("dists", "env", "prefix")):
        raise PythonUnavailable(f"interpreter {python} gave no package listing")
    return data


spawned = 0  # listing processes started by this process (tests and benchmarks read it)


def _stat_key(path: Path) -> list | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _key(python: Path) -> dict:
    """What the listing depends on, apart from the sys.path folders' mtimes."""
    return {"v": CACHE_VERSION, "python": str(python), "exe": _stat_key(python),
            "cfg": _stat_key(python.parent.parent / "pyvenv.cfg"),
            "env": {k: os.environ.get(k) for k in _KEY_ENV}, "host": list(os.uname())}


def _paths_unchanged(paths) -> bool:
    if not isinstance(paths, list) or not paths:
        return False
    for item in paths:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            return False
        try:
            now = os.stat(item[0]).st_mtime_ns
        except OSError:
            now = None
        if now != item[1]:
            return False
    return True


def _load(path: Path, python: Path, key: dict) -> PyEnv | None:
    from agent.markers import read_json

    data = read_json(path)
    if data is None or data.get("key") != key or not _paths_unchanged(data.get("paths")):
        return None
    dists, env, prefix = data.get("dists"), data.get("env"), data.get("prefix")
    if not (isinstance(dists, dict) and isinstance(env, dict) and isinstance(prefix, str)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in dists.items())
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        return None  # hand-edited or another version's: list again
    return PyEnv(python=python, dists=dists, env=env, prefix=prefix)


def _save(path: Path, data: dict, key: dict) -> None:
    paths = data.get("paths")
    listed_at = data.get("now")
    if not isinstance(paths, list) or not isinstance(listed_at, (int, float)):
        return
    newest = max((m for _, m in paths if isinstance(m, int)), default=0) / 1e9
    if newest > min(listed_at, time.time()) - RACY:
        return  # changed too recently to trust its mtime: the next call lists again
    from agent.markers import atomic_write

    try:
        atomic_write(path, json.dumps({"key": key, "paths": paths, "dists": data["dists"],
                                       "env": data["env"], "prefix": data["prefix"]}))
    except OSError:
        pass  # a read-only or full state folder: no cache, same answers
