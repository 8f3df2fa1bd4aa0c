"""What is installed in the target interpreter, read without importing anything heavy there.

One short subprocess lists `*.dist-info` / `*.egg-info` folder names on the interpreter's sys.path
(name and version are in the folder name) and its PEP 508 marker environment. No pip call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from agent import procs

_SCRIPT = r"""
import json, os, sys, platform
dists = {}
for p in sys.path:
    try:
        names = os.listdir(p or '.')
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
print(json.dumps({'dists': dists, 'env': env, 'prefix': sys.prefix}))
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class PyEnv:
    python: Path
    dists: dict[str, str]
    env: dict[str, str]
    prefix: str


class PythonUnavailable(Exception):
    pass


def inspect(python: Path, timeout: float = 30.0) -> PyEnv:
    if not python.exists():
        raise PythonUnavailable(f"interpreter {python} does not exist")
    code, out = procs.quick([str(python), "-c", _SCRIPT], timeout=timeout)
    if code != 0:
        last = out.strip().splitlines()[-1:] or ["no output"]
        raise PythonUnavailable(f"interpreter {python} does not run: {last[0]}")
    try:
        data = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise PythonUnavailable(f"interpreter {python} gave no package listing") from None
    return PyEnv(python=python, dists=data["dists"], env=data["env"], prefix=data["prefix"])
