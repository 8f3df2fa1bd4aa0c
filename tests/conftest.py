"""Fixtures: a temporary workspace with its own venv, local upstreams, local wheels.

Nothing here touches /workspace (the config loader refuses it through POD_AGENT_FORBID_WORKSPACE),
reaches the network, or outlives its test (see `no_leaks`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.helpers import build_wheel, make_repo, wait_for, write_yaml

# ----------------------------------------------------------------------------- pytest-xdist
_TALLIES: list[dict] = []  # the reliability tables of the xdist workers (controller side)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    import json

    data = getattr(node, "workeroutput", {}).get("reliability_tally")
    if data:
        _TALLIES.append(json.loads(data))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Under pytest-xdist: one reliability table from the workers' tables."""
    if _TALLIES:
        from tests.reliability.conftest import merge, print_table

        print_table(terminalreporter, merge(_TALLIES))


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    gitconfig = home / ".gitconfig"
    gitconfig.write_text("[user]\n\tname = test\n\temail = test@example.invalid\n"
                         "[init]\n\tdefaultBranch = main\n[protocol \"file\"]\n\tallow = always\n")
    saved = dict(os.environ)
    os.environ.update({
        "POD_AGENT_FORBID_WORKSPACE": "/workspace",
        "POD_AGENT_GPU": "0",
        "GIT_CONFIG_GLOBAL": str(gitconfig),
        "GIT_CONFIG_NOSYSTEM": "1",
        "PIP_NO_INPUT": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    })
    os.environ.pop("POD_AGENT_WORKSPACE", None)
    os.environ.pop("POD_AGENT_CONFIG", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def no_leaks():
    """Every child process and thread a test starts must be gone when it ends."""
    me = psutil.Process()
    threads_before = {t.ident for t in threading.enumerate()}
    yield
    def leftovers():
        return [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    try:
        wait_for(lambda: not leftovers(), timeout=10, what="child processes to exit")
    except AssertionError:
        procs = leftovers()
        for p in procs:
            p.kill()
        raise AssertionError(f"test leaked processes: {[p.cmdline() for p in procs]}")
    def extra_threads():
        return [t for t in threading.enumerate()
                if t.ident not in threads_before and t.is_alive() and not t.daemon]
    wait_for(lambda: not extra_threads(), timeout=10, what="threads to stop")


@pytest.fixture(scope="session")
def wheels(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    for name, version in [("podtest-alpha", "1.0"), ("podtest-alpha", "2.0"),
                          ("podtest-beta", "1.0"), ("podtest-gamma", "1.0"),
                          ("podtest-delta", "1.0"), ("podtest-nodea", "1.0"),
                          ("podtest-nodeb", "1.0"), ("podtest-nodec", "1.0")]:
        build_wheel(folder, name, version)
    return folder


@dataclass
class Workspace:
    root: Path
    python: Path
    wheels: Path
    upstreams: Path
    config_path: Path
    config: dict = field(default_factory=dict)
    urls: dict = field(default_factory=dict)

    @property
    def markers(self) -> Path:
        return self.root / ".install_markers"

    @property
    def comfyui(self) -> Path:
        return self.root / "ComfyUI"

    def args(self) -> list[str]:
        return ["--workspace", str(self.root), "--config", str(self.config_path)]

    def save(self) -> None:
        write_yaml(self.config_path, self.config)

    def marker(self, name: str) -> Path:
        return self.markers / f"{name}.done"


def make_venv(path: Path) -> Path:
    """A venv that sees the base interpreter's packages (pip included), made in ~50 ms."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(path)], check=True)
    return path / "bin" / "python"


@pytest.fixture
def ws(tmp_path, wheels) -> Workspace:
    """A workspace with a venv, a fake ComfyUI upstream, two node upstreams and a config that
    mirrors the default components (installer offline: --no-index --find-links)."""
    root = tmp_path / "ws"
    root.mkdir()
    up = tmp_path / "upstreams"
    python = make_venv(root / "venv")
    urls = {
        "comfyui": make_repo(up / "ComfyUI", {
            "main.py": "print('fake comfyui')\n",
            "requirements.txt": "podtest-alpha>=1.0\npodtest-beta\n",
        }),
        "node_a": make_repo(up / "node-a", {"__init__.py": "", "requirements.txt":
                                            "podtest-nodea\n"}),
        "node_b": make_repo(up / "node-b", {"__init__.py": "", "requirements.txt":
                                            "podtest-nodeb\n"}),
        "gguf": make_repo(up / "ComfyUI-GGUF", {"__init__.py": "", "requirements.txt":
                                                "podtest-delta\n"}),
    }
    config = {
        "installer": "pip",
        "installer_args": ["--no-index", "--find-links", str(wheels)],
        "comfyui": {"venv": None, "python": str(python)},
        "defaults": {"retries": 0, "retry_backoff": 0, "timeout": 120},
        "components": {
            "comfyui_core": {"kind": "git", "repo": urls["comfyui"], "dest": "{comfyui}",
                             "required": True},
            "dependencies_main": {"kind": "pip", "requirements": ["{comfyui}/requirements.txt"],
                                  "depends_on": ["comfyui_core"], "required": True},
            "dependencies_additional": {"kind": "pip", "packages": ["podtest-gamma>=1.0"],
                                        "depends_on": ["dependencies_main"]},
            "custom_nodes": {"kind": "nodes", "nodes": [urls["node_a"], urls["node_b"]],
                             "depends_on": ["comfyui_core", "dependencies_main"]},
            "gguf_node": {"kind": "git", "repo": urls["gguf"],
                          "dest": "{comfyui}/custom_nodes/ComfyUI-GGUF",
                          "requirements": "auto", "depends_on": ["comfyui_core"]},
            "sageattention": {"kind": "command", "run": "echo built > {workspace}/sage.txt",
                              "check": "test -f {workspace}/sage.txt", "requires_gpu": True,
                              "background": True, "depends_on": ["dependencies_main"],
                              "log": "{workspace}/sageattention_install.log"},
            "overall_installation": {"kind": "overall"},
        },
    }
    w = Workspace(root=root, python=python, wheels=wheels, upstreams=up,
                  config_path=tmp_path / "config.yaml", config=config, urls=urls)
    w.save()
    return w
