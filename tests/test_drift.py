"""Environment drift: the target venv's distributions changing outside the agent's own installs
are noticed (around a ComfyUI start, between checks), reported in health and history, and
re-checked. Unit tests of agent/drift.py first, then the real agent with a fake ComfyUI that
pip-installs at start and a pip run by hand."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from agent import drift
from agent.checks import REGISTRY
from agent.checks.base import CheckCtx, Hooks
from agent.config import load
from tests.helpers import run_cli, runtime_json, wait_for
from tests.test_daemon import aws, install_all, running, service, starts  # noqa: F401


# ---------------------------------------------------------------------- units
def test_diff_and_summary():
    d = drift.diff({"numpy": "2.1.0", "torch": "2.4", "old": "1"},
                   {"numpy": "1.26.4", "torch": "2.4", "new": "0.3"})
    assert d == {"changed": {"numpy": ["2.1.0", "1.26.4"]}, "added": {"new": "0.3"},
                 "removed": {"old": "1"}}
    assert drift.summary(d) == "numpy 2.1.0 -> 1.26.4, new added (0.3), old removed (1)"
    assert drift.names(d) == ["new", "numpy", "old"]
    assert drift.empty(drift.diff({"a": "1"}, {"a": "1"}))
    many = drift.diff({}, {f"p{i}": "1" for i in range(12)})
    assert drift.summary(many).endswith("(+4 more)")


def test_loaded_diff_names_what_changed():
    base = ("c1", (("node-a", ("h1", ())),), (("podtest-alpha", "2.0"),))
    assert drift.loaded_diff(base, base) == []
    assert drift.loaded_diff(base, ("c2",) + base[1:]) == ["ComfyUI's commit"]
    assert drift.loaded_diff(base, (base[0], (("node-a", ("h2", ())),), base[2])) == [
        "custom nodes node-a"]
    assert drift.loaded_diff(base, base[:2] + ((("podtest-alpha", "1.0"),),)) == [
        "packages podtest-alpha 2.0 -> 1.0"]


def test_installers_read_from_the_dist_info(ws):
    site = next((ws.root / "venv" / "lib").glob("python*")) / "site-packages"
    info = site / "Podtest_Zeta-3.0.dist-info"
    info.mkdir(parents=True)
    (info / "INSTALLER").write_text("uv\n")
    d = drift.diff({"podtest-zeta": "2.0"}, {"podtest-zeta": "3.0"})
    assert drift.installers(ws.python, d) == ["uv"]
    assert drift.installers(ws.python, drift.diff({"podtest-zeta": "3.0"}, {})) == []
    (info / "INSTALLER").write_text("rm -rf /\n")  # not a tool name: not shown
    assert drift.installers(ws.python, d) == []


def test_affected_components_are_those_whose_requirements_name_it(ws):
    (ws.root / "ComfyUI").mkdir()
    (ws.root / "ComfyUI" / "requirements.txt").write_text("podtest-alpha>=1.0\npodtest-beta\n")
    ws.config["components"]["dependencies_additional"]["packages"] = ["Podtest_Gamma[x]>=1.0"]
    ws.save()
    config = load(ws.config_path, ws.root)
    assert drift.affected(config, ["podtest-alpha"]) == ["dependencies_main"]
    assert drift.affected(config, ["podtest-gamma"]) == ["dependencies_additional"]
    assert drift.affected(config, ["numpy"]) == []


def test_history_is_bounded_and_read_from_its_tail(ws, monkeypatch):
    config = load(ws.config_path, ws.root)
    monkeypatch.setattr(drift, "HISTORY_MAX_BYTES", 4096)
    for i in range(200):
        drift.append(config, drift.record("between checks",
                                          drift.diff({"a": "1"}, {"a": str(i)}), "", []))
    path = drift.history_path(config)
    assert path.stat().st_size <= 4096 + 400
    lines = path.read_text().splitlines()
    assert all(json.loads(line)["kind"] == "drift" for line in lines)  # no partial line kept
    last = drift.recent(config, kind="drift", limit=1)
    assert last[0]["changed"] == {"a": ["1", "199"]}
    path.write_text(path.read_text() + "garbage\n")
    assert drift.recent(config, kind="drift", limit=1)[0]["changed"] == {"a": ["1", "199"]}


def _run_check(config):
    settings = config.health["checks"]["drift"]
    return REGISTRY["drift"](CheckCtx(config, settings, Hooks(), {}))


def test_drift_check_warns_for_a_while_then_names_the_last_one(ws):
    config = load(ws.config_path, ws.root)
    assert _run_check(config).status == "ok"  # no history at all
    rec = drift.record("during ComfyUI start", drift.diff({"numpy": "2.1"}, {"numpy": "1.26"}),
                       "ComfyUI (pid 7) or a custom node it loaded", ["dependencies_main"])
    drift.append(config, rec)
    result = _run_check(config)
    assert result.status == "warn"
    assert "numpy 2.1 -> 1.26 (during ComfyUI start" in result.detail
    assert "re-checked: dependencies_main" in result.detail
    rec["time"] -= 7200  # older than warn_for (1 h)
    drift.history_path(config).write_text(json.dumps(rec) + "\n")
    result = _run_check(config)
    assert result.status == "ok" and result.detail.startswith("no drift for 2.0 h; last: numpy")


def test_health_now_reports_the_latest_drift(ws):
    config = load(ws.config_path, ws.root)
    drift.append(config, drift.record("between checks",
                                      drift.diff({}, {"podtest-x": "1.0"}), "", []))
    proc = run_cli("health", "--now", "--check", "drift", "--json", *ws.args())
    data = json.loads(proc.stdout)
    entry = data["checks"]["drift"]
    assert entry["status"] == "warn", proc.stdout
    assert "podtest-x added (1.0)" in entry["detail"]


# ---------------------------------------------------------------------- the agent
def _venv_dists(ws) -> dict:
    return drift.dists(ws.python) or {}


def _agent_state(ws) -> dict:
    return runtime_json(ws.root, "agent.json") or {}


def _health(ws) -> dict:
    return (runtime_json(ws.root, "health.json") or {}).get("checks") or {}


def _history(ws) -> list[dict]:
    path = ws.root / ".pod-agent" / "history.jsonl"
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
    except OSError:
        return []
    return [r for r in records if r.get("kind") == "drift"]  # installs share the file


@pytest.mark.slow
def test_pip_install_at_comfyui_start_is_drift_and_is_repaired(aws):
    # a component needs podtest-alpha>=2.0; ComfyUI's start downgrades it (as ComfyUI-Manager
    # does with numpy): drift during the start, the component re-probed and repaired, and
    # ComfyUI restarted because the repair changed what it loads
    aws.config["components"]["dependencies_additional"]["packages"] = [
        "podtest-gamma>=1.0", "podtest-alpha>=2.0"]
    aws.config["comfyui"]["env"].update({
        "FAKE_COMFY_PIP_AT_START": f"--no-index --find-links {aws.wheels} podtest-alpha==1.0",
        "FAKE_COMFY_PIP_ONCE": "1", "FAKE_COMFY_PIP_WAIT": "pip_go"})
    # the repair must come from the reconcile the drift asks for, not the `components` check
    aws.config["health"] = {"checks": {"components": {"enabled": False}}}
    aws.save()
    install_all(aws)
    assert _venv_dists(aws)["podtest-alpha"] == "2.0"
    agent = aws.start_agent()
    # the downgrade lands once the resume passes are over (as ComfyUI-Manager's comes seconds
    # into a start): a pass that repaired it first would take it for its own install
    wait_for(lambda: all(_agent_state(aws).get("reconciles", {}).get(p)
                         for p in ("foreground", "background")), 30, what="resume passes")
    (aws.control / "pip_go").write_text("")
    wait_for(lambda: _history(aws), 60, what="a drift record")
    rec = _history(aws)[0]
    assert rec["kind"] == "drift" and rec["source"] == "during ComfyUI start"
    assert rec["changed"] == {"podtest-alpha": ["2.0", "1.0"]}
    assert rec["added"] == {} and rec["removed"] == {}
    # put down to the start: seen once it answered, or earlier by a health check's repair
    assert rec["by"] in (f"ComfyUI (pid {starts(aws)[0]['pid']}) or a custom node it loaded",
                         "ComfyUI (starting) or a custom node it loaded"), rec
    assert rec["installer"] == ["pip"]
    assert rec["affected"] == ["dependencies_main", "dependencies_additional"]
    wait_for(lambda: _health(aws).get("drift", {}).get("status") == "warn", 20,
             what="drift in health")
    assert "podtest-alpha 2.0 -> 1.0" in _health(aws)["drift"]["detail"]
    # re-checked: the probe sees alpha 1.0 < 2.0, the reinstall puts 2.0 back, ComfyUI restarts
    wait_for(lambda: len(starts(aws)) == 2 and running(aws), 60, what="repair and restart")
    assert _venv_dists(aws)["podtest-alpha"] == "2.0"
    log = agent.log()
    assert "environment drift during ComfyUI start: podtest-alpha 2.0 -> 1.0" in log, log
    assert "changed packages podtest-alpha 1.0 -> 2.0: ComfyUI restarts" in log, log
    # the agent's own repair is not drift
    assert len(_history(aws)) == 1


@pytest.mark.slow
def test_pip_run_by_hand_between_checks_is_drift(aws):
    aws.config["agent"]["reconcile_interval"] = 1.0
    aws.save()
    install_all(aws)
    agent = aws.start_agent()
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    pid = service(aws)["pid"]
    wait_for(lambda: "reconcile (foreground): periodic full reconcile" in agent.log(), 20,
             what="a periodic reconcile")
    # a package no component asks for: no pass touches it, the next periodic look sees it
    subprocess.run([str(aws.python), "-m", "pip", "install", "-q", "--no-index", "--find-links",
                    str(aws.wheels), "podtest-nodec"], check=True, capture_output=True)
    wait_for(lambda: _history(aws), 30, what="a drift record")
    rec = _history(aws)[0]
    assert rec["source"] == "between checks" and rec["by"] == ""
    assert rec["installer"] == ["pip"]  # the dist-info's INSTALLER
    assert rec["added"] == {"podtest-nodec": "1.0"} and not rec["changed"] and not rec["removed"]
    assert rec["affected"] == []
    wait_for(lambda: _health(aws).get("drift", {}).get("status") == "warn", 20,
             what="drift in health")
    assert "podtest-nodec added (1.0) (between checks" in _health(aws)["drift"]["detail"]
    assert ", with pip)" in _health(aws)["drift"]["detail"]
    log = agent.log()
    assert "environment drift between checks: podtest-nodec added (1.0) (with pip); " \
           "re-checking every component" in log, log
    # nothing ComfyUI loads was reinstalled: the same ComfyUI serves, one record only
    assert len(starts(aws)) == 1 and service(aws)["pid"] == pid
    assert len(_history(aws)) == 1


@pytest.mark.slow
def test_a_start_that_reverts_the_repair_every_time_stops_costing_restarts(aws):
    # ComfyUI-Manager downgrading numpy at every start while a component needs the newer one:
    # two repair-and-restart rounds, then the third repair keeps ComfyUI running
    aws.config["components"]["dependencies_additional"]["packages"] = [
        "podtest-gamma>=1.0", "podtest-alpha>=2.0"]
    aws.config["comfyui"]["env"].update({
        "FAKE_COMFY_PIP_AT_START": f"--no-index --find-links {aws.wheels} podtest-alpha==1.0",
        "FAKE_COMFY_PIP_WAIT": "pip_go"})
    aws.config["health"] = {"checks": {"components": {"enabled": False}}}
    aws.save()
    install_all(aws)
    agent = aws.start_agent()
    wait_for(lambda: all(_agent_state(aws).get("reconciles", {}).get(p)
                         for p in ("foreground", "background")), 30, what="resume passes")
    (aws.control / "pip_go").write_text("")
    wait_for(lambda: "reverted 3 times in a row: no restart" in agent.log(), 90,
             what="the third repair without a restart")
    assert [r["repeats"] for r in _history(aws)] == [1, 2, 3]
    assert all(r["changed"] == {"podtest-alpha": ["2.0", "1.0"]} for r in _history(aws))
    assert len(starts(aws)) == 3 and running(aws)
    assert _venv_dists(aws)["podtest-alpha"] == "2.0"  # repaired on disk all the same
    assert "3 times in a row" in _health(aws)["drift"]["detail"]
