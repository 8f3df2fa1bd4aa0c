"""Issue 3 figures for the resident agent (`pod-agent run`), on a fully installed workspace
(default components' shape + 30 extra nodes) with the fake ComfyUI server.

    python bench/bench_agent.py [--trials 20] [--idle 60] [--files 50000]

1. marker deleted -> installer started (median, p95 over --trials)
2. resume: `pod-agent run` start -> ComfyUI process spawned
3. idle agent over --idle seconds: CPU % of one core, RSS, inotify watches, with --files files
   under models/ and the venv
4. custom node change -> restart begun (quiet period 2 s)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workspace import ROOT, build, cli  # noqa: E402


def wait(pred, timeout=60.0, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError("benchmark condition not reached")


def starts(ws) -> list[dict]:
    try:
        return [json.loads(x) for x in ws["record"].read_text().splitlines() if x]
    except FileNotFoundError:
        return []


def service(ws) -> dict:
    try:
        return json.loads(next((ws["root"] / ".pod-agent" / "run").glob("*/service.json"))
                          .read_text())
    except (StopIteration, OSError, ValueError):
        return {}


def inotify_watches(pid: int) -> int:
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == "anon_inode:inotify":
                info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
                total += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def start_agent(ws, log: Path) -> subprocess.Popen:
    env = dict(os.environ, POD_AGENT_GPU="0")
    return subprocess.Popen([sys.executable, "-m", "agent", "run", *ws["args"]], cwd=ROOT,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop_agent(proc: subprocess.Popen) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    return time.monotonic() - t0


def pct(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--files", type=int, default=50000)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = build(Path(tmp))
        # a component whose installer records when it started
        stamp = Path(tmp) / "started.txt"
        cfg = yaml.safe_load(ws["config"].read_text())
        cfg["components"]["probe_component"] = {
            "kind": "command", "run": f"date +%s.%N > {stamp}", "check": f"test -s {stamp}"}
        ws["config"].write_text(yaml.safe_dump(cfg, sort_keys=False))
        assert cli(ws, "install").returncode == 0
        rows = []
        log = Path(tmp) / "agent.log"

        # 2. resume
        resume = []
        for _ in range(5):
            ws["record"].unlink(missing_ok=True)
            t0 = time.time()
            proc = start_agent(ws, log)
            first = wait(lambda: starts(ws))[0]
            resume.append(first["time"] - t0)
            wait(lambda: service(ws).get("state") == "running")
            stop_agent(proc)
        rows.append(("resume: agent start -> ComfyUI spawned", resume, "s",
                     "includes the agent's Python start-up"))

        # 1. marker deleted -> installer started
        proc = start_agent(ws, log)
        wait(lambda: service(ws).get("state") == "running")
        marker = ws["root"] / ".install_markers" / "probe_component.done"
        lat = []
        for _ in range(opts.trials):
            wait(lambda: marker.exists())
            time.sleep(0.3)  # let the previous reconcile settle (not a measurement)
            stamp.write_text("")
            t0 = time.time()
            marker.unlink()
            wait(lambda: stamp.read_text().strip())
            lat.append(float(stamp.read_text()) - t0)
        wait(lambda: marker.exists())
        rows.append(("marker deleted -> installer started", lat, "s", "inotify"))

        # 4. custom node change -> restart begun
        node = ws["root"] / "ComfyUI" / "custom_nodes" / "node-03" / "__init__.py"
        quiet = cfg["agent"]["restart_quiet_period"]
        restart, stopped = [], []
        for _ in range(5):
            n = len(starts(ws))
            old = psutil.Process(starts(ws)[-1]["pid"])
            time.sleep(0.5)
            t0 = time.time()
            node.write_text(f"# {t0}\n")
            wait(lambda: not old.is_running())
            stopped.append(time.time() - t0)
            wait(lambda: len(starts(ws)) > n)
            restart.append(starts(ws)[-1]["time"] - t0)
            wait(lambda: service(ws).get("state") == "running")
        rows.append((f"node change -> old ComfyUI gone (quiet {quiet:g}s)", stopped, "s",
                     "restart begun: reconcile, queue check, SIGTERM"))
        rows.append((f"node change -> ComfyUI respawned (quiet {quiet:g}s)", restart, "s",
                     "stop + spawn included"))

        # 3. idle with many files under models/ and the venv
        watches_before = inotify_watches(proc.pid)
        models = ws["root"] / "ComfyUI" / "models"
        site = next((ws["root"] / "venv" / "lib").glob("python*")) / "site-packages" / "bulk"
        for i in range(opts.files):
            folder = (models if i % 2 else site) / f"d{i // 500:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"f{i}.bin").write_bytes(b"x")
        time.sleep(6)  # a watcher refresh runs every 5 s (not a measurement)
        watches_after = inotify_watches(proc.pid)
        p = psutil.Process(proc.pid)
        c0 = sum(p.cpu_times()[:2])
        time.sleep(opts.idle)
        cpu = (sum(p.cpu_times()[:2]) - c0) / opts.idle * 100
        rss = p.memory_info().rss / 2**20
        stop_s = stop_agent(proc)

        print(f"workspace: 8 components, 46 node repos, {len(ws['names'])} distributions; "
              f"{opts.trials} trials")
        print("| measurement | median | p95 | max | unit | note |")
        print("|---|---|---|---|---|---|")
        for name, samples, unit, note in rows:
            print(f"| {name} | {statistics.median(samples):.3f} | {pct(samples, 0.95):.3f} | "
                  f"{max(samples):.3f} | {unit} | {note} |")
        print(f"| idle CPU over {opts.idle:g}s | {cpu:.2f} | | | % of one core | |")
        print(f"| idle RSS | {rss:.1f} | | | MiB | |")
        print(f"| inotify watches | {watches_before} -> {watches_after} | | | watches | "
              f"before -> after adding {opts.files} files under models/ and the venv |")
        print(f"| SIGTERM -> agent exited | {stop_s:.2f} | | | s | ComfyUI stopped too |")


if __name__ == "__main__":
    main()
