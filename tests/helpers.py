"""Test building blocks: real wheels, real git repositories, real processes, no network."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

import yaml

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition"):
    """Poll predicate until it returns a truthy value; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def build_wheel(folder: Path, name: str, version: str, requires: Iterable[str] = (),
                module_code: str = "") -> Path:
    """Write a real, installable pure-Python wheel (PEP 427) without any build backend."""
    dist = name.replace("-", "_")
    module = dist.lower()
    tag = "py3-none-any"
    path = folder / f"{dist}-{version}-{tag}.whl"
    info = f"{dist}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{module}/__init__.py": f"__version__ = {version!r}\n{module_code}",
        f"{info}/METADATA": metadata,
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: {tag}\n",
        f"{info}/top_level.txt": module + "\n",
    }
    record = []
    for fname, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=")
        record.append(f"{fname},sha256={digest.decode()},{len(content.encode())}")
    record.append(f"{info}/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for fname, content in files.items():
            zf.writestr(fname, content)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def git(*args: str, cwd: Path | None = None) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    return out.stdout.strip()


def make_repo(path: Path, files: Mapping[str, str], message: str = "initial") -> str:
    """A real git repository with files committed; returns its file:// URL."""
    path.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "-b", "main", str(path))
    commit_files(path, files, message)
    return path.as_uri()


def commit_files(path: Path, files: Mapping[str, str | None], message: str = "change") -> str:
    for rel, content in files.items():
        target = path / rel
        if content is None:
            target.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    git("add", "-A", cwd=path)
    git("commit", "-q", "-m", message, cwd=path)
    return git("rev-parse", "HEAD", cwd=path)


def runtime_json(root: Path, name: str) -> dict | None:
    """A JSON file the agent keeps in <root>/.pod-agent/run/<host>/ (agent.json, service.json,
    health.json, http.json); None when absent or not readable yet."""
    try:
        data = json.loads(next((root / ".pod-agent" / "run").glob(f"*/{name}")).read_text())
    except (StopIteration, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)


def status_json(*args: str) -> dict:
    proc = run_cli("status", "--json", *args)
    return json.loads(proc.stdout)


def installed_dists(python: Path) -> set[str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=json"],
                         capture_output=True, text=True, check=True)
    return {d["name"].lower() for d in json.loads(out.stdout)}
