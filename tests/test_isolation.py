"""One bad component or file is that component's failure, never the whole pass's: the rest is
still converged, by `install` and by the running agent, and health says when a reconcile keeps
failing."""

from __future__ import annotations

import pytest

import json

from tests.helpers import run_cli, wait_for
from tests.kit import counting, install, runs, status, use


def test_a_directory_marker_fails_only_its_component(ws):
    use(ws, {"a": counting(ws, "a"), "b": counting(ws, "b"),
             "c": counting(ws, "c", depends_on=["a"])})
    ws.markers.mkdir()
    (ws.markers / "a.done").mkdir()  # a folder where the marker file belongs
    proc = install(ws, expect=1)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert runs(ws, "b") == 1 and ws.marker("b").is_file()  # independent: installed
    assert "blocked by a" in out
    line = next(x for x in out.splitlines() if x.startswith("a: failed"))
    assert "a.done" in line and "is a folder" in line and "move it away" in line, line
    code, data = status(ws)
    assert code == 1 and data["components"]["b"]["state"] == "installed"
    assert data["components"]["a"]["state"] != "installed"
    # the fault removed, the next run converges
    (ws.markers / "a.done").rmdir()
    install(ws)
    assert status(ws)[1]["verdict"] == "healthy"


def test_a_crashing_probe_is_reported_as_that_components_failure(ws, monkeypatch):
    """A probe that raises (here: a requirements file that is a directory) breaks its own
    component only."""
    from agent.config import load
    from agent.execute import Executor

    req = ws.root / "reqs.txt"
    req.mkdir()
    use(ws, {"p": {"kind": "pip", "requirements": [str(req)]}, "b": counting(ws, "b")})
    report = Executor(load(ws.config_path, ws.root)).run()
    by_name = {o.name: o for o in report.outcomes}
    assert by_name["b"].status == "installed"
    assert by_name["p"].status == "failed"
    assert "\n" not in by_name["p"].message and "reqs.txt" in by_name["p"].message


@pytest.mark.slow
def test_running_agent_repairs_the_rest_and_health_reports_a_failing_reconcile(ws):
    from tests.test_daemon import Agent

    use(ws, {"a": counting(ws, "a"), "b": counting(ws, "b")},
        agent={"reconcile_interval": 1, "start_comfyui": False},
        health={"checks": {"agent": {"interval": 1}}}, http={"port": 0})
    ws.markers.mkdir()
    (ws.markers / "a.done").mkdir()
    agent = Agent(ws, "--no-comfyui")
    try:
        wait_for(lambda: ws.marker("b").is_file(), 60, what="b installed by the agent")
        ws.marker("b").unlink()  # the agent keeps repairing what it can
        wait_for(lambda: ws.marker("b").is_file() and runs(ws, "b") == 2, 60,
                 what="b reinstalled")
        report = ws.root / ".pod-agent" / "health.json"

        def agent_check():
            proc = run_cli("health", "--json", "--check", "agent", *ws.args())
            try:
                entry = json.loads(proc.stdout)["checks"]["agent"]
            except (ValueError, KeyError):
                return None
            return entry if "has not converged" in entry.get("detail", "") else None

        entry = wait_for(agent_check, 60, interval=0.5, what="the agent check to warn")
        assert entry["status"] == "warn"
        assert "failed: a" in entry["detail"]
        # /readyz lists the failing component (it is not required: ComfyUI's readiness rules)
        info = json.loads(next((ws.root / ".pod-agent" / "run").glob("*/http.json")).read_text())
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(info["url"] + "/readyz", timeout=10)
            raise AssertionError("/readyz answered 200 without ComfyUI")
        except urllib.error.HTTPError as exc:
            code, body = exc.code, json.loads(exc.read())
        assert code == 503 and "a" in body["failed_components"]
        assert "a.done" in body["failed_components"]["a"]
        assert "crashed" not in agent.log()
    finally:
        assert agent.stop() == 0
    assert "Traceback" not in agent.log()


@pytest.mark.slow
def test_the_agent_retries_a_failed_pass_on_its_own_once_the_fault_is_gone(ws, tmp_path):
    """No event and a long periodic interval: a pass that failed is tried again by itself
    (5 s, doubling), so a fault that goes away (a disk freed, a network back) heals."""
    from tests.test_daemon import Agent

    fixed = tmp_path / "fixed"  # outside the workspace: no watched event when it appears
    use(ws, {"flaky": counting(ws, "flaky", extra=f"test -f {fixed}")},
        agent={"reconcile_interval": 3600}, health={"enabled": False}, http={"enabled": False})
    agent = Agent(ws, "--no-comfyui")
    try:
        wait_for(lambda: runs(ws, "flaky") >= 1, 60, what="the first attempt")
        fixed.touch()
        wait_for(lambda: ws.marker("flaky").is_file(), 60, interval=0.2,
                 what="the retry to install it")
        assert "retry: the last pass did not converge" in agent.log()
    finally:
        assert agent.stop() == 0
