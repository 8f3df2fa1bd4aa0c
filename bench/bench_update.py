"""Issue 10's figures: a no-op `pod-agent update --all --dry-run` on the 16-node workspace of
bench/_workspace.py (ComfyUI, Manager, GGUF, 16 custom nodes: 19 local git upstreams), then a
real update of one node (a new commit with a new requirement; ComfyUI started for the import
check) and its `rollback`, and an update whose requirement cannot be installed (automatic
rollback). Offline: local upstreams, local wheels, the fake ComfyUI.

    python bench/bench_update.py [--rounds 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workspace import build, cli  # noqa: E402

from tests.helpers import build_wheel, commit_files  # noqa: E402


def timed(ws: dict, *args: str, expect: int = 0) -> float:
    t0 = time.monotonic()
    proc = cli(ws, *args)
    took = time.monotonic() - t0
    if proc.returncode != expect:
        raise SystemExit(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None)
    a = ap.parse_args()
    base = a.keep or Path(tempfile.mkdtemp(prefix="bench-update-"))
    ws = build(base / "b", extra_nodes=0)
    t = timed(ws, "install")
    print(f"setup: first install {t:.1f} s")
    dry = [timed(ws, "update", "--all", "--dry-run") for _ in range(a.rounds)]
    print(f"no-op `update --all --dry-run` (19 checkouts, 16 nodes): median "
          f"{statistics.median(dry):.2f} s (rounds: {', '.join(f'{x:.2f}' for x in dry)})")
    build_wheel(ws["wheels"], "benchpkg-new", "1.0")
    up = ws["base"] / "upstreams" / "node-00"
    commit_files(up, {"requirements.txt": (up / "requirements.txt").read_text()
                      + "benchpkg-new\n"}, "a new requirement")
    t_up = timed(ws, "update", "node-00")
    t_rb = timed(ws, "rollback")
    print(f"real update of node-00 (new requirement installed, ComfyUI started for the check): "
          f"{t_up:.1f} s; its rollback (commit back, package removed, verified): {t_rb:.1f} s")
    commit_files(up, {"requirements.txt": (up / "requirements.txt").read_text()
                      + "benchpkg-nowhere\n"}, "a requirement nobody has")
    t_fail = timed(ws, "update", "node-00", expect=1)
    print(f"failing update of node-00 (requirement not installable) with its automatic rollback: "
          f"{t_fail:.1f} s")


if __name__ == "__main__":
    main()
