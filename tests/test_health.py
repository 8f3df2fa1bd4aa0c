"""Health checks, self-healing and the health report: every SageAttention probe path against a
fake `torch` and a fake `sageattention` (real probe processes in their own sessions), reinstall
rate limit and quarantine, a dead observer restarted, bounded checks, health.jsonl under load
and rotation, `pod-agent health`, and planted secrets that never reach a file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from agent import health as h
from agent import log as agent_log
from agent import markers
from agent.checks import REGISTRY
from agent.checks.base import Hooks, Result
from agent.config import load
from agent.model import ConfigError
from tests.helpers import ROOT, run_cli, wait_for, write_yaml

FAKE_COMFY = ROOT / "tests" / "fake_comfyui" / "main.py"
HF = "hf_PlantedSecretToken12345"
PASSWORD = "pl4ntedPassw0rd"
BEARER = "plantedBearerValue987"
SECRETS = (HF, PASSWORD, BEARER)
LEAKY_ERROR = (f"failed to fetch https://user:{PASSWORD}@example.invalid/w.whl with {HF}; "
               f"Authorization: Bearer {BEARER}")

FAKE_TORCH = r'''
"""A fake torch: just enough of the API the SageAttention probe uses (pure Python)."""
import math
import os
import random

__version__ = "2.5.1+cu124"


class version:
    cuda = "12.4"


float16 = "float16"
float32 = "float32"


class Tensor:
    def __init__(self, data, shape=()):
        self.data = list(data)
        self.shape = tuple(shape)

    def float(self):
        return Tensor(self.data, self.shape)

    def __sub__(self, other):
        return Tensor([a - b for a, b in zip(self.data, other.data)], self.shape)

    def __truediv__(self, other):
        return Tensor([a / other.data[0] for a in self.data], self.shape)

    def abs(self):
        return Tensor([abs(a) for a in self.data], self.shape)

    def max(self):
        return Tensor([max(self.data)])

    def all(self):
        return Tensor([all(self.data)])

    def norm(self):
        return Tensor([math.sqrt(sum(a * a for a in self.data))])

    def item(self):
        return self.data[0]


def isfinite(t):
    return Tensor([math.isfinite(a) for a in t.data], t.shape)


def manual_seed(seed):
    random.seed(seed)


def randn(*shape, dtype=None, device=None):
    n = 1
    for s in shape:
        n *= s
    return Tensor([random.gauss(0.0, 1.0) for _ in range(n)], shape)


class cuda:
    @staticmethod
    def is_available():
        return os.environ.get("FAKE_TORCH_CUDA", "1") == "1"

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def get_device_name(index=0):
        return "NVIDIA Fake H200"

    @staticmethod
    def get_device_capability(index=0):
        return (9, 0)

    @staticmethod
    def synchronize():
        return None


def _sdpa(q, k, v, **kwargs):
    return Tensor([0.5 * a + 0.25 * b + 0.25 * c for a, b, c in zip(q.data, k.data, v.data)],
                  q.shape)


class nn:
    class functional:
        scaled_dot_product_attention = staticmethod(_sdpa)
'''

SAGE = {
    "ok": '''
import torch
__version__ = "2.2.0"
def sageattn(q, k, v, tensor_layout="HND", is_causal=False, **kw):
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return torch.Tensor([x * 1.001 for x in ref.data], ref.shape)
''',
    "import_error": '''
raise ImportError("libcuda.so.1: cannot open shared object file: No such file or directory")
''',
    "undefined_symbol": '''
raise ImportError("/venv/lib/python3.11/site-packages/sageattention/_qattn_sm90.so: "
                  "undefined symbol: _ZN3c104cuda9SetDeviceEa")
''',
    "kernel_error": '''
__version__ = "2.2.0"
def sageattn(q, k, v, **kw):
    raise RuntimeError("SM90 kernel is not available. Make sure you GPUs with compute "
                       "capability 9.0.")
''',
    "mismatch": '''
__version__ = "2.2.0"
def sageattn(q, k, v, **kw):
    return q
''',
    "hang": '''
import time
__version__ = "2.2.0"
def sageattn(q, k, v, **kw):
    while True:
        time.sleep(1)
''',
    "crash": '''
import os, signal
__version__ = "2.2.0"
def sageattn(q, k, v, **kw):
    os.kill(os.getpid(), signal.SIGSEGV)
''',
}

SAGE["leaky"] = f"raise ImportError({LEAKY_ERROR!r})\n"
PACKAGE_FAULTS = ("import_error", "undefined_symbol", "kernel_error", "mismatch", "missing",
                  "crash")


# ---------------------------------------------------------------------- helpers
def set_fakes(root: Path, sage: str | None = "ok", torch: bool = True) -> None:
    """Write the fake packages (a changed file changes the probe's fingerprint)."""
    for name, text in (("torch", FAKE_TORCH if torch else None),
                       ("sageattention", SAGE[sage] if sage and sage != "missing" else None)):
        pkg = root / name
        if text is None:
            if pkg.exists():
                (pkg / "__init__.py").unlink()
                pkg.rmdir()
            continue
        pkg.mkdir(parents=True, exist_ok=True)
        init = pkg / "__init__.py"
        init.write_text(text)
        st = init.stat()
        os.utime(init, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


class Recorder:
    def __init__(self, snap: dict | None = None):
        self.restarts: list[tuple[str, bool]] = []
        self.reconciles: list[str] = []
        self.snap = snap if snap is not None else {"state": "running", "pid": None}

    def hooks(self, **extra) -> Hooks:
        return Hooks(service=lambda: dict(self.snap), comfy_expected=lambda: True,
                     request_restart=lambda reason, urgent: self.restarts.append((reason,
                                                                                 urgent)),
                     request_reconcile=self.reconciles.append, **extra)


def configure(ws, fakes: Path | None = None, checks: dict | None = None, **top):
    if fakes is not None:
        ws.config["comfyui"]["env"] = {"PYTHONPATH": str(fakes)}
    ws.config["health"] = {"checks": checks or {}, **top}
    ws.save()
    return load(ws.config_path, ws.root)


def sage_marker(cfg) -> None:
    markers.write(cfg.markers_dir, "sageattention", {"fingerprint": "x", "version": "2.2.0"})


@pytest.fixture
def report(ws):
    """The health.jsonl sink, as the agent configures it."""
    path = ws.root / "logs" / "health.jsonl"
    agent_log.health_report(path)
    yield path
    agent_log.close_health_report()


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setenv("POD_AGENT_GPU", "1")


def records(folder: Path, pattern: str = "health*.jsonl") -> list[dict]:
    out = []
    for path in sorted(folder.glob(pattern)):
        for line in path.read_text().splitlines():
            out.append(json.loads(line))
    return out


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- config
def test_health_config_defaults_and_line_numbered_errors(ws):
    cfg = load(ws.config_path, ws.root)
    assert cfg.health["reinstall_limit"] == 3 and cfg.health["limit_window"] == 3600
    checks = cfg.health["checks"]
    assert set(checks) == set(REGISTRY)
    assert checks["sageattention"]["on_fail"] == "reinstall"
    assert checks["comfyui_http"]["failures"] == 3
    assert checks["disk"]["paths"] == (str(ws.root), "/")
    assert cfg.http == {"enabled": True, "address": "127.0.0.1", "port": 9188, "token": None}
    cases = [
        ({"health": {"checks": {"disk": {"bogus": 1}}}}, "unknown field 'bogus'"),
        ({"health": {"checks": {"nope": {}}}}, "unknown check 'nope'"),
        ({"health": {"checks": {"disk": {"on_fail": "reinstall"}}}}, "'on_fail' must be one of"),
        ({"health": {"checks": {"gpu": {"interval": 0}}}}, "'interval' must be > 0"),
        ({"health": {"report_max_size": "huge"}}, "'report_max_size' must be a size"),
        ({"health": {"colour": "red"}}, "unknown field 'colour'"),
        ({"http": {"port": 70000}}, "'port' must be 0-65535"),
        ({"http": {"tokn": "x"}}, "unknown field 'tokn'"),
    ]
    base = dict(ws.config)
    for extra, message in cases:
        write_yaml(ws.config_path, {**base, **extra})
        with pytest.raises(ConfigError) as err:
            load(ws.config_path, ws.root)
        assert message in str(err.value) and f"{ws.config_path}:" in str(err.value), err.value
    proc = run_cli("health", "--now", *ws.args())
    assert proc.returncode == 2 and proc.stderr.startswith("config error:")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------- sageattention
EXPECT = {
    "ok": ("ok", "sageattention 2.2.0 kernel ok on NVIDIA Fake H200 (sm_90)"),
    "import_error": ("fail", "sageattention does not import: ImportError: libcuda.so.1"),
    "undefined_symbol": ("fail", "ABI mismatch: sageattention was built for another torch "
                                 "than torch 2.5.1+cu124, CUDA 12.4"),
    "kernel_error": ("fail", "kernel failed on NVIDIA Fake H200 (sm_90): RuntimeError: SM90 "
                             "kernel is not available"),
    "mismatch": ("fail", "kernel result differs from torch SDPA on NVIDIA Fake H200 (sm_90): "
                         "relative error"),
    "missing": ("fail", "sageattention is not installed in"),
    "crash": ("fail", "probe crashed (killed by SIGSEGV) during the kernel stage"),
    "hang": ("fail", "probe timed out after"),
    "no_torch": ("fail", "torch does not import"),
    "no_cuda": ("fail", "cannot use the GPU: torch.cuda.is_available() is False"),
}


@pytest.mark.parametrize("mode", list(EXPECT))
def test_sageattention_probe_paths(ws, tmp_path, gpu, report, monkeypatch, mode):
    fakes = tmp_path / "fakes"
    set_fakes(fakes, sage="ok" if mode in ("no_torch", "no_cuda") else mode,
              torch=mode != "no_torch")
    if mode == "no_cuda":
        monkeypatch.setenv("FAKE_TORCH_CUDA", "0")
    timeout = 2.0 if mode == "hang" else 30.0
    cfg = configure(ws, fakes, {"sageattention": {"timeout": timeout}})
    sage_marker(cfg)
    rec = Recorder()
    monitor = h.Monitor(cfg, rec.hooks())
    entry = monitor.run("sageattention")
    status, text = EXPECT[mode]
    assert entry["status"] == status, entry
    assert text in entry["detail"], entry["detail"]
    # the package's own faults are healed by a reinstall; the rest cannot be
    heals = mode in PACKAGE_FAULTS
    assert entry["action"] == ("reinstall sageattention" if heals else "none"), entry
    assert bool(rec.reconciles) == heals
    assert (markers.read(cfg.markers_dir, "sageattention") is None) == heals
    assert rec.restarts == []
    log = (ws.root / "logs" / "sageattention-probe.log").read_text()
    assert "POD_AGENT_PROBE" in log
    if mode == "hang":
        assert "timed out" in log and entry["data"]["stage"] == "kernel"
        assert entry["duration"] < timeout + 6
    lines = records(report.parent)
    assert [r["check"] for r in lines] == ["sageattention", "summary"]
    assert lines[0]["status"] == status and lines[0]["action"] == entry["action"]
    assert lines[1]["verdict"] == ("healthy" if status == "ok" else "failing")


def test_sageattention_skips_without_gpu_and_never_reinstalls(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("POD_AGENT_GPU", "0")
    fakes = tmp_path / "fakes"
    set_fakes(fakes, sage="missing")
    cfg = configure(ws, fakes)
    sage_marker(cfg)
    rec = Recorder()
    entry = h.Monitor(cfg, rec.hooks()).run("sageattention")
    assert (entry["status"], entry["detail"], entry["action"]) == ("skip", "no GPU", "none")
    assert rec.reconciles == [] and markers.read(cfg.markers_dir, "sageattention")
    assert not (ws.root / "logs" / "sageattention-probe.log").exists()  # no probe ran


def test_sageattention_results_are_cached_by_fingerprint(ws, tmp_path, gpu):
    fakes = tmp_path / "fakes"
    set_fakes(fakes, sage="ok")
    cfg = configure(ws, fakes, {"sageattention": {"on_fail": "none"}})  # the marker stays
    sage_marker(cfg)
    monitor = h.Monitor(cfg, Recorder().hooks())
    log = ws.root / "logs" / "sageattention-probe.log"
    first = monitor.run("sageattention")
    assert first["status"] == "ok" and "cached" not in first["detail"]
    log.unlink()
    second = monitor.run("sageattention")
    assert second["status"] == "ok" and "(cached 0 min ago)" in second["detail"]
    assert not log.exists()  # answered from the cache: no probe process
    assert second["data"]["fingerprint"] == first["data"]["fingerprint"]
    set_fakes(fakes, sage="mismatch")  # the package changed: a new fingerprint, a new probe
    third = monitor.run("sageattention")
    assert third["status"] == "fail" and "cached" not in third["detail"] and log.exists()
    forced = h.Monitor(cfg).run("sageattention", force=True)  # --now ignores the cache
    assert forced["status"] == "fail" and "cached" not in forced["detail"]
    cache = json.loads((cfg.state_dir / "sageattention-probe.json").read_text())
    assert len(cache["entries"]) == 2


# ---------------------------------------------------------------------- self-healing
@pytest.mark.slow  # over 2.5 s
def test_reinstall_rate_limit_quarantine_and_release(ws, tmp_path, gpu, report):
    fakes = tmp_path / "fakes"
    set_fakes(fakes, sage="kernel_error")
    cfg = configure(ws, fakes)
    rec = Recorder()
    monitor = h.Monitor(cfg, rec.hooks())
    for i in range(3):
        sage_marker(cfg)  # what the reconcile loop does after each removal
        entry = monitor.run("sageattention")
        assert entry["action"] == "reinstall sageattention", entry
        assert markers.read(cfg.markers_dir, "sageattention") is None
    assert len(rec.reconciles) == 3
    sage_marker(cfg)
    entry = monitor.run("sageattention")
    assert entry["action"].startswith("quarantined sageattention (3 reinstalls of "
                                      "sageattention within 60 min; quarantined until"), entry
    assert markers.read(cfg.markers_dir, "sageattention") is not None  # left alone
    assert len(rec.reconciles) == 3
    state = h.load_state(cfg)
    assert "sageattention" in state["quarantined"] and state["verdict"] == "failing"
    summary = [r for r in records(report.parent) if r["check"] == "summary"][-1]
    assert summary["verdict"] == "failing" and "sageattention" in summary["quarantined"]
    # an agent restart does not reset the budget (it lives on the volume)
    again = h.Monitor(cfg, rec.hooks()).run("sageattention")
    assert again["action"].startswith("quarantined sageattention"), again
    # a person's reinstall lifts the quarantine and resets the budget
    monitor.reinstall("sageattention", "HTTP request")
    assert markers.read(cfg.markers_dir, "sageattention") is None and len(rec.reconciles) == 4
    assert not monitor.limiter.quarantined()
    # a healthy result lifts a quarantine too
    for _ in range(4):
        sage_marker(cfg)
        monitor.run("sageattention")
    assert "sageattention" in monitor.limiter.quarantined()
    set_fakes(fakes, sage="ok")
    assert monitor.run("sageattention")["status"] == "ok"
    assert not monitor.limiter.quarantined()
    assert h.load_state(cfg)["quarantined"] == {}


def test_components_check_catches_a_lying_marker(ws, report):
    proof = ws.root / "proof.txt"
    ws.config["components"] = {
        "thing": {"kind": "command", "run": f"echo built > {proof}", "check": f"test -f {proof}"},
    }
    ws.save()
    assert run_cli("install", *ws.args()).returncode == 0
    cfg = configure(ws, checks={"components": {"timeout": 30}})
    rec = Recorder()
    monitor = h.Monitor(cfg, rec.hooks())
    ok = monitor.run("components")
    assert ok["status"] == "ok" and ok["data"]["states"] == {"thing": "installed"}
    proof.unlink()  # the marker now lies
    bad = monitor.run("components")
    assert bad["status"] == "fail" and "thing: marker present but broken" in bad["detail"]
    assert bad["action"] == "reinstall thing"
    assert not (ws.markers / "thing.done").exists()
    assert rec.reconciles == ["health check components: reinstall thing"]
    assert monitor.component_states() == {"thing": "broken"}


def _fake_comfy(port: int, control: Path) -> subprocess.Popen:
    env = dict(os.environ, FAKE_COMFY_CONTROL=str(control))
    return subprocess.Popen([sys.executable, str(FAKE_COMFY), "--listen", "127.0.0.1",
                             "--port", str(port)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def test_comfyui_checks_threshold_urgency_and_restart_limit(ws, tmp_path):
    port = free_port()
    control = tmp_path / "control"
    control.mkdir()
    ws.config["comfyui"].update({"port": port, "host": "127.0.0.1"})
    cfg = configure(ws, checks={"comfyui_http": {"timeout": 1.0, "failures": 2},
                                "comfyui_process": {"failures": 1}}, restart_limit=2)
    server = _fake_comfy(port, control)
    try:
        rec = Recorder({"state": "starting", "pid": server.pid})
        monitor = h.Monitor(cfg, rec.hooks())
        monitor.grace = 1.0
        assert monitor.run("comfyui_http")["status"] == "skip"  # startup grace
        wait_for(lambda: port_open(port), 10, what="fake ComfyUI listening")
        rec.snap["state"] = "running"
        ok = monitor.run("comfyui_http")
        assert ok["status"] == "ok", ok
        assert "ComfyUI 0.0.0-fake" in ok["detail"] and ok["data"]["latency"] < 1.0
        proc = monitor.run("comfyui_process")
        assert proc["status"] == "ok" and proc["data"]["pid"] == server.pid
        (control / "hang").write_text("")  # alive but not answering
        first = monitor.run("comfyui_http")
        assert first["status"] == "fail" and first["action"] == \
            "waiting (1/2 failures before restart_comfyui)"
        second = monitor.run("comfyui_http")
        assert second["action"] == "restart_comfyui" and rec.restarts[-1][1] is False
        (control / "hang").unlink()
        rec.snap["state"] = "backoff"  # the supervisor already restarts it: no action
        rec.snap["last_failure"] = "exited with status 1"
        backoff = monitor.run("comfyui_process")
        assert backoff["status"] == "fail" and backoff["action"] == "none"
        rec.snap["state"] = "running"
        server.kill()
        server.wait(5)
        gone = monitor.run("comfyui_process")
        assert gone["status"] == "fail" and "is gone" in gone["detail"]
        assert gone["action"] == "restart_comfyui (urgent)" and rec.restarts[-1][1] is True
        third = monitor.run("comfyui_process")
        assert third["action"].startswith("rate-limited: 2 restarts of comfyui within 60 min; "
                                          "next allowed at"), third
        assert len(rec.restarts) == 2
        assert not monitor.limiter.quarantined()  # ComfyUI is rate-limited, not quarantined
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(5)


def test_process_check_detects_a_zombie(ws):
    cfg = configure(ws, checks={"comfyui_process": {"failures": 1}})
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 10,
                 what="a zombie")
        rec = Recorder({"state": "running", "pid": child.pid})
        entry = h.Monitor(cfg, rec.hooks()).run("comfyui_process")
        assert entry["status"] == "fail" and "is a zombie" in entry["detail"]
        assert rec.restarts and rec.restarts[0][1] is True  # dead: urgent
    finally:
        child.wait()


def test_dead_observer_is_restarted_and_scheduler_errors_reported(ws):
    from agent.watch import Events, Watcher

    cfg = configure(ws)
    events = Events(marker=lambda *a: None, node=lambda *a: None, restart=lambda *a: None,
                    refresh=lambda: None)
    watcher = Watcher(cfg, events)
    job_events = {"error": 0, "missed": 0, "max_instances": 0}
    monitor = h.Monitor(cfg, Recorder().hooks(watcher=watcher,
                                              job_events=lambda: dict(job_events)))
    watcher.start()
    try:
        assert monitor.run("agent")["status"] == "ok"
        dead = watcher._observer
        dead.stop()
        dead.join(10)
        assert not watcher.alive()
        entry = monitor.run("agent")
        assert entry["status"] == "warn" and entry["action"] == "restart_observer"
        assert "observer thread had died: restarted" in entry["detail"]
        assert watcher.alive() and watcher.restarts == 1 and watcher._observer is not dead
        job_events["error"] += 2
        job_events["max_instances"] += 1
        noisy = monitor.run("agent")
        assert noisy["status"] == "warn"
        assert "2 error, 1 max instances" in noisy["detail"]
        assert monitor.run("agent")["status"] == "ok"  # only news are reported
    finally:
        watcher.stop()


def test_a_hanging_check_is_bounded_and_reported(ws, monkeypatch):
    cfg = configure(ws, checks={"disk": {"timeout": 0.3}})
    release = threading.Event()
    monkeypatch.setitem(REGISTRY, "disk", lambda ctx: release.wait(30) and Result("ok", "late"))
    monitor = h.Monitor(cfg, Recorder().hooks())
    monitor.grace = 0.0
    start = time.monotonic()
    first = monitor.run("disk")
    assert time.monotonic() - start < 5
    assert first["status"] == "fail" and "did not finish within 0.3s" in first["detail"]
    second = monitor.run("disk")
    assert "previous run is still going" in second["detail"]
    agent = monitor.run("agent")
    assert agent["status"] == "warn" and "disk (1x)" in agent["detail"]
    release.set()
    wait_for(lambda: "disk" not in monitor._running, 5, what="the stuck check to end")
    monkeypatch.setitem(REGISTRY, "disk", lambda ctx: Result("ok", "fine"))
    assert monitor.run("disk")["status"] == "ok"


# ---------------------------------------------------------------------- reports
@pytest.mark.slow  # over 2.5 s
def test_health_jsonl_stays_valid_json_lines_under_load_rotation_and_deletion(ws):
    cfg = configure(ws, checks={"disk": {"warn_free_gb": 0, "fail_free_gb": 0}},
                    report_max_size="40 KB", report_retention=1000)
    logs = ws.root / "logs"
    agent_log.health_report(logs / "health.jsonl", cfg.health["report_max_size"],
                            cfg.health["report_retention"])
    try:
        # source="cli" (`health --now`) writes every result; the agent writes only changes
        # (tests/test_quiet.py)
        monitor = h.Monitor(cfg, Recorder().hooks(), source="cli")

        def burst(n: int) -> None:
            for i in range(n):
                monitor.run("disk")  # a check record (and health.json replaced)
                for _ in range(4):
                    monitor.summary()  # a summary record

        threads = [threading.Thread(target=burst, args=(150,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        files = list(logs.glob("health*.jsonl"))
        assert len(files) > 3, files  # rotated
        lines = records(logs)
        assert len(lines) >= 3000
        checks = [r for r in lines if r["check"] == "disk"]
        assert len(checks) == 600
        for r in lines:
            assert {"time", "check", "status", "detail", "duration", "action"} <= set(r)
            assert r["status"] in ("ok", "warn", "fail", "skip")
        assert any(r["check"] == "summary" and r["verdict"] == "healthy" for r in lines)
        # a user deletes the report: it is reopened on the next record
        for path in logs.glob("health*.jsonl"):
            path.unlink()
        monitor.run("disk")
        monitor.summary()
        again = records(logs, "health.jsonl")
        assert [r["check"] for r in again] == ["disk", "summary"]
    finally:
        agent_log.close_health_report()
    state = json.loads((cfg.runtime_dir / "health.json").read_text())
    assert state["checks"]["disk"]["status"] == "ok" and state["verdict"] == "healthy"


def test_disk_and_gpu_checks(ws, tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nif [ -f %s/broken ]; then echo 'NVIDIA-SMI has failed'; exit 9; "
                   "fi\necho '0, NVIDIA H200, 37, 1024, 143771, 91'\n"
                   "echo '1, NVIDIA H200, 0, 0, 143771, 40'\n" % tmp_path)
    smi.chmod(0o755)
    cfg = configure(ws, checks={"gpu": {"nvidia_smi": str(smi)},
                                "disk": {"warn_free_gb": 1e6, "fail_free_gb": 0}})
    monitor = h.Monitor(cfg)
    hot = monitor.run("gpu")
    assert hot["status"] == "warn" and "GPU0 at 91 C" in hot["detail"]
    assert [g["memory_total_mib"] for g in hot["data"]["gpus"]] == [143771.0, 143771.0]
    (tmp_path / "broken").write_text("")
    broken = monitor.run("gpu")
    assert broken["status"] == "fail" and "NVIDIA-SMI has failed" in broken["detail"]
    cfg.health["checks"]["gpu"]["nvidia_smi"] = str(tmp_path / "absent")
    assert monitor.run("gpu")["status"] == "skip"
    disk = monitor.run("disk")
    assert disk["status"] == "warn" and "below 1e+06 GiB" in disk["detail"]
    cfg.health["checks"]["disk"]["fail_free_gb"] = 1e6
    assert monitor.run("disk")["status"] == "fail"


@pytest.mark.slow  # over 2.5 s
def test_cli_health_now_latest_json_and_exit_codes(ws):
    none = run_cli("health", *ws.args())
    assert none.returncode == 1 and none.stderr.startswith("error: no health report yet")
    bad = run_cli("health", "--check", "nope", *ws.args())
    assert bad.returncode == 1 and "unknown check 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr + none.stderr

    def disk(warn: float, fail: float) -> None:
        configure(ws, checks={"disk": {"warn_free_gb": warn, "fail_free_gb": fail}})

    disk(0, 0)
    ok = run_cli("health", "--now", "--check", "disk", *ws.args())
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("health: HEALTHY") and "disk " in ok.stdout
    disk(1e6, 0)
    warn = run_cli("health", "--now", "--check", "disk", "--json", *ws.args())
    assert warn.returncode == 1
    data = json.loads(warn.stdout)
    assert data["verdict"] == "degraded" and data["checks"]["disk"]["status"] == "warn"
    disk(1e6, 1e6)
    assert run_cli("health", "--now", "--check", "disk", *ws.args()).returncode == 2
    latest = run_cli("health", "--check", "disk", "--json", *ws.args())  # no --now: the file
    assert latest.returncode == 2 and json.loads(latest.stdout)["checks"]["disk"]["status"] \
        == "fail"
    full = run_cli("health", "--now", *ws.args())  # every check, no agent running
    for name in REGISTRY:
        assert f"\n{name} " in full.stdout, full.stdout
    assert "pod-agent is not running" in full.stdout and full.returncode == 2
    lines = records(ws.root / "logs")
    assert lines[-1]["check"] == "summary" and lines[-1]["verdict"] == "failing"


def test_planted_secrets_never_reach_health_files(ws, tmp_path, gpu, report, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF)
    fakes = tmp_path / "fakes"
    set_fakes(fakes, sage="leaky")
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{LEAKY_ERROR}'\nexit 3\n")
    smi.chmod(0o755)
    cfg = configure(ws, fakes, {"gpu": {"nvidia_smi": str(smi)}})
    sage_marker(cfg)
    monitor = h.Monitor(cfg, Recorder().hooks())
    entries = monitor.run_many(["sageattention", "gpu"])
    assert all(e["status"] == "fail" for e in entries)
    assert "https://***@example.invalid" in entries[0]["detail"]
    assert "Bearer ***" in entries[0]["detail"] and "with ***" in entries[0]["detail"]
    cli = run_cli("health", "--now", "--json", *ws.args(), env={"POD_AGENT_GPU": "1"})
    assert "***@example.invalid" in cli.stdout
    written = [p for p in ws.root.rglob("*") if p.is_file() and ".install_markers" not in
               str(p) and "venv" not in p.parts]
    names = {p.name for p in written}
    assert {"health.jsonl", "health.json", "sageattention-probe.log"} <= names, names
    for path in written:
        text = path.read_text(errors="replace")
        for secret in SECRETS:
            assert secret not in text, (secret, path)
    for secret in SECRETS:
        assert secret not in cli.stdout + cli.stderr
