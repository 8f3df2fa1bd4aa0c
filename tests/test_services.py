"""Services besides ComfyUI (agent/services.py, agent/service_config.py): the `services:` and
`hooks:` config, the built-in jupyter and sshd, PUBLIC_KEY in authorized_keys, the start hooks,
and the services manager with real processes."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from agent import redact
from agent.config import load
from agent.model import AgentError, ConfigError
from agent.service_config import Hooks
from agent.services import Manager, ensure_authorized_keys, prepare, run_hook
from tests.helpers import run_cli, wait_for, write_yaml
from tests.test_daemon import aws, install_all, running  # noqa: F401 - the agent fixture

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA a@pod"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB b@pod"


def _load(tmp_path: Path, services: dict | None = None, overlay: dict | None = None, **top):
    """The built-in config (with its services) plus an overlay in a tmp workspace."""
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    data = dict(top)
    if services is not None:
        data["services"] = services
    if overlay is not None:
        data.update(overlay)
    if data:
        write_yaml(ws / "pod-agent.yaml", data)
    return load(None, ws)


# --------------------------------------------------------------------------- config
def test_builtin_services_and_hooks(tmp_path):
    cfg = _load(tmp_path)
    jup, sshd = cfg.services["jupyter"], cfg.services["sshd"]
    assert jup.enabled == sshd.enabled == "auto"
    assert jup.port == 8888 and jup.ready == "/api" and jup.restart == "always"
    assert f"--ServerApp.root_dir={cfg.workspace}" in jup.command
    # the token travels in the environment, never on the argv that `ps` shows
    assert not any("PASSWORD" in part or "token" in part.lower() for part in jup.command)
    assert jup.env == {"JUPYTER_TOKEN": "${JUPYTER_PASSWORD}"}
    assert sshd.authorized_keys == "${PUBLIC_KEY}" and "sshd -D -e" in sshd.command
    assert cfg.hooks.pre_start == Path("/pre_start.sh")
    assert cfg.hooks.post_start == Path("/post_start.sh")
    assert cfg.hooks.log == cfg.workspace / "logs" / "hooks.log"


def test_overlay_merges_services_by_name(tmp_path):
    cfg = _load(tmp_path, {
        "jupyter": {"enabled": False},  # only `enabled`: the built-in otherwise kept
        "sshd": {"command": ["my-sshd"], "restart": "never"},  # replaced whole
        "web": {"command": "python -m http.server 9000", "port": 9000, "ready": "/",
                "depends_on": ["comfyui_core"], "env": {"A": "1"}, "stop_timeout": 3,
                "required_for_ready": True, "cwd": "{workspace}/www"},
    })
    assert cfg.services["jupyter"].enabled == "false"
    assert cfg.services["jupyter"].port == 8888
    assert cfg.services["sshd"].command == ("my-sshd",)
    assert cfg.services["sshd"].authorized_keys is None and cfg.services["sshd"].port is None
    web = cfg.services["web"]
    assert web.shell and web.argv({}) == ["bash", "-c", "python -m http.server 9000"]
    assert web.depends_on == ("comfyui_core",) and web.required_for_ready
    assert web.cwd == cfg.workspace / "www" and web.log == cfg.workspace / "logs" / "web.log"
    assert list(cfg.services) == ["jupyter", "sshd", "web"]


@pytest.mark.parametrize("body, key, says", [
    ({"command": "x", "restart": "sometimes"}, "restart", "one of always, on-failure, never"),
    ({"command": "x", "port": 70000}, "port", "1-65535"),
    ({"command": "x", "port": 80, "ready": "http"}, "ready", "an HTTP path"),
    ({"command": "x", "ready": "/"}, "ready", "needs 'port'"),
    ({"command": "x", "depends_on": ["nope"]}, "depends_on", "unknown component 'nope'"),
    ({"port": 1}, None, "missing 'command'"),
    ({"command": []}, "command", "empty list"),
    ({"command": {"a": 1}}, "command", "argv list or a shell line"),
    ({"command": "x", "enabled": "maybe"}, "enabled", "true, false or auto"),
    ({"command": "x", "stop_timeout": 0}, "stop_timeout", "> 0"),
    ({"command": "x", "required_for_ready": True}, "required_for_ready", "needs 'ready'"),
    ({"command": "x", "bogus": 1}, "bogus", "unknown field 'bogus'"),
])
def test_a_bad_service_value_is_one_line_naming_it(tmp_path, body, key, says):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, {"web": body})
    text = str(err.value)
    assert "\n" not in text and "pod-agent.yaml:" in text and "service 'web'" in text, text
    assert says in text, text
    if key:
        assert f"'{key}'" in text or key in text, text


def test_a_bad_services_section_through_the_cli_is_exit_2_one_line(tmp_path):
    ws = tmp_path / "ws"
    write_yaml(ws / "pod-agent.yaml", {"services": {"comfyui": {"command": "x"}}})
    proc = run_cli("status", "--workspace", str(ws))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pod-agent.yaml:2" in lines[0] and "comfyui" in lines[0], lines


def test_enabled_auto_needs_its_variables_and_its_program(tmp_path):
    cfg = _load(tmp_path)
    jup, sshd = cfg.services["jupyter"], cfg.services["sshd"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    assert jup.auto_off({"PATH": str(bin_dir)}) == "JUPYTER_PASSWORD is not set"
    env = {"PATH": str(bin_dir), "JUPYTER_PASSWORD": "s3cret-pass"}
    assert jup.auto_off(env) == "jupyter-lab not found on PATH"
    fake = bin_dir / "jupyter-lab"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert jup.auto_off(env) is None
    assert sshd.auto_off({}) == "PUBLIC_KEY is not set"
    cfg = _load(tmp_path, {"jupyter": {"enabled": False}, "sshd": {"enabled": True}})
    assert cfg.services["jupyter"].auto_off(env) == "disabled in the config"
    assert cfg.services["sshd"].auto_off({}) is None


def test_the_jupyter_password_is_registered_as_a_secret_whatever_its_length(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("JUPYTER_PASSWORD", "pw42")  # 4 characters: below the env rule's 6
    _load(tmp_path)
    try:
        assert redact.redact("token pw42 here") == "token *** here"
    finally:
        redact.forget_all()


# --------------------------------------------------------------------------- authorized_keys
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_public_key_added_once_with_strict_permissions(tmp_path):
    home = tmp_path / "home"
    assert ensure_authorized_keys(KEY_A, home) == [KEY_A]
    assert ensure_authorized_keys(KEY_A + "\n", home) == []  # every start: not appended again
    keys = home / ".ssh" / "authorized_keys"
    assert keys.read_text() == KEY_A + "\n"
    assert _mode(home / ".ssh") == 0o700 and _mode(keys) == 0o600
    # a key the user added by hand stays; a new PUBLIC_KEY is added after it; loose modes fixed
    keys.write_text("# mine\n" + KEY_B)  # no final newline
    os.chmod(keys, 0o644)
    os.chmod(home / ".ssh", 0o755)
    assert ensure_authorized_keys(f"{KEY_A}\n{KEY_B}", home) == [KEY_A]
    assert keys.read_text().splitlines() == ["# mine", KEY_B, KEY_A]
    assert _mode(home / ".ssh") == 0o700 and _mode(keys) == 0o600


def test_public_key_from_the_environment_before_sshd_starts(tmp_path):
    cfg = _load(tmp_path)
    home = tmp_path / "home"
    env = {"HOME": str(home), "PUBLIC_KEY": KEY_A}
    prepare(cfg.services["sshd"], env)
    prepare(cfg.services["sshd"], env)
    assert (home / ".ssh" / "authorized_keys").read_text() == KEY_A + "\n"
    other = tmp_path / "other"
    other.mkdir()
    (other / ".ssh").write_text("a file where the folder goes")  # one line, no traceback
    with pytest.raises(AgentError) as err:
        prepare(cfg.services["sshd"], {"HOME": str(other), "PUBLIC_KEY": KEY_A})
    assert "\n" not in str(err.value) and "authorized_keys" in str(err.value), err.value


def test_readme_init_script_sshd_keeps_the_key_and_the_auto_rule(tmp_path):
    """The README's `service ssh start` body (tried by hand against a real sshd) is a whole
    body: it keeps PUBLIC_KEY's authorized_keys and `auto`, and has no port (the forked daemon
    would hold it after an agent restart). A body of only command and restart would lose both."""
    import re
    import textwrap

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [textwrap.dedent(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S)
              if "service ssh start" in b]
    assert len(blocks) == 1, blocks
    cfg = _load(tmp_path, overlay=yaml.safe_load(blocks[0]))
    sshd = cfg.services["sshd"]
    assert sshd.shell and "service ssh start" in sshd.command and sshd.restart == "never"
    assert sshd.port is None and sshd.ready is None
    assert sshd.auto_off({}) == "PUBLIC_KEY is not set"
    home = tmp_path / "home"
    prepare(sshd, {"HOME": str(home), "PUBLIC_KEY": KEY_A})
    assert (home / ".ssh" / "authorized_keys").read_text() == KEY_A + "\n"
    bare = _load(tmp_path, {"sshd": {"command": "service ssh start", "restart": "never"}})
    assert bare.services["sshd"].authorized_keys is None
    assert bare.services["sshd"].auto_off({}) is None  # would run without PUBLIC_KEY


# --------------------------------------------------------------------------- hooks
def test_hooks_run_when_present_with_their_output_in_the_log(tmp_path):
    log = tmp_path / "logs" / "hooks.log"
    pre = tmp_path / "pre_start.sh"
    pre.write_text(f"echo pre-start ran\necho $$ > {tmp_path}/pre.pid\nexit 3\n")
    hooks = Hooks(pre_start=pre, post_start=tmp_path / "absent.sh", log=log, timeout=30)
    assert run_hook("pre_start", hooks) == 3
    assert (tmp_path / "pre.pid").exists() and "pre-start ran" in log.read_text()
    assert run_hook("post_start", hooks) is None  # no such file: nothing run, no error
    assert run_hook("pre_start", None) is None


def test_a_hook_that_hangs_is_ended_at_its_timeout_or_at_shutdown(tmp_path):
    pre = tmp_path / "pre_start.sh"
    pre.write_text("echo waiting\nsleep 60\n")
    log = tmp_path / "hooks.log"
    assert run_hook("pre_start", Hooks(pre_start=pre, log=log, timeout=1)) == -9
    assert "timed out" in log.read_text()
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert run_hook("pre_start", Hooks(pre_start=pre, log=log, timeout=60), stop) is None


# --------------------------------------------------------------------------- the manager

FAST = {"backoff_initial": 0.2, "backoff_max": 1.0, "ready_poll_interval": 0.1,
        "liveness_interval": 0.5, "degraded_after": 50}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_server(port: int, **fields) -> dict:
    return {"command": [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            "port": port, "ready": "/", "restart": "always", "stop_timeout": 5, **fields}


def py(code: str, **fields) -> dict:
    return {"command": [sys.executable, "-c", code], **fields}


def services_config(tmp_path: Path, services: dict, **top):
    """A config with one cheap component `core` and these services (no built-ins)."""
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    path = write_yaml(tmp_path / "config.yaml", {
        "components": {"core": {"kind": "command", "run": "true", "check": "true"}},
        "agent": dict(FAST), "services": services, **top})
    return load(path, ws)


@pytest.fixture
def managers():
    made: list[Manager] = []

    def make(cfg, **kw) -> Manager:
        m = Manager(cfg, tick=0.05, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.shutdown()


def state(m: Manager, name: str) -> dict:
    return m.snapshot()[name]


def saved_services(cfg) -> dict:
    try:
        return json.loads((cfg.runtime_dir / "services.json").read_text())["services"]
    except (OSError, ValueError, KeyError):
        return {}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow  # real processes, stop ladders
def test_a_service_starts_answers_and_stops_with_the_agent(tmp_path, managers):
    port = free_port()
    cfg = services_config(tmp_path, {"web": http_server(port)})
    m = managers(cfg)
    m.start()
    wait_for(lambda: state(m, "web")["ready"], timeout=30, what="the web service to answer")
    entry = state(m, "web")
    assert entry["state"] == "running" and entry["port"] == port and entry["restarts"] == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        assert resp.status == 200
    saved = wait_for(lambda: saved_services(cfg).get("web"), timeout=10, what="services.json")
    assert saved["pid"] == entry["pid"] and saved["state"] == "running"
    m.shutdown()
    assert gone(entry["pid"]) and state(m, "web")["state"] == "stopped"


@pytest.mark.slow  # real processes, stop ladders
def test_restart_policies_and_backoff(tmp_path, managers):
    cfg = services_config(tmp_path, {
        "crash": py("import sys; print('boom', flush=True); sys.exit(3)", restart="on-failure"),
        "once": py("print('done')", restart="on-failure"),
        "never": py("import sys; sys.exit(4)", restart="never"),
    })
    m = managers(cfg)
    m.start()
    wait_for(lambda: state(m, "crash")["restarts"] >= 2, timeout=30, what="crash restarts")
    crash = state(m, "crash")
    assert crash["last_exit"]["code"] == 3, crash
    assert "boom" in Path(crash["log"]).read_text()
    wait_for(lambda: state(m, "once")["last_exit"] and state(m, "never")["last_exit"],
             timeout=30, what="the one-shot services to exit")
    seen = state(m, "crash")["restarts"]  # two more backoff periods: neither starts again
    wait_for(lambda: state(m, "crash")["restarts"] >= seen + 2, timeout=30, what="time")
    for name, code in (("once", 0), ("never", 4)):
        entry = state(m, name)
        assert entry["state"] == "stopped" and entry["restarts"] == 0, (name, entry)
        assert entry["last_exit"]["code"] == code


@pytest.mark.slow  # real processes, stop ladders
def test_a_service_ignoring_sigterm_is_killed_after_its_stop_timeout(tmp_path, managers):
    # the log's header quotes the command: wait for a line only the running code can print
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('sigterm' + '-ignored', flush=True); time.sleep(600)")
    cfg = services_config(tmp_path, {"stubborn": py(code, stop_timeout=1)})
    m = managers(cfg)
    m.start()
    pid = wait_for(lambda: state(m, "stubborn")["pid"], timeout=30, what="it to start")
    wait_for(lambda: "sigterm-ignored" in Path(state(m, "stubborn")["log"]).read_text(),
             timeout=30, what="SIGTERM to be ignored")
    began = time.monotonic()
    m.shutdown()
    took = time.monotonic() - began
    assert gone(pid) and 0.9 <= took < 10, took


def test_a_service_with_depends_on_waits_for_its_component(tmp_path, managers):
    port = free_port()
    cfg = services_config(tmp_path, {
        "web": http_server(port, depends_on=["core"]),
        # sshd as built in, but a stand-in command: no real sshd needed
        "sshd": py("import time; time.sleep(600)", enabled="auto", auto_env=["PUBLIC_KEY"],
                   authorized_keys="${PUBLIC_KEY}"),
        "jupyter": py("0", enabled="auto", auto_env=["JUPYTER_PASSWORD"])})
    installed: set[str] = set()
    home = tmp_path / "home"
    environ = {k: v for k, v in os.environ.items() if k != "JUPYTER_PASSWORD"}
    m = managers(cfg, installed=lambda name: name in installed,
                 environ={**environ, "HOME": str(home), "PUBLIC_KEY": KEY_A})
    m.start()
    wait_for(lambda: state(m, "sshd")["state"] == "running", timeout=30, what="sshd to run")
    assert (home / ".ssh" / "authorized_keys").read_text() == KEY_A + "\n"
    assert state(m, "jupyter")["state"] == "off"
    assert state(m, "jupyter")["reason"] == "JUPYTER_PASSWORD is not set"
    web = state(m, "web")
    assert web["state"] == "waiting" and web["waiting_for"] == ["core"] and web["pid"] is None
    installed.add("core")
    m.components_changed()
    wait_for(lambda: state(m, "web")["ready"], timeout=30, what="web after core installed")


@pytest.mark.slow  # real processes, stop ladders
def test_restart_by_request_file_and_readiness_of_required_services(tmp_path, managers):
    port = free_port()
    cfg = services_config(tmp_path, {"web": http_server(port, required_for_ready=True)})
    restarts: list = []
    m = managers(cfg, comfy_restart=lambda why, urgent: restarts.append((why, urgent)))
    assert m.not_ready() == "service web is stopped: not started yet"
    m.start()
    wait_for(lambda: m.not_ready() is None, timeout=30, what="web ready")
    pid = state(m, "web")["pid"]
    requests = cfg.runtime_dir / "requests"
    requests.mkdir(parents=True)
    for rid, body in (("1", {"name": "web"}), ("2", {"name": "comfyui"}),
                      ("3", {"name": "nope"})):
        (requests / f"restart-{rid}.json").write_text(json.dumps(body))
    answers = wait_for(lambda: [json.loads((requests / f"restart-{r}.answer").read_text())
                                for r in "123" if (requests / f"restart-{r}.answer").exists()]
                       if all((requests / f"restart-{r}.answer").exists() for r in "123")
                       else None, timeout=30, what="answers")
    assert answers[0]["ok"] and answers[1]["ok"] and not answers[2]["ok"], answers
    assert "no such service: nope" in answers[2]["error"]
    assert restarts == [("`pod-agent restart comfyui`", False)]
    wait_for(lambda: state(m, "web")["pid"] not in (None, pid) and state(m, "web")["ready"],
             timeout=30, what="web restarted")
    assert gone(pid) and state(m, "web")["restarts"] == 1


# --------------------------------------------------------------------------- with `pod-agent run`

SECRET = "jupyter-Secret-1234"

FAKE_JUPYTER = '''
import http.server, os, sys
port, tok = int(sys.argv[1]), os.environ.get("JUPYTER_TOKEN", "")
print(f"fake jupyter: token is {tok}", flush=True)
print(f"http://127.0.0.1:{port}/lab?token={tok}", flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/api" or self.headers.get("Authorization") == f"token {tok}"
        self.send_response(200 if ok else 403)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _with_services(aws, tmp_path, fresh: bool = False) -> dict:
    """Services and hooks on the agent fixture's config: `web` (no depends_on, required for
    ready) and `jup` (a fake JupyterLab that prints its token, depends on comfyui_core)."""
    ports = {"web": free_port(), "jup": free_port()}
    script = tmp_path / "fake_jupyter.py"
    script.write_text(FAKE_JUPYTER)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "pre.sh").write_text(f"echo pre ran; date +%s.%N > {hooks}/pre.done\n")
    (hooks / "post.sh").write_text(f"echo post ran; date +%s.%N > {hooks}/post.done\n")
    aws.config["services"] = {
        "web": http_server(ports["web"], required_for_ready=True),
        "jup": {"command": [sys.executable, str(script), str(ports["jup"])],
                "env": {"JUPYTER_TOKEN": "${JUPYTER_PASSWORD}"}, "port": ports["jup"],
                "ready": "/api", "restart": "always", "depends_on": ["comfyui_core"],
                "auto_env": ["JUPYTER_PASSWORD"], "enabled": "auto"},
    }
    aws.config["hooks"] = {"pre_start": str(hooks / "pre.sh"), "post_start": str(hooks / "post.sh"),
                           "log": str(aws.root / "logs" / "hooks.log")}
    aws.save()
    return {"ports": ports, "hooks": hooks}


def endpoint(ws, path: str):
    """(HTTP status, JSON or text) of the running agent's endpoint."""
    from tests.helpers import runtime_json

    info = wait_for(lambda: (runtime_json(ws.root, "http.json") or {}).get("port"), 30,
                    what="http.json")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{info}{path}", timeout=10) as resp:
            code, body = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read().decode()
    try:
        return code, json.loads(body)
    except ValueError:
        return code, body


def services_of(ws) -> dict:
    from tests.helpers import runtime_json

    return (runtime_json(ws.root, "services.json") or {}).get("services") or {}


def serving(ws, name: str) -> bool:
    s = services_of(ws).get(name) or {}
    return s.get("state") == "running" and bool(s.get("ready"))


@pytest.mark.slow  # starts the agent
def test_resumed_volume_services_start_first_token_never_shown(aws, tmp_path):
    setup = _with_services(aws, tmp_path)
    install_all(aws)
    began = time.monotonic()
    agent = aws.start_agent(env={"JUPYTER_PASSWORD": SECRET})
    wait_for(lambda: serving(aws, "jup") and serving(aws, "web"), 60, what="services ready")
    jup_s = time.monotonic() - began
    wait_for(lambda: running(aws), 60, what="ComfyUI running")
    print(f"resumed volume: JupyterLab (fake) answered {jup_s:.2f}s after `pod-agent run`")
    wait_for(lambda: (setup["hooks"] / "post.done").exists(), 60, what="post_start hook")
    log = agent.log()
    # pre_start before anything; services before the verification that starts ComfyUI
    assert log.index("hook pre_start: running") < log.index("starting: workspace")
    assert log.index("service jup stopped -> starting") < log.index("ComfyUI stopped -> ")
    assert "pre ran" in (aws.root / "logs" / "hooks.log").read_text()
    req = urllib.request.Request(f"http://127.0.0.1:{setup['ports']['jup']}/x",
                                 headers={"Authorization": f"token {SECRET}"})
    with urllib.request.urlopen(req, timeout=5) as resp:  # the token reached JupyterLab
        assert resp.status == 200

    status = run_cli("status", *aws.args())
    assert "SERVICES" in status.stdout and "jup" in status.stdout, status.stdout
    data = json.loads(run_cli("status", "--json", *aws.args()).stdout)
    assert data["services"]["web"]["state"] == "running"
    assert data["services"]["jup"]["ready"] is True

    code, ready = endpoint(aws, "/readyz")  # web is required_for_ready, and serves
    assert code == 200 and ready["ready"] is True, ready
    _, metrics = endpoint(aws, "/metrics")
    assert 'pod_agent_service_state{service="jup",state="running"} 1.0' in metrics
    assert 'pod_agent_service_ready{service="web"} 1.0' in metrics
    _, full = endpoint(aws, "/status")
    assert full["services"]["jup"]["state"] == "running" and SECRET not in json.dumps(full)

    pid = services_of(aws)["web"]["pid"]
    proc = run_cli("restart", "web", *aws.args())
    assert proc.returncode == 0 and "restarting now" in proc.stdout, (proc.stdout, proc.stderr)
    wait_for(lambda: services_of(aws)["web"].get("pid") not in (None, pid)
             and serving(aws, "web"), 60, what="web restarted")
    from tests.test_daemon import starts

    proc = run_cli("restart", "comfyui", *aws.args())  # queue-aware, through the supervisor
    assert proc.returncode == 0 and "queue is empty" in proc.stdout, (proc.stdout, proc.stderr)
    wait_for(lambda: len(starts(aws)) == 2, 60, what="ComfyUI restarted")
    bad = run_cli("restart", "nope", *aws.args())
    assert bad.returncode == 1 and "no such service" in bad.stderr and \
        len(bad.stderr.strip().splitlines()) == 1
    shown = run_cli("logs", "jup", *aws.args())
    assert "token is ***" in shown.stdout, shown.stdout

    # the token: nowhere in argv, logs, state files, status
    group = [p for p in psutil.process_iter(["cmdline"])
             if SECRET in " ".join(p.info["cmdline"] or [])]
    assert not group, [p.info["cmdline"] for p in group]
    texts = {"status": status.stdout + json.dumps(data), "agent output": agent.log()}
    for path in [*aws.root.joinpath("logs").rglob("*"), *aws.root.joinpath(".pod-agent").rglob(
            "*")]:
        if path.is_file():
            texts[str(path)] = path.read_text(errors="replace")
    assert [k for k, v in texts.items() if SECRET in v] == []
    pids = [services_of(aws)[n]["pid"] for n in ("web", "jup")]
    assert agent.stop(timeout=60) == 0
    assert all(gone(p) for p in pids)


@pytest.mark.slow  # starts the agent
def test_fresh_volume_services_without_depends_on_start_at_once(aws, tmp_path):
    _with_services(aws, tmp_path)
    aws.config["services"]["web"]["required_for_ready"] = False
    aws.config["services"]["gate"] = py("import time; time.sleep(600)", port=free_port(),
                                        ready="tcp", required_for_ready=True)
    aws.save()
    agent = aws.start_agent(env={"JUPYTER_PASSWORD": SECRET})
    wait_for(lambda: serving(aws, "jup"), 90, what="jup after its component")
    wait_for(lambda: running(aws), 90, what="ComfyUI running")
    code, ready = endpoint(aws, "/readyz")  # ComfyUI serves, but `gate` never answers
    assert code == 503 and ready["reason"] == "service gate is starting", ready
    log = agent.log()
    web = log.index("service web stopped -> starting")
    assert web < log.index("comfyui_core: installing (no marker)")
    assert "service jup stopped -> starting: components installed: comfyui_core installed" \
        in log, log
    assert web < log.index("service jup stopped -> starting")
    # an agent killed with -9 leaves its services running; the next one adopts them
    before = {n: services_of(aws)[n]["pid"] for n in ("web", "jup")}
    agent.proc.kill()
    agent.proc.wait(30)
    assert not any(gone(p) for p in before.values())
    second = aws.start_agent(env={"JUPYTER_PASSWORD": SECRET})
    wait_for(lambda: all(services_of(aws).get(n, {}).get("adopted") and serving(aws, n)
                         for n in before), 60, what="the services adopted")
    assert {n: services_of(aws)[n]["pid"] for n in before} == before
    assert second.stop(timeout=60) == 0
    assert all(gone(p) for p in before.values())


@pytest.mark.slow  # real processes
def test_reload_restarts_changed_starts_new_stops_removed(tmp_path, managers):
    import dataclasses

    cfg = services_config(tmp_path, {"keep": py("import time; time.sleep(600)"),
                                     "change": py("import time; time.sleep(600)"),
                                     "drop": py("import time; time.sleep(600)")})
    m = managers(cfg)
    m.start()
    wait_for(lambda: all(state(m, n)["state"] == "running" for n in ("keep", "change", "drop")),
             timeout=30, what="three services running")
    pids = {n: state(m, n)["pid"] for n in ("keep", "change", "drop")}
    new = dict(cfg.services)
    new["change"] = dataclasses.replace(new["change"], env={"NEW": "1"})
    del new["drop"]
    new["added"] = dataclasses.replace(new["keep"], name="added", log=tmp_path / "added.log")
    m.reload(dataclasses.replace(cfg, services=new))
    wait_for(lambda: state(m, "added")["state"] == "running" and state(m, "change")["pid"]
             not in (None, pids["change"]), timeout=30, what="reload applied")
    assert state(m, "keep")["pid"] == pids["keep"] and "drop" not in m.snapshot()
    assert gone(pids["drop"]) and gone(pids["change"])


# --------------------------------------------------------------------------- the commands
def test_restart_without_a_running_agent_and_logs(tmp_path):
    import subprocess

    cfg = services_config(tmp_path, {"web": http_server(free_port())})
    args = ["--workspace", str(cfg.workspace), "--config", str(tmp_path / "config.yaml")]
    proc = run_cli("restart", "web", *args)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: no pod-agent runs for {cfg.workspace} on this host: `pod-agent restart` asks "
        "the running agent (start it with `pod-agent run`)"], proc.stderr
    proc = run_cli("logs", "web", *args)
    assert proc.returncode == 1 and "no log yet" in proc.stderr
    log = cfg.services["web"].log
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "token=abcdef123456\n")
    proc = run_cli("logs", "web", "-n", "3", *args)
    assert proc.stdout.splitlines() == ["line 98", "line 99", "token=***"], proc.stdout
    follow = subprocess.Popen([sys.executable, "-m", "agent", "logs", "web", "-f", "-n", "1",
                               *args], stdout=subprocess.PIPE, text=True)
    try:
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.extend(iter(follow.stdout.readline, "")),
                                  daemon=True)
        reader.start()
        wait_for(lambda: "token=***\n" in seen, 30, what="the last line first")
        with open(log, "a") as fh:
            fh.write("appended\n")
        wait_for(lambda: "appended\n" in seen, 30, what="-f to print the new line")
        log.write_text("after rotation\n")  # truncated (copytruncate): from the start
        wait_for(lambda: "after rotation\n" in seen, 30, what="-f after a rotation")
        assert seen == ["token=***\n", "appended\n", "after rotation\n"], seen
    finally:
        follow.terminate()
        follow.wait(10)
        follow.stdout.close()


# --------------------------------------------------------------------------- real JupyterLab
def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _jupyter_lab() -> str | None:
    import shutil

    return os.environ.get("POD_AGENT_TEST_JUPYTER") or shutil.which("jupyter-lab")


@pytest.mark.slow  # a real JupyterLab
@pytest.mark.skipif(_jupyter_lab() is None, reason="JupyterLab is not installed here (pip "
                    "install jupyterlab, or POD_AGENT_TEST_JUPYTER=/path/to/jupyter-lab)")
def test_real_jupyterlab_takes_the_password_as_its_token_never_on_argv(tmp_path, managers,
                                                                      monkeypatch):
    import dataclasses

    exe = _jupyter_lab()
    port = free_port()
    monkeypatch.setenv("JUPYTER_PASSWORD", SECRET)
    monkeypatch.setenv("PATH", f"{Path(exe).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    cfg = _load(tmp_path)
    spec = cfg.services["jupyter"]
    command = tuple(f"--port={port}" if a == "--port=8888" else a for a in spec.command)
    assert command != spec.command
    cfg = dataclasses.replace(cfg, services={"jupyter": dataclasses.replace(
        spec, command=command, port=port, ready_timeout=120)})
    m = managers(cfg)
    began = time.monotonic()
    m.start()
    wait_for(lambda: state(m, "jupyter")["ready"], timeout=120, what="JupyterLab to answer")
    print(f"JupyterLab answered /api {time.monotonic() - began:.2f}s after its start")
    base = f"http://127.0.0.1:{port}/api/contents"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base, timeout=10)
    assert err.value.code == 403
    req = urllib.request.Request(base, headers={"Authorization": f"token {SECRET}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    pid = state(m, "jupyter")["pid"]
    group = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"]
             and _pgid(p.pid) == pid]
    assert group and not [p for p in group if SECRET in " ".join(p.info["cmdline"])]
    m.write_state(force=True)
    for path in (Path(state(m, "jupyter")["log"]), cfg.runtime_dir / "services.json",
                 cfg.runtime_dir / "services" / "jupyter.json"):
        assert SECRET not in path.read_text(), path
    m.shutdown()
    assert gone(pid)
