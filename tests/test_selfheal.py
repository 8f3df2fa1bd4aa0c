"""Self-healing end to end: a real `pod-agent run`, the fake ComfyUI (tests/test_daemon.py `aws`),
real health checks acting on real processes, markers and installs. tests/test_health.py checks the
same decisions against a recorder; these check that the agent carries them out."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli, runtime_json, wait_for
from tests.test_daemon import aws, install_all, running, service, starts  # noqa: F401
from tests.test_health import set_fakes

pytestmark = pytest.mark.slow  # every test here starts the agent

QUIET = {"interval": 3600, "enabled": False}


def health(aws, checks: dict, **top) -> None:
    """Only the named checks, fast; the others off (their results would not be the subject)."""
    every = ("comfyui_http", "comfyui_process", "sageattention", "components", "disk", "gpu",
             "agent", "drift")
    aws.config["health"] = {"checks": {n: checks.get(n, {"enabled": False}) for n in every},
                            **top}
    aws.save()


def records(aws, check: str) -> list[dict]:
    path = aws.root / "logs" / "health.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [r for r in map(json.loads, lines) if r.get("check") == check]


def idle(aws) -> bool:
    """Both reconcile workers have run at least once since the agent started."""
    state = runtime_json(aws.root, "agent.json")
    if state is None:
        return False
    rec = state.get("reconciles") or {}
    return bool(rec.get("foreground") and rec.get("background"))


def proof_component(aws, name: str = "thing") -> None:
    proof = aws.root / f"{name}.txt"
    aws.config["components"][name] = {
        "kind": "command", "run": f"echo built >> {proof}", "check": f"test -f {proof}",
        "depends_on": ["comfyui_core"]}


# ---------------------------------------------------------------------- health -> restart
def test_comfyui_that_stops_answering_is_restarted_by_the_http_check(aws):
    # the supervisor's own liveness probe is slowed down: the health check must do it
    aws.config["agent"].update({"liveness_interval": 3600})
    health(aws, {"comfyui_http": {"interval": 0.3, "timeout": 0.3, "failures": 3}})
    install_all(aws)
    agent = aws.start_agent()
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    first = starts(aws)[-1]["pid"]
    (aws.control / "hang").write_text("")  # alive, /system_stats never answers
    wait_for(lambda: "health check comfyui_http failed" in agent.log(), 20,
             what="the http check asking for a restart")
    (aws.control / "hang").unlink()
    # the agent's state file follows within one housekeeping tick: wait for the new pid there
    wait_for(lambda: len(starts(aws)) == 2 and running(aws) and service(aws)["pid"] != first,
             30, what="ComfyUI restarted")
    assert service(aws)["pid"] == starts(aws)[-1]["pid"]
    acted = [r["action"] for r in records(aws, "comfyui_http") if r["action"] != "none"]
    assert "restart_comfyui" in acted, acted  # not urgent: the process was alive
    log = agent.log()
    assert "ComfyUI restart requested" in log and "liveness check failed" not in log
    # and it answers again: the check is ok afterwards
    wait_for(lambda: records(aws, "comfyui_http")[-1]["status"] == "ok", 20, what="check ok")


# ---------------------------------------------------------------------- health -> reinstall
def test_broken_component_found_by_the_components_check_is_reinstalled(aws):
    proof_component(aws)
    health(aws, {"components": {"interval": 0.5, "timeout": 30}})
    install_all(aws)
    agent = aws.start_agent()
    wait_for(lambda: running(aws) and idle(aws), 60, what="agent idle")
    proof = aws.root / "thing.txt"
    assert proof.read_text() == "built\n"
    proof.unlink()  # the marker now lies: present, but the component is broken
    wait_for(lambda: "health: components failed: reinstalling thing" in agent.log(), 20,
             what="the components check acting")
    wait_for(lambda: proof.exists() and aws.marker("thing").exists(), 30, what="reinstalled")
    assert proof.read_text() == "built\n"
    acted = [r for r in records(aws, "components") if r["action"] == "reinstall thing"]
    assert len(acted) == 1, records(aws, "components")
    wait_for(lambda: records(aws, "components")[-1]["status"] == "ok", 20, what="check ok")
    assert agent.proc.poll() is None


def test_component_broken_again_and_again_is_quarantined_and_reported(aws):
    proof_component(aws)
    health(aws, {"components": {"interval": 0.5, "timeout": 30}}, reinstall_limit=2)
    install_all(aws)
    agent = aws.start_agent()
    wait_for(lambda: running(aws) and idle(aws), 60, what="agent idle")
    proof = aws.root / "thing.txt"
    for n in (1, 2):
        proof.unlink()
        wait_for(lambda: proof.exists() and aws.marker("thing").exists(), 30,
                 what=f"reinstall {n}")
    proof.unlink()  # a third time within the window: quarantined, left alone
    wait_for(lambda: "health: thing quarantined" in agent.log(), 20, what="quarantine")
    assert aws.marker("thing").exists() and not proof.exists()
    acted = [r["action"] for r in records(aws, "components") if r["action"] != "none"]
    assert acted[:2] == ["reinstall thing", "reinstall thing"], acted
    assert acted[2].startswith("quarantined thing (2 reinstalls of thing within 60 min"), acted
    report = json.loads(run_cli("health", "--json", *aws.args()).stdout)
    assert "thing" in json.dumps(report.get("quarantined")), report
    status = run_cli("status", *aws.args()).stdout
    assert "quarantined" in status, status
    assert not proof.exists()  # still not reinstalled


# ---------------------------------------------------------------------- the SageAttention flag
def test_sage_flag_follows_install_and_kernel_check(aws, tmp_path):
    fakes = tmp_path / "fakes"
    set_fakes(fakes, sage="ok")
    aws.config["comfyui"]["env"]["PYTHONPATH"] = str(fakes)
    aws.config["comfyui"]["sage_attention"] = "auto"
    health(aws, {"sageattention": {"interval": 0.5, "timeout": 30, "on_fail": "none"}})
    install_all(aws)  # POD_AGENT_GPU=0 here: sageattention not installed yet
    agent = aws.start_agent(env={"POD_AGENT_GPU": "1"})
    wait_for(lambda: starts(aws), 30, what="ComfyUI spawned")
    assert "--use-sage-attention" not in starts(aws)[0]["argv"]  # not installed: no flag
    # installed (background) and the kernel check passes: restarted with the flag
    wait_for(lambda: "--use-sage-attention" in starts(aws)[-1]["argv"] and running(aws), 60,
             what="a start with the flag")
    with_flag = len(starts(aws))
    # the kernel check fails for the installed build: restarted without it
    set_fakes(fakes, sage="kernel_error")
    wait_for(lambda: len(starts(aws)) > with_flag and running(aws), 60,
             what="a restart without the flag")
    assert "--use-sage-attention" not in starts(aws)[-1]["argv"]
    assert "not passing --use-sage-attention: the kernel check failed" in agent.log()
    assert aws.marker("sageattention").exists()  # on_fail none: no reinstall
    without = len(starts(aws))
    # a build that passes again: the flag is back
    set_fakes(fakes, sage="ok")
    wait_for(lambda: len(starts(aws)) > without and running(aws), 60, what="flag back")
    assert "--use-sage-attention" in starts(aws)[-1]["argv"]
