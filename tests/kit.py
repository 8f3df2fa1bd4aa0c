"""Small shared pieces for the install/status/reset tests (on top of tests/helpers.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import IO, Mapping

import psutil

from tests.helpers import run_cli

STAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


def cmd(run: str, **fields) -> dict:
    """A `command` component."""
    return {"kind": "command", "run": run, **fields}


def counting(ws, name: str, extra: str = "", **fields) -> dict:
    """A command component that appends one line to <workspace>/runs/<name> each time its
    installer runs, proven by that file's existence."""
    runs = ws.root / "runs" / name
    run = f"mkdir -p {runs.parent} && echo ran >> {runs}"
    if extra:
        run += f" && {extra}"
    return cmd(run, check=f"test -s {runs}", **fields)


def runs(ws, name: str) -> int:
    path = ws.root / "runs" / name
    return len(path.read_text().splitlines()) if path.exists() else 0


def use(ws, components: Mapping[str, dict], **top) -> None:
    """Replace the workspace config's components (and top-level keys) and save it."""
    ws.config["components"] = dict(components)
    ws.config.update(top)
    ws.save()


def install(ws, *args: str, env: Mapping[str, str] | None = None,
            expect: int | None = 0) -> subprocess.CompletedProcess:
    proc = run_cli("install", *args, *ws.args(), env=env)
    if expect is not None:
        assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def status(ws, env: Mapping[str, str] | None = None) -> tuple[int, dict]:
    proc = run_cli("status", "--json", *ws.args(), env=env)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def start_cli(*args: str, stdout: IO, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "agent", *args], stdout=stdout,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full)


def marker_lines(path: Path) -> tuple[str, dict[str, str]]:
    lines = path.read_text().splitlines()
    meta = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        meta[key.strip()] = value.strip()
    return lines[0], meta


def all_files(root: Path):
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with (size, mtime_ns): proves nothing was changed or deleted."""
    out = {}
    for path in root.rglob("*"):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


def kill_tree(proc: psutil.Process) -> None:
    for child in proc.children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.kill()
    except psutil.NoSuchProcess:
        pass
