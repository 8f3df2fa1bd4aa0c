"""Issue 9: a no-op `pod-agent install` and `pod-agent status --json` next to the lower bound
(bench/lower_bound.py: a fresh process in the target interpreter checking every requirement with
importlib.metadata + packaging), at 10, 50, 200 and 500 custom nodes.

Paired runs: every round visits the workspaces in a shuffled order and runs the three commands
back to back on each (in a shuffled order too), so a load spike on a shared machine hits a triple
alike; the table shows the medians of the times and of the per-triple ratios. The per-node cost
is the least-squares slope over the node counts, of the whole commands and, less noisy, of the
same work in this process (config load + observe/plan/execute, no interpreter start or imports).
Then it proves the no-op check still catches a removed package, a moved HEAD and a changed
requirement file.

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


def agent(ws: dict, *args: str, tree: Path = ROOT) -> subprocess.CompletedProcess:
    # through -m (runpy: ~3 ms more than the `pod-agent` console script): the same for any
    # tree (--old runs another checkout's agent package from its own folder)
    return subprocess.run([sys.executable, "-m", "agent", *args, *ws["args"]], cwd=tree,
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


def old_runs(tree: Path) -> dict:
    return {
        "install (old)": lambda ws: checked("old install", agent(ws, "install", tree=tree), 0,
                                            "Nothing to do"),
        "status (old)": lambda ws: checked("old status", agent(ws, "status", "--json",
                                                              tree=tree), 0, '"healthy"'),
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


def in_process(spaces: dict, counts: list[int], rounds: int) -> dict[tuple[int, str], float]:
    """Median seconds of a no-op install and status done in this process (config loaded each
    time, modules already imported): the per-node cost without a process start in the noise."""
    os.environ.update(POD_AGENT_GPU="0")
    from agent import config as cfg
    from agent.execute import Executor
    from agent.status import collect

    def install(ws):
        report = Executor(cfg.load(ws["config"], ws["root"]), gpu=False).run()
        assert report.ok and not report.changed

    def status(ws):
        assert collect(cfg.load(ws["config"], ws["root"]), gpu=False)["verdict"] == "healthy"

    out: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds * 3):
        for n in counts:
            for what, fn in (("install", install), ("status", status)):
                start = time.perf_counter()
                fn(spaces[n])
                out.setdefault((n, what), []).append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--nodes", default="10,50,200,500")
    parser.add_argument("--old", type=Path, help="another checkout (e.g. `git worktree add "
                        "/tmp/old <commit>`): its install/status run in the same rounds")
    opts = parser.parse_args()
    if opts.old:
        RUNS.update(old_runs(opts.old.resolve()))
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
        ratios: dict[tuple[int, str], list[float]] = {}
        rng = random.Random(9)
        for _ in range(opts.rounds):
            for n in rng.sample(counts, len(counts)):
                took = {}
                for what in rng.sample(list(RUNS), len(RUNS)):
                    start = time.perf_counter()
                    RUNS[what](spaces[n])
                    took[what] = time.perf_counter() - start
                    samples.setdefault((n, what), []).append(took[what])
                for what in ("install", "status"):
                    ratios.setdefault((n, what), []).append(took[what] / took["lower"])
        med = {k: statistics.median(v) for k, v in samples.items()}
        ratio = {k: statistics.median(v) for k, v in ratios.items()}
        inproc = in_process(spaces, counts, opts.rounds)
        reqs = {n: len(all_requirement_files(spaces[n])) for n in counts}
        print(f"no-op check, medians of {opts.rounds} paired rounds (seconds); lower bound = "
              f"bench/lower_bound.py in the target interpreter; ratio = median of the "
              f"per-round ratios")
        print()
        print("| nodes | req. files | `install` | `status --json` | lower bound | install / LB "
              "| status / LB |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n in counts:
            i, s, lb = med[(n, "install")], med[(n, "status")], med[(n, "lower")]
            print(f"| {n} | {reqs[n]} | {i:.3f} | {s:.3f} | {lb:.3f} | "
                  f"{ratio[(n, 'install')]:.2f}x | {ratio[(n, 'status')]:.2f}x |")
        if len(counts) > 1:
            print()
            per = {what: slope([(n, med[(n, what)]) for n in counts]) * 1000 for what in RUNS}
            print(f"per node, whole commands (least squares over {counts[0]}..{counts[-1]}): "
                  f"install {per['install']:.3f} ms, status {per['status']:.3f} ms, lower bound "
                  f"{per['lower']:.3f} ms")
            per = {what: slope([(n, inproc[(n, what)]) for n in counts]) * 1000
                   for what in ("install", "status")}
            each = ", ".join(f"{n}: {inproc[(n, 'install')] * 1000:.1f}" for n in counts)
            print(f"per node, in process (config load + the check, medians): install "
                  f"{per['install']:.3f} ms, status {per['status']:.3f} ms (install, ms: {each})")
        if opts.old:
            print()
            print(f"the same rounds, the agent of {opts.old}:")
            print()
            print("| nodes | `install` old -> new | `status --json` old -> new |")
            print("|---:|---:|---:|")
            for n in counts:
                print(f"| {n} | {med[(n, 'install (old)')]:.3f} -> {med[(n, 'install')]:.3f} | "
                      f"{med[(n, 'status (old)')]:.3f} -> {med[(n, 'status')]:.3f} |")
        print()
        for line in catches(spaces[counts[0]], built["python"]):
            print(f"- caught: {line}")


if __name__ == "__main__":
    main()
