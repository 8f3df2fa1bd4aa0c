"""The resident agent, end to end: real `pod-agent run` processes, a fake ComfyUI, real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT, commit_files, git, make_repo, run_cli, runtime_json, wait_for

FAKE = ROOT / "tests" / "fake_comfyui" / "main.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_servers(port: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(c.endswith("main.py") for c in cmd) and str(port) in cmd:
            out.append(p)
    return out


class Agent:
    def __init__(self, ws, *extra: str, env: dict | None = None, prefix: tuple = ()):
        self.ws = ws
        self.out = ws.root.parent / f"agent-{time.monotonic_ns()}.out"
        full = dict(os.environ)
        full.update(env or {})
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "agent", "run", *ws.args(), *extra],
            stdout=open(self.out, "w"), stderr=subprocess.STDOUT, env=full,
            stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self) -> str:
        return self.out.read_text()

    def stop(self, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def aws(ws, tmp_path):
    """The `ws` workspace with a ComfyUI upstream whose main.py is the fake server."""
    port = free_port()
    commit_files(ws.upstreams / "ComfyUI", {"main.py": FAKE.read_text()}, "fake server")
    ws.port = port
    ws.record = tmp_path / "starts.jsonl"
    ws.control = tmp_path / "control"
    ws.control.mkdir()
    ws.config["comfyui"].update({
        "args": ["--listen", "127.0.0.1", "--port", str(port)], "port": port,
        "env": {"FAKE_COMFY_RECORD": str(ws.record), "FAKE_COMFY_CONTROL": str(ws.control)}})
    ws.config["http"] = {"port": 0}
    ws.config["agent"] = {
        "restart_quiet_period": 1.0, "backoff_initial": 0.3, "backoff_max": 2.0,
        "ready_poll_interval": 0.2, "liveness_interval": 0.5, "queue_poll_interval": 0.2,
        "stop_timeout": 5, "reconcile_interval": 600, "degraded_retry": 60}
    ws.save()
    agents: list[Agent] = []

    def start(*extra: str, env: dict | None = None, prefix: tuple = ()) -> Agent:
        agent = Agent(ws, *extra, env=env, prefix=prefix)
        agents.append(agent)
        return agent

    ws.start_agent = start
    yield ws
    for agent in agents:
        agent.stop()
    strays = fake_servers(port)
    for p in strays:
        p.kill()
    assert not strays, "a ComfyUI outlived its agent"


def starts(ws) -> list[dict]:
    try:
        return [json.loads(line) for line in ws.record.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def service(ws) -> dict:
    return runtime_json(ws.root, "service.json") or {}


def running(ws) -> bool:
    return service(ws).get("state") == "running"


def install_all(ws) -> None:
    proc = run_cli("install", *ws.args())
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow  # starts the agent
def test_fresh_volume_installs_then_starts_and_stops_cleanly(aws):
    agent = aws.start_agent()
    wait_for(lambda: running(aws), 60, what="ComfyUI running")
    assert aws.marker("comfyui_core").exists() and aws.marker("dependencies_main").exists()
    assert len(starts(aws)) == 1
    data = json.loads(run_cli("status", "--json", *aws.args()).stdout)
    assert data["agent"]["pid"] == agent.proc.pid
    assert data["comfyui"]["state"] == "running"
    pid = starts(aws)[0]["pid"]
    assert agent.stop(timeout=30) == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not fake_servers(aws.port)
    assert "pod-agent stopped" in agent.log()


@pytest.mark.slow  # starts the agent
def test_deleted_marker_is_reinstalled(aws):
    # whether ComfyUI restarts after it: tests/test_restart_decision.py (only when what it loads
    # changed; this reinstall changes nothing)
    install_all(aws)
    agent = aws.start_agent()
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    log = aws.root / "logs" / "install" / "dependencies_main.log"
    runs = log.read_text().count("\n=== ") + log.read_text().startswith("=== ")
    aws.marker("dependencies_main").unlink()
    wait_for(lambda: aws.marker("dependencies_main").exists(), 30, what="marker rewritten")
    wait_for(lambda: "reinstalled dependencies_main" in agent.log(), 30, what="restart decision")
    assert running(aws)
    text = log.read_text()
    assert text.count("\n=== ") + text.startswith("=== ") > runs


def agent_state(ws) -> dict:
    return runtime_json(ws.root, "agent.json") or {}


def resume_passes_done(ws) -> bool:
    """Both resume reconciles (foreground, background) have finished: the agent is idle."""
    rec = agent_state(ws).get("reconciles") or {}
    return bool(rec.get("foreground") and rec.get("background") and rec.get("runs", 0) >= 2)


@pytest.mark.slow  # starts the agent
def test_rm_all_markers_is_one_ordered_reinstall(aws):
    install_all(aws)
    aws.start_agent()
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    # ComfyUI runs before the resume reconcile ends (it starts first on a resume). A burst that
    # lands while that pass observes the components is seen half by it and half by the next
    # pass: the promise is about a burst on an idle agent, so wait for the resume passes.
    wait_for(lambda: resume_passes_done(aws), 60, what="resume reconciles done")
    progress = aws.root / "installation_progress.log"
    offset = len(progress.read_text())
    for marker in aws.markers.glob("*.done"):
        marker.unlink()
    wait_for(lambda: aws.marker("overall_installation").exists(), 60, what="all reinstalled")
    new = progress.read_text()[offset:]
    order = [line.split("] ")[1].split(":")[0] for line in new.splitlines()
             if ": installing" in line or ": reinstalling" in line]
    assert order == ["comfyui_core", "dependencies_main", "dependencies_additional",
                     "custom_nodes", "gguf_node"], new
    # one reconcile for the burst: each component installed exactly once
    assert all(order.count(n) == 1 for n in order)


@pytest.mark.slow  # starts the agent
def test_rm_all_markers_during_a_pass_is_still_in_dependency_order(aws):
    install_all(aws)
    agent = aws.start_agent()
    wait_for(lambda: "reconcile (foreground)" in agent.log(), 30, interval=0.005,
             what="the resume pass started")
    progress = aws.root / "installation_progress.log"
    offset = len(progress.read_text())
    for marker in aws.markers.glob("*.done"):
        marker.unlink()
    wait_for(lambda: all(aws.marker(n).exists() for n in (
        "comfyui_core", "dependencies_main", "dependencies_additional", "custom_nodes",
        "gguf_node", "overall_installation")), 90, what="all reinstalled")
    new = progress.read_text()[offset:]
    order = [line.split("] ")[1].split(":")[0] for line in new.splitlines()
             if ": installing" in line or ": reinstalling" in line]
    assert order == ["comfyui_core", "dependencies_main", "dependencies_additional",
                     "custom_nodes", "gguf_node"], new


@pytest.mark.slow  # starts the agent
def test_new_node_gets_requirements_and_one_restart_after_quiet_period(aws, wheels):
    install_all(aws)
    aws.start_agent()
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    before = len(starts(aws))
    url = make_repo(aws.upstreams / "node-c", {"__init__.py": "", "requirements.txt":
                                               "podtest-nodec\n"})
    git("clone", "-q", url, str(aws.comfyui / "custom_nodes" / "node-c"))
    wait_for(lambda: len(starts(aws)) == before + 1 and running(aws), 30, what="restart")
    assert "podtest_nodec-1.0.dist-info" in os.listdir(
        next((aws.root / "venv" / "lib").glob("python*")) / "site-packages")
    # exactly one restart for the whole clone
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert len(starts(aws)) == before + 1
        time.sleep(0.1)


@pytest.mark.slow  # starts the agent
def test_change_restart_waits_for_busy_queue(aws):
    install_all(aws)
    aws.start_agent()
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    before = len(starts(aws))
    (aws.control / "busy").write_text("2")
    node = aws.comfyui / "custom_nodes" / "node-a" / "__init__.py"
    node.write_text("# changed\n")
    wait_for(lambda: (service(aws).get("pending_restart") or {}).get("waiting_for") == "queue",
             20, what="restart pending on the queue")
    status = run_cli("status", *aws.args()).stdout
    assert "restart pending" in status and "waiting for queue" in status
    assert len(starts(aws)) == before
    (aws.control / "busy").unlink()
    wait_for(lambda: len(starts(aws)) == before + 1 and running(aws), 20, what="restart")


@pytest.mark.slow  # starts the agent
def test_crash_loop_backs_off_and_reports_degraded(aws):
    install_all(aws)
    aws.config["comfyui"]["env"]["FAKE_COMFY_CRASH_ON_START"] = "1"
    aws.config["agent"].update({"degraded_after": 3, "degraded_window": 60,
                                "degraded_retry": 60})
    aws.save()
    aws.start_agent()
    wait_for(lambda: service(aws).get("state") == "degraded", 30, what="DEGRADED")
    data = json.loads(run_cli("status", "--json", *aws.args()).stdout)
    assert data["comfyui"]["state"] == "degraded" and data["verdict"] == "degraded"
    n = len(starts(aws))
    assert n >= 4
    deltas = [b["time"] - a["time"] for a, b in zip(starts(aws), starts(aws)[1:])]
    assert deltas[-1] > deltas[0]  # backoff grows


@pytest.mark.slow  # starts the agent
def test_agent_killed_and_restarted_adopts_comfyui(aws):
    install_all(aws)
    first = aws.start_agent()
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    pid = starts(aws)[-1]["pid"]
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    assert psutil.pid_exists(pid)
    aws.start_agent()
    wait_for(lambda: service(aws).get("adopted") and running(aws), 30, what="adoption")
    assert service(aws)["pid"] == pid
    assert len(starts(aws)) == 1
    assert [p.pid for p in fake_servers(aws.port)] == [pid]


@pytest.mark.slow  # starts the agent
def test_second_agent_on_same_workspace_refuses(aws):
    aws.start_agent()
    wait_for(lambda: running(aws), 60, what="ComfyUI running")
    second = run_cli("run", *aws.args(), timeout=30)
    assert second.returncode == 1
    assert "already runs" in second.stderr


@pytest.mark.slow  # starts the agent
def test_polling_mode_reinstalls_deleted_marker(aws):
    install_all(aws)
    agent = aws.start_agent("--poll", "0.3")
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    aws.marker("dependencies_additional").unlink()
    wait_for(lambda: aws.marker("dependencies_additional").exists(), 20, what="reinstall")
    state = json.loads(next((aws.root / ".pod-agent" / "run").glob("*/agent.json")).read_text())
    assert state["watch"]["mode"] == "polling"
    assert agent.proc.poll() is None


@pytest.mark.slow  # starts the agent
def test_resume_starts_comfyui_before_background_work_and_sage_flag_follows_probe(aws):
    aws.config["components"]["sageattention"]["run"] = (
        "sleep 4; echo built > {workspace}/sage.txt")
    aws.save()
    install_all(aws)  # POD_AGENT_GPU=0: sageattention skipped
    agent = aws.start_agent(env={"POD_AGENT_GPU": "1"})
    wait_for(lambda: starts(aws), 30, what="ComfyUI spawned")
    assert "--use-sage-attention" not in starts(aws)[0]["argv"]
    assert not (aws.root / "sage.txt").exists()  # background work still running
    wait_for(lambda: len(starts(aws)) >= 2, 30, what="restart after sageattention installed")
    assert "--use-sage-attention" in starts(aws)[-1]["argv"]
    assert agent.proc.poll() is None


@pytest.mark.slow  # starts the agent
def test_entrypoint_runs_the_agent_and_stops_on_sigterm(aws):
    env = dict(os.environ, POD_AGENT_WORKSPACE=str(aws.root),
               POD_AGENT_CONFIG=str(aws.config_path),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if not shutil.which("pod-agent", path=env["PATH"]):
        pytest.skip("pod-agent is not installed as a console script")
    out = aws.root.parent / "entrypoint.out"
    proc = subprocess.Popen(["bash", str(ROOT / "entrypoint.sh")], env=env,
                            stdout=open(out, "w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: running(aws), 60, what="ComfyUI running via entrypoint")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (aws.root / "logs").is_dir() and aws.markers.is_dir()
    assert not fake_servers(aws.port)


def test_systemd_unit_verifies(tmp_path):
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "systemd" / "pod-agent.service").read_text()
    exe = shutil.which("pod-agent") or sys.executable
    path = tmp_path / "pod-agent.service"
    path.write_text(unit.replace("/usr/local/bin/pod-agent", exe))
    proc = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pod-agent.service" not in proc.stderr, proc.stderr


@pytest.mark.slow  # starts the agent
def test_as_pid1_reaps_orphans_and_keeps_its_children_exit_codes(aws):
    unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
    if not shutil.which("unshare") or subprocess.run([*unshare, "true"]).returncode != 0:
        pytest.skip("cannot create a PID namespace here")
    # an installer that leaves orphans behind: they are re-parented to PID 1, the agent
    aws.config["components"]["orphans"] = {
        "kind": "command", "run": "for i in 1 2 3; do (sleep 0.2 &); done; sleep 0.5",
        "check": "true"}
    aws.save()
    agent = aws.start_agent(prefix=tuple(unshare))
    wait_for(lambda: running(aws), 60, what="ComfyUI running under a PID-1 agent")
    wait_for(lambda: aws.marker("orphans").exists(), 30, what="orphan-making installer done")
    inner = psutil.Process(agent.proc.pid).children()[0]  # the agent: PID 1 in its namespace
    assert "agent" in " ".join(inner.cmdline())

    def zombies():
        return [c for c in inner.children() if c.status() == psutil.STATUS_ZOMBIE]

    wait_for(lambda: not zombies(), 10, what="orphans reaped")
    # its own child's exit status is still its own: a crash is seen as a crash, not "exit 0"
    (aws.control / "crash").write_text("")
    wait_for(lambda: (service(aws).get("last_exit") or {}).get("code") == 1, 20,
             what="ComfyUI's exit code seen by the supervisor")
    (aws.control / "crash").unlink()
    inner.send_signal(signal.SIGTERM)  # what a container runtime sends to PID 1
    assert agent.proc.wait(40) == 0
