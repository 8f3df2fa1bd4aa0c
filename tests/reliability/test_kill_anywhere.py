"""Kill anywhere: kill -9 the CLI alone, and separately the whole process tree (what a pod stop
does), at random instants of a full install (the venv's creation included) and of a node change
handled by the running agent. After each kill: no marker (and no user-node record) claims an
incomplete component, judged by checks independent of the agent's own probes; then ONE next run
converges, and nothing the killed run started is left running.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.helpers import build_wheel, git, make_repo, run_cli, wait_for
from tests.reliability.conftest import size

TAG = "POD_AGENT_TEST_TRIAL"  # every process of a trial inherits it: the pod's process tree
MODULES = {"dependencies_main": ["podtest_alpha", "podtest_beta"],
           "dependencies_additional": ["podtest_gamma"],
           "custom_nodes": ["podtest_nodea", "podtest_nodeb"],
           "gguf_node": ["podtest_delta"]}
CHECKOUTS = {"comfyui_core": ["ComfyUI"],
             "custom_nodes": ["ComfyUI/custom_nodes/node-a", "ComfyUI/custom_nodes/node-b"],
             "gguf_node": ["ComfyUI/custom_nodes/ComfyUI-GGUF"]}


def tagged(trial: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TAG) == trial:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def pod_stop(trial: str) -> None:
    """Every process of the trial dies at once, whatever its session (SIGKILL, no grace)."""
    for _ in range(50):
        procs = tagged(trial)
        if not procs:
            return
        for proc in procs:
            try:
                proc.suspend()  # freeze first, so nothing spawns while we kill
            except psutil.Error:
                pass
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)
    raise AssertionError(f"trial {trial}: processes survive SIGKILL")


def start(args: list[str], trial: str, out: Path) -> subprocess.Popen:
    env = dict(os.environ, **{TAG: trial})
    return subprocess.Popen([sys.executable, "-m", "agent", *args], env=env,
                            stdout=open(out, "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def truth(root: Path, upstream_heads: dict[str, str]) -> dict[str, bool]:
    """Is each component really complete? Checked without the agent's code: git's own view of
    each checkout, and imports in the volume's interpreter."""
    python = root / "pyenv" / "bin" / "python"
    imports: dict[str, bool] = {}
    if python.exists():
        code = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n"
                "    try:\n        importlib.import_module(m); out[m] = True\n"
                "    except Exception:\n        out[m] = False\nprint(json.dumps(out))")
        mods = [m for ms in MODULES.values() for m in ms] + ["pip"]
        proc = subprocess.run([str(python), "-c", code, *mods], capture_output=True, text=True,
                              timeout=60)
        try:
            imports = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            imports = {}
    pip_ok = imports.get("pip", False)

    def clean_checkout(rel: str) -> bool:
        path = root / rel
        if not (path / ".git").exists():
            return False
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"],
                              capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True)
        want = upstream_heads.get(Path(rel).name)
        return head.returncode == 0 and dirty.returncode == 0 and not dirty.stdout.strip() \
            and (want is None or head.stdout.strip() == want)

    out = {}
    for name in ("comfyui_core", "dependencies_main", "dependencies_additional",
                 "custom_nodes", "gguf_node"):
        ok = all(clean_checkout(r) for r in CHECKOUTS.get(name, []))
        ok = ok and all(imports.get(m, False) for m in MODULES.get(name, []))
        if name in MODULES:
            ok = ok and pip_ok
        out[name] = ok
    out["sageattention"] = False  # no GPU here: never installed, so a marker would be a lie
    out["overall_installation"] = all(v for k, v in out.items() if k != "sageattention")
    return out


def lies(root: Path, heads: dict[str, str]) -> list[str]:
    real = truth(root, heads)
    markers = root / ".install_markers"
    return [name for name, ok in real.items() if (markers / f"{name}.done").exists() and not ok]


@pytest.fixture
def kws(ws):
    """The `ws` workspace with a real volume venv: created on demand from the test's own
    interpreter (itself a venv, so the .pth inheritance is exercised too)."""
    ws.config["comfyui"] = {"venv": "{workspace}/pyenv", "base_python": sys.executable}
    ws.config["health"] = {"enabled": False}
    ws.config["http"] = {"enabled": False}
    ws.config["agent"] = {"restart_quiet_period": 0.5, "reconcile_interval": 600}
    ws.save()
    ws.heads = {Path(url).name: git("rev-parse", "HEAD", cwd=Path(url[len("file://"):]))
                for url in ws.urls.values()}
    ws.heads["ComfyUI"] = ws.heads.pop("ComfyUI")
    return ws


def converge_once(ws, root: Path, trial: str, out: Path) -> tuple[bool, str]:
    """The next run, exactly one, must converge."""
    args = ["install", "--workspace", str(root), "--config", str(ws.config_path)]
    proc = start(args, trial + "-next", out)
    try:
        code = proc.wait(300)
    finally:
        pod_stop(trial + "-next")
    st = run_cli("status", "--json", "--workspace", str(root), "--config", str(ws.config_path))
    try:
        verdict = json.loads(st.stdout)["verdict"]
    except (ValueError, KeyError):
        verdict = "unreadable"
    real = truth(root, ws.heads)
    bad = [n for n, ok in real.items() if not ok and n != "sageattention"]
    ok = code == 0 and verdict == "healthy" and not bad
    return ok, f"exit {code}, verdict {verdict}, not complete: {bad}"


def crashed(out: Path) -> bool:
    text = out.read_text(errors="replace") if out.exists() else ""
    return "Traceback" in text or "internal error" in text


@pytest.mark.parametrize("mode", ["cli", "tree"])
def test_kill_anywhere_during_a_full_install(kws, tmp_path, tally, mode):
    ws = kws
    rng = random.Random(f"install-{mode}")
    # calibrate: how long a full install from nothing takes here
    calib = tmp_path / "calibration"
    t0 = time.monotonic()
    ok, why = converge_once(ws, calib, f"calib-{mode}", tmp_path / "calib.out")
    full = time.monotonic() - t0
    assert ok, why
    failures = []
    phases: Counter = Counter()
    for i in range(size(1, 20)):
        root = tmp_path / f"trial{i}"
        trial = f"{mode}-{i}-{os.getpid()}"
        out = tmp_path / f"trial{i}.out"
        at = rng.uniform(0.3, full)
        proc = start(["install", "--workspace", str(root), "--config", str(ws.config_path)],
                     trial, out)
        try:
            proc.wait(at)
            finished = True  # it finished before the kill instant: still a valid case
        except subprocess.TimeoutExpired:
            finished = False
            if mode == "cli":
                proc.kill()
                proc.wait(10)
            else:
                pod_stop(trial)
        phases[phase_of(root, finished)] += 1
        lied = lies(root, ws.heads)
        converged, why = converge_once(ws, root, trial, out)
        leftover = tagged(trial)  # what the killed run started, still running
        for p in leftover:
            p.kill()
        note = (f"kill at {at:.1f}s{' (had finished)' if finished else ''}: lies {lied}; "
                f"{why}; leftover {len(leftover)}")
        if not tally.case(f"kill: install ({mode})", crash=crashed(out), lie=bool(lied),
                          leak=bool(leftover), converged=converged, note=note):
            failures.append(note)
    tally.info(f"kill: install ({mode})", "killed during: " + ", ".join(
        f"{k} {v}" for k, v in phases.most_common()) + f" (a full install takes {full:.1f}s)")
    assert not failures, failures


def phase_of(root: Path, finished: bool) -> str:
    """What the killed install was doing, from what it left behind."""
    if finished:
        return "nothing (had finished)"
    venv = root / "pyenv"
    if not venv.exists():
        return "before the venv"
    if not (venv / "pod-agent-venv.json").exists():
        return "venv creation"
    try:
        lines = (root / "installation_progress.log").read_text().splitlines()
    except OSError:
        return "unknown"
    doing = [ln.split("] ", 1)[-1].split(":")[0] for ln in lines if ": installing" in ln]
    return doing[-1] if doing else "unknown"


def test_kill_anywhere_during_a_node_change_handled_by_the_agent(kws, tmp_path, tally):
    """A user clones a node while the agent runs; the agent installs its requirements. Kill
    the agent (alone, or with its whole tree) at a random instant of that."""
    ws = kws
    root = ws.root
    proc = start(["install", *ws.args()], "base", tmp_path / "base.out")
    assert proc.wait(300) == 0, (tmp_path / "base.out").read_text()
    rng = random.Random("node-change")
    failures = []
    duration = None
    for i in range(size(2, 20) + 1):  # the first trial calibrates (no kill)
        mode = "cli" if i % 2 else "tree"
        pkg = f"podtest-trial{i}"
        build_wheel(ws.wheels, pkg, "1.0")
        url = make_repo(ws.upstreams / f"node-trial{i}", {
            "__init__.py": "", "requirements.txt": f"{pkg}\n"})
        trial = f"node-{i}-{os.getpid()}"
        out = tmp_path / f"agent{i}.out"
        agent = start(["run", "--no-comfyui", *ws.args()], trial, out)
        runtime = root / ".pod-agent" / "run"
        wait_for(lambda: any(runtime.glob("*/agent.json")), 60, what="the agent to start")
        dest = root / "ComfyUI" / "custom_nodes" / f"node-trial{i}"
        git("clone", "-q", url, str(dest))
        t0 = time.monotonic()
        module = f"podtest_trial{i}"

        def importable() -> bool:
            return subprocess.run([str(root / "pyenv" / "bin" / "python"), "-c",
                                   f"import {module}"], capture_output=True).returncode == 0

        if duration is None:
            wait_for(importable, 120, interval=0.2, what="the agent to install the node")
            duration = time.monotonic() - t0 + 1.0
            agent.send_signal(signal.SIGTERM)
            agent.wait(60)
            pod_stop(trial)
            continue
        at = rng.uniform(0.0, duration)
        try:
            agent.wait(at)
        except subprocess.TimeoutExpired:
            pass
        if mode == "cli":
            agent.kill()
            agent.wait(10)
        else:
            pod_stop(trial)
        state = json.loads((root / ".pod-agent" / "user_nodes.json").read_text()) \
            if (root / ".pod-agent" / "user_nodes.json").is_file() else {}
        lied = lies(root, ws.heads)
        if f"node-trial{i}" in state and not importable():
            lied.append(f"user_nodes.json claims node-trial{i}")
        converged, why = converge_once(ws, root, trial, out)
        converged = converged and importable()
        leftover = tagged(trial)
        for p in leftover:
            p.kill()
        note = f"{mode} kill at {at:.1f}s: lies {lied}; {why}; leftover {len(leftover)}"
        if not tally.case(f"kill: agent node change ({mode})", crash=crashed(out),
                          lie=bool(lied), leak=bool(leftover), converged=converged, note=note):
            failures.append(note)
    assert not failures, failures
