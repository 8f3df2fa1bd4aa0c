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


# ----------------------------------------------------------------------------- issue 9
_STAMP = "2026-01-01 00:00:00\n"  # a legacy marker: the first `install` upgrades it in place


def build_installed(base: Path, counts: list[int], packages: int = 120) -> dict:
    """Fully installed workspaces with counts[i] custom nodes each, built without running an
    installer per node: one venv with every wheel installed (one pip call), node checkouts
    copied from local git upstreams (a copy of a repository is a clone for every probe),
    legacy markers that `pod-agent install` upgrades (the probe runs for real) -> every
    workspace is then a no-op. Returns {"python", "wheels", "names", "spaces": {n: ws}}."""
    import shutil

    base.mkdir(parents=True, exist_ok=True)
    wheels = base / "wheels"
    names = [f"benchpkg-{i:03d}" for i in range(packages)]
    for name in names:
        build_wheel(wheels, name, "1.0")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--disable-pip-version-check", *map(str, sorted(wheels.glob("*.whl")))],
                   check=True)
    up = base / "upstreams"
    core = make_repo(up / "ComfyUI", {"main.py": FAKE.read_text(), "requirements.txt":
                                      "".join(f"{n}>=1.0\n" for n in names[:46])})
    manager = make_repo(up / "ComfyUI-Manager", {"__init__.py": "", "requirements.txt":
                                                 "\n".join(names[46:52]) + "\n"})
    gguf = make_repo(up / "ComfyUI-GGUF", {"__init__.py": "", "requirements.txt":
                                           "\n".join(names[52:55]) + "\n"})
    templates = []  # 30 distinct node repositories; node i is a copy of template i % 30
    for i in range(30):
        reqs = names[55 + i * 2: 57 + i * 2]
        templates.append(up / f"template-{i:02d}")
        make_repo(templates[-1], {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n",
                                  "requirements.txt": "\n".join(reqs) + "\n"})
    most = max(counts)
    for i in range(most):
        shutil.copytree(templates[i % 30], up / f"node-{i:03d}", symlinks=True)
    spaces = {}
    for count in counts:
        root = base / f"ws-{count}"
        cn = root / "ComfyUI" / "custom_nodes"
        shutil.copytree(up / "ComfyUI", root / "ComfyUI", symlinks=True)
        for name in ("ComfyUI-Manager", "ComfyUI-GGUF"):
            shutil.copytree(up / name, cn / name, symlinks=True)
        nodes = []
        for i in range(count):
            shutil.copytree(up / f"node-{i:03d}", cn / f"node-{i:03d}", symlinks=True)
            nodes.append((up / f"node-{i:03d}").as_uri())
        config = {
            "installer": "pip",
            "installer_args": ["--no-index", "--find-links", str(wheels)],
            "comfyui": {"venv": None, "python": str(python), "port": free_port()},
            "defaults": {"retries": 0},
            "components": {
                "comfyui_core": {"kind": "git", "repo": core, "dest": "{comfyui}",
                                 "required": True},
                "dependencies_main": {"kind": "pip",
                                      "requirements": ["{comfyui}/requirements.txt"],
                                      "depends_on": ["comfyui_core"], "required": True},
                "dependencies_additional": {"kind": "pip", "packages": [
                    f"{n}>=1.0" for n in names[100:110]], "depends_on": ["dependencies_main"]},
                "manager_prerequisites": {"kind": "pip", "packages": names[110:112],
                                          "depends_on": ["dependencies_main"]},
                "comfyui_manager": {"kind": "git", "repo": manager,
                                    "dest": "{comfyui}/custom_nodes/ComfyUI-Manager",
                                    "requirements": "auto",
                                    "depends_on": ["comfyui_core", "manager_prerequisites"]},
                "custom_nodes": {"kind": "nodes", "nodes": nodes,
                                 "depends_on": ["comfyui_core", "dependencies_main"]},
                "gguf_node": {"kind": "git", "repo": gguf,
                              "dest": "{comfyui}/custom_nodes/ComfyUI-GGUF",
                              "requirements": "auto", "depends_on": ["comfyui_core"]},
                "sageattention": {"kind": "command", "run": "true", "requires_gpu": True,
                                  "background": True, "depends_on": ["dependencies_main"]},
                "overall_installation": {"kind": "overall"},
            },
        }
        config_path = write_yaml(base / f"config-{count}.yaml", config)
        markers = root / ".install_markers"
        markers.mkdir(parents=True)
        for name in config["components"]:
            if name not in ("sageattention", "overall_installation"):
                (markers / f"{name}.done").write_text(_STAMP)
        ws = {"root": root, "python": python, "config": config_path, "nodes": count,
              "args": ["--workspace", str(root), "--config", str(config_path)],
              "packages": config["components"]["dependencies_additional"]["packages"]
              + config["components"]["manager_prerequisites"]["packages"]}
        first = cli(ws, "install")
        if first.returncode != 0:
            raise RuntimeError(f"{count} nodes: the first install failed:\n"
                               f"{first.stdout}{first.stderr}")
        spaces[count] = ws
    return {"python": python, "wheels": wheels, "names": names, "spaces": spaces}
