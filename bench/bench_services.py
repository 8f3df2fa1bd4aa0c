"""Time from `pod-agent run` on a resumed volume to JupyterLab answering /api, next to ComfyUI
(the fake one from the tests) answering /system_stats; and JupyterLab started by hand, for the
agent's share. Prints a table (seconds).

    python bench/bench_services.py [--jupyter-lab PATH] [--rounds 3]

Needs JupyterLab (`pip install jupyterlab`, anywhere: --jupyter-lab points at its script).
Everything lives in a temporary folder; nothing reaches the network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent.parent
FAKE = HERE / "tests" / "fake_comfyui" / "main.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except Exception:  # noqa: BLE001 - not yet
        return False


def wait(urls: dict[str, str], began: float, limit: float = 120.0) -> dict[str, float]:
    got: dict[str, float] = {}
    while len(got) < len(urls) and time.monotonic() - began < limit:
        for name, url in urls.items():
            if name not in got and answers(url):
                got[name] = time.monotonic() - began
        time.sleep(0.05)
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jupyter-lab", default=shutil.which("jupyter-lab"))
    ap.add_argument("--rounds", type=int, default=3)
    opts = ap.parse_args()
    if not opts.jupyter_lab:
        sys.exit("jupyter-lab not found: pip install jupyterlab, or pass --jupyter-lab PATH")
    base = Path(tempfile.mkdtemp(prefix="bench-services-"))
    try:
        ws = base / "ws"
        ws.mkdir()
        cport, jport = free_port(), free_port()
        cfg = {
            "comfyui": {"venv": None, "python": sys.executable, "port": cport,
                        "args": ["--listen", "127.0.0.1", "--port", str(cport)]},
            "http": {"port": 0},
            "components": {"comfyui_core": {
                "kind": "command", "required": True, "check": "test -f {comfyui}/main.py",
                "run": f"mkdir -p {{comfyui}} && cp {FAKE} {{comfyui}}/main.py"}},
            "services": {"jupyter": {
                "enabled": "auto", "auto_env": ["JUPYTER_PASSWORD"],
                "command": ["jupyter-lab", "--no-browser", "--allow-root", f"--port={jport}",
                            "--ServerApp.root_dir={workspace}"],
                "env": {"JUPYTER_TOKEN": "${JUPYTER_PASSWORD}"}, "port": jport,
                "ready": "/api", "restart": "always"}},
        }
        (base / "config.yaml").write_text(yaml.safe_dump(cfg))
        args = ["--workspace", str(ws), "--config", str(base / "config.yaml")]
        env = dict(os.environ, JUPYTER_PASSWORD="bench-secret-123", POD_AGENT_GPU="0",
                   PATH=f"{Path(opts.jupyter_lab).parent}{os.pathsep}{os.environ['PATH']}",
                   JUPYTER_RUNTIME_DIR=str(base / "jupyter-runtime"), PYTHONPATH=str(HERE))
        subprocess.run([sys.executable, "-m", "agent", "install", *args], env=env, check=True,
                       capture_output=True)
        urls = {"jupyter": f"http://127.0.0.1:{jport}/api",
                "comfyui": f"http://127.0.0.1:{cport}/system_stats"}
        rows = []
        for i in range(opts.rounds):
            began = time.monotonic()
            agent = subprocess.Popen([sys.executable, "-m", "agent", "run", *args], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
            got = wait(urls, began)
            agent.terminate()
            agent.wait(60)
            began = time.monotonic()
            bare = subprocess.Popen([opts.jupyter_lab, "--no-browser", "--allow-root",
                                     f"--port={jport}", f"--ServerApp.root_dir={ws}"],
                                    env=dict(env, JUPYTER_TOKEN="bench-secret-123"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            alone = wait({"jupyter": urls["jupyter"]}, began).get("jupyter")
            bare.terminate()
            bare.wait(30)
            rows.append((i, got.get("jupyter"), got.get("comfyui"), alone))
        print(f"{'round':>5}  {'run->jupyter':>12}  {'run->comfyui':>12}  {'jupyter alone':>13}")
        for i, j, c, a in rows:
            print(f"{i:>5}  {j or float('nan'):>12.2f}  {c or float('nan'):>12.2f}  "
                  f"{a or float('nan'):>13.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
