"""Issue 9: a no-op `pod-agent install` and `pod-agent status --json` next to the lower bound
(bench/lower_bound.py: a fresh process in the target interpreter checking every requirement with
importlib.metadata + packaging), at 10, 50, 200 and 500 custom nodes.

Paired runs: every round runs the three commands on every workspace, in a shuffled order, so a
load spike on a shared machine hits all of them alike; the table shows medians. Then it proves
the no-op check still catches a removed package, a moved HEAD and a changed requirement file.

    python bench/bench_noop.py [--rounds 9] [--nodes 10,50,200,500]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workspace import ROOT, all_requirement_files, build_installed  # noqa: E402

LOWER_BOUND = Path(__file__).resolve().parent / "lower_bound.py"
ENV = dict(os.environ, POD_AGENT_GPU="0", GIT_CONFIG_NOSYSTEM="1")
ENV.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a pod: modules compiled once, not every run


def agent(ws: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args, *ws["args"]], cwd=ROOT,
                          capture_output=True, text=True, env=ENV)


def lower_bound_args(ws: dict) -> list[str]:
    args = [str(ws["python"]), str(LOWER_BOUND)]
    for f in all_requirement_files(ws):
        args += ["-r", str(f)]
    return args + list(ws["packages"])


def lower(ws: dict) -> subprocess.CompletedProcess:
    return subprocess.run(lower_bound_args(ws), capture_output=True, text=True, env=ENV)


def checked(what: str, proc: subprocess.CompletedProcess, code: int = 0,
            text: str | None = None) -> None:
    if proc.returncode != code or (text is not None and text not in proc.stdout):
        raise SystemExit(f"{what}: unexpected result (exit {proc.returncode}, wanted {code}"
                         f"{', ' + repr(text) if text else ''}):\n{proc.stdout}{proc.stderr}")


RUNS = {
    "install": lambda ws: checked("install", agent(ws, "install"), 0, "Nothing to do"),
    "status": lambda ws: checked("status", agent(ws, "status", "--json"), 0, '"healthy"'),
    "lower": lambda ws: checked("lower bound", lower(ws), 0),
}


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares seconds per node."""
    mx = statistics.mean(p[0] for p in points)
    my = statistics.mean(p[1] for p in points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def catches(ws: dict, python: Path) -> list[str]:
    """A removed package, a moved HEAD and a changed requirement file are each reported by a
    no-op `status` (exit 1 with the reason) and repaired by `install`."""
    out = []
    node = ws["root"] / "ComfyUI" / "custom_nodes" / "node-003"
    victim = (node / "requirements.txt").read_text().split()[0]
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", victim], check=True,
                   capture_output=True)
    checked("status after pip uninstall", agent(ws, "status", "--json"), 1,
            f"{victim} not installed")
    checked("lower bound after pip uninstall", lower(ws), 1, f"{victim} not installed")
    out.append(f"removed package ({victim}): status reports `{victim} not installed`")
    checked("install repairs it", agent(ws, "install"), 0, "reinstalling")
    git = ["git", "-C", str(node), "-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "moved"], check=True)
    checked("status after a commit", agent(ws, "status", "--json"), 1, "HEAD moved")
    out.append("moved HEAD (a commit in node-003): status reports `HEAD moved from ... to ...`")
    subprocess.run(git + ["reset", "-q", "--hard", "HEAD~1"], check=True)
    checked("status after the reset", agent(ws, "status", "--json"), 0, '"healthy"')
    req = node / "requirements.txt"
    text = req.read_text()
    req.write_text(text + "# changed\n")
    checked("status after a requirement change", agent(ws, "status", "--json"), 1,
            "requirements.txt or install.py changed")
    out.append("changed requirements.txt (node-003): status reports `requirements.txt or "
               "install.py changed`")
    checked("install after the change", agent(ws, "install"), 0)
    req.write_text(text)
    checked("install after the change back", agent(ws, "install"), 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--nodes", default="10,50,200,500")
    opts = parser.parse_args()
    counts = [int(n) for n in opts.nodes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        built = build_installed(Path(tmp), counts)
        print(f"built {len(counts)} installed workspaces in {time.perf_counter() - t0:.0f}s "
              f"({len(built['names'])} wheels in one venv)", file=sys.stderr)
        spaces = built["spaces"]
        for ws in spaces.values():  # warm the page cache and the agent's listing cache
            for fn in RUNS.values():
                fn(ws)
        samples: dict[tuple[int, str], list[float]] = {}
        rng = random.Random(9)
        for _ in range(opts.rounds):
            jobs = [(n, what) for n in counts for what in RUNS]
            rng.shuffle(jobs)
            for n, what in jobs:
                start = time.perf_counter()
                RUNS[what](spaces[n])
                samples.setdefault((n, what), []).append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in samples.items()}
        reqs = {n: len(all_requirement_files(spaces[n])) for n in counts}
        print(f"no-op check, medians of {opts.rounds} paired rounds (seconds); lower bound = "
              f"bench/lower_bound.py in the target interpreter")
        print()
        print("| nodes | req. files | `install` | `status --json` | lower bound | install / LB "
              "| status / LB |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n in counts:
            i, s, lb = med[(n, "install")], med[(n, "status")], med[(n, "lower")]
            print(f"| {n} | {reqs[n]} | {i:.3f} | {s:.3f} | {lb:.3f} | {i / lb:.2f}x "
                  f"| {s / lb:.2f}x |")
        if len(counts) > 1:
            print()
            per = {what: slope([(n, med[(n, what)]) for n in counts]) * 1000 for what in RUNS}
            print(f"per node (least squares over {counts[0]}..{counts[-1]}): install "
                  f"{per['install']:.3f} ms, status {per['status']:.3f} ms, lower bound "
                  f"{per['lower']:.3f} ms")
        print()
        for line in catches(spaces[counts[0]], built["python"]):
            print(f"- caught: {line}")


if __name__ == "__main__":
    main()
