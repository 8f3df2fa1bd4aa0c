"""Configuration: one-line errors with exit 2 that touch nothing, the overlay, the default config,
placeholders, and the CLI entry points."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent import config as cfg
from agent.model import ConfigError
from tests.helpers import ROOT, run_cli, write_yaml
from tests.kit import counting, install, runs, status, use

HEADER = "installer: pip\ncomfyui: {venv: null, python: /usr/bin/python3}\ncomponents:\n"

# (id, components block starting on line 4, line of the error, component, problem text)
CONFIG_ERRORS = [
    ("bad-yaml", '  a: {kind: command, run: "echo hi"\n  b: {kind: command, run: x}\n', None,
     None, "invalid YAML"),
    ("unknown-kind", "  a: {kind: command, run: x}\n  b: {kind: bogus, run: x}\n", 5, "b",
     "unknown kind 'bogus'"),
    ("unknown-field", "  a:\n    kind: command\n    run: x\n    colour: red\n", 7, "a",
     "unknown field 'colour'"),
    ("unknown-dependency", "  a: {kind: command, run: x}\n  b: {kind: command, run: x, "
     "depends_on: [a, zz]}\n", 5, "b", "unknown dependency 'zz'"),
    ("cycle", "  a: {kind: command, run: x, depends_on: [c]}\n  b: {kind: command, run: x, "
     "depends_on: [a]}\n  c: {kind: command, run: x, depends_on: [b]}\n", None, None,
     "dependency cycle"),
    ("self-dependency", "  a: {kind: command, run: x, depends_on: [a]}\n", 4, "a",
     "dependency cycle: a -> a"),
    ("name-with-dash", "  my-comp: {kind: command, run: x}\n", 4, "my-comp",
     "plain identifier"),
    ("name-starting-with-digit", "  1st: {kind: command, run: x}\n", 4, "1st",
     "plain identifier"),
    ("unquoted-spec", "  deps:\n    kind: pip\n    packages:\n      - accelerate\n"
     "      - transformers>=4.28.1 >\n", 8, "deps",
     "invalid package spec 'transformers>=4.28.1 >'"),
    ("not-pep508", "  deps: {kind: pip, packages: ['torch sde']}\n", 4, "deps",
     "invalid package spec 'torch sde'"),
    ("missing-run", "  a: {kind: command}\n", 4, "a", "missing 'run'"),
    ("missing-kind", "  a: {run: x}\n", 4, "a", "missing 'kind'"),
    ("negative-retries", "  a: {kind: command, run: x, retries: -1}\n", 4, "a",
     "'retries' must be a whole number"),
    ("bad-bool", "  a: {kind: command, run: x, required: maybe}\n", 4, "a",
     "'required' must be true or false"),
    ("node-without-repo", "  n:\n    kind: nodes\n    nodes:\n      - {ref: main}\n", 7, "n",
     "needs a 'repo'"),
]


def _assert_one_line_error(proc, *parts: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("config error: ")
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.mark.parametrize("name, body, line, component, problem", CONFIG_ERRORS,
                         ids=[c[0] for c in CONFIG_ERRORS])
def test_config_error_is_one_line_exit_2_and_touches_nothing(tmp_path, name, body, line,
                                                             component, problem):
    path = tmp_path / "config.yaml"
    path.write_text(HEADER + body)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    proc = run_cli("install", "--workspace", str(workspace), "--config", str(path))
    parts = [str(path), problem]
    if line is not None:
        parts.append(f"{path}:{line}:")
    if component is not None:
        parts.append(f"component '{component}'")
    _assert_one_line_error(proc, *parts)
    assert list(workspace.iterdir()) == []  # nothing created: no markers, logs, venv, locks


def test_cycle_error_names_the_components_in_the_cycle(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(HEADER + CONFIG_ERRORS[4][1])
    with pytest.raises(ConfigError) as err:
        cfg.load(path, tmp_path / "ws")
    assert "a -> c -> b -> a" in str(err.value) or "b -> a -> c -> b" in str(err.value) \
        or "c -> b -> a -> c" in str(err.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    proc = run_cli("status", "--workspace", str(tmp_path), "--config",
                   str(tmp_path / "nope.yaml"))
    _assert_one_line_error(proc, str(tmp_path / "nope.yaml"), "not found")


def test_real_workspace_is_refused_in_tests():
    """The guard that keeps this suite away from /workspace is itself working."""
    proc = run_cli("status", "--workspace", "/workspace")
    assert proc.returncode == 2 and "forbidden" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- overlay
def _overlay(ws, data: dict) -> Path:
    return write_yaml(ws.root / "pod-agent.yaml", data)


def test_overlay_replaces_disables_and_adds_components(ws):
    use(ws, {"a": counting(ws, "a", depends_on=["c"], required=True),
             "b": counting(ws, "b"),
             "c": counting(ws, "c"),
             "overall_installation": {"kind": "overall"}})
    _overlay(ws, {"components": {
        "a": counting(ws, "a_replaced"),
        "b": {"enabled": False},
        "d": counting(ws, "d", depends_on=["c"]),
    }})
    code, data = status(ws)
    assert set(data["components"]) == {"a", "b", "c", "d", "overall_installation"}
    assert data["components"]["b"]["state"] == "disabled"
    assert data["components"]["d"]["state"] == "missing"

    proc = install(ws)
    assert "b: installing" not in proc.stdout
    assert (runs(ws, "a"), runs(ws, "a_replaced"), runs(ws, "b"), runs(ws, "c"),
            runs(ws, "d")) == (0, 1, 0, 1, 1)
    assert not ws.marker("b").exists()
    assert ws.marker("overall_installation").exists()  # a disabled component does not block it
    code, data = status(ws)
    assert (code, data["verdict"]) == (0, "healthy")
    assert data["components"]["b"]["state"] == "disabled"

    conf = cfg.load(ws.config_path, ws.root)
    # Replaced, not merged: the base entry's depends_on and required are gone.
    assert conf.components["a"].depends_on == () and not conf.components["a"].required
    assert conf.components["b"].enabled is False
    assert str(ws.root / "pod-agent.yaml") in conf.sources


def test_overlay_sets_comfyui_args_and_keeps_the_other_settings(ws):
    ws.config["comfyui"]["port"] = 8190
    ws.save()
    _overlay(ws, {"comfyui": {"args": ["--listen", "127.0.0.1", "--cpu"]}})
    conf = cfg.load(ws.config_path, ws.root)
    assert conf.comfyui.args == ("--listen", "127.0.0.1", "--cpu")
    assert conf.comfyui.port == 8190
    assert conf.comfyui.python == ws.python
    assert set(conf.components) == set(ws.config["components"])


@pytest.mark.parametrize("overlay, problem", [
    ("components:\n  gguf_node: {enabled: maybe}\n", "'enabled' must be true or false"),
    ("components:\n  extra:\n    kind: command\n    run: x\n    bogus: 1\n",
     "unknown field 'bogus'"),
    ("components:\n  extra: {kind: command, run: x, depends_on: [nosuch]}\n",
     "unknown dependency 'nosuch'"),
    ("comfyui: {args: [--cpu}\n", "invalid YAML"),
], ids=["bad-enabled", "unknown-field", "unknown-dependency", "bad-yaml"])
def test_overlay_errors_name_the_overlay_file(ws, overlay, problem):
    path = ws.root / "pod-agent.yaml"
    path.write_text(overlay)
    before = sorted(p.name for p in ws.root.iterdir())
    proc = run_cli("install", *ws.args())
    _assert_one_line_error(proc, f"{path}:", problem)
    assert sorted(p.name for p in ws.root.iterdir()) == before
    assert not ws.markers.exists()


# ----------------------------------------------------------------------------- default config
DEFAULT_COMPONENTS = ["comfyui_core", "model_folders", "dependencies_main",
                      "dependencies_additional", "manager_prerequisites", "comfyui_manager",
                      "custom_nodes", "ffmpeg_source", "gguf_node", "sageattention",
                      "overall_installation"]


def test_default_config_is_found_and_names_the_ten_components(tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    proc = run_cli("status", "--json", "--workspace", str(workspace))
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert list(data["components"]) == DEFAULT_COMPONENTS
    assert data["verdict"] == "broken"
    assert data["components"]["sageattention"]["state"] == "skipped"
    assert data["components"]["sageattention"]["log"] == str(workspace /
                                                              "sageattention_install.log")
    for name in DEFAULT_COMPONENTS[:9]:
        assert data["components"][name]["state"] == "missing", name
    assert data["components"]["comfyui_core"]["log"] == str(
        workspace / "logs" / "install" / "comfyui_core.log")
    assert list(workspace.iterdir()) == []  # status only looks


def test_default_config_values_that_users_rely_on(tmp_path):
    conf = cfg.load(None, tmp_path)
    assert conf.markers_dir == tmp_path / ".install_markers"
    assert conf.progress_log == tmp_path / "installation_progress.log"
    assert conf.comfyui.dir == tmp_path / "ComfyUI"
    assert conf.comfyui.venv == tmp_path / "venv"
    assert conf.comfyui.python == tmp_path / "venv" / "bin" / "python"
    sage = conf.components["sageattention"]
    assert sage.requires_gpu and sage.background
    assert conf.components["ffmpeg_source"].spec["depth"] == 1
    assert "transformers>=4.28.1" in conf.components["dependencies_additional"].spec["packages"]
    assert conf.components["dependencies_main"].spec["requirements"] == (
        tmp_path / "ComfyUI" / "requirements.txt",)
    assert conf.order() == DEFAULT_COMPONENTS


def test_default_config_ships_inside_the_wheel():
    """pyproject copies config/default.yaml to the place default_config_path() looks first."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    target = include["config/default.yaml"]
    packaged = Path(cfg.__file__).parent.parent / target
    assert packaged == Path(cfg.__file__).parent / "_config" / "default.yaml"
    assert cfg.default_config_path().read_text() == (ROOT / "config" / "default.yaml").read_text()


def test_config_from_environment_variables(ws):
    env = {"POD_AGENT_CONFIG": str(ws.config_path), "POD_AGENT_WORKSPACE": str(ws.root)}
    proc = run_cli("status", "--json", env=env)
    data = json.loads(proc.stdout)
    assert data["workspace"] == str(ws.root)
    assert list(data["components"]) == list(ws.config["components"])


def test_placeholders_and_default_log_paths(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {
        "comfyui": {"dir": "{workspace}/Comfy", "venv": "{workspace}/env"},
        "markers_dir": "{workspace}/marks",
        "components": {
            "n": {"kind": "git", "repo": "file:///x", "dest": "{comfyui}/custom_nodes/x"},
            "c": {"kind": "command", "run": "{python} -V > {workspace}/v.txt",
                  "log": "{workspace}/c.log"},
        }})
    conf = cfg.load(path, tmp_path / "w")
    w = tmp_path / "w"
    assert conf.comfyui.python == w / "env" / "bin" / "python"
    assert conf.markers_dir == w / "marks"
    assert conf.components["n"].spec["dest"] == w / "Comfy" / "custom_nodes" / "x"
    assert conf.components["n"].log == w / "logs" / "install" / "n.log"
    assert conf.components["c"].spec["run"] == f"{w}/env/bin/python -V > {w}/v.txt"
    assert conf.components["c"].log == w / "c.log"


def test_shell_variables_in_braces_are_left_alone(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"components": {
        "c": {"kind": "command", "run": 'echo "${workspace}" "${MAX_JOBS:-8}" {workspace}'}}})
    conf = cfg.load(path, tmp_path)
    want = f'echo "${{workspace}}" "${{MAX_JOBS:-8}}" {tmp_path}'
    assert conf.components["c"].spec["run"] == want


# ----------------------------------------------------------------------------- entry points
def test_python_dash_m_agent_help():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("install", "status", "reset"):
        assert command in proc.stdout


def test_pod_agent_console_script_help():
    script = Path(sys.executable).parent / "pod-agent"
    exe = str(script) if script.exists() else shutil.which("pod-agent")
    assert exe, "the pod-agent console script is not installed"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "install" in proc.stdout and "status" in proc.stdout


def test_install_help_lists_its_options():
    proc = run_cli("install", "--help")
    assert proc.returncode == 0
    for opt in ("--force", "--json", "--workspace", "--config"):
        assert opt in proc.stdout
