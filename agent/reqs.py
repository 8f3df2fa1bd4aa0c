"""Parse requirement files and check them against an interpreter's installed distributions."""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from agent.pyenv import PyEnv, canonical

_EGG = re.compile(r"[#&]egg=([A-Za-z0-9_.\-]+)")
_INCLUDE = re.compile(r"^(-r|--requirement|-c|--constraint)(\s+|=)(.+)$")


@dataclass(frozen=True)
class Req:
    requirement: Requirement | None  # None: present-by-name only (URL/editable with #egg)
    name: str
    source: str  # "file:line" or "package"


@functools.lru_cache(maxsize=4096)
def _requirement(text: str) -> Requirement:
    """Requirement(text), parsed once per process: the same lines recur in every custom node's
    requirements.txt (numpy, opencv-python, ...) and packaging's parser is the costly part of
    reading them. Never mutated by its users."""
    return Requirement(text)


def parse_spec(spec: str) -> Requirement:
    """A package spec from config; raises ValueError with a readable reason."""
    try:
        return _requirement(spec)
    except InvalidRequirement as exc:
        # packaging appends the spec and a caret diagram on further lines; a config error is
        # one line, so keep the first.
        why = (str(exc).splitlines() or ["not a PEP 508 requirement"])[0]
        raise ValueError(f"invalid package spec {spec!r}: {why}") from None


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    buf, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1]
            continue
        buf += line
        yield start, buf
        buf = ""
    if buf:
        yield start, buf


_COMMENT = re.compile(r"(^|\s)#.*$")


def read_file(path: Path) -> tuple[list[Req], list[Path]]:
    """Requirements in a file (following -r includes) and the list of files read."""
    reqs, files = _read(os.fspath(path), set())
    return reqs, [Path(f) for f in files]


def read_reqs(path: Path | str) -> list[Req]:
    """The requirements alone (what a probe needs: no list of files)."""
    return _read(os.fspath(path), set())[0]


def _read(path: str, seen: set[str]) -> tuple[list[Req], list[str]]:
    # normpath: `-r ../requirements.txt` from an included file must be recognised as seen,
    # or two files including each other recurse until the path is too long.
    path = os.path.normpath(os.path.abspath(path))
    if path in seen:
        return [], []
    seen.add(path)
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    reqs: list[Req] = []
    files = [path]
    for number, raw in _logical_lines(text):
        line = (_COMMENT.sub("", raw) if "#" in raw else raw).strip()
        if not line:
            continue
        where = f"{path}:{number}"
        inc = _INCLUDE.match(line)
        if inc:
            if inc.group(1) in ("-r", "--requirement"):
                target = os.path.join(os.path.dirname(path), inc.group(3).strip())
                if os.path.isfile(target):
                    more, more_files = _read(target, seen)
                    reqs += more
                    files += more_files
            continue
        if line.startswith(("-e ", "--editable")) or "://" in line.split("@")[0] or \
                line.startswith(("git+", "hg+", "svn+", "bzr+")):
            egg = _EGG.search(line)
            if egg:
                reqs.append(Req(None, canonical(egg.group(1)), where))
            elif " @ " in line:
                name = line.split(" @ ")[0].strip()
                reqs.append(Req(None, canonical(name.split("[")[0]), where))
            continue
        if line.startswith("-"):
            continue  # installer options (--index-url, -f, --pre, ...) are passed on as they are
        if " @ " not in line and (line.startswith((".", "/")) or
                                  line.endswith((".whl", ".tar.gz", ".zip"))):
            continue  # local paths and archives: cannot be checked by name
        # (`name @ https://.../name-1.0-py3-none-any.whl` names its package: checked below)
        line = line.split(" --")[0].strip()  # per-requirement options such as --hash
        try:
            req = _requirement(line)
        except InvalidRequirement:
            continue  # the installer will report it; nothing to verify here
        reqs.append(Req(req, canonical(req.name), where))
    return reqs, files


def files_digest(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f).encode())
        try:
            h.update(f.read_bytes())
        except OSError:
            h.update(b"<missing>")
    return h.hexdigest()[:16]


def unmet(reqs: Iterable[Req], env: PyEnv) -> list[str]:
    """Readable problems for every requirement the environment does not satisfy."""
    problems: list[str] = []
    where = env.prefix
    for item in reqs:
        req = item.requirement
        if req is not None and req.marker is not None:
            try:
                if not req.marker.evaluate(dict(env.env, extra="")):
                    continue
            except Exception:  # noqa: BLE001 - an odd marker is not our failure
                pass
        installed = env.dists.get(item.name)
        if installed is None:
            problems.append(f"{req.name if req else item.name} not installed in {where}")
            continue
        if req is None or not req.specifier:
            continue
        try:
            version = Version(installed)
        except InvalidVersion:
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {installed} installed in {where}, {req.specifier} wanted")
    return problems


def versions(reqs: Iterable[Req], env: PyEnv) -> str:
    parts = []
    for item in reqs:
        ver = env.dists.get(item.name)
        if ver:
            parts.append(f"{item.name}=={ver}")
    return ", ".join(dict.fromkeys(parts))
