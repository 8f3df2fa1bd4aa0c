"""The status page at `/`: the renderer (agent/page.py) on hostile input, its history, served
in-process over HTTP, end to end by a real `pod-agent run`, and in a real headless Chromium
(screenshot and DOM)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from agent import page
from agent.endpoints import AgentApi, history_events, tail_jsonl
from agent.http import Api, HttpServer
from agent.redact import forget_all, register
from tests.helpers import wait_for
from tests.test_daemon import aws, install_all, running  # noqa: F401 - fixture
from tests.test_http import HF, LEAKY, PASSWORD, Stub, _http_info, call

REGISTERED = "pl4nted-registered-s3cret-value"  # a value the config declared secret
HOSTILE = f'<script>alert("x")</script><img src=x onerror=alert(1)> {HF} {REGISTERED}'


def status_doc(reason: str = HOSTILE) -> dict:
    return {
        "workspace": "/tmp/ws",
        "verdict": "broken",
        "components": {
            "comfyui_core": {"state": "installed", "version": "0.3.64", "reason": "",
                             "timestamp": "2026-11-29 08:00:00", "required": True},
            "dependencies_main": {"state": "failed", "version": None, "reason": reason,
                                  "required": True},
            "sageattention": {"state": "skipped", "reason": "no GPU", "required": False},
        },
        "agent": {"pid": 12, "uptime": 3700, "last_reconcile": "2026-11-29 08:00:01",
                  "last_result": "failed: dependencies_main",
                  "http": {"state": "listening", "detail": "listening on x"}},
        "comfyui": {"state": "backoff", "pid": None, "uptime": None, "restarts": 3,
                    "failures": 2, "last_exit": {"code": None, "signal": "SIGKILL"},
                    "last_failure": f"exited: {reason}", "degraded_reason": None},
    }


def health_doc() -> dict:
    return {"verdict": "failing", "checks": {
        "gpu": {"status": "fail", "detail": LEAKY + " <b>bold</b>", "failures": 2,
                "time": "2026-11-29T08:00:00+00:00", "action": "none"},
        "disk": {"status": "ok", "detail": "9 GiB free", "time": "2026-11-29T08:00:00+00:00"}},
        "quarantined": {"dependencies_main": "reinstalled 3 times in 1h"}}


def assert_safe(doc: str) -> None:
    """Nothing a browser would run or fetch, nothing secret."""
    low = doc.lower()
    assert "<script" not in low and "<img" not in low and "<form" not in low
    assert "<iframe" not in low and "<input" not in low and "<button" not in low
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", low), \
        "an external URL"
    assert "@import" not in low and "url(" not in low
    for secret in (HF, REGISTERED, PASSWORD, "plantedBearerValue987"):
        assert secret not in doc


@pytest.fixture
def registered():
    register(REGISTERED)
    yield
    forget_all()


def test_the_page_escapes_masks_and_carries_nothing_external(registered):
    doc = page.render(status_doc(), health_doc(), [
        {"time": 1.7e9, "source": "drift", "status": "warn", "text": HOSTILE}],
        now=1.7e9 + 5, observed_at=1.7e9, version="0.1.0")
    assert_safe(doc)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in doc  # shown, as text
    assert "&lt;b&gt;bold&lt;/b&gt;" in doc and "***" in doc
    assert '<meta http-equiv="refresh" content="5">' in doc
    assert 'id="verdict" data-verdict="broken"' in doc and ">BROKEN</h1>" in doc
    for name in ("comfyui_core", "dependencies_main", "sageattention", "ComfyUI",
                 "pod-agent", "gpu", "disk", "SIGKILL", "0.3.64", "1h 01m"):
        assert name in doc, name
    assert doc.count("dependencies_main") >= 3  # its row, the verdict line, quarantined
    assert page.render(status_doc(), health_doc(), [], now=1.7e9 + 5, observed_at=1.7e9,
                       version="0.1.0") == page.render(status_doc(), health_doc(), [],
                                                       now=1.7e9 + 5, observed_at=1.7e9,
                                                       version="0.1.0")  # pure


@pytest.mark.parametrize("status_verdict,health_verdict,expected", [
    ("healthy", "healthy", "healthy"), ("healthy", None, "healthy"),
    ("healthy", "failing", "failing"), ("healthy", "degraded", "degraded"),
    ("installing", "healthy", "installing"), ("broken", "healthy", "broken"),
    ("degraded", "failing", "failing"), (None, None, "unknown")])
def test_the_verdict_is_the_worse_of_status_and_health(status_verdict, health_verdict,
                                                       expected):
    status = None if status_verdict is None else dict(status_doc(""), verdict=status_verdict)
    health = {"verdict": health_verdict, "checks": {}} if health_verdict else None
    verdict, why = page.overall(status, health)
    assert verdict == expected
    doc = page.render(status, health, [])
    assert f'data-verdict="{expected}"' in doc and f">{expected.upper()}</h1>" in doc
    assert why and page.text(why) in doc


def test_garbage_in_the_status_document_still_renders():
    weird = {"verdict": 3, "components": {"a": "not a dict", "b": {"state": None,
                                                                   "installing_for": "x"}},
             "agent": "nope", "comfyui": {"uptime": float("nan"), "restarts": True,
                                          "last_exit": "x", "pending_restart": {"reason": 1}},
             "services": [{"name": "<svc>", "state": "running", "uptime": 61}, "junk"]}
    doc = page.render(weird, {"checks": {"x": "junk", "y": {"time": "garbage"}}},
                      [{"time": "junk"}, {}])
    assert "&lt;svc&gt;" in doc and "1m 01s" in doc and "</html>" in doc


def test_history_merges_health_changes_drift_and_reconcile_passes(tmp_path):
    health = tmp_path / "health.jsonl"
    lines = [
        {"time": "2026-11-29T08:00:00+00:00", "check": "summary", "verdict": "healthy",
         "detail": "7 ok"},
        {"time": "2026-11-29T08:00:10+00:00", "check": "gpu", "status": "fail",
         "detail": "nvidia-smi failed", "previous": "ok", "action": "restart_comfyui"},
        {"time": "2026-11-29T08:00:11+00:00", "check": "summary", "verdict": "failing",
         "detail": "1 fail"},
        {"time": "2026-11-29T08:05:11+00:00", "check": "summary", "verdict": "failing",
         "detail": "1 fail"},  # periodic, unchanged: not news
    ]
    health.write_text("partial line}\n" + "".join(json.dumps(r) + "\n" for r in lines)
                      + "not json\n")
    records = tail_jsonl(health)
    assert len(records) == 4
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert tail_jsonl(fifo) == [] and tail_jsonl(tmp_path / "missing") == []
    drift = [{"time": time.mktime((2026, 11, 29, 8, 1, 0, 0, 0, -1)), "kind": "drift",
              "summary": "numpy 2.1.0 -> 1.26.4", "by": "ComfyUI start",
              "affected": ["dependencies_main"], "repeats": 2}]
    reconciles = [{"time": "2026-11-29 08:02:00", "phase": "foreground", "result": "ok",
                   "changed": [], "duration": 0.1},  # nothing happened: left out
                  {"time": "2026-11-29 08:03:00", "phase": "background",
                   "result": "failed: sageattention", "changed": ["x"], "duration": 2.5}]
    events = history_events(records, drift, reconciles)
    texts = [e["text"] for e in events]
    assert len(events) == 5, texts
    assert [e["time"] for e in events] == sorted((e["time"] for e in events), reverse=True)
    assert any("gpu (was ok): nvidia-smi failed (action: restart_comfyui)" in t for t in texts)
    assert sum(t.startswith("verdict ") for t in texts) == 2
    assert any("numpy 2.1.0 -> 1.26.4 (by ComfyUI start; affects dependencies_main; 2 times)"
               in t for t in texts)
    assert any("background pass failed: sageattention, changed x (2.5 s)" in t for t in texts)


def test_page_served_over_http_with_safe_headers(registered):
    stub = Stub(None)
    api = stub.api()
    answers = {"code": 503, "status": None}
    api.page = lambda: (answers["code"], page.render(answers["status"], health_doc(),
                                                     []).encode())
    server = HttpServer(api, "127.0.0.1", 0)
    _, port = server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        code, headers, body = call(base + "/")
        assert code == 503 and headers["Retry-After"] == "2" and ">FAILING</h1>" in body
        answers.update(code=200, status=status_doc())
        for path in ("/", "/index.html", "/?x=1"):
            code, headers, body = call(base + path)
            assert code == 200, path
            assert headers["Content-Type"] == "text/html; charset=utf-8"
            assert headers["Cache-Control"] == "no-store"
            assert "default-src 'none'" in headers["Content-Security-Policy"]
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert ">BROKEN</h1>" in body and "dependencies_main" in body
            assert_safe(body)
        code, headers, body = call(base + "/", method="HEAD")
        assert code == 200 and body == "" and int(headers["Content-Length"]) > 1000
        # without a page (an Api built by older code) `/` is an honest 404
        assert call(base + "/nope")[0] == 404
    finally:
        server.stop()
    bare = HttpServer(Stub(None).api(), "127.0.0.1", 0)
    _, port = bare.start()
    try:
        assert call(f"http://127.0.0.1:{port}/")[0] == 404
    finally:
        bare.stop()


class CountingApi(AgentApi):
    def __init__(self, daemon, status: dict):
        self.collects = 0
        self._status = status
        super().__init__(daemon)

    def _collect(self) -> dict:
        self.collects += 1
        return self._status


def test_the_page_is_built_from_the_cached_observation_under_a_burst(tmp_path, monkeypatch,
                                                                    registered):
    """What the daemon gives AgentApi, faked: 150 concurrent readers of `/` cost one status
    observation, one gathering of the page's other data and one render per second; the
    history's files and the reconcile passes reach the page, redacted and escaped."""
    ws = tmp_path / "ws"
    (ws / "logs").mkdir(parents=True)
    state = ws / ".pod-agent"
    state.mkdir()
    (ws / "logs" / "health.jsonl").write_text(json.dumps(
        {"time": "2026-11-29T08:00:10+00:00", "check": "disk", "status": "warn",
         "detail": f"<script>1</script> {REGISTERED}", "previous": "ok"}) + "\n")
    (state / "history.jsonl").write_text(json.dumps(
        {"time": 1.7e9, "kind": "drift", "summary": "numpy 2.1.0 -> 1.26.4",
         "by": f"pip {HF}"}) + "\n")
    health = SimpleNamespace(
        enabled=lambda: ["gpu"], verdict=None, component_states=lambda: {},
        latest_entry=lambda n: {"status": "fail", "detail": f"x {HF}",
                                "time": "2026-11-29T08:00:00+00:00"},
        limiter=SimpleNamespace(quarantined=lambda: {}))
    daemon = SimpleNamespace(
        health=health, _started=time.time(), job_events={}, http_info=None,
        supervisor=SimpleNamespace(snapshot=lambda: {"state": "running"}),
        watcher=SimpleNamespace(restarts=0),
        config=SimpleNamespace(workspace=ws, state_dir=state, http={}),
        fg=SimpleNamespace(last={"time": "2026-11-29 08:00:20", "phase": "foreground",
                                 "result": "failed: dependencies_main", "changed": [],
                                 "duration": 1.5}),
        bg=SimpleNamespace(last=None))
    api = CountingApi(daemon, status_doc())
    renders: list[float] = []
    real_render = page.render
    monkeypatch.setattr(page, "render", lambda *a, **k: renders.append(time.monotonic())
                        or real_render(*a, **k))
    api.status_changed()  # as after a reconcile pass
    server = HttpServer(Api(alive=api.alive, ready=api.ready, status=api.status,
                            metrics=api.render_metrics, reinstall=api.reinstall,
                            restart=api.restart, token=lambda: None, page=api.page),
                        "127.0.0.1", 0)
    _, port = server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        body = wait_for(lambda: (a := page_of(base))[0] == 200 and a[1], 10, what="the page")
        assert "FAILING" in body or "BROKEN" in body
        assert "disk (was ok): &lt;script&gt;1&lt;/script&gt; ***" in body
        assert "numpy 2.1.0 -&gt; 1.26.4 (by pip hf_***)" in body
        assert "foreground pass failed: dependencies_main (1.5 s)" in body
        assert_safe(body)
        collects, gathered, rendered = api.collects, api.page_data.computations, len(renders)
        started = time.monotonic()
        with ThreadPoolExecutor(150) as pool:
            answers = list(pool.map(lambda _: page_of(base), range(150)))
        took = time.monotonic() - started
        assert {code for code, _ in answers} == {200}
        assert all(b.endswith("</html>\n") for _, b in answers)
        # one new observation at most (the copy may turn 5 s old during the burst)
        assert api.collects - collects <= 1 + took / 5
        assert api.page_data.computations - gathered <= 1 + took / 5
        assert len(renders) - rendered <= 2 + took, (len(renders) - rendered, took)
    finally:
        server.stop()


# ------------------------------------------------------------------ a real agent
def page_of(base: str) -> tuple[int, str]:
    code, _, body = call(base + "/")
    return code, body


def verdict_of(body: str) -> str | None:
    m = re.search(r'data-verdict="([a-z]+)"', body)
    return m.group(1) if m else None


def start_agent(aws, tmp_path, hostile_gpu: bool):  # noqa: F811
    install_all(aws)
    checks = {"comfyui_http": {"interval": 0.5}, "comfyui_process": {"interval": 0.5},
              "components": {"interval": 1}, "agent": {"interval": 0.5},
              "disk": {"interval": 1, "warn_free_gb": 0, "fail_free_gb": 0}}
    env = {}
    if hostile_gpu:  # a check whose detail is hostile and leaky, through the real path
        tools = tmp_path / "tools"
        tools.mkdir()
        smi = tools / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho '<script>alert(1)</script> {LEAKY}'\nexit 3\n")
        smi.chmod(0o755)
        checks["gpu"] = {"interval": 1, "nvidia_smi": str(smi)}
        env = {"HF_TOKEN": HF}
    aws.config["http"] = {"port": 0}
    aws.config["health"] = {"checks": checks}
    aws.save()
    agent = aws.start_agent(env=env)
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    info = wait_for(lambda: _http_info(aws), 10, what="http.json")
    return agent, info["url"]


@pytest.mark.slow  # starts the agent
def test_the_agent_serves_its_page(aws, tmp_path):  # noqa: F811
    agent, base = start_agent(aws, tmp_path, hostile_gpu=True)
    # the gpu check fails (its nvidia-smi exits 3): the verdict is FAILING, said at the top
    def failing() -> str | None:
        body = page_of(base)[1]
        last[0] = body
        return body if verdict_of(body) == "failing" and "gpu: " in body else None

    last = [""]

    try:
        body = wait_for(failing, 30, what="the page says FAILING, with the gpu check's change")
    except AssertionError:
        raise AssertionError(last[0]) from None
    assert body.index(">FAILING</h1>") < body.index("<h2>")
    status = json.loads(call(base + "/status")[2])
    for name in status["components"]:
        assert f"<td>{name}</td>" in body, name
    assert "ComfyUI" in body and "running" in body and "restarts" in body
    assert "<td>gpu</td>" in body and "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert '<meta http-equiv="refresh"' in body
    assert_safe(body)
    assert "Recent history" in body and "gpu: " in body  # health.jsonl's change records
    # a burst of readers: every one answered, the page rendered from the cached observation
    codes = [page_of(base)[0] for _ in range(20)]
    assert codes == [200] * 20
    assert agent.stop() == 0


# ------------------------------------------------------------------ a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1200, 900


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, every pixel's RGB bytes, row by row) of an 8-bit RGB/RGBA PNG; enough
    of the format for a browser's screenshot, no dependencies."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
        pos += 12 + length
    assert header is not None
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif ftype == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif ftype == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif ftype == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [r[i:i + 3] for r in rows for i in range(0, stride, bpp)]


def chromium(tmp_path: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run headless Chromium in its own process group and profile; nothing survives it."""
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-dev-shm-usage", "--disable-crash-reporter", "--disable-breakpad",
           "--hide-scrollbars", "--run-all-compositor-stages-before-draw",
           "--virtual-time-budget=2000", f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "HOME": str(tmp_path)})
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helpers (zygote, crashpad) included
        except ProcessLookupError:
            pass
        proc.wait(5)
    strays = [p for p in psutil.process_iter(["cmdline"])
              if any(str(profile) in c for c in (p.info["cmdline"] or []))]
    for p in strays:
        p.kill()
    assert not strays, "a Chromium process outlived its run"
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


@pytest.mark.slow  # starts the agent and a browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get "
                    "install chromium; .ci/run installs it)")
def test_the_page_in_a_headless_browser(aws, tmp_path):  # noqa: F811
    agent, base = start_agent(aws, tmp_path, hostile_gpu=False)
    # every check run once and the page says HEALTHY: what the browser must show
    wait_for(lambda: verdict_of(page_of(base)[1]) == "healthy"
             and "no health results yet" not in page_of(base)[1], 30,
             what="the page says HEALTHY")
    dom = chromium(tmp_path, "--dump-dom", base + "/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r'<header class="verdict" id="verdict" data-verdict="healthy"[^>]*>'
                     r"<h1>HEALTHY</h1>", dom.stdout), dom.stdout[:2000]
    assert "<td>comfyui_core</td>" in dom.stdout and "<script" not in dom.stdout
    shot = tmp_path / "page.png"
    run = chromium(tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}",
                   base + "/")
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    if os.environ.get("POD_AGENT_KEEP_SCREENSHOT"):  # to look at it
        shutil.copy(shot, os.environ["POD_AGENT_KEEP_SCREENSHOT"])
    width, height, px = read_png(shot)
    assert (width, height) == (WIDTH, HEIGHT)
    colours = set(px)
    assert len(colours) > 50, f"a blank page? {len(colours)} colours"  # text is anti-aliased
    banner = bytes(int(page.COLOUR["healthy"][i:i + 2], 16) for i in (1, 3, 5))
    # the verdict banner: a wide band of the verdict's colour near the top
    assert px.count(banner) > WIDTH * 40, "no green verdict banner"
    top = [i for i, p in enumerate(px) if p == banner][0] // width
    assert top < 100, top
    assert agent.stop() == 0
