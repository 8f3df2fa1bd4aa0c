"""The agent's HTTP endpoint: probes, status, Prometheus metrics and the guarded POST endpoints,
in-process against a stub and end to end against a real `pod-agent run` with a fake ComfyUI."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

import agent.http
from agent.endpoints import Observed, status_answer
from agent.http import MAX_BODY, Api, HttpServer
from tests.helpers import run_cli, runtime_json, wait_for
from tests.test_daemon import aws, install_all, running, starts  # noqa: F401 - fixture

TOKEN = "pl4nted-http-token-0123456789"
HF = "hf_PlantedSecretToken12345"
PASSWORD = "pl4ntedPassw0rd"
BEARER = "plantedBearerValue987"
LEAKY = (f"failed to fetch https://user:{PASSWORD}@example.invalid/w.whl with {HF}; "
         f"Authorization: Bearer {BEARER}")

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url: str, method: str = "GET", token: str | None = None,
         auth: str | None = None) -> tuple[int, dict, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if auth is not None:
        req.add_header("Authorization", auth)
    try:
        with _opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


class Stub:
    def __init__(self, token: str | None):
        self._token = token
        self.calls: list[tuple] = []
        self.is_ready = False

    def api(self) -> Api:
        return Api(
            alive=lambda: (True, {"status": "ok"}),
            ready=lambda: (self.is_ready, {"ready": self.is_ready}),
            status=lambda: {"verdict": "healthy"},
            metrics=lambda: (b"pod_agent_up 1\n", "text/plain; version=0.0.4"),
            reinstall=self.reinstall,
            restart=lambda urgent: self.calls.append(("restart", urgent)) or {"ok": 1},
            token=lambda: self._token)

    def reinstall(self, name: str):
        self.calls.append(("reinstall", name))
        return (202, {"accepted": True}) if name == "known" else (404, {"error": "no"})


@pytest.fixture
def captured():
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{message}")
    yield lines
    logger.remove(sink)


@pytest.mark.parametrize("token", [None, TOKEN])
def test_mutating_endpoints_need_the_bearer_token(token, captured):
    stub = Stub(token)
    server = HttpServer(stub.api(), "127.0.0.1", 0)
    _, port = server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        assert call(base + "/healthz")[0] == 200
        assert call(base + "/readyz")[0] == 503
        stub.is_ready = True
        assert call(base + "/readyz")[0] == 200
        assert json.loads(call(base + "/status")[2]) == {"verdict": "healthy"}
        assert call(base + "/metrics")[2] == "pod_agent_up 1\n"
        assert call(base + "/nope")[0] == 404
        assert call(base + "/comfyui/restart")[0] == 405  # GET on a POST endpoint
        for path in ("/comfyui/restart", "/components/known/reinstall"):
            if token is None:  # off: nothing can switch them on from outside
                assert call(base + path, "POST")[0] == 403
                assert call(base + path, "POST", token="anything")[0] == 403
                continue
            code, headers, _ = call(base + path, "POST")
            assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
            assert call(base + path, "POST", token=BEARER)[0] == 401
            assert call(base + path, "POST", token=TOKEN + "x")[0] == 401
            assert call(base + path, "POST", auth=f"Basic {TOKEN}")[0] == 401
            assert stub.calls == [] or path != "/comfyui/restart"
        if token is not None:
            assert call(base + "/comfyui/restart?urgent=1", "POST", token=TOKEN)[0] == 202
            assert call(base + "/components/known/reinstall", "POST", token=TOKEN)[0] == 202
            assert call(base + "/components/other/reinstall", "POST", token=TOKEN)[0] == 404
            assert call(base + "/components/bad%20name/reinstall", "POST",
                        token=TOKEN)[0] == 404
            assert stub.calls == [("restart", True), ("reinstall", "known"),
                                  ("reinstall", "other")]
        else:
            assert stub.calls == []
        assert call(base + "/components/x/delete", "POST", token=TOKEN)[0] == 404
    finally:
        server.stop()
    text = "\n".join(captured)
    assert "refused" in text or token is None
    for secret in (TOKEN, BEARER):
        assert secret not in text


def _http_info(ws) -> dict | None:
    return runtime_json(ws.root, "http.json")


def _health(ws) -> dict:
    return (runtime_json(ws.root, "health.json") or {}).get("checks") or {}


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.slow
def test_agent_serves_probes_status_metrics_and_guarded_actions(aws, tmp_path):  # noqa: F811
    install_all(aws)
    tools = tmp_path / "tools"
    tools.mkdir()
    smi = tools / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{LEAKY}'\nexit 3\n")
    smi.chmod(0o755)
    aws.config["http"] = {"port": 0}
    aws.config["health"] = {"checks": {
        "comfyui_http": {"interval": 0.5}, "comfyui_process": {"interval": 0.5},
        "components": {"interval": 1}, "agent": {"interval": 0.5},
        "disk": {"interval": 1, "warn_free_gb": 0, "fail_free_gb": 0},
        "gpu": {"interval": 1, "nvidia_smi": str(smi)}}}
    aws.save()
    agent = aws.start_agent(env={"POD_AGENT_HTTP_TOKEN": TOKEN, "HF_TOKEN": HF})
    wait_for(lambda: running(aws), 30, what="ComfyUI running")
    info = wait_for(lambda: _http_info(aws), 10, what="http.json")
    assert info["address"] == "127.0.0.1" and info["port"] > 0
    base = info["url"]

    code, _, body = call(base + "/healthz")
    assert code == 200 and json.loads(body)["status"] == "ok"
    wait_for(lambda: call(base + "/readyz")[0] == 200, 10, what="ready")
    code, _, body = call(base + "/status")
    over_http = json.loads(body)
    cli = json.loads(run_cli("status", "--json", *aws.args()).stdout)
    assert set(over_http) == set(cli) | {"observed_at", "age"}  # the agent's cached copy
    assert 0 <= over_http["age"] < 60
    assert {n: c["state"] for n, c in over_http["components"].items()} == \
        {n: c["state"] for n, c in cli["components"].items()}

    wait_for(lambda: {"gpu", "components", "comfyui_http", "agent"} <= set(_health(aws)), 20,
             what="health checks reported")
    assert _health(aws)["gpu"]["status"] == "fail"
    code, headers, text = call(base + "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"pod_agent_up", "pod_agent_uptime_seconds", "pod_agent_comfyui_state",
            "pod_agent_comfyui_restarts", "pod_agent_component_state",
            "pod_agent_health_check_status", "pod_agent_health_check_duration_seconds",
            "pod_agent_reconcile_runs", "pod_agent_reconcile_duration_seconds",
            "pod_agent_quarantined", "pod_agent_health_verdict"} <= names, names
    samples = _samples(text)
    assert samples[("pod_agent_comfyui_state", (("state", "running"),))] == 1
    assert samples[("pod_agent_health_check_status", (("check", "gpu"), ("status", "fail")))] \
        == 1
    assert samples[("pod_agent_component_state", (("component", "comfyui_core"),
                                                  ("state", "installed")))] == 1
    assert samples[("pod_agent_comfyui_restarts_total", ())] == 0
    assert sum(v for (n, _), v in samples.items() if n == "pod_agent_reconcile_runs_total") >= 1

    # POST endpoints: refused without the right token, accepted with it
    before = len(starts(aws))
    assert call(base + "/comfyui/restart", "POST")[0] == 401
    assert call(base + "/comfyui/restart", "POST", token=BEARER)[0] == 401
    assert len(starts(aws)) == before
    assert call(base + "/comfyui/restart", "POST", token=TOKEN)[0] == 202
    wait_for(lambda: len(starts(aws)) == before + 1 and running(aws), 20, what="restart")
    assert call(base + "/components/nope/reinstall", "POST", token=TOKEN)[0] == 404
    progress = aws.root / "installation_progress.log"
    runs = progress.read_text().count("dependencies_additional: reinstalling") + \
        progress.read_text().count("dependencies_additional: installing")
    assert call(base + "/components/dependencies_additional/reinstall", "POST",
                token=TOKEN)[0] == 202
    wait_for(lambda: progress.read_text().count("dependencies_additional: installing")
             + progress.read_text().count("dependencies_additional: reinstalling") > runs
             and aws.marker("dependencies_additional").exists(), 20, what="reinstalled")

    # /readyz follows ComfyUI: a crash loop answers 503, recovery 200 again
    (aws.control / "crash").write_text("")
    wait_for(lambda: call(base + "/readyz")[0] == 503, 20, what="not ready")
    (aws.control / "crash").unlink()
    wait_for(lambda: call(base + "/readyz")[0] == 200, 20, what="ready again")
    m = _samples(call(base + "/metrics")[2])
    assert m[("pod_agent_comfyui_restarts_total", ())] >= 2

    latest = run_cli("health", "--json", *aws.args())
    assert latest.returncode == 2 and json.loads(latest.stdout)["checks"]["gpu"]["status"] \
        == "fail"
    assert agent.stop() == 0
    assert _http_info(aws) is None  # removed on shutdown

    # no planted secret in anything the agent wrote (the fake nvidia-smi itself excluded)
    log = (aws.root / "logs" / "agent.log").read_text()
    assert "***@example.invalid" in log and "http: serving" in log
    files = [p for p in tmp_path.rglob("*") if p.is_file() and tools not in p.parents
             and "venv" not in p.parts and ".git" not in p.parts]
    assert any(p.name == "health.jsonl" for p in files)
    for path in files:
        text = path.read_text(errors="replace")
        for secret in (TOKEN, HF, PASSWORD, BEARER):
            assert secret not in text, (secret, path)


# ------------------------------------------------------------------ bodies, deadlines, load
@pytest.fixture
def served():
    """An in-process endpoint on a free port against a Stub (token set)."""
    servers: list[HttpServer] = []

    def make(api: Api | None = None, **kw) -> tuple[Stub, int]:
        stub = Stub(TOKEN)
        server = HttpServer(api or stub.api(), "127.0.0.1", 0, **kw)
        servers.append(server)
        stub.server = server
        return stub, server.start()[1]

    yield make
    for server in servers:
        server.stop()


def exchange(port: int, head: bytes, body: bytes = b"", stream: bytes = b"",
             timeout: float = 5.0) -> tuple[bytes, bool, float]:
    """Send head + body, then keep sending `stream` (a never-ending body) until the server
    stops taking it; read the answer. (answer, whether the server closed the connection
    within `timeout`, seconds until it did)."""
    start = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    answer, closed = b"", False
    try:
        try:
            sock.sendall(head + body)
            if stream:
                sock.settimeout(0.05)
                while time.monotonic() - start < timeout:
                    try:
                        sock.send(stream)
                    except TimeoutError:
                        pass
                    try:
                        data = sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        closed = True
                        break
                    answer += data
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(max(0.05, timeout - (time.monotonic() - start)))
        while not closed:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
            except TimeoutError:
                break
            if not data:
                closed = True
                break
            answer += data
    finally:
        sock.close()
    return answer, closed, time.monotonic() - start


def code_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


CHUNK = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"


@pytest.mark.parametrize("method, path", [("POST", "/comfyui/restart"), ("GET", "/healthz")])
def test_a_chunked_body_is_refused_and_the_connection_closed(served, method, path):
    stub, port = served()
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    answer, closed, took = exchange(port, head, stream=CHUNK)  # 64 KiB chunks, never ending
    assert code_of(answer) == 411, answer[:200]
    assert b"Content-Length" in answer.split(b"\r\n\r\n", 1)[1]  # says what to do
    assert closed and took < 4, (closed, took)
    assert stub.calls == []
    # a chunked body on a keep-alive connection is never read as the next request
    smuggled = (b"POST /comfyui/restart HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                b"\r\n\r\n0\r\n\r\nPOST /comfyui/restart HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    answer, closed, _ = exchange(port, smuggled)
    assert answer.count(b"HTTP/1.1 ") == 1 and code_of(answer) == 411 and closed
    assert stub.calls == []
    assert call(f"http://127.0.0.1:{port}/healthz")[0] == 200  # the server still serves


def test_bodies_over_the_limit_are_413_and_bad_lengths_400(served):
    stub, port = served()
    auth = f"Authorization: Bearer {TOKEN}\r\n"

    def post(headers: str, body: bytes = b"", stream: bytes = b"") -> tuple[bytes, bool]:
        head = f"POST /comfyui/restart HTTP/1.1\r\nHost: x\r\n{auth}{headers}\r\n".encode()
        answer, closed, took = exchange(port, head, body, stream)
        assert took < 4
        return answer, closed

    answer, closed = post("Content-Length: 10485760\r\n", stream=b"y" * 65536)
    assert code_of(answer) == 413 and closed
    answer, closed = post(f"Content-Length: {MAX_BODY + 1}\r\nExpect: 100-continue\r\n")
    assert code_of(answer) == 413 and b"100 Continue" not in answer  # refused before sent
    for bad in ("-1", "12abc", "1e3", "99999999999999999999999"):
        answer, closed = post(f"Content-Length: {bad}\r\n", b"{}")
        assert code_of(answer) in (400, 413) and closed, (bad, answer[:100])
    answer, _ = post("Content-Length: 2\r\nContent-Length: 3\r\n", b"{}")
    assert code_of(answer) == 400
    assert stub.calls == []
    # a body within the limit is read, then answered
    body = b"{" + b" " * 4000 + b"}"
    answer, closed = post(f"Content-Length: {len(body)}\r\n", body)
    assert code_of(answer) == 202 and closed
    assert stub.calls == [("restart", False)]


@pytest.mark.slow
def test_a_trickling_client_is_cut_at_the_request_deadline(served, monkeypatch):
    monkeypatch.setattr(agent.http, "REQUEST_DEADLINE", 1.5)
    _, port = served(workers=1)  # one worker: while it is held, nothing else is answered
    results: dict[str, tuple] = {}

    def trickle() -> None:  # a header byte every 0.2 s never hits the 5 s socket timeout
        start = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            while time.monotonic() - start < 10:
                sock.sendall(b"X")
                time.sleep(0.2)  # the client's own pace, not synchronisation
        except OSError:
            pass
        finally:
            sock.close()
        results["trickle"] = (time.monotonic() - start,)

    def slow_body() -> None:  # 10 of 100 promised bytes, then nothing
        results["body"] = exchange(port, b"POST /comfyui/restart HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Length: 100\r\n\r\n", b"0123456789",
                                   timeout=10)

    for target in (trickle, slow_body):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join(15)
        assert not thread.is_alive()
    assert results["trickle"][0] < 4, results  # cut at 1.5 s, not after 10 s of bytes
    _, closed, took = results["body"]
    assert closed and took < 4, results
    start = time.monotonic()
    assert call(f"http://127.0.0.1:{port}/healthz")[0] == 200
    assert time.monotonic() - start < 1


def test_connections_beyond_the_pool_and_queue_get_503_at_once(served):
    stub, port = served(workers=1, queue_max=1)
    inner = stub.server._server
    held: list[socket.socket] = []
    try:
        # the worker waits for the rest of the first request; the second waits in the queue
        for n, ready in ((1, lambda: len(inner._active) == 1),
                         (2, lambda: inner._queue.qsize() == 1)):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            held[-1].sendall(b"GET /healthz HTTP/1.1\r\n")
            wait_for(ready, 5, what=f"connection {n} taken")
        answer, closed, took = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert code_of(answer) == 503 and b"Retry-After" in answer and closed and took < 1
        for sock in held:
            sock.sendall(b"Host: x\r\n\r\n")
        for sock in held:
            assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()


def test_healthz_answers_while_a_status_refresh_is_slow(served):
    gate = threading.Event()
    runs: list[float] = []

    def slow_collect() -> dict:
        runs.append(time.monotonic())
        gate.wait(20)
        return {"verdict": "healthy", "run": len(runs)}

    observed = Observed(slow_collect, "status", fresh=0.3, usable=60, wait=1.0, waiters=2)
    stub = Stub(TOKEN)
    api = stub.api()
    api.status = lambda: status_answer(observed)
    _, port = served(api)
    base = f"http://127.0.0.1:{port}"

    def burst(n: int) -> tuple[list[tuple[int, float, dict]], float]:
        def one(path: str) -> tuple[int, float, dict]:
            start = time.monotonic()
            code, _, body = call(base + path)
            return code, time.monotonic() - start, json.loads(body)

        with ThreadPoolExecutor(n + 1) as pool:
            statuses = [pool.submit(one, "/status") for _ in range(n)]
            health = pool.submit(one, "/healthz")
            return [f.result() for f in statuses], health.result()[1]

    # nothing observed yet, the first observation hangs: at most 2 readers wait (1 s), the
    # rest are told to retry at once; /healthz is answered meanwhile; one computation
    answers, health_took = burst(30)
    assert health_took < 1, health_took
    assert {c for c, _, _ in answers} == {503} and len(runs) == 1
    assert sum(t > 0.9 for _, t, _ in answers) <= 2
    gate.set()
    wait_for(lambda: call(base + "/status")[0] == 200, 10, what="first status")
    # a stale copy: served at once (with its age) while one new observation hangs
    gate.clear()
    before = len(runs)
    wait_for(lambda: json.loads(call(base + "/status")[2])["age"] > 0.3, 5, what="stale")
    answers, health_took = burst(30)
    assert health_took < 1 and all(c == 200 and t < 1 for c, t, _ in answers), answers
    assert all(b["age"] > 0.3 and b["observed_at"] for _, _, b in answers)
    assert len(runs) == before + 1
    gate.set()
    wait_for(lambda: json.loads(call(base + "/status")[2])["run"] == before + 1, 10,
             what="the new observation served")


def _free_port_held() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.slow
def test_a_taken_port_is_retried_shown_and_served_once_freed(aws):  # noqa: F811
    install_all(aws)
    blocker = _free_port_held()
    port = blocker.getsockname()[1]
    try:
        aws.config["http"] = {"port": port}
        aws.config["health"] = {"checks": {"agent": {"interval": 0.5}}}
        aws.save()
        agent = aws.start_agent()
        info = wait_for(lambda: (i := _http_info(aws)) and i.get("state") == "retrying"
                        and i.get("attempts", 0) >= 2 and i, 30, what="bind retried")
        assert info["error"] == "port taken" and info["port"] == port
        text = run_cli("status", *aws.args()).stdout
        line = next(x for x in text.splitlines() if x.startswith("HTTP "))
        assert f"not listening on 127.0.0.1:{port}: port taken, retrying in" in line, text
        data = json.loads(run_cli("status", "--json", *aws.args()).stdout)
        assert data["agent"]["http"]["state"] == "retrying"
        assert data["agent"]["http"]["retry_in"] >= 0
        wait_for(lambda: _health(aws).get("agent", {}).get("status") == "warn"
                 and "HTTP endpoint not listening" in _health(aws)["agent"]["detail"], 20,
                 what="the agent check warns")
        now = run_cli("health", "--now", "--check", "agent", "--json", *aws.args())
        assert json.loads(now.stdout)["checks"]["agent"]["status"] == "warn", now.stdout
    finally:
        blocker.close()
    info = wait_for(lambda: (i := _http_info(aws)) and i.get("state") == "listening" and i,
                    40, what="served once the port is free")
    assert info["port"] == port
    assert call(f"http://127.0.0.1:{port}/healthz")[0] == 200
    data = json.loads(run_cli("status", "--json", *aws.args()).stdout)
    assert data["agent"]["http"]["state"] == "listening"
    assert f"listening on http://127.0.0.1:{port}" in run_cli("status", *aws.args()).stdout
    wait_for(lambda: _health(aws).get("agent", {}).get("status") == "ok", 20,
             what="the agent check ok again")
    assert agent.stop() == 0
    log = (aws.root / "logs" / "agent.log").read_text()
    assert log.count("cannot listen on") == 1, log  # once per change of state, not per retry
    assert "bound after" in log
