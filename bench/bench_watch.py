"""Issue 9: the resident agent's threads, inotify watches, RSS and idle CPU against the number of
custom nodes. Starts `pod-agent run --no-comfyui` (no components, no ComfyUI) on a workspace of
N node folders (each with a `.git` folder and a few top-level files), lets it settle past the
first health checks, then samples it while idle.

    python bench/bench_watch.py [--nodes 10,50,200,500] [--idle 20] [--settle 15] [--src DIR]
                                [--poll SECONDS]

--src runs the agent from another checkout (e.g. `git worktree add /tmp/old HEAD~N` to measure
an older version side by side): PYTHONPATH=DIR, cwd=DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent


def make_workspace(base: Path, nodes: int) -> tuple[Path, Path]:
    ws = base / "ws"
    cn = ws / "ComfyUI" / "custom_nodes"
    for i in range(nodes):
        node = cn / f"node-{i:03d}"
        (node / ".git" / "refs" / "heads").mkdir(parents=True)
        (node / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (node / ".git" / "refs" / "heads" / "main").write_text(f"{i:040x}\n")
        (node / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
        (node / "nodes.py").write_text("x = 1\n")
        (node / "requirements.txt").write_text("")
        (node / "js").mkdir()
    (ws / ".install_markers").mkdir(parents=True)
    config = {"comfyui": {"venv": None}, "components": {},
              "http": {"address": "127.0.0.1", "port": 0},
              "agent": {"reconcile_interval": 300}}
    conf = base / "config.yaml"
    conf.write_text(yaml.safe_dump(config))
    return ws, conf


def inotify_watches(pid: int) -> tuple[int, int]:
    """(inotify instances, watches) held by the process."""
    fds = watches = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == "anon_inode:inotify":
                fds += 1
                info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
                watches += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
        except OSError:
            continue
    return fds, watches


def agent_state(ws: Path) -> dict:
    try:
        return json.loads(next((ws / ".pod-agent" / "run").glob("*/agent.json")).read_text())
    except (StopIteration, OSError, ValueError):
        return {}


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise TimeoutError(f"benchmark: {what} not reached in {timeout} s")


def measure(src: Path, nodes: int, idle: float, settle: float, poll: float | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ws, conf = make_workspace(Path(tmp), nodes)
        env = dict(os.environ, POD_AGENT_GPU="0", PYTHONPATH=str(src))
        args = [sys.executable, "-m", "agent", "run", "--no-comfyui", "--workspace", str(ws),
                "--config", str(conf)]
        if poll:
            args += ["--poll", str(poll)]
        log = open(Path(tmp) / "agent.out", "w")
        proc = subprocess.Popen(args, cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            t0 = time.monotonic()
            wait(lambda: agent_state(ws).get("watch", {}).get("watches", 0) > 0
                 or proc.poll() is not None, 120, "agent started")
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited: {(Path(tmp) / 'agent.out').read_text()}")
            started = time.monotonic() - t0
            time.sleep(settle)  # past the boot reconcile and the first health checks
            p = psutil.Process(proc.pid)
            c0, w0 = p.cpu_times(), time.monotonic()
            peak_threads = p.num_threads()
            while time.monotonic() - w0 < idle:
                time.sleep(0.5)
                peak_threads = max(peak_threads, p.num_threads())
            c1, w1 = p.cpu_times(), time.monotonic()
            cpu = (c1.user + c1.system - c0.user - c0.system) / (w1 - w0) * 100
            fds, watches = inotify_watches(proc.pid)
            return {"nodes": nodes, "threads": p.num_threads(), "peak_threads": peak_threads,
                    "inotify_fds": fds, "watches": watches,
                    "agent_watches": agent_state(ws).get("watch", {}).get("watches"),
                    "mode": agent_state(ws).get("watch", {}).get("mode"),
                    "rss_mb": p.memory_info().rss / 2**20, "idle_cpu_pct": cpu,
                    "start_s": started}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="10,50,200,500")
    ap.add_argument("--idle", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=15.0)
    ap.add_argument("--src", type=Path, default=ROOT)
    ap.add_argument("--poll", type=float, default=None)
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    rows = [measure(opts.src.resolve(), int(n), opts.idle, opts.settle, opts.poll)
            for n in opts.nodes.split(",")]
    if opts.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"agent from {opts.src.resolve()}, idle {opts.idle:.0f} s after {opts.settle:.0f} s "
          f"settle{', --poll ' + str(opts.poll) if opts.poll else ''}")
    print(f"{'nodes':>5} {'mode':>8} {'threads':>7} {'peak':>5} {'inotify fds':>11} "
          f"{'watches':>7} {'RSS MB':>7} {'idle CPU %':>10}")
    for r in rows:
        print(f"{r['nodes']:>5} {r['mode'] or '?':>8} {r['threads']:>7} {r['peak_threads']:>5} "
              f"{r['inotify_fds']:>11} {r['watches']:>7} {r['rss_mb']:>7.1f} "
              f"{r['idle_cpu_pct']:>10.2f}")


if __name__ == "__main__":
    main()
