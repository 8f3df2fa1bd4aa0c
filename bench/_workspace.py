"""Build a realistic, offline workspace for the benchmarks: the default components' shape
(ComfyUI, its requirements, the additional packages, ComfyUI-Manager, GGUF, custom nodes) with
local git upstreams and locally built wheels, plus N extra custom nodes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import build_wheel, make_repo, write_yaml  # noqa: E402

FAKE = ROOT / "tests" / "fake_comfyui" / "main.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(base: Path, extra_nodes: int = 30, packages: int = 120) -> dict:
    """Returns {"args": [...], "root", "python", "config", "port", "record", ...}."""
    base.mkdir(parents=True, exist_ok=True)
    wheels = base / "wheels"
    names = [f"benchpkg-{i:03d}" for i in range(packages)]
    for name in names:
        build_wheel(wheels, name, "1.0")
    root = base / "ws"
    root.mkdir()
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(venv)], check=True)
    up = base / "upstreams"
    core_reqs = "".join(f"{n}>=1.0\n" for n in names[:46])
    urls = {"comfyui": make_repo(up / "ComfyUI", {"main.py": FAKE.read_text(),
                                                  "requirements.txt": core_reqs})}
    for name, reqs in (("ComfyUI-Manager", names[46:52]), ("ComfyUI-GGUF", names[52:55])):
        urls[name] = make_repo(up / name, {"__init__.py": "",
                                           "requirements.txt": "\n".join(reqs) + "\n"})
    nodes = []
    for i in range(16 + extra_nodes):
        reqs = names[55 + (i * 2) % 60: 55 + (i * 2) % 60 + 2]
        nodes.append(make_repo(up / f"node-{i:02d}", {
            "__init__.py": "NODE_CLASS_MAPPINGS = {}\n",
            "requirements.txt": "\n".join(reqs) + "\n"}))
    port = free_port()
    record = base / "starts.jsonl"
    config = {
        "installer": "pip",
        "installer_args": ["--no-index", "--find-links", str(wheels)],
        "comfyui": {"venv": None, "python": str(venv / "bin" / "python"),
                    "args": ["--listen", "127.0.0.1", "--port", str(port)], "port": port,
                    "env": {"FAKE_COMFY_RECORD": str(record),
                            "FAKE_COMFY_CONTROL": str(base / "control")}},
        "agent": {"restart_quiet_period": 2.0, "reconcile_interval": 300},
        "defaults": {"retries": 0},
        "components": {
            "comfyui_core": {"kind": "git", "repo": urls["comfyui"], "dest": "{comfyui}",
                             "required": True},
            "dependencies_main": {"kind": "pip", "requirements": ["{comfyui}/requirements.txt"],
                                  "depends_on": ["comfyui_core"], "required": True},
            "dependencies_additional": {"kind": "pip", "packages": [
                f"{n}>=1.0" for n in names[100:110]], "depends_on": ["dependencies_main"]},
            "manager_prerequisites": {"kind": "pip", "packages": names[110:112],
                                      "depends_on": ["dependencies_main"]},
            "comfyui_manager": {"kind": "git", "repo": urls["ComfyUI-Manager"],
                                "dest": "{comfyui}/custom_nodes/ComfyUI-Manager",
                                "requirements": "auto",
                                "depends_on": ["comfyui_core", "manager_prerequisites"]},
            "custom_nodes": {"kind": "nodes", "nodes": nodes,
                             "depends_on": ["comfyui_core", "dependencies_main"]},
            "gguf_node": {"kind": "git", "repo": urls["ComfyUI-GGUF"],
                          "dest": "{comfyui}/custom_nodes/ComfyUI-GGUF",
                          "requirements": "auto", "depends_on": ["comfyui_core"]},
            "sageattention": {"kind": "command", "run": "true", "requires_gpu": True,
                              "background": True, "depends_on": ["dependencies_main"]},
            "overall_installation": {"kind": "overall"},
        },
    }
    config_path = write_yaml(base / "config.yaml", config)
    return {"root": root, "python": venv / "bin" / "python", "config": config_path,
            "args": ["--workspace", str(root), "--config", str(config_path)], "port": port,
            "record": record, "wheels": wheels, "names": names, "base": base}


def all_requirement_files(ws: dict) -> list[Path]:
    cn = ws["root"] / "ComfyUI" / "custom_nodes"
    return [ws["root"] / "ComfyUI" / "requirements.txt"] + sorted(cn.glob("*/requirements.txt"))


def cli(ws: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full = dict(os.environ, POD_AGENT_GPU="0", GIT_CONFIG_NOSYSTEM="1")
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "agent", *args, *ws["args"]], cwd=ROOT,
                          capture_output=True, text=True, env=full)
