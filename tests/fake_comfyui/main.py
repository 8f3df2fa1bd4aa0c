"""A fake ComfyUI server for tests (stdlib only).

Started like ComfyUI: `python main.py --listen 0.0.0.0 --port 8188 [other args ignored]`.

Routes: GET /system_stats, GET /queue, GET /prompt, POST /prompt, POST /interrupt, and
ComfyUI-Manager's restart: GET (or POST) /manager/reboot or /api/manager/reboot answers 200, then
restarts as the Manager does (glob/manager_server.py `restart`): with __COMFY_CLI_SESSION__ set,
it writes `<$__COMFY_CLI_SESSION__>.reboot` and exits with status 0; without it (or with
FAKE_COMFY_REBOOT=exec) it re-executes itself in place: os.execv(sys.executable,
[sys.executable] + sys.argv), same pid.

Control (files in $FAKE_COMFY_CONTROL, default <cwd>/.fake_control, re-read on each request):
  busy   present -> one running item; the integer inside (default 0) is the number pending
  hang   present -> GET /system_stats blocks until the file is gone
  crash  present -> exit 1 (checked at start and every 0.1 s)
  say    present -> removed, then its text printed on stdout (checked every 0.1 s; a failed
         write, e.g. EPIPE, is ignored as a logging handler would)

Environment:
  FAKE_COMFY_CRASH_ON_START=1   exit 1 right after recording the start
  FAKE_COMFY_START_DELAY=secs   wait before listening (a slow start)
  FAKE_COMFY_RECORD=path        append {"pid", "argv", "time", "child_pid"} per start
  FAKE_COMFY_IGNORE_SIGTERM=1   ignore SIGTERM (only SIGKILL stops it)
  FAKE_COMFY_SPAWN_CHILD=1      start a child process in the same process group that just waits
                                (it ignores SIGTERM too when FAKE_COMFY_IGNORE_SIGTERM=1)
  FAKE_COMFY_PRINT_ENV=A,B      print `env A=<value>` for each named variable at start (stdout),
                                and the same with a progress-bar '\r' ending on stderr
  FAKE_COMFY_PIP_AT_START=args  run `python -m pip install <args>` (shlex-split) at start, before
                                listening, as ComfyUI-Manager or a node installing at import does;
                                with FAKE_COMFY_PIP_ONCE=1 only while <control>/pip_done is absent
                                (written after the first run)
  FAKE_COMFY_PIP_WAIT=name      before that pip run, wait (at most 60 s) for <control>/<name>
  FAKE_COMFY_LOAD_NODES=1       before listening, import each folder of <cwd>/custom_nodes (its
                                __init__.py, in this interpreter) and print ComfyUI's import
                                summary with its wording: `Cannot import <path> module for custom
                                nodes: <error>`, `   0.0 seconds (IMPORT FAILED): <path>`
  FAKE_COMFY_REBOOT=exec        the Manager's restart re-executes in place even when
                                __COMFY_CLI_SESSION__ is set (a ComfyUI started by someone else)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CONTROL = Path(os.environ.get("FAKE_COMFY_CONTROL") or Path.cwd() / ".fake_control")
CHILD_CODE = (
    "import os, signal, sys, time\n"
    "if os.environ.get('FAKE_COMFY_IGNORE_SIGTERM') == '1':\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)


def say(text: str) -> None:
    print(f"[fake-comfyui {os.getpid()}] {text}", flush=True)


def control(name: str) -> Path:
    return CONTROL / name


def busy_state() -> tuple[list, list]:
    path = control("busy")
    try:
        raw = path.read_text().strip()
    except FileNotFoundError:
        return [], []
    except OSError:
        raw = ""
    try:
        pending = max(0, int(raw or "0"))
    except ValueError:
        pending = 0
    running = [[0, "fake-running", {}, {}, []]]
    return running, [[i + 1, f"fake-pending-{i}", {}, {}, []] for i in range(pending)]


def ram() -> tuple[int, int]:
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info.get("MemTotal", 0), info.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        return 0, 0


REBOOT_PATHS = ("/manager/reboot", "/api/manager/reboot")


def reboot() -> None:
    """What ComfyUI-Manager's /manager/reboot does, after the answer went out."""
    time.sleep(0.2)
    session = os.environ.get("__COMFY_CLI_SESSION__")
    if session and os.environ.get("FAKE_COMFY_REBOOT") != "exec":
        with open(session + ".reboot", "w"):
            pass
        say("Restarting...")
        os._exit(0)
    say("Restarting... [Legacy Mode]")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable] + sys.argv)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # keep the log quiet
        pass

    def _json(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/system_stats":
            while control("hang").exists():
                time.sleep(0.05)
            total, free = ram()
            self._json(200, {
                "system": {
                    "os": os.name,
                    "comfyui_version": "0.0.0-fake",
                    "python_version": sys.version,
                    "pytorch_version": "none",
                    "embedded_python": False,
                    "argv": sys.argv,
                    "ram_total": total,
                    "ram_free": free,
                },
                "devices": [],
            })
        elif path == "/queue":
            running, pending = busy_state()
            self._json(200, {"queue_running": running, "queue_pending": pending})
        elif path == "/prompt":
            running, pending = busy_state()
            self._json(200, {"exec_info": {"queue_remaining": len(running) + len(pending)}})
        elif path in REBOOT_PATHS:
            self._json(200, {})
            threading.Thread(target=reboot, name="reboot", daemon=True).start()
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        if path == "/prompt":
            self._json(200, {"prompt_id": str(uuid.uuid4()), "number": 0, "node_errors": {}})
        elif path == "/interrupt":
            self._json(200, {})
        elif path in REBOOT_PATHS:
            self._json(200, {})
            threading.Thread(target=reboot, name="reboot", daemon=True).start()
        else:
            self._json(404, {"error": "not found"})


def watch_control() -> None:
    while True:
        if control("crash").exists():
            try:
                say("crash file found: exiting with status 1")
            except OSError:
                pass
            os._exit(1)
        try:
            text = control("say").read_text()
            control("say").unlink()
        except OSError:
            text = None
        if text is not None:
            try:
                say(text.strip())
            except OSError:
                pass
        time.sleep(0.1)


def load_custom_nodes() -> None:
    """FAKE_COMFY_LOAD_NODES: what ComfyUI's nodes.py does at start, with its log lines."""
    import importlib.util
    import traceback

    root = Path.cwd() / "custom_nodes"
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return
    times = []
    for name in names:
        path = root / name
        if name == "__pycache__" or name.startswith(".") or name.endswith(".disabled") \
                or not (path / "__init__.py").is_file():
            continue
        began = time.perf_counter()
        try:
            spec = importlib.util.spec_from_file_location(str(path).replace(".", "_x_"),
                                                          path / "__init__.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            ok = True
        except Exception as e:  # noqa: BLE001 - as ComfyUI: logged, the start goes on
            print(traceback.format_exc(), flush=True)
            print(f"Cannot import {path} module for custom nodes: {e}", flush=True)
            ok = False
        times.append((time.perf_counter() - began, str(path), ok))
    if times:
        print("\nImport times for custom nodes:", flush=True)
        for t, path, ok in sorted(times):
            print("{:6.1f} seconds{}: {}".format(t, "" if ok else " (IMPORT FAILED)", path),
                  flush=True)
        print("", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--listen", nargs="?", const="0.0.0.0", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    args, _unknown = parser.parse_known_args()

    if os.environ.get("FAKE_COMFY_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def on_term(signum, frame):
            say("SIGTERM: exiting")
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)

    child_pid = None
    if os.environ.get("FAKE_COMFY_SPAWN_CHILD") == "1":
        child = subprocess.Popen([sys.executable, "-c", CHILD_CODE], stdin=subprocess.DEVNULL)
        child_pid = child.pid

    record = os.environ.get("FAKE_COMFY_RECORD")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "argv": sys.argv, "time": time.time(),
                                "child_pid": child_pid}) + "\n")

    say(f"starting: {' '.join(sys.argv)} (python {platform.python_version()})")
    for name in filter(None, os.environ.get("FAKE_COMFY_PRINT_ENV", "").split(",")):
        say(f"env {name}={os.environ.get(name, '')}")
        sys.stderr.write(f"progress {name}: {os.environ.get(name, '')} 100%\r")
        sys.stderr.flush()
    if os.environ.get("FAKE_COMFY_CRASH_ON_START") == "1":
        say("FAKE_COMFY_CRASH_ON_START: exiting with status 1")
        os._exit(1)
    if control("crash").exists():
        say("crash file found at start: exiting with status 1")
        os._exit(1)
    threading.Thread(target=watch_control, name="control", daemon=True).start()

    pip_args = os.environ.get("FAKE_COMFY_PIP_AT_START")
    once = os.environ.get("FAKE_COMFY_PIP_ONCE") == "1"
    if pip_args and not (once and control("pip_done").exists()):
        import shlex

        gate = os.environ.get("FAKE_COMFY_PIP_WAIT")
        deadline = time.monotonic() + 60
        while gate and not control(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)

        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                               *shlex.split(pip_args)], capture_output=True, text=True)
        say(f"pip install {pip_args}: exit {proc.returncode} {proc.stderr.strip()[-200:]}")
        if once:
            control("pip_done").write_text("")
    delay = float(os.environ.get("FAKE_COMFY_START_DELAY") or 0)
    if delay > 0:
        time.sleep(delay)

    if os.environ.get("FAKE_COMFY_LOAD_NODES") == "1":
        load_custom_nodes()
    server = ThreadingHTTPServer((args.listen, args.port), Handler)
    say(f"To see the GUI go to: http://{args.listen}:{args.port}")
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
