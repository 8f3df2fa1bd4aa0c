"""Issue 12 figures: a model download through the agent vs `curl` of the same file from the same
local server, and the bytes transferred when a download killed at 50 % is resumed.

    python bench/bench_download.py [--size-mb 1000] [--rounds 3]

The server (tests/dlserver.py, sendfile, Range) runs in this process; `curl -o` and
`pod-agent install` (a `download` component: HEAD, GET into .part, sha256 while downloading,
fsync, rename, marker) run as subprocesses, alternating, the file removed between rounds; a
third row is curl followed by `sync FILE` (the same durability as the agent's fsync). The
agent's time is the whole command (start-up, config, marker included). Resume: the install is
killed (SIGKILL, process group) once its .part holds half the file; the next install's GET
requests and the bytes the server sent for them are counted.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.dlserver import Server  # noqa: E402
from tests.helpers import write_yaml  # noqa: E402


def make_file(path: Path, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            n = min(left, len(chunk))
            fh.write(chunk[:n])
            left -= n
            chunk = chunk[1:] + chunk[:1]  # not one repeated block


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    size = opts.size_mb * 1_000_000
    base = Path(tempfile.mkdtemp(prefix="bench-dl-"))
    src = base / "model.bin"
    make_file(src, size)
    ws = base / "ws"
    cfg = base / "config.yaml"
    env = dict(os.environ, POD_AGENT_GPU="0", POD_AGENT_PROGRESS="lines")
    agent = [sys.executable, "-m", "agent", "install", "-w", str(ws), "-c", str(cfg)]
    dest = base / "out"
    with Server() as srv:
        srv.add("model.bin", src)
        write_yaml(cfg, {"comfyui": {"venv": None, "python": sys.executable},
                         "defaults": {"retries": 0},
                         "components": {"model": {"kind": "download",
                                                  "url": srv.url("model.bin"),
                                                  "dest": str(dest)}}})
        curl_t, synced_t, agent_t, rates = [], [], [], []
        log = ws / "installation_progress.log"
        for _ in range(opts.rounds):
            out = base / "curl.bin"
            t = time.perf_counter()
            subprocess.run(["curl", "-sS", "-o", str(out), srv.url("model.bin")], check=True)
            curl_t.append(time.perf_counter() - t)
            out.unlink()
            t = time.perf_counter()  # curl, then its file made durable as the agent makes it
            subprocess.run(["curl", "-sS", "-o", str(out), srv.url("model.bin")], check=True)
            subprocess.run(["sync", str(out)], check=True)
            synced_t.append(time.perf_counter() - t)
            out.unlink()
            t = time.perf_counter()
            subprocess.run(agent, check=True, env=env, capture_output=True)
            agent_t.append(time.perf_counter() - t)
            found = re.findall(r"transferred in ([\d.]+)s", log.read_text())
            rates.append(size / 1e6 / float(found[-1]))
            (dest / "model.bin").unlink()
            (ws / ".install_markers" / "model.done").unlink()
        c, a = statistics.median(curl_t), statistics.median(agent_t)
        mb = size / 1e6
        print(f"file: {mb:.0f} MB, {opts.rounds} rounds each, alternating (median; all rounds)")
        print(f"curl:  {c:6.2f} s  {mb / c:7.1f} MB/s  ({', '.join(f'{x:.2f}' for x in curl_t)})")
        y = statistics.median(synced_t)
        print(f"curl + sync FILE: {y:6.2f} s  {mb / y:7.1f} MB/s  "
              f"({', '.join(f'{x:.2f}' for x in synced_t)})")
        print(f"agent: {a:6.2f} s  {mb / a:7.1f} MB/s  ({', '.join(f'{x:.2f}' for x in agent_t)})")
        print(f"agent/curl time: {a / c:.3f} ({(a / c - 1) * 100:+.1f} %); agent/(curl + sync) "
              f"time: {a / y:.3f} ({(a / y - 1) * 100:+.1f} %)")
        r = statistics.median(rates)
        print(f"agent's own transfer (GET to rename, from its log): {r:7.1f} MB/s "
              f"({', '.join(f'{x:.0f}' for x in rates)}); vs curl: "
              f"{(r / (mb / c) - 1) * 100:+.1f} %")

        # ---- resume after a kill at 50 %
        part = dest / "model.bin.part"
        srv.log.clear()
        proc = subprocess.Popen(agent, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if part.exists() and part.stat().st_size >= size // 2:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait()
        kept = part.stat().st_size
        srv.log.clear()
        subprocess.run(agent, check=True, env=env, capture_output=True)
        second = srv.gets("model.bin")
        sent = sum(r["sent"] for r in second)
        ok = (dest / "model.bin").stat().st_size == size
        print(f"resume: killed with {kept / size * 100:.1f} % in the part; "
              f"the next install sent "
              f"{sent / size * 100:.1f} % of the file ({sent} bytes) in "
              f"{len(second)} request(s): {[r['range'] for r in second]}; complete: {ok}")
    subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
