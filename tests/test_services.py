"""Services besides ComfyUI (agent/services.py, agent/service_config.py): the `services:` and
`hooks:` config, the built-in jupyter and sshd, PUBLIC_KEY in authorized_keys, the start hooks,
and the services manager with real processes."""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from agent import redact
from agent.config import load
from agent.model import AgentError, ConfigError
from agent.service_config import Hooks
from agent.services import ensure_authorized_keys, prepare, run_hook
from tests.helpers import run_cli, write_yaml

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
