"""The process engine (agent/engine.py) with real processes: small Python scripts as services."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from agent.engine import HttpReady, Service, Spec, TcpReady, image_signature
from tests.helpers import wait_for

FAST = dict(ready_timeout=10.0, ready_poll_interval=0.05, liveness_interval=0.1,
            liveness_failures=3, backoff_initial=0.05, backoff_max=0.2,
            backoff_reset_after=600.0, degraded_after=2, degraded_window=900.0,
            degraded_retry=0.3, stop_timeout=3.0)

# A service: listens on $PORT when set, says it started, exits with $EXIT_WITH after $EXIT_AFTER
# seconds when set, ignores SIGTERM with $IGNORE_TERM=1.
SERVICE = textwrap.dedent("""
    import os, signal, socket, sys, time
    if os.environ.get("IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"service {os.getpid()} up token={os.environ.get('TOKEN', '')}", flush=True)
    port = int(os.environ.get("PORT") or 0)
    if port:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(5)
    after = os.environ.get("EXIT_AFTER")
    if after is not None:
        time.sleep(float(after))
        sys.exit(int(os.environ.get("EXIT_WITH") or 0))
    while True:
        time.sleep(1)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rig:
    def __init__(self, root: Path):
        self.root = root
        self.script = root / "service.py"
        self.script.write_text(SERVICE)
        self.state_dir = root / "state"
        self.services: list[Service] = []

    def spec(self, name: str = "svc", env: dict | None = None, **over) -> Spec:
        values = dict(name=name, command=[sys.executable, str(self.script)],
                      log=self.root / "logs" / f"{name}.log", cwd=self.root, env=env or {})
        values.update(over)
        return Spec(**values)

    def service(self, spec: Spec, **timing) -> Service:
        svc = Service(spec, self.state_dir, timing={**FAST, **timing})
        self.services.append(svc)
        return svc

    def teardown(self) -> None:
        for svc in reversed(self.services):
            svc.stop(timeout=2)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.teardown()


def state(svc: Service) -> str:
    return svc.snapshot()["state"]


def ticking(svc: Service, predicate):
    def check():
        svc.tick()
        return predicate()
    return check


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_crashing_service_backs_off_then_degrades_and_keeps_retrying(rig):
    svc = rig.service(rig.spec(env={"EXIT_AFTER": "0", "EXIT_WITH": "3"}))
    svc.start("test")
    seen: list[str] = []

    def step():
        snap = svc.snapshot()
        if snap["state"] in ("backoff", "degraded") and snap["failures"] > len(seen):
            seen.append(snap["state"])
        return snap["state"] == "degraded"

    wait_for(ticking(svc, step), 20, 0.01, "DEGRADED")
    assert seen == ["backoff", "backoff", "degraded"]
    snap = svc.snapshot()
    assert snap["last_exit"]["code"] == 3 and "exited with status 3" in snap["last_failure"]
    assert snap["degraded_reason"].startswith("3 failed starts within 900s")
    assert snap["next_start_in"] is not None
    starts = (rig.root / "logs" / "svc.log").read_text().count("pod-agent starts svc")
    wait_for(ticking(svc, lambda: (rig.root / "logs" / "svc.log").read_text()
                     .count("pod-agent starts svc") > starts), 10, 0.01, "the slow retry")
    svc.stop()
    assert state(svc) == "stopped"


def test_sigterm_ignored_means_sigkill_after_stop_timeout_and_nothing_left(rig):
    svc = rig.service(rig.spec(env={"IGNORE_TERM": "1"}, stop_timeout=0.5))
    svc.start()
    wait_for(ticking(svc, lambda: state(svc) == "running"), 10, what="running")
    pid = svc.snapshot()["pid"]
    assert os.getpgid(pid) == pid  # its own session and group
    wait_for(lambda: f"service {pid} up" in (rig.root / "logs" / "svc.log").read_text(), 10,
             what="its output (SIGTERM ignored by then)")
    began = time.monotonic()
    svc.stop()
    took = time.monotonic() - began
    assert 0.5 <= took < 8
    assert svc.snapshot()["last_exit"]["signal"] == 9
    assert gone(pid) and not (rig.state_dir / "svc.json").exists()


@pytest.mark.parametrize("policy,code,after", [
    ("never", 3, "stopped"), ("never", 0, "stopped"),
    ("on-failure", 0, "stopped"), ("on-failure", 3, "backoff"),
    ("always", 0, "backoff"),
])
def test_restart_policy(rig, policy, code, after):
    svc = rig.service(rig.spec(env={"EXIT_AFTER": "0", "EXIT_WITH": str(code)}, restart=policy),
                      backoff_initial=60, backoff_max=60)
    svc.start()
    wait_for(ticking(svc, lambda: svc.snapshot()["last_exit"] is not None), 10, 0.01, "the exit")
    snap = svc.snapshot()
    assert snap["state"] == after and snap["last_exit"]["code"] == code and snap["pid"] is None
    assert snap["failures"] == (1 if after == "backoff" else 0)
    assert bool(snap["last_failure"]) == (code != 0 or after == "backoff"), snap
    if after == "stopped":  # not started again by itself; an explicit request does
        svc.tick()
        assert state(svc) == "stopped"
        svc.request_restart("asked")
        svc.tick()
        assert svc.snapshot()["pid"] is not None


def test_a_new_engine_adopts_the_running_service_and_can_stop_it(rig):
    port = free_port()
    spec = rig.spec(env={"PORT": str(port), "TOKEN": "s3cr3t-token-value"}, port=port,
                    ready=TcpReady(port), secrets=("s3cr3t-token-value",))
    first = rig.service(spec)
    first.start()
    wait_for(ticking(first, lambda: state(first) == "running"), 10, what="running")
    pid = first.snapshot()["pid"]
    saved = json.loads((rig.state_dir / "svc.json").read_text())
    assert saved["pid"] == pid and saved["create_time"] == psutil.Process(pid).create_time()
    # the agent "dies": a new engine object adopts the process (saved pid + create_time)
    second = rig.service(spec)
    second.start("agent restarted")
    snap = second.snapshot()
    assert snap["adopted"] and snap["pid"] == pid and snap["state"] == "running"
    second.stop()
    assert gone(pid) and state(second) == "stopped"
    log = (rig.root / "logs" / "svc.log").read_text()
    assert "s3cr3t-token-value" not in log and "token=***" in log  # the log pipe redacts
    # a start on a port someone else holds is a failed start, never a second process
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        third = rig.service(spec)
        third.start()
        assert third.snapshot()["state"] == "backoff"
        assert "already in use" in third.snapshot()["last_failure"]


def test_http_readiness_and_a_shell_line_command(rig):
    port = free_port()
    spec = rig.spec(name="web", command=f"echo hello from a shell line; exec {sys.executable} "
                                        f"-m http.server {port} --bind 127.0.0.1",
                    ready=HttpReady(port, "/"))
    svc = rig.service(spec)
    svc.start()
    assert state(svc) == "starting"
    wait_for(ticking(svc, lambda: state(svc) == "running"), 15, what="HTTP readiness")
    assert svc.snapshot()["ready"]
    assert "hello from a shell line" in (rig.root / "logs" / "web.log").read_text()
    svc.stop()


def test_a_missing_command_is_a_failed_start(rig):
    svc = rig.service(rig.spec(command=["no-such-command-here"]))
    svc.start()
    snap = svc.snapshot()
    assert snap["state"] == "backoff" and "command not found on PATH" in snap["last_failure"]
    with pytest.raises(ValueError, match="restart must be one of"):
        rig.spec(restart="sometimes")


def test_image_signature_changes_with_an_exec_in_place(tmp_path):
    script = tmp_path / "reexec.py"
    script.write_text("import os, sys, time\n"
                      "if sys.argv[1:] != ['again']:\n"
                      "    sys.stdin.readline()\n"
                      "    os.execv(sys.executable, [sys.executable, __file__, 'again'])\n"
                      "time.sleep(30)\n")
    import subprocess

    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE)
    try:
        before = wait_for(lambda: image_signature(proc.pid), 10, what="a signature")
        ctime = psutil.Process(proc.pid).create_time()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        wait_for(lambda: "again" in psutil.Process(proc.pid).cmdline(), 10, what="the exec")
        assert psutil.Process(proc.pid).create_time() == ctime  # what adoption matches on
        assert image_signature(proc.pid) != before
    finally:
        proc.kill()
        proc.wait()


def test_a_zombie_that_is_not_our_child_counts_as_gone(tmp_path):
    """The stop ladder waits on processes, not on their parents' reaping: a non-child zombie
    (the log pipe once its parent, init, is slow to reap it) is gone at once."""
    import subprocess

    from agent.procs import wait_gone

    # a parent that never reaps its child: the child exits and stays a zombie
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        zombie = psutil.Process(int(parent.stdout.readline()))
        wait_for(lambda: zombie.status() == psutil.STATUS_ZOMBIE, 10, what="a zombie")
        gone: list[int] = []
        began = time.monotonic()
        assert wait_gone([zombie], 20, lambda p: gone.append(p.pid)) == []
        assert time.monotonic() - began < 10 and gone == [zombie.pid]
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
