"""Plain data shared by every layer. No I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class AgentError(Exception):
    """An expected failure: the CLI prints it as one line and exits 1."""


class ConfigError(AgentError):
    """Invalid configuration: one line naming file, component and problem; exit 2.

    The message is made one line here, whatever it quotes: control characters (a newline in a
    name, an escape sequence) are shown escaped, and it is cut at MAX_LEN characters."""

    MAX_LEN = 1000

    def __init__(self, message: object = "") -> None:
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
        if len(text) > self.MAX_LEN:
            text = text[:self.MAX_LEN - 3] + "..."
        super().__init__(text)


@dataclass(frozen=True)
class Component:
    name: str
    kind: str
    depends_on: tuple[str, ...] = ()
    enabled: bool = True
    background: bool = False
    required: bool = False
    requires_gpu: bool = False
    timeout: float = 3600.0
    retries: int = 1
    retry_backoff: float = 5.0
    log: Path = Path("install.log")
    restart_comfyui: bool = True  # ComfyUI loads it: restart ComfyUI after it changed
    spec: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComfyUISettings:
    dir: Path
    python: Path
    venv: Path | None
    base_python: str
    args: tuple[str, ...]
    port: int
    host: str
    env: Mapping[str, str]
    log: Path
    sage_attention: str  # auto | on | off


@dataclass(frozen=True)
class Config:
    workspace: Path
    markers_dir: Path
    state_dir: Path
    progress_log: Path
    installer: str  # auto | uv | pip
    installer_env: Mapping[str, str]
    installer_args: tuple[str, ...]
    comfyui: ComfyUISettings
    components: Mapping[str, Component]
    agent: Mapping[str, Any]
    sources: tuple[str, ...]
    health: Mapping[str, Any] = field(default_factory=dict)  # `health:` (see agent/config.py)
    http: Mapping[str, Any] = field(default_factory=dict)  # `http:` (see agent/config.py)
    services: Mapping[str, Any] = field(default_factory=dict)  # agent/service_config.py
    hooks: Any = None  # agent/service_config.Hooks

    @property
    def runtime_dir(self) -> Path:
        """Per-host files (agent pid, ComfyUI pid): a volume may be shared by several pods."""
        import socket

        return self.state_dir / "run" / socket.gethostname()

    def order(self) -> list[str]:
        """Component names in dependency order (stable: config order breaks ties)."""
        done: list[str] = []
        seen: set[str] = set()
        for root in self.components:  # depth-first, without recursion: chains can be long
            if root in seen:
                continue
            seen.add(root)
            stack = [(root, iter(self.components[root].depends_on))]
            while stack:
                name, deps = stack[-1]
                for dep in deps:
                    if dep not in seen:
                        seen.add(dep)
                        stack.append((dep, iter(self.components[dep].depends_on)))
                        break
                else:
                    stack.pop()
                    done.append(name)
        # derived components last, whatever file they came from
        return [n for n in done if self.components[n].kind != "overall"] + \
            [n for n in done if self.components[n].kind == "overall"]


@dataclass(frozen=True)
class Marker:
    timestamp: str
    meta: Mapping[str, str]

    @property
    def legacy(self) -> bool:
        return "fingerprint" not in self.meta


class State(str, enum.Enum):
    INSTALLED = "installed"
    MISSING = "missing"
    BROKEN = "broken"
    STALE = "stale"
    FAILED = "failed"
    SKIPPED = "skipped"
    DISABLED = "disabled"
    INSTALLING = "installing"


@dataclass(frozen=True)
class Observed:
    state: State
    reason: str = ""
    marker: Marker | None = None
    legacy: bool = False  # installed per probe, but the marker is a legacy one-liner


class Action(str, enum.Enum):
    SKIP = "skip"
    INSTALL = "install"
    REINSTALL = "reinstall"
    UPGRADE_MARKER = "upgrade-marker"
    SKIP_NO_GPU = "skip-no-gpu"
    DISABLED = "disabled"


@dataclass(frozen=True)
class Step:
    name: str
    action: Action
    reason: str = ""
    needs: tuple[str, ...] = ()  # dependencies that must be installed first
    forced: bool = False  # reinstall even when installed (`install --force`)


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # installed | already | failed | blocked | skipped | disabled
    message: str
    log: str = ""
    tail: str = ""
    duration: float = 0.0
