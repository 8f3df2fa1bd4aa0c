"""The agent's HTTP endpoint: probes, status, Prometheus metrics and the guarded POST endpoints,
in-process against a stub and end to end against a real `pod-agent run` with a fake ComfyUI."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from agent.http import Api, HttpServer
from tests.helpers import run_cli, wait_for
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
    try:
        return json.loads(next((ws.root / ".pod-agent" / "run").glob("*/http.json"))
                          .read_text())
    except (StopIteration, OSError, ValueError):
        return None


def _health(ws) -> dict:
    try:
        return json.loads(next((ws.root / ".pod-agent" / "run").glob("*/health.json"))
                          .read_text())["checks"]
    except (StopIteration, OSError, ValueError, KeyError):
        return {}


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


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
    assert set(over_http) == set(cli)
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
