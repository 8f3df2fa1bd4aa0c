"""Shared context for kinds: the target interpreter, the installer, git, the GPU answer."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from agent import procs
from agent.model import Component, Config, State
from agent.pyenv import PyEnv, PythonUnavailable, inspect


class InstallError(Exception):
    """An installer step failed; the message says which and why."""


@dataclass(frozen=True)
class Problem:
    state: State  # BROKEN or STALE
    reason: str


class Ctx:
    """Per-run context handed to kinds. Caches the interpreter listing until invalidated."""

    def __init__(self, config: Config, gpu: bool | None = None):
        self.config = config
        self._pyenv: PyEnv | None = None
        self._gpu = gpu
        self._python_ready = False

    # -------------------------------------------------------------- interpreter
    @property
    def python(self) -> Path:
        return self.config.comfyui.python

    def pyenv(self) -> PyEnv:
        """The interpreter's listing: kept for this run until invalidated, and between runs
        in <state_dir>/cache (agent/pyenv.py; only where the state folder already exists: a
        reader on a fresh volume creates nothing)."""
        if self._pyenv is None:
            state = self.config.state_dir
            self._pyenv = inspect(self.python, cache=state / "cache" if state.is_dir() else None)
        return self._pyenv

    def invalidate(self) -> None:
        self._pyenv = None

    @property
    def gpu(self) -> bool:
        if self._gpu is None:
            from agent.gpu import has_gpu

            self._gpu = has_gpu()
        return self._gpu

    def ensure_python(self, comp: Component) -> None:
        """The target interpreter, ready to install into. The volume's virtualenv is created
        on demand and repaired when a previous creation was cut short (agent/venv.py)."""
        if self._python_ready:
            return
        cui = self.config.comfyui
        if cui.venv is None or not str(self.python).startswith(str(cui.venv)):
            if not self.python.exists():
                raise InstallError(f"interpreter {self.python} does not exist (comfyui.python)")
            self._python_ready = True
            return
        base = cui.base_python if "/" in cui.base_python else (shutil.which(cui.base_python)
                                                                or sys.executable)
        need_pip = self.config.installer == "pip" or not (
            self.config.installer == "uv" and self.uv())
        from agent import venv  # the install side only: not imported by a check

        try:
            venv.ensure(cui.venv, self.python, base, comp.log, need_pip)
        except venv.VenvError as exc:
            raise InstallError(str(exc)) from None
        self._python_ready = True
        self.invalidate()

    # -------------------------------------------------------------- installer
    def uv(self) -> str | None:
        found = shutil.which("uv")
        if found:
            return found
        sibling = Path(sys.executable).parent / "uv"
        return str(sibling) if sibling.exists() else None

    def pip_install(self, comp: Component, args: Sequence[str], title: str) -> None:
        """Install pip arguments into the target interpreter with the configured installer:
        uv with every inherited package pinned and excluded, pip as the fallback
        (agent/uvinstall.py)."""
        from agent import uvinstall

        self.ensure_python(comp)
        try:
            uvinstall.install(self, comp, args, title)
        finally:
            self.invalidate()

    # -------------------------------------------------------------- git
    def git(self, comp: Component, args: Sequence[str], title: str, cwd: Path | None = None,
            timeout: float | None = None, env: dict[str, str] | None = None) -> None:
        result = procs.run(["git", *args], log=comp.log, timeout=timeout or comp.timeout,
                           cwd=cwd, title=title, env=env)
        if not result.ok:
            why = "timed out" if result.timed_out else f"exit {result.returncode}"
            text = procs.tail(comp.log, 5)
            if "dubious ownership" in text:
                where = cwd or (args[-1] if args else "")
                raise InstallError(f"git refuses {where} (dubious ownership): run "
                                   f"`git config --global --add safe.directory '*'` or fix the "
                                   f"folder's owner")
            raise InstallError(f"{title} failed ({why})")


def requirement_problems(ctx: Ctx, reqs) -> list[str]:
    from agent.reqs import unmet

    try:
        env = ctx.pyenv()
    except PythonUnavailable as exc:
        return [str(exc)]
    return unmet(reqs, env)
