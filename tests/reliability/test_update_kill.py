"""Kill -9 in the middle of `pod-agent update` (the CLI and everything it started, as a pod stop
does), at points chosen from the update's own progress (its journal's phases) and at random
instants. The next `install` must say what it did with the interrupted update (completed or
rolled back), and the workspace must then be wholly before or wholly after the update: every
checkout at its old or its new commit together, the packages to match, markers that do not lie
(status healthy), no journal left.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import ROOT, commit_files, git, run_cli
from tests.kit import install
from tests.reliability.conftest import size
from tests.reliability.test_kill_anywhere import pod_stop, tagged

FAKE = ROOT / "tests" / "fake_comfyui" / "main.py"
POINTS = ["journal", "moved", "verifying"]  # journal written / a checkout moved / verifying


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def kws(ws):
    port = _free_port()
    commit_files(ws.upstreams / "ComfyUI", {"main.py": FAKE.read_text()}, "fake server")
    ws.config["comfyui"].update({"args": ["--listen", "127.0.0.1", "--port", str(port)],
                                 "port": port, "env": {"FAKE_COMFY_LOAD_NODES": "1"}})
    ws.config["health"] = {"enabled": False}
    ws.save()
    install(ws)
    heads = lambda: {n: git("rev-parse", "HEAD", cwd=p) for n, p in _checkouts(ws).items()}  # noqa: E731
    ws.old = heads()
    commit_files(ws.upstreams / "ComfyUI", {"requirements.txt": "podtest-alpha<2\n"
                                            "podtest-beta\n"}, "alpha 1")
    commit_files(ws.upstreams / "node-a", {"requirements.txt": "podtest-nodea\n"
                                           "podtest-nodec\n"}, "nodec")
    ws.new = {n: git("rev-parse", "HEAD", cwd=ws.upstreams / up)
              for n, up in (("ComfyUI", "ComfyUI"), ("node-a", "node-a"))}
    return ws


def _checkouts(ws) -> dict[str, Path]:
    return {"ComfyUI": ws.comfyui, "node-a": ws.comfyui / "custom_nodes" / "node-a"}


def _dists(ws) -> dict[str, str]:
    out = subprocess.run([str(ws.python), "-m", "pip", "list", "--format=json"],
                         capture_output=True, text=True, check=True)
    return {d["name"].lower(): d["version"] for d in json.loads(out.stdout)}


def _journal(ws) -> dict | None:
    path = ws.root / ".pod-agent" / "updates" / "journal.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _reached(ws, point: str) -> bool:
    j = _journal(ws)
    if j is None:
        return False
    if point == "journal":
        return True
    if point == "moved":
        return any(c.get("moved") for c in j["changes"])
    return j.get("phase") in ("verifying", "verified")


def _consistent(ws) -> str | None:
    """None when the workspace is wholly before or wholly after the update; else what is off."""
    heads = {n: git("rev-parse", "HEAD", cwd=p) for n, p in _checkouts(ws).items()}
    d = _dists(ws)
    if heads == ws.old:
        want = {"podtest-alpha": "2.0", "podtest-nodec": None}
    elif heads == {"ComfyUI": ws.new["ComfyUI"], "node-a": ws.new["node-a"]}:
        want = {"podtest-alpha": "1.0", "podtest-nodec": "1.0"}
    else:
        return f"checkouts half-updated: {heads}"
    for name, version in want.items():
        if d.get(name) != version:
            return f"{name} is {d.get(name)}, {version} expected with checkouts {heads}"
    st = run_cli("status", "--json", *ws.args())
    verdict = json.loads(st.stdout)["verdict"] if st.stdout.strip() else "unreadable"
    if verdict != "healthy":
        return f"status verdict {verdict}"
    if _journal(ws) is not None:
        return "journal left behind"
    return None


def test_kill_9_during_an_update_leaves_before_or_after(kws, tmp_path, tally):
    ws = kws
    rng = random.Random("update-kill")
    points: list[str | float] = list(POINTS)
    if size(0, 1):  # full run: random instants over the time a whole update takes here
        t0 = time.monotonic()
        done = run_cli("update", "--all", *ws.args())
        full = time.monotonic() - t0
        assert done.returncode == 0, done.stdout + done.stderr
        assert run_cli("rollback", "--no-verify", *ws.args()).returncode == 0
        points += [rng.uniform(0.3, full) for _ in range(6)]
    failures = []
    outcomes: Counter = Counter()
    for i, point in enumerate(points):
        trial = f"update-{i}-{os.getpid()}"
        out = tmp_path / f"trial{i}.out"
        env = dict(os.environ, POD_AGENT_TEST_TRIAL=trial)
        proc = subprocess.Popen([sys.executable, "-m", "agent", "update", "--all", *ws.args()],
                                env=env, stdout=open(out, "ab"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        began = time.monotonic()
        while proc.poll() is None and time.monotonic() < deadline:
            if (isinstance(point, str) and _reached(ws, point)) or \
                    (not isinstance(point, str) and time.monotonic() - began >= point):
                break
            time.sleep(0.01)
        finished = proc.poll() is not None
        pod_stop(trial)
        proc.wait(10)
        left = _journal(ws) is not None
        nxt = run_cli("install", *ws.args())
        said = [line for line in nxt.stdout.splitlines() if "interrupted update" in line]
        problem = _consistent(ws)
        if problem is None and left and not said:
            problem = "the next install did not say what it did with the interrupted update"
        outcomes[("finished" if finished else "completed" if any("completed" in x for x in said)
                  else "rolled back" if said else "before the journal")] += 1
        crash = "Traceback" in out.read_text(errors="replace") + nxt.stdout + nxt.stderr
        note = f"kill at {point}{' (had finished)' if finished else ''}: {said or nxt.stdout[-200:]}"
        if not tally.case("kill: update", crash=crash, lie=problem is not None,
                          leak=bool(tagged(trial)), converged=nxt.returncode == 0,
                          note=note if problem else ""):
            failures.append(f"{note}: {problem}; install exit {nxt.returncode}")
        # the next trial starts from before the update
        if git("rev-parse", "HEAD", cwd=ws.comfyui) != ws.old["ComfyUI"]:
            back = run_cli("rollback", "--no-verify", *ws.args())
            assert back.returncode == 0, back.stdout + back.stderr
    print(f"update kill outcomes: {dict(outcomes)}")
    assert not failures, "\n".join(failures)
