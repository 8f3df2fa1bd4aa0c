"""What the agent says about what happened, and when (issue 8): progress and agent log lines
that say each thing once, as it happens, at the right level; `status` while installing and
after ComfyUI was killed; health details that are true on a CPU machine and while ComfyUI
waits for the required components."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent import health as h
from agent.cli_core import render_status
from agent.config import load
from agent.execute import describe
from agent.model import Outcome
from tests.helpers import run_cli, wait_for
from tests.kit import cmd, counting, install, runs, use

REPEATS = re.compile(r"\b(installed: installed|already: already|failed: failed|"
                     r"blocked: blocked|skipped: skipped|disabled: disabled)\b")


def progress(ws) -> str:
    path = ws.root / "installation_progress.log"
    return path.read_text() if path.exists() else ""


# ---------------------------------------------------------------------- one line, said once
def test_outcome_lines_say_their_status_once():
    assert describe(Outcome("a", "installed", "installed in 2.0s (1.0)")) == \
        "a: installed in 2.0s (1.0)"
    assert describe(Outcome("a", "already", "already installed (2026-01-01 00:00:00, -)")) == \
        "a: already installed (2026-01-01 00:00:00, -)"
    assert describe(Outcome("a", "blocked", "blocked by b")) == "a: blocked by b"
    assert describe(Outcome("a", "failed", "exit 3")) == "a: failed: exit 3"
    assert describe(Outcome("a", "skipped", "skipped: no GPU")) == "a: skipped: no GPU"
    assert describe(Outcome("a", "disabled", "disabled in config")) == "a: disabled in config"


def test_progress_log_never_repeats_a_status(ws):
    use(ws, {"a": counting(ws, "a"), "b": counting(ws, "b", depends_on=["a"]),
             "bad": cmd("exit 3", check="false"),
             "child": counting(ws, "child", depends_on=["bad"])})
    install(ws, expect=1)
    install(ws, expect=1)
    text = progress(ws)
    assert "a: installed in " in text and "b: installed in " in text
    assert "bad: failed: " in text and "child: blocked by bad" in text
    assert not REPEATS.search(text), text


def test_agent_log_levels_and_each_outcome_once():
    from loguru import logger

    from agent.model import Action, Step
    from agent.reconcile import LogReporter

    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(f"{m.record['level'].name} {m.record['message']}"),
                      level="DEBUG", format="{message}")
    try:
        r = LogReporter("foreground")
        r.begin(Step("a", Action.INSTALL, "no marker", ()))
        r.end(Outcome("a", "installed", "installed in 1.0s (-)"))
        r.end(Outcome("b", "failed", "exit 3"))
        r.log(Outcome("b", "failed", "exit 3"))  # the pass's summary: not again
        r.end(Outcome("c", "blocked", "blocked by b"))
        r.end(Outcome("d", "already", "already installed (t, -)"))
        r.end(Outcome("e", "already", "repaired by reinstalling its dependency a; kept"))
        r.end(Outcome("f", "failed", "stopped"))  # cut short by shutdown: no warning
    finally:
        logger.remove(sink)
    assert seen == ["INFO a: installing (no marker)", "INFO a: installed in 1.0s (-)",
                    "WARNING b: failed: exit 3", "WARNING c: blocked by b",
                    "DEBUG d: already installed (t, -)",
                    "INFO e: repaired by reinstalling its dependency a; kept",
                    "INFO f: failed: stopped"]


# ---------------------------------------------------------------------- user nodes
def test_new_user_node_says_what_was_installed(ws):
    use(ws, {"a": counting(ws, "a")})
    install(ws)
    nodes = ws.comfyui / "custom_nodes"
    (nodes / "bare").mkdir(parents=True)
    (nodes / "bare" / "__init__.py").write_text("")
    (nodes / "withreqs").mkdir()
    (nodes / "withreqs" / "__init__.py").write_text("")
    (nodes / "withreqs" / "requirements.txt").write_text("podtest-nodec\n")
    install(ws)
    text = progress(ws)
    bare = [ln for ln in text.splitlines() if "custom_nodes/bare:" in ln]
    assert len(bare) == 1 and bare[0].endswith(
        "custom_nodes/bare: new node, nothing to install (no requirements.txt or install.py)"), \
        text
    assert "custom_nodes/withreqs: requirements installed" in text
    assert "requirements installed" not in bare[0]
    assert not REPEATS.search(text), text


# ---------------------------------------------------------------------- repaired by a dependency
def test_component_repaired_by_its_dependency_says_so(ws):
    runs_a = ws.root / "runs" / "a"
    use(ws, {"a": counting(ws, "a"),
             "b": counting(ws, "b", depends_on=["a"]) | {
                 "check": f"test -s {runs_a} && test -s {ws.root / 'runs' / 'b'}"}})
    install(ws)
    old = ws.marker("b").read_text().splitlines()[0]
    runs_a.unlink()  # a breaks, and b's probe with it
    out = install(ws).stdout
    assert runs(ws, "a") == 1 and runs(ws, "b") == 1  # only a was installed again
    line = next(ln for ln in out.splitlines() if ln.startswith("b: "))
    assert line.startswith("b: repaired by reinstalling its dependency a"), out
    assert "already installed" not in line
    assert old in line  # its own install time, said as such
    assert not any(ln.startswith("b: reinstalling") for ln in out.splitlines()), out
    assert "b: repaired by reinstalling its dependency a" in progress(ws)


# ---------------------------------------------------------------------- status: last exit
def _status_data(last_exit):
    return {"workspace": "/w", "verdict": "degraded", "components": {},
            "agent": {"pid": 1, "uptime": 5, "last_reconcile": None, "last_result": None},
            "comfyui": {"state": "backoff", "pid": None, "uptime": None, "restarts": 1,
                        "last_exit": last_exit}}


def test_status_says_how_comfyui_last_ended():
    killed = render_status(_status_data({"code": None, "signal": 9, "time": 1, "pid": 5}))
    assert "last exit: killed by signal 9 (SIGKILL)" in killed
    assert "None" not in killed
    code = render_status(_status_data({"code": 1, "signal": None, "time": 1, "pid": 5}))
    assert "last exit: code 1" in code and "None" not in code
    unknown = render_status(_status_data({"code": None, "signal": None, "time": 1, "pid": 5}))
    assert "last exit: unknown" in unknown and "None" not in unknown


# ---------------------------------------------------------------------- VRAM on a CPU machine
class _Stats(BaseHTTPRequestHandler):
    devices: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"system": {"comfyui_version": "0.3.0", "pytorch_version": "2.5",
                                      "python_version": "3.11.9 (main)"},
                           "devices": self.devices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("devices,want,unwanted", [
    ([{"name": "cpu", "type": "cpu", "vram_total": 25232932864, "vram_free": 23837868032}],
     "no GPU (runs on the CPU)", "VRAM"),
    ([{"name": "cuda:0 NVIDIA H100", "type": "cuda", "vram_total": 85899345920,
       "vram_free": 42949672960}], "cuda:0 NVIDIA H100: 40.0/80.0 GiB VRAM free", "CPU"),
])
def test_http_check_says_vram_only_for_a_gpu(ws, devices, want, unwanted):
    handler = type("Stats", (_Stats,), {"devices": devices})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        ws.config["comfyui"].update({"port": port, "host": "127.0.0.1"})
        ws.save()
        cfg = load(ws.config_path, ws.root)
        hooks = h.Hooks(service=lambda: {"state": "running", "pid": os.getpid()},
                        comfy_expected=lambda: True, request_restart=lambda *a: None,
                        request_reconcile=lambda *a: None)
        entry = h.Monitor(cfg, hooks).run("comfyui_http")
        assert entry["status"] == "ok", entry
        assert want in entry["detail"] and unwanted not in entry["detail"], entry["detail"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---------------------------------------------------------------------- the running agent
from tests.test_daemon import aws, install_all, running, service, starts  # noqa: E402,F401

LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) \| (\w+)\s*\| (.*)$")


def log_lines(agent) -> list[tuple[datetime, str, str]]:
    out = []
    for line in agent.log().splitlines():
        m = LINE.match(line)
        if m:
            out.append((datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S"), m[2], m[3]))
    return out


def health_entry(ws, name: str) -> dict | None:
    for path in (ws.root / ".pod-agent" / "run").glob("*/health.json"):
        try:
            return json.loads(path.read_text())["checks"].get(name)
        except (OSError, ValueError, KeyError):
            return None
    return None


@pytest.mark.slow
def test_first_boot_tells_each_component_as_it_happens(aws):
    gate, done = aws.root / "gate", aws.root / "slow.done-file"
    aws.config["components"]["slow"] = cmd(
        f"while [ ! -f {gate} ]; do sleep 0.05; done; sleep 1.1; touch {done}",
        check=f"test -f {done}", required=True)
    aws.config["components"]["broken"] = cmd("echo nope; exit 3", check="false")
    aws.config["health"] = {"checks": {"comfyui_http": {"interval": 0.5}}}
    aws.save()
    agent = aws.start_agent()
    # `status` while a component installs: which one, since when
    wait_for(lambda: json.loads(run_cli("status", "--json", *aws.args()).stdout)
             ["components"]["slow"]["state"] == "installing", 60, what="slow installing")
    data = json.loads(run_cli("status", "--json", *aws.args()).stdout)
    slow = data["components"]["slow"]
    assert slow["state"] == "installing" and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$",
                                                      slow["timestamp"]), slow
    assert slow["installing_for"] is not None and slow["installing_for"] >= 0
    assert re.search(r"installer\s+pid \d+ .* component=slow installing for \d+s",
                     run_cli("status", *aws.args()).stdout)
    # the health check says why ComfyUI is not up: it waits, nobody passed --no-comfyui
    entry = wait_for(lambda: health_entry(aws, "comfyui_http"), 20, what="comfyui_http check")
    assert entry["status"] == "skip"
    assert entry["detail"] == "ComfyUI waits for the required components (not started yet)"
    assert "--no-comfyui" not in (aws.root / "logs" / "health.jsonl").read_text()
    gate.write_text("")
    wait_for(lambda: running(aws), 60, what="ComfyUI running")
    # every check runs once soon after start: the components check too (interval 300 s)
    comp = wait_for(lambda: health_entry(aws, "components"), 30, what="components check")
    assert comp["status"] in ("ok", "warn", "fail")
    lines = log_lines(agent)
    msgs = [m for _, _, m in lines]

    def at(prefix: str) -> tuple[datetime, str, int]:
        i = next(i for i, m in enumerate(msgs) if m.startswith(prefix))
        return lines[i][0], lines[i][1], i

    began, lvl_b, i_b = at("slow: installing")
    ended, lvl_e, i_e = at("slow: installed in ")
    assert lvl_b == lvl_e == "INFO" and i_b < i_e and ended > began  # two moments, in order
    i_core = at("comfyui_core: installed in ")[2]
    assert at("comfyui_core: installing")[2] < i_core
    assert at("broken: failed: ")[1] == "WARNING"
    # each outcome logged once per pass, each status said once
    for name in ("comfyui_core", "dependencies_main", "slow"):
        assert sum(m.startswith(f"{name}: installed in ") for m in msgs) == 1, msgs
    assert not any(REPEATS.search(m) for m in msgs), msgs
    assert not any(m.startswith("starting ComfyUI") for m in msgs)
    start = [m for m in msgs if "-> starting" in m]
    assert start and start[0].endswith("starting: required components installed"), start


@pytest.mark.slow
def test_status_last_exit_after_comfyui_is_killed(aws):
    install_all(aws)
    aws.start_agent()
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    pid = starts(aws)[-1]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (service(aws).get("last_exit") or {}).get("signal") == 9, 20,
             what="the exit recorded")
    text = run_cli("status", *aws.args()).stdout
    assert "last exit: killed by signal 9 (SIGKILL)" in text, text
    assert "last exit None" not in text


@pytest.mark.slow
def test_resume_then_adoption_log_no_start_before_adopting(aws):
    install_all(aws)
    first = aws.start_agent()
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    msgs = [m for _, _, m in log_lines(first)]
    assert any(m.endswith("-> starting: resume: required components verified") for m in msgs)
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    second = aws.start_agent()
    wait_for(lambda: service(aws).get("adopted") and running(aws), 30, what="adoption")
    wait_for(lambda: any("adopted running ComfyUI" in m for _, _, m in log_lines(second)), 10,
             what="the adoption logged")
    msgs = [m for _, _, m in log_lines(second)]
    assert not any("starting ComfyUI" in m or "-> starting" in m for m in msgs), msgs
    assert len(starts(aws)) == 1
