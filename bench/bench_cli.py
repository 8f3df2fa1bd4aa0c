"""How long the command line takes before it does any work: a bare interpreter, `import agent.cli`,
`pod-agent --help` and `pod-agent status --help`, in paired rounds (each round runs every case
once, in turn, so machine load hits them alike); medians in ms and the cost over a bare
interpreter. Goal (issue 9): under 60 ms over a bare interpreter.

    python bench/bench_cli.py [--rounds 30] [--tree OTHER_CHECKOUT]

--tree also measures another checkout (e.g. `git worktree add /tmp/old <commit>`) side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def cases(tree: Path, label: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    py = sys.executable
    return {
        f"{label}import agent.cli": ([py, "-c", "import agent.cli"], env),
        f"{label}pod-agent --help": ([py, "-m", "agent", "--help"], env),
        f"{label}pod-agent status --help": ([py, "-m", "agent", "status", "--help"], env),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tree", type=Path, default=None)
    args = ap.parse_args()
    todo = {"bare interpreter": ([sys.executable, "-c", "pass"], dict(os.environ))}
    todo.update(cases(HERE, "" if args.tree is None else "this: "))
    if args.tree is not None:
        todo.update(cases(args.tree.resolve(), "other: "))
    times: dict[str, list[float]] = {k: [] for k in todo}
    for _ in range(args.rounds):
        for name, (cmd, env) in todo.items():
            start = time.perf_counter()
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=True, cwd="/")
            times[name].append((time.perf_counter() - start) * 1000)
    bare = statistics.median(times["bare interpreter"])
    width = max(len(k) for k in todo)
    print(f"{'case'.ljust(width)}  median ms  over bare ms")
    for name, xs in times.items():
        med = statistics.median(xs)
        print(f"{name.ljust(width)}  {med:9.1f}  {med - bare:11.1f}")


if __name__ == "__main__":
    main()
