"""The CLI as a user types it (issue 8, "Getting it"): options before or after the command as git
takes them, short usage errors, help that shows its defaults, a missing workspace said as such,
and entrypoint.sh's install of the agent from a settable source. Real CLI subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_cli, write_yaml

HEADER = "installer: pip\ncomfyui: {venv: null, python: /usr/bin/python3}\ncomponents:\n"
COMMANDS = ("install", "status", "reset", "health", "run")


def _config(tmp_path: Path, name: str = "conf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + "  a: {kind: command, run: \"true\"}\n")
    return path


def _ws_of(proc) -> str:
    assert proc.stdout, (proc.returncode, proc.stderr)
    return json.loads(proc.stdout)["workspace"]


# ----------------------------------------------------------------------------- common options
@pytest.mark.parametrize("before", [["-w"], ["--workspace"]])
def test_workspace_before_the_command(tmp_path, before):
    ws = tmp_path / "ws"
    ws.mkdir()
    proc = run_cli(*before, str(ws), "status", "--json", env={"POD_AGENT_WORKSPACE": ""})
    assert proc.returncode in (0, 1) and "usage" not in proc.stderr.lower(), proc.stderr
    assert _ws_of(proc) == str(ws)


def test_config_before_the_command_is_used(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("components: [\n")
    for args in (["--config", str(bad), "status"], ["-c", str(bad), "status"],
                 ["status", "-c", str(bad)], ["-c", str(bad), "health"]):
        proc = run_cli(*args, "-w", str(tmp_path / "ws"))
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("config error:") and str(bad) in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_install_with_options_before_the_command(tmp_path):
    ws, conf = tmp_path / "ws", _config(tmp_path)
    proc = run_cli("-w", str(ws), "-c", str(conf), "install", "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert json.loads(proc.stdout)["ok"] is True
    assert (ws / ".install_markers" / "a.done").is_file()


def test_precedence_command_then_before_then_env(tmp_path):
    env_ws, before, after = (tmp_path / n for n in ("env", "before", "after"))
    env = {"POD_AGENT_WORKSPACE": str(env_ws)}
    assert _ws_of(run_cli("status", "--json", env=env)) == str(env_ws)
    assert _ws_of(run_cli("-w", str(before), "status", "--json", env=env)) == str(before)
    assert _ws_of(run_cli("-w", str(before), "status", "--json", "-w", str(after),
                          env=env)) == str(after)
    assert _ws_of(run_cli("status", "-w", str(after), "--json", env=env)) == str(after)
    # a config given before the command beats POD_AGENT_CONFIG
    good, bad = _config(tmp_path), tmp_path / "bad.yaml"
    bad.write_text("components: [\n")
    proc = run_cli("-c", str(good), "status", "--json", "-w", str(after),
                   env={"POD_AGENT_CONFIG": str(bad)})
    assert proc.returncode != 2 and list(json.loads(proc.stdout)["components"]) == ["a"], \
        proc.stderr


# ----------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("args,where", [
    (["status", "--bogus"], "agent status --help`)"),
    (["bogus-command"], "agent --help`)"),
    (["-w"], "--help"),
    (["--json", "status"], "--help"),  # --json stays per command
    (["status", "extra"], "agent status --help`)"),
])
def test_usage_error_is_one_plain_line_exit_2(args, where):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usage error: "), proc.stderr
    assert where in lines[0]
    assert not any(ch in proc.stderr for ch in "╭│╰"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bare_command_prints_the_help():
    proc = run_cli()
    assert "Usage:" in proc.stdout + proc.stderr and "status" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- help texts
def test_help_shows_the_workspace_default_everywhere():
    for args in [["--help"]] + [[c, "--help"] for c in COMMANDS]:
        proc = run_cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        text = " ".join(proc.stdout.split())
        assert "The persistent volume [default: /workspace]." in text, (args, proc.stdout)
        assert "volume ." not in text and "╭" not in proc.stdout
        assert "--config" in text and "-w, --workspace" in text
    assert "[env var: POD_AGENT_WORKSPACE]" in " ".join(run_cli("status", "--help")
                                                        .stdout.split())


# ----------------------------------------------------------------------------- missing workspace
def test_status_on_a_missing_workspace_says_so_and_creates_nothing(tmp_path):
    ws = tmp_path / "nope" / "ws"
    proc = run_cli("status", "-w", str(ws))
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and str(ws) in err[0], proc.stderr
    assert "--workspace" in err[0]
    assert proc.stdout.splitlines()[0].startswith(f"workspace: {ws} (MISSING")
    data = json.loads(run_cli("status", "--json", "-w", str(ws)).stdout)
    assert data["workspace_missing"] is True and data["workspace"] == str(ws)
    assert not (tmp_path / "nope").exists()
    ws.mkdir(parents=True)
    proc = run_cli("status", "--json", "-w", str(ws))
    assert json.loads(proc.stdout)["workspace_missing"] is False
    assert "does not exist" not in proc.stderr


# ----------------------------------------------------------------------------- entrypoint.sh
# python3 on PATH is a stub: `-m venv DIR` makes DIR/bin/python, whose `-m pip install SRC`
# records SRC and makes DIR/bin/pod-agent, which records its arguments. The script's own logic
# (source choice, one-line refusals, reuse of the venv, exec of `pod-agent run`) runs for real.
STUB_PYTHON3 = r"""#!/bin/bash
[ "$1 $2" = "-m venv" ] || exit 97
mkdir -p "$3/bin"
cat > "$3/bin/python" <<'EOS'
#!/bin/bash
echo "pip $*" >> "$STUB_LOG"
case "$*" in *fail*) echo "ERROR: no such package" >&2; exit 1;; esac
d="$(dirname "$0")"
printf '#!/bin/bash\necho "pod-agent $*" >> "$STUB_LOG"\n' > "$d/pod-agent"
chmod +x "$d/pod-agent"
EOS
chmod +x "$3/bin/python"
"""


def _entrypoint(tmp_path: Path, script: Path, **extra: str) -> tuple:
    stub = tmp_path / "stubbin"
    stub.mkdir(exist_ok=True)
    (stub / "python3").write_text(STUB_PYTHON3)
    (stub / "python3").chmod(0o755)
    path = f"{stub}:/usr/bin:/bin"
    if shutil.which("pod-agent", path=path):
        pytest.skip("a pod-agent on the system PATH hides the entrypoint's install branch")
    log = tmp_path / "stub.log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("POD_AGENT_") and k != "VIRTUAL_ENV"}
    env.update(PATH=path, STUB_LOG=str(log), POD_AGENT_WORKSPACE=str(tmp_path / "ws"), **extra)
    proc = subprocess.run(["bash", str(script), "--poll", "5"], env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    return proc, (log.read_text().splitlines() if log.exists() else [])


def test_entrypoint_installs_from_its_own_checkout_by_default(tmp_path):
    proc, calls = _entrypoint(tmp_path, ROOT / "entrypoint.sh")
    assert proc.returncode == 0, proc.stderr
    venv = tmp_path / "ws" / ".pod-agent" / "agent-venv"
    assert calls == [f"pip -m pip install --quiet {ROOT}", "pod-agent run --poll 5"]
    assert f"installing the agent from {ROOT} into {venv}" in proc.stderr
    # the second start reuses the venv on the volume
    proc, calls = _entrypoint(tmp_path, ROOT / "entrypoint.sh")
    assert proc.returncode == 0 and calls[2:] == ["pod-agent run --poll 5"], (calls, proc.stderr)


@pytest.mark.parametrize("source", ["git+https://github.com/OWNER/comfy-pod-agent",
                                    "/wheels/comfy_pod_agent-0.1.0-py3-none-any.whl"])
def test_entrypoint_installs_from_pod_agent_source(tmp_path, source):
    alone = tmp_path / "image"  # not a checkout: POD_AGENT_SOURCE is what counts
    alone.mkdir()
    shutil.copy(ROOT / "entrypoint.sh", alone / "entrypoint.sh")
    proc, calls = _entrypoint(tmp_path, alone / "entrypoint.sh", POD_AGENT_SOURCE=source)
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"pip -m pip install --quiet {source}", "pod-agent run --poll 5"]


def test_entrypoint_without_a_source_stops_with_one_line(tmp_path):
    alone = tmp_path / "image"
    alone.mkdir()
    shutil.copy(ROOT / "entrypoint.sh", alone / "entrypoint.sh")
    proc, calls = _entrypoint(tmp_path, alone / "entrypoint.sh")
    assert proc.returncode == 1 and calls == []
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "POD_AGENT_SOURCE" in lines[0] and "error:" in lines[0], lines
    assert not (tmp_path / "ws" / ".pod-agent" / "agent-venv").exists()


def test_entrypoint_failed_pip_install_is_one_line_and_retried_next_start(tmp_path):
    proc, calls = _entrypoint(tmp_path, ROOT / "entrypoint.sh", POD_AGENT_SOURCE="/x/fail.whl")
    assert proc.returncode == 1 and calls == ["pip -m pip install --quiet /x/fail.whl"]
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "error: pip install of /x/fail.whl into "
        f"{tmp_path / 'ws' / '.pod-agent' / 'agent-venv'} failed (output above): fix "
        "POD_AGENT_SOURCE or the network and restart")
    proc, calls = _entrypoint(tmp_path, ROOT / "entrypoint.sh", POD_AGENT_SOURCE="/x/ok.whl")
    assert proc.returncode == 0 and calls[1:] == ["pip -m pip install --quiet /x/ok.whl",
                                                  "pod-agent run --poll 5"], calls
