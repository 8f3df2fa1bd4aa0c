"""Issue 9: first install from an empty volume, pip against uv (with the image's packages pinned
and excluded, agent/uvinstall.py), on ComfyUI's real requirements. Not a test: it downloads
from the package index and takes minutes.

    python bench/bench_first_install.py --requirements /tmp/comfy_requirements.txt [--rounds 2]

The "image" is an interpreter that has torch, as a pod image has its CUDA torch: a venv at
--image (built on first use with `pip install torch==2.14.1 torchvision==0.29.1`, which pip takes
from this machine's local disk). Each measurement makes a fresh workspace whose volume venv the
agent creates from the image (`--system-site-packages` plus the .pth for a venv image), exactly
as `pod-agent install` does (not timed), then times the agent's own install path
(`Ctx.pip_install`) with `installer: pip` and with `installer: auto` (uv + pins). Both go to the
public index with cold caches (PIP_CACHE_DIR / UV_CACHE_DIR: empty temporary folders;
PIP_CONFIG_FILE=/dev/null and no PIP_FIND_LINKS, so pip does not read this machine's local
mirrors, as on a pod). Rounds alternate which installer goes first.

Bytes downloaded: the receive counter of every interface but `lo` in /proc/net/dev across the
install (the machine's whole traffic: other work on it adds to it), next to the size of the
installer's cache folder afterwards (pip keeps the downloaded wheels; uv keeps them unpacked,
which is larger than what it downloaded). A guard stops an installer that has received more than
--guard-gb (default 2): neither may download torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import config as config_mod, procs, uvinstall  # noqa: E402
from agent.kinds.base import Ctx, InstallError  # noqa: E402
from agent.pyenv import inspect  # noqa: E402
from agent.reqs import read_file, unmet  # noqa: E402

MB = 1024 * 1024


def rx_bytes() -> int:
    total = 0
    with open("/proc/net/dev") as fh:
        for line in fh.readlines()[2:]:
            name, _, data = line.partition(":")
            if name.strip() != "lo":
                total += int(data.split()[0])
    return total


def du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def build_image(image: Path) -> Path:
    python = image / "bin" / "python"
    if python.exists():
        return python
    print(f"building the image interpreter at {image} (torch from this machine's disk) ...",
          flush=True)
    subprocess.run(["python3", "-m", "venv", str(image)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.14.1",
                    "torchvision==0.29.1"], check=True)
    return python


def measure(installer: str, image_python: Path, requirements: Path, guard: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-first-{installer}-"))
    try:
        ws = tmp / "ws"
        caches = tmp / "cache"
        caches.mkdir()
        env = {"PIP_CACHE_DIR": str(caches / "pip"), "UV_CACHE_DIR": str(caches / "uv"),
               "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1"}
        conf_path = tmp / "c.yaml"
        conf_path.write_text(
            f"installer: {installer}\n"
            f"installer_env: {env!r}\n".replace("'", '"') +
            "defaults: {timeout: 3000, retries: 0}\n"
            f"comfyui: {{base_python: {image_python}}}\n"
            "components:\n"
            f"  dependencies_main: {{kind: pip, requirements: [{requirements}]}}\n")
        conf = config_mod.load(conf_path, ws)
        ctx = Ctx(conf, gpu=False)
        comp = conf.components["dependencies_main"]
        ctx.ensure_python(comp)  # the venv, as the agent makes it: not timed
        before = uvinstall.layout(ctx.python)

        aborted = threading.Event()
        done = threading.Event()
        start_rx = rx_bytes()

        def watch() -> None:
            while not done.wait(0.5):
                if rx_bytes() - start_rx > guard:
                    aborted.set()
                    procs.terminate_all()
                    return

        guard_thread = threading.Thread(target=watch, daemon=True)
        guard_thread.start()
        start = time.perf_counter()
        error = ""
        try:
            ctx.pip_install(comp, ["-r", str(requirements)], "dependencies_main: install")
        except InstallError as exc:
            error = str(exc)
        elapsed = time.perf_counter() - start
        done.set()
        guard_thread.join()
        received = rx_bytes() - start_rx
        after = uvinstall.layout(ctx.python)
        dups = sorted(n for n in after.own if n in before.inherited and n not in before.own)
        reqs, _ = read_file(requirements)
        missing = unmet(reqs, inspect(ctx.python))
        log = comp.log.read_text(errors="replace")
        used = ("pip (fallback)" if "installing with pip" in log else
                "uv+pins" if "inherited packages excluded" in log else
                "uv" if " pip install --python" in log else "pip")
        return {"installer": installer, "used": used, "seconds": elapsed, "rx": received,
                "cache": du(caches), "installed": len(after.own) - len(before.own),
                "dups": dups, "unmet": missing, "error": "aborted by the download guard"
                if aborted.is_set() else error}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requirements", type=Path, required=True,
                        help="ComfyUI's requirements.txt (a copy)")
    parser.add_argument("--image", type=Path, default=Path(tempfile.gettempdir()) /
                        "pod-agent-bench-image")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--guard-gb", type=float, default=2.0)
    opts = parser.parse_args()
    image_python = build_image(opts.image)
    os.environ.pop("PIP_FIND_LINKS", None)  # pip as on a pod: the public index only
    print(f"image: {image_python}; requirements: {opts.requirements}", flush=True)
    rows = []
    for rnd in range(1, opts.rounds + 1):
        order = ["pip", "auto"] if rnd % 2 else ["auto", "pip"]
        got = {}
        for installer in order:
            print(f"round {rnd}: installer {installer} ...", flush=True)
            got[installer] = measure(installer, image_python, opts.requirements,
                                     int(opts.guard_gb * 1024 * MB))
        rows.append((rnd, got))

    print()
    print("| round | installer | used | time s | received MB | cache MB | dists in venv | "
          "inherited reinstalled | requirements unmet |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rnd, got in rows:
        for installer in ("pip", "auto"):
            r = got[installer]
            print(f"| {rnd} | {installer} | {r['used']} | {r['seconds']:.1f} | "
                  f"{r['rx'] / MB:.0f} | {r['cache'] / MB:.0f} | {r['installed']} | "
                  f"{len(r['dups'])} {' '.join(r['dups'][:3])} | {len(r['unmet'])} |"
                  + (f" error: {r['error']}" if r["error"] else ""))
    print()
    print("| round | pip / uv time | pip / uv received bytes |")
    print("|---|---|---|")
    for rnd, got in rows:
        p, u = got["pip"], got["auto"]
        print(f"| {rnd} | {p['seconds'] / max(u['seconds'], 1e-9):.1f}x | "
              f"{p['rx'] / max(u['rx'], 1):.2f}x |")
    for rnd, got in rows:
        for r in got.values():
            if r["unmet"]:
                print(f"round {rnd} {r['installer']}: unmet: {'; '.join(r['unmet'][:3])}")


if __name__ == "__main__":
    main()
