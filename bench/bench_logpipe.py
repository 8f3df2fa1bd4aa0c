"""Cost of ComfyUI's redacting log pipe (agent/logpipe.py): start overhead and throughput.

    python bench/bench_logpipe.py [--mb 20] [--trials 5]

A writer prints --mb MB of 100-byte lines, once straight into a log file (as ComfyUI's output
went before) and once through the pipe, with 10 registered secrets. Prints the median time from
start to the writer's exec (the bootstrap's overhead) and the time until the last byte is in the
log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

LOGPIPE = Path(__file__).resolve().parent.parent / "agent" / "logpipe.py"


def writer(mb: int) -> list[str]:
    code = ("import sys\nline = 'x' * 99 + '\\n'\nw = sys.stdout.write\n"
            f"for i in range({mb * 10000}): w(line)\n")
    return [sys.executable, "-c", code]


def direct(log: Path, mb: int) -> float:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    start = time.monotonic()
    subprocess.run(writer(mb), stdout=fd, stderr=fd, start_new_session=True, check=True)
    os.close(fd)
    return time.monotonic() - start


def piped(log: Path, mb: int) -> tuple[float, float]:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    status_r, status_w = os.pipe()
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-I", str(LOGPIPE), str(log), str(status_w)],
                            stdin=subprocess.PIPE, stdout=fd, stderr=fd, start_new_session=True,
                            pass_fds=(status_w,))
    os.close(status_w)
    proc.stdin.write(json.dumps({"cmd": writer(mb),
                                 "secrets": [f"secret-value-{i:02d}" for i in range(10)]}).encode())
    proc.stdin.close()
    status = b""
    while chunk := os.read(status_r, 100):
        status += chunk
    started = time.monotonic() - start
    os.close(status_r)
    proc.wait()
    pipe = psutil.Process(int(status.split()[1]))
    while pipe.is_running() and pipe.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.005)
    os.close(fd)
    return started, time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=20)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "comfyui.log"
        plain, starts, through = [], [], []
        for _ in range(args.trials):
            log.unlink(missing_ok=True)
            plain.append(direct(log, args.mb))
            log.unlink(missing_ok=True)
            s, t = piped(log, args.mb)
            assert log.stat().st_size == args.mb * 1_000_000, log.stat().st_size
            starts.append(s)
            through.append(t)
    print(f"| measurement ({args.mb} MB of 100-byte lines, median of {args.trials}) | result |")
    print("|---|---|")
    print(f"| straight to the file | {statistics.median(plain):.2f} s |")
    print(f"| through the log pipe | {statistics.median(through):.2f} s |")
    print(f"| pipe start overhead (start -> exec) | {statistics.median(starts) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
