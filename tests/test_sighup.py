"""SIGHUP reloads the config of a running agent (real `pod-agent run`, the fake ComfyUI)."""

from __future__ import annotations

import re
import signal

import pytest

from tests.helpers import wait_for
from tests.test_daemon import aws, install_all, running, service, starts  # noqa: F401
from tests.test_selfheal import idle

pytestmark = pytest.mark.slow  # every test here starts the agent


def lines(agent, text: str) -> list[str]:
    return [line for line in agent.log().splitlines() if text in line]


def test_valid_reload_installs_a_new_component_and_restarts_with_new_settings(aws):
    install_all(aws)
    agent = aws.start_agent()
    wait_for(lambda: running(aws) and idle(aws), 60, what="agent idle")
    assert len(starts(aws)) == 1
    proof = aws.root / "extra.txt"
    aws.config["components"]["extra"] = {
        "kind": "command", "run": f"echo built > {proof}", "check": f"test -f {proof}",
        "depends_on": ["comfyui_core"]}
    aws.config["comfyui"]["args"] = [*aws.config["comfyui"]["args"], "--preview-method", "auto"]
    aws.save()
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: lines(agent, "SIGHUP: config reloaded"), 10, what="reloaded")
    # the new component is installed by the reload's reconcile ...
    wait_for(lambda: proof.exists() and aws.marker("extra").exists(), 30, what="new component")
    # ... and ComfyUI is restarted (queue-aware) with its new arguments
    wait_for(lambda: len(starts(aws)) == 2 and running(aws), 30, what="restart")
    assert starts(aws)[-1]["argv"][-2:] == ["--preview-method", "auto"]
    assert "ComfyUI settings changed" in agent.log()
    assert len(lines(agent, "SIGHUP: config reloaded")) == 1
    assert not lines(agent, "keeping the old one") and "Traceback" not in agent.log()
    assert agent.proc.poll() is None


def test_invalid_reload_keeps_the_old_config_in_one_line(aws):
    install_all(aws)
    agent = aws.start_agent()
    wait_for(lambda: running(aws) and idle(aws), 60, what="agent idle")
    pid = service(aws)["pid"]
    good = aws.config_path.read_text()
    aws.config_path.write_text(good + "\ncomponents: [oops\n")
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: lines(agent, "keeping the old one"), 10, what="reload refused")
    (line,) = lines(agent, "keeping the old one")
    assert "ERROR" in line and str(aws.config_path) in line, line
    assert "Traceback" not in agent.log() and not lines(agent, "config reloaded")
    # the old config still runs everything: same ComfyUI, a deleted marker is reinstalled
    assert agent.proc.poll() is None and running(aws) and service(aws)["pid"] == pid
    aws.marker("dependencies_additional").unlink()
    wait_for(lambda: aws.marker("dependencies_additional").exists(), 30, what="reinstall")
    # and a valid file again is taken on the next SIGHUP
    aws.config_path.write_text(good)
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: lines(agent, "SIGHUP: config reloaded"), 10, what="reloaded")
    assert len(lines(agent, "keeping the old one")) == 1
    assert service(aws)["pid"] == pid  # nothing ComfyUI uses changed: no restart
    log = agent.log().splitlines()
    after = log[log.index(line) + 1]
    assert re.match(r"\d{4}-\d\d-\d\d \d", after), after  # the error was one line
