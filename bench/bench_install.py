"""Issue 2 figures: no-op `pod-agent install` and `pod-agent status` on a fully installed
workspace (default components' shape + 30 extra nodes), next to a no-op `pip install -r` of the
same requirement files (the old template's way), and proof that verification still catches a
removed package.

    python bench/bench_install.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workspace import all_requirement_files, build, cli  # noqa: E402


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def row(name: str, samples: list[float], note: str = "") -> str:
    return (f"| {name:<44} | {statistics.median(samples):7.3f} | {max(samples):7.3f} | "
            f"{note} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = build(Path(tmp))
        start = time.perf_counter()
        first = cli(ws, "install")
        assert first.returncode == 0, first.stdout + first.stderr
        fresh = time.perf_counter() - start
        files = all_requirement_files(ws)
        lines = sum(1 for f in files for x in f.read_text().splitlines() if x.strip())

        def noop_install():
            p = cli(ws, "install")
            assert p.returncode == 0 and "Nothing to do" in p.stdout, p.stdout + p.stderr

        def status():
            p = cli(ws, "status", "--json")
            assert p.returncode == 0, p.stdout

        pip_args = [str(ws["python"]), "-m", "pip", "install", "-q", "--no-index",
                    "--find-links", str(ws["wheels"])]
        for f in files:
            pip_args += ["-r", str(f)]

        def pip_noop():
            subprocess.run(pip_args, check=True, capture_output=True)

        results = [
            row("pod-agent install (no-op, verifies all)", timed(noop_install, opts.runs)),
            row("pod-agent status --json", timed(status, opts.runs)),
            row("pip install -r <all files> (no-op)", timed(pip_noop, opts.runs),
                f"{len(files)} files, {lines} lines"),
        ]
        # verification still catches a removed package
        victim = ws["names"][7]
        subprocess.run([str(ws["python"]), "-m", "pip", "uninstall", "-y", "-q", victim],
                       check=True)
        t0 = time.perf_counter()
        p = cli(ws, "status", "--json")
        caught = time.perf_counter() - t0
        assert p.returncode == 1 and f"{victim} not installed" in p.stdout, p.stdout
        results.append(row("pod-agent status after `pip uninstall`", [caught],
                           f"reports: {victim} not installed"))
        t0 = time.perf_counter()
        p = cli(ws, "install")
        repaired = time.perf_counter() - t0
        assert p.returncode == 0 and "reinstalling" in p.stdout
        results.append(row("pod-agent install (repairs it)", [repaired]))
        comps = 8
        print(f"workspace: {comps} components + 46 node repos ({len(files)} requirement files, "
              f"{len(ws['names'])} distributions); fresh install took {fresh:.1f}s; "
              f"{opts.runs} runs each")
        print(f"| {'command':<44} | median s | max s   | note |")
        print(f"|{'-' * 46}|---------|---------|------|")
        for r in results:
            print(r)


if __name__ == "__main__":
    main()
