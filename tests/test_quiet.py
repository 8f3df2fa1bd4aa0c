"""Quiet and true: health.jsonl records changes (and periodic summaries), not every unchanged
result; stale atomic_write temp files are cleaned at start; a health report from an agent that
is gone (or too old) says so and is never HEALTHY."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from agent import health as h
from agent import log as agent_log
from agent import markers, procs
from agent.config import load
from agent.health import Hooks
from tests.helpers import run_cli, wait_for
from tests.test_daemon import aws, install_all  # noqa: F401 - the fixture
from tests.test_health import report  # noqa: F401 - the health.jsonl sink fixture


def configure(ws, checks: dict | None = None, **top):
    ws.config["health"] = {"checks": checks or {}, **top}
    ws.save()
    return load(ws.config_path, ws.root)


def agent_hooks() -> Hooks:
    return Hooks(service=lambda: {"state": "running", "pid": None}, comfy_expected=lambda: True,
                 request_restart=lambda reason, urgent: None,
                 request_reconcile=lambda why: None)


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------- health.jsonl
def test_idle_agent_writes_changes_and_summaries_not_every_run(ws, report):
    cfg = configure(ws, {"disk": {"warn_free_gb": 0, "fail_free_gb": 0}})
    monitor = h.Monitor(cfg, agent_hooks())
    runs = 40
    for _ in range(runs):  # an idle agent: the same results over and over
        for name in ("agent", "disk"):
            assert monitor.run(name)["status"] == "ok"
    lines = records(report)
    assert [r["check"] for r in lines if r["check"] != "summary"] == ["agent", "disk"], lines
    assert all(r["previous"] is None for r in lines if r["check"] != "summary")
    assert len(lines) <= 4, lines  # the two first results and the verdict's summaries
    # health.json still has every run's latest result
    state = h.load_state(cfg)
    assert state["checks"]["disk"]["time"] == monitor.latest["disk"]["time"]
    # a periodic summary says how many runs there were since the previous summary (the first
    # `agent` result made the verdict and wrote one)
    summary = monitor.summary()
    assert (summary["runs"]["agent"], summary["runs"]["disk"]) == (runs - 1, runs), summary
    assert monitor.summary()["runs"]["disk"] == 0  # counted from the previous summary
    # a change is written, with the status it left
    monitor.config = configure(ws, {"disk": {"warn_free_gb": 1_000_000, "fail_free_gb": 0}})
    assert monitor.run("disk")["status"] == "warn"
    assert monitor.run("disk")["status"] == "warn"  # unchanged: not written again
    monitor.config = cfg
    assert monitor.run("disk")["status"] == "ok"
    checks = [r for r in records(report) if r["check"] == "disk"]
    assert [(r["status"], r["previous"]) for r in checks] == [
        ("ok", None), ("warn", "ok"), ("ok", "warn")]
    # every line is one JSON object with the same keys for every check record
    keys = {tuple(sorted(r)) for r in records(report) if r["check"] != "summary"}
    assert len(keys) == 1, keys


def test_a_different_failure_is_a_new_record_moving_numbers_are_not():
    a = h.detail_class("ok", "/ws: 22.2 GiB free of 100 GiB")
    assert a == h.detail_class("ok", "/ws: 21.9 GiB free of 100 GiB")
    assert a != h.detail_class("warn", "/ws: 21.9 GiB free of 100 GiB")
    assert h.detail_class("fail", "HTTP 500") != h.detail_class("fail", "connection refused")
    assert h.detail_class("ok", "pid 7 sleeping, RSS 0.02 GiB, CPU 0%, 2 threads") == \
        h.detail_class("ok", "pid 7 running, RSS 0.03 GiB, CPU 4%, 3 threads")


def test_health_now_writes_every_result_it_ran(ws, report):
    cfg = configure(ws, {"disk": {"warn_free_gb": 0, "fail_free_gb": 0}})
    monitor = h.Monitor(cfg, source="cli")
    for _ in range(3):
        monitor.run("disk")
    assert [r["check"] for r in records(report)].count("disk") == 3


# ---------------------------------------------------------------------- temp files
def test_stale_temp_files_are_cleaned_and_nothing_else(ws):
    cfg = configure(ws)
    old = time.time() - 600
    planted = {}
    for folder in (cfg.state_dir, cfg.runtime_dir, cfg.markers_dir):
        folder.mkdir(parents=True, exist_ok=True)
        stale = folder / ".health.json.k3x_9a0b.tmp"
        stale.write_text("{")
        os.utime(stale, (old, old))
        planted[stale] = False
    fresh = cfg.runtime_dir / ".agent.json.abcdefgh.tmp"  # a write in progress
    fresh.write_text("{")
    planted[fresh] = True
    keep = {  # old, but not atomic_write's temp files
        cfg.runtime_dir / "notes.tmp": "x", cfg.runtime_dir / ".health.json.short.tmp": "x",
        cfg.runtime_dir / "health.json.abcdefgh.tmp": "x",
        cfg.markers_dir / "comfyui_core.done": "2024-01-01 00:00:00\n"}
    for path, text in keep.items():
        path.write_text(text)
        os.utime(path, (old, old))
    sub = cfg.runtime_dir / "sub"
    sub.mkdir()
    nested = sub / ".x.json.abcdefgh.tmp"  # not in a named folder
    nested.write_text("")
    os.utime(nested, (old, old))
    link = cfg.runtime_dir / ".y.json.abcdefgh.tmp"
    link.symlink_to(ws.root / "elsewhere")
    folder = cfg.runtime_dir / ".z.json.abcdefgh.tmp"
    folder.mkdir()
    os.utime(folder, (old, old))
    removed = markers.clean_temps(cfg)
    assert sorted(removed) == sorted(p for p, kept in planted.items() if not kept)
    for path, kept in planted.items():
        assert path.exists() == kept, path
    for path in [*keep, nested, folder]:
        assert path.exists(), path
    assert link.is_symlink()


# ---------------------------------------------------------------------- stale reports
WRITER = """
import sys
from agent import health as h
from agent.config import load
from agent.health import Hooks
cfg = load(sys.argv[1], sys.argv[2])
hooks = Hooks(service=lambda: {"state": "running", "pid": None}, comfy_expected=lambda: True,
              request_restart=lambda r, u: None, request_reconcile=lambda w: None)
print(h.Monitor(cfg, hooks).run("disk")["status"])
"""


def test_a_report_from_an_agent_that_is_gone_is_stale_and_exits_non_zero(ws):
    configure(ws, {"disk": {"warn_free_gb": 0, "fail_free_gb": 0}})
    proc = subprocess.run([sys.executable, "-c", WRITER, str(ws.config_path), str(ws.root)],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr
    state = json.loads(next((ws.root / ".pod-agent" / "run").glob("*/health.json")).read_text())
    writer = state["agent"]["pid"]
    assert state["verdict"] == "healthy"
    assert procs.alive(writer, state["agent"]["create_time"]) is None  # the writer is gone
    out = run_cli("health", *ws.args())
    assert out.returncode == 1, out.stdout + out.stderr
    head = out.stdout.splitlines()
    assert head[0].startswith("health: STALE (the report said HEALTHY)"), out.stdout
    assert f"report from pod-agent pid {writer}, which is no longer running" in head[1]
    assert "STALE" in next(x for x in head if x.startswith("disk"))
    data = json.loads(run_cli("health", "--json", *ws.args()).stdout)
    assert data["stale"] is True and data["verdict"] == "stale"
    assert data["reported_verdict"] == "healthy" and data["checks"]["disk"]["stale"] is True
    assert f"pid {writer}" in data["stale_reason"]
    st = json.loads(run_cli("status", "--json", *ws.args()).stdout)
    assert st["health"]["verdict"] == "stale" and st["health"]["stale"] is True
    # `health --now` runs the checks again: current, not stale
    now = run_cli("health", "--now", "--check", "disk", "--json", *ws.args())
    assert json.loads(now.stdout)["stale"] is False and now.returncode == 0, now.stdout


def test_a_report_older_than_its_checks_intervals_is_stale(ws):
    cfg = configure(ws, {"disk": {"warn_free_gb": 0, "fail_free_gb": 0, "interval": 60,
                                  "timeout": 15}})
    monitor = h.Monitor(cfg, agent_hooks())  # this process: an agent that is alive
    monitor.run("disk")
    state = h.load_state(cfg)
    t = time.time()
    assert h.staleness(cfg, state, now=t)["stale"] is False
    assert h.staleness(cfg, state, now=t + 3 * 60 + 10)["stale"] is False
    late = h.staleness(cfg, state, now=t + 3 * 60 + 20)
    assert late["stale"] is True and "disk" in late["checks"], late
    assert late["reason"].startswith("stale: disk (3m old; it runs every 60s"), late


@pytest.mark.slow
def test_health_after_the_agent_was_sigkilled_says_so(aws):  # noqa: F811
    install_all(aws)
    aws.config["health"] = {"checks": {"agent": {"interval": 0.5}}}
    aws.save()
    cfg = load(aws.config_path, aws.root)
    stale_tmp = cfg.runtime_dir / ".health.json.deadbeef.tmp"  # left by an earlier kill -9
    stale_tmp.parent.mkdir(parents=True, exist_ok=True)
    stale_tmp.write_text("{")
    os.utime(stale_tmp, (time.time() - 600,) * 2)
    agent = aws.start_agent("--no-comfyui")
    pid = agent.proc.pid
    wait_for(lambda: (h.load_state(cfg) or {}).get("agent", {}).get("pid") == pid
             and "agent" in h.load_state(cfg)["checks"], 60, what="the agent's health report")
    assert not stale_tmp.exists()
    live = run_cli("health", "--json", *aws.args())
    assert json.loads(live.stdout)["stale"] is False, live.stdout
    os.killpg(pid, signal.SIGKILL)
    agent.proc.wait(10)
    out = run_cli("health", *aws.args())
    assert out.returncode != 0, out.stdout
    assert out.stdout.startswith("health: STALE"), out.stdout
    assert f"report from pod-agent pid {pid}, which is no longer running" in out.stdout
    text = run_cli("status", *aws.args()).stdout
    line = next(x for x in text.splitlines() if x.startswith("HEALTH"))
    assert "STALE" in line and "HEALTHY" not in line, text


# ---------------------------------------------------------------------- the agent log
def test_connection_refused_while_comfyui_starts_is_logged_once(tmp_path):
    from loguru import logger

    from tests.test_supervisor import Pod

    sup = Pod(tmp_path).supervisor()  # nothing listens on its port: every probe is refused
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{message}")
    try:
        for _ in range(20):
            assert sup._probe() is False
    finally:
        logger.remove(sink)
    said = [x for x in lines if "/system_stats" in x]
    assert len(said) == 1 and "refused" in said[0].lower(), lines


# ---------------------------------------------------------------------- the figure in the README
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("POD_AGENT_MEASURE_QUIET"),
                    reason="a measurement: POD_AGENT_MEASURE_QUIET=SECONDS (the window) runs it")
def test_measure_idle_agent_log_volume(aws, capsys):  # noqa: F811
    """An idle agent (ComfyUI running, default health settings): lines and bytes a day written
    to health.jsonl and agent.log, extrapolated from a window after the first 30 s."""
    from tests.test_daemon import running

    window = float(os.environ["POD_AGENT_MEASURE_QUIET"])
    install_all(aws)
    agent = aws.start_agent()
    wait_for(lambda: running(aws), 60, what="ComfyUI running")

    def sizes():
        out = {}
        for name in ("health.jsonl", "agent.log"):
            path = aws.root / "logs" / name
            text = path.read_text() if path.exists() else ""
            out[name] = (text.count("\n"), len(text.encode()))
        return out

    pause = __import__("threading").Event()
    pause.wait(30)  # a measurement window, not synchronisation
    a, t0 = sizes(), time.monotonic()
    pause.wait(window)
    b, t1 = sizes(), time.monotonic()
    assert agent.stop() == 0
    day = 86400 / (t1 - t0)
    with capsys.disabled():
        for name in a:
            print(f"\n{name}: {(b[name][0] - a[name][0]) * day:.0f} lines/day, "
                  f"{(b[name][1] - a[name][1]) * day / 1e6:.2f} MB/day (window {t1 - t0:.0f}s)")
