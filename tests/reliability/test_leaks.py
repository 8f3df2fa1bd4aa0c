"""Leaks: distinct secrets planted in every place a pod's config or environment can hold one,
pushed through every command and the running agent, then searched for in every file of the
workspace and in every output. Goal: 0 occurrences.

Places: a component's own `env`, `installer_env`, `comfyui.args` (a secret flag's value, an
`hf_` token, a URL whose password contains '@'), `comfyui.env` (a secret value and a proxy URL
with credentials), `http.token`, the process environment, a git URL with credentials (a clone that
fails), a URL with credentials in a component's env.

They travel: installers print them (installs that succeed, fail and retry, a check that fails and
prints them, a version command), the fake ComfyUI prints its argv and environment (stdout and a
'\\r' progress line on stderr) and, later, a line sent to it; the agent logs ComfyUI's command
line and writes runtime state; `install`, `install --json`, `status`, `status --json`,
`health --now`, `health --json`, `reset`; the running agent with its health checks, HTTP GET
endpoints and token-guarded POSTs (right and wrong token); a restart and a reinstall asked over
HTTP.

Searched: every file under the workspace (raw bytes), the agent's stdout/stderr, every command's
stdout and stderr, every HTTP answer; each secret as written, percent-encoded and JSON-escaped.
Before that the search is shown to find planted values (a canary file and a canary output), so
the suite cannot pass vacuously; and each secret is shown to have been printed (its masked form
is where the installer or ComfyUI printed it), so a zero means masked, not absent.

Short run: plain secrets. Full run (POD_AGENT_RELIABILITY=full): also secrets with spaces,
quotes, '$', non-ASCII characters, and 4-character config secrets (the shortest registered;
process environment values need 6).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest

from tests.helpers import run_cli, runtime_json, wait_for
from tests.kit import all_files
from tests.reliability.conftest import size
from tests.test_daemon import aws, running, service  # noqa: F401 - fixture

FLAVORS = {
    "plain": {
        "component env": "compenv-Vy8q-secret",
        "installer_env": "instenv-K2pz-secret",
        "comfyui.args flag value": "argsflag-Q7wm-secret",
        "comfyui.args hf_ token": "hf_ArgsHfTokenZ9x8y7w6",
        "comfyui.args URL password with @": "argsurl-p@ss-R4tn",
        "comfyui.env": "cuienv-J3hd-secret",
        "comfyui.env URL password with @": "proxy-p@ss-M5kc",
        "http.token": "httptoken-W6bf-secret",
        "process env": "procenv-T8nx-secret",
        "git URL password with @": "giturl-p@ss-L2vq",
        "component env URL password": "mirror-pass-C7rj",
    },
    "odd characters": {
        "component env": "comp env 'pä$$' \"x\"",
        "installer_env": "inst\tenv ünïcode ✓",
        "comfyui.args flag value": "args flag $HOME `x`",
        "comfyui.args hf_ token": "hf_OddFlavourTokenAbc123",
        "comfyui.args URL password with @": "a@b@c-Odd",
        "comfyui.env": "cui\\env\\back slash",
        "comfyui.env URL password with @": "@lead-and-trail@",
        "http.token": "http token with spaces",
        "process env": "proc ëñv value",
        "git URL password with @": "g@t-p%ss",
        "component env URL password": "m!rr0r;pass",
    },
    "shortest": {
        "component env": "Cq4!",
        "installer_env": "Iz7?",
        "comfyui.args flag value": "Af9#",
        "comfyui.args hf_ token": "hf_Sh0rt1234",
        "comfyui.args URL password with @": "u@p9",
        "comfyui.env": "Ce3%",
        "comfyui.env URL password with @": "x@y8",
        "http.token": "Ht5^",
        "process env": "Pe6&Zz",
        "git URL password with @": "g@i7",
        "component env URL password": "Mp2*",
    },
}
RUNS = list(FLAVORS)[:size(1, 3)]


# ---------------------------------------------------------------------- the search
def forms(value: str) -> set[bytes]:
    """How a secret can appear: as written, percent-encoded, JSON-escaped (both ways); for a
    password with '@', also each piece between the '@'s of 4 characters or more (a URL pattern
    that stops at the first '@' leaves the rest visible)."""
    out = {value, quote(value, safe=""), json.dumps(value)[1:-1],
           json.dumps(value, ensure_ascii=False)[1:-1]}
    if "@" in value:
        out |= {piece for piece in value.split("@") if len(piece) >= 4}
    return {f.encode("utf-8") for f in out}


def search(secrets: dict[str, str], files: list[Path], outputs: dict[str, str],
           root: Path) -> dict[str, list[str]]:
    """place -> where its secret was found (file paths relative to root, output names)."""
    needles = {place: forms(value) for place, value in secrets.items()}
    found: dict[str, list[str]] = {place: [] for place in secrets}
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for place, wanted in needles.items():
            if any(n in data for n in wanted):
                found[place].append(str(path.relative_to(root)) if path.is_relative_to(root)
                                    else str(path))
    for name, text in outputs.items():
        data = text.encode("utf-8", "surrogateescape")
        for place, wanted in needles.items():
            if any(n in data for n in wanted):
                found[place].append(name)
    return found


# ---------------------------------------------------------------------- the pod
def plant(ws, s: dict[str, str]) -> Path:
    """The config with every secret planted; returns the file whose presence the check wants."""
    ok = ws.root / "leaky-ok.flag"
    print_all = ('echo "pw=$MY_PASSWORD inst=$DEPLOY_TOKEN proc=$HF_TOKEN url=$MIRROR_URL '
                 f'http={s["http.token"]}"')
    comp_env = {"MY_PASSWORD": s["component env"],
                "MIRROR_URL": f"https://mu:{s['component env URL password']}@mirror.invalid/"}
    port = ws.port
    ws.config["installer_env"] = {"DEPLOY_TOKEN": s["installer_env"]}
    ws.config["comfyui"].update({
        "args": ["--listen", "127.0.0.1", "--port", str(port),
                 "--api-key", s["comfyui.args flag value"],
                 f"--hf-token={s['comfyui.args hf_ token']}",
                 "--remote", f"https://au:{s['comfyui.args URL password with @']}@remote.invalid/x"],
        "env": {"COMFY_SECRET": s["comfyui.env"],
                "PROXY_URL": f"http://pu:{s['comfyui.env URL password with @']}@proxy.invalid:3128",
                "FAKE_COMFY_CONTROL": str(ws.control),
                "FAKE_COMFY_PRINT_ENV": "COMFY_SECRET,PROXY_URL,HF_TOKEN"},
    })
    ws.config["http"] = {"port": 0, "token": s["http.token"]}
    ws.config["health"] = {"checks": {
        "comfyui_http": {"interval": 0.5}, "comfyui_process": {"interval": 0.5},
        "components": {"interval": 1}, "agent": {"interval": 0.5}}}
    ws.config["components"] = {
        "comfyui_core": ws.config["components"]["comfyui_core"],
        "leaky_ok": {"kind": "command", "env": comp_env,
                     "run": f"{print_all}; echo yes > {ok}",
                     "check": f'test -f {ok} || {{ {print_all}; exit 1; }}',
                     "version_cmd": 'echo "v1 $MY_PASSWORD"'},
        "leaky_fail": {"kind": "command", "env": comp_env, "run": f"{print_all} >&2; exit 3",
                       "retries": 1, "retry_backoff": 0},
        "private_git": {"kind": "git", "dest": "{workspace}/private",
                        "repo": f"file://gu:{s['git URL password with @']}@localhost"
                                "/nonexistent/private.git"},
        "overall_installation": {"kind": "overall"},
    }
    ws.save()
    return ok


def evidence(s: dict[str, str]) -> dict[str, tuple[str, str]]:
    """place -> (file, text): where the secret was printed, now masked."""
    return {
        "component env": ("logs/install/leaky_ok.log", "pw=***"),
        "installer_env": ("logs/install/leaky_ok.log", "inst=***"),
        "process env": ("logs/comfyui.log", "env HF_TOKEN=***"),
        "http.token": ("logs/install/leaky_ok.log", "http=***"),
        "component env URL password": ("logs/install/leaky_ok.log",
                                       "url=https://***@mirror.invalid/"),
        "comfyui.args flag value": ("logs/comfyui.log", "--api-key ***"),
        "comfyui.args hf_ token": ("logs/comfyui.log", "--hf-token=***"),
        "comfyui.args URL password with @": ("logs/comfyui.log", "https://***@remote.invalid/x"),
        "comfyui.env": ("logs/comfyui.log", "env COMFY_SECRET=***"),
        "comfyui.env URL password with @": ("logs/comfyui.log",
                                            "env PROXY_URL=http://***@proxy.invalid:3128"),
        # git gets the bare URL (credentials through its helper): the clone ran, nothing to mask
        "git URL password with @": ("logs/install/private_git.log", "-- file://localhost/"),
    }


def http(url: str, method: str = "GET", token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def log_pipes(log: Path) -> list[psutil.Process]:
    """Live redactors (agent/logpipe.py) writing to this log."""
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and str(log) in cmd and \
                any(a.endswith("logpipe.py") for a in cmd):
            out.append(proc)
    return out


def http_info(ws) -> dict | None:
    return runtime_json(ws.root, "http.json")


# ---------------------------------------------------------------------- the suite
@pytest.mark.parametrize("flavor", RUNS)
def test_planted_secrets_never_appear_in_files_or_outputs(aws, tally, flavor):  # noqa: F811
    ws = aws
    s = FLAVORS[flavor]
    assert len(set(s.values())) == len(s)
    ok = plant(ws, s)
    env = {"HF_TOKEN": s["process env"]}
    outputs: dict[str, str] = {}

    def cli(name: str, *args: str, expect: tuple[int, ...] = (0, 1, 2)) -> str:
        proc = run_cli(*args, *ws.args(), env=env)
        assert proc.returncode in expect, (args, proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        outputs[name] = proc.stdout + "\n" + proc.stderr
        return proc.stdout

    # 0. The search finds what is there: a canary file and a canary output with every secret
    # (as written, and JSON-escaped), so the zeros below cannot be vacuous.
    canary = ws.root / "logs" / "canary.txt"
    canary.parent.mkdir(parents=True, exist_ok=True)
    canary.write_text(" | ".join(s.values()))
    escaped = ws.root / "canary.json"
    escaped.write_text(json.dumps(list(s.values())))
    seen = search(s, [canary, escaped], {"canary output": "x" + "\n".join(s.values())}, ws.root)
    assert all(where == ["logs/canary.txt", "canary.json", "canary output"]
               for where in seen.values()), seen
    canary.unlink()
    escaped.unlink()

    # 1. One-shot commands: installs that succeed, fail (with a retry) and cannot clone.
    cli("install", "install", expect=(1,))
    assert json.loads(cli("install --json", "install", "--json", expect=(1,)))["outcomes"]
    ok.unlink()  # leaky_ok's check now fails and prints every secret
    cli("status", "status", expect=(1,))
    cli("status --json", "status", "--json", expect=(1,))
    cli("health --now", "health", "--now", expect=(1, 2))
    cli("health --json", "health", "--json", expect=(1, 2))
    cli("reset", "reset", "leaky_ok")

    # 2. The running agent: it reinstalls leaky_ok, retries the failures, starts ComfyUI
    # (which prints its argv and environment), runs health checks, answers HTTP.
    agent = ws.start_agent(env=env)
    wait_for(lambda: running(ws), 60, what="ComfyUI running")
    comfy_log = ws.root / "logs" / "comfyui.log"
    wait_for(lambda: comfy_log.is_file() and "env HF_TOKEN=" in comfy_log.read_text(), 10,
             what="ComfyUI's environment printed")
    assert len(log_pipes(comfy_log)) == 1  # its output goes through the redacting pipe
    tmp = ws.control / ".say"
    tmp.write_text(f"later: {s['comfyui.args flag value']} {s['process env']} "
                   f"{s['comfyui.env']}")
    tmp.replace(ws.control / "say")
    wait_for(lambda: "later: " in comfy_log.read_text(), 10, what="a later line")
    info = wait_for(lambda: http_info(ws), 10, what="http.json")
    base = info["url"]
    wait_for(lambda: http(base + "/readyz")[0] == 200, 20, what="ready")
    for path in ("/healthz", "/readyz", "/status", "/metrics"):
        code, body = http(base + path)
        outputs[f"GET {path}"] = body
        assert code == 200, (path, code, body)
    code, body = http(base + "/comfyui/restart", "POST", token="wrong-token-value")
    outputs["POST wrong token"] = body
    assert code == 401
    pid = service(ws).get("pid")
    code, body = http(base + "/comfyui/restart?urgent=1", "POST", token=s["http.token"])
    outputs["POST restart"] = body
    assert code == 202
    wait_for(lambda: running(ws) and service(ws).get("pid") not in (None, pid), 30,
             what="ComfyUI restarted")
    code, body = http(base + "/components/leaky_fail/reinstall", "POST", token=s["http.token"])
    outputs["POST reinstall"] = body
    assert code == 202
    health_file = ws.root / "logs" / "health.jsonl"
    wait_for(lambda: health_file.is_file() and any(
        json.loads(line).get("check") == "components"
        for line in health_file.read_text().splitlines() if line.strip()), 20,
        what="a components health record")
    wait_for(lambda: ok.exists(), 30, what="leaky_ok reinstalled by the agent")
    cli("status (agent running)", "status", expect=(1,))
    cli("status --json (agent running)", "status", "--json", expect=(1,))
    cli("health (agent running)", "health", "--json", expect=(0, 1, 2))
    assert agent.stop(timeout=40) == 0
    outputs["agent stdout/stderr"] = agent.log()
    wait_for(lambda: not log_pipes(comfy_log), 10, what="ComfyUI's log pipe to end with it")

    # 3. The search: every file of the workspace, every output.
    files = list(all_files(ws.root))
    assert len(files) > 20
    found = search(s, files, outputs, ws.root)
    ok_all = True
    for place, where in found.items():
        ok_all &= tally.case("leaks", leak=bool(where),
                             note=f"{flavor}: {place} found in {', '.join(where[:5])}")
    assert ok_all, {p: w for p, w in found.items() if w}

    # 4. Each secret was printed somewhere and masked there (a zero means masked, not absent).
    assert "later: *** *** ***" in comfy_log.read_text()
    for place, (rel, text) in evidence(s).items():
        data = (ws.root / rel).read_text(errors="replace")
        assert text in data, (place, rel, text)
