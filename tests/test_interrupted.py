"""A run that dies (kill -9 of the CLI, a crashed agent) leaves its installers running: they run
in sessions of their own. The next holder of the component's lock ends them before it redoes
the work, and clones cut short are cleared."""

from __future__ import annotations

import pytest

import os
import signal

import psutil

from tests.helpers import wait_for
from tests.kit import cmd, install, start_cli, use


@pytest.mark.slow
def test_next_run_ends_the_installer_a_killed_cli_left_running(ws, tmp_path):
    pidfile, go = ws.root / "installer.pid", ws.root / "go"
    use(ws, {"slow": cmd(f"if [ -f {go} ]; then touch {ws.root}/slow.ok; "
                         f"else echo $$ > {pidfile}; sleep 300; fi",
                         check=f"test -f {ws.root}/slow.ok")})
    out = open(tmp_path / "cli.out", "w")
    cli = start_cli("install", *ws.args(), stdout=out)
    orphan = None
    try:
        wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip(), 60,
                 what="the installer to start")
        orphan = psutil.Process(int(pidfile.read_text()))
        os.kill(cli.pid, signal.SIGKILL)  # the CLI alone, as `kill -9 <pid>` does
        cli.wait(10)
        assert orphan.is_running()  # its installer lives on in its own session
        go.touch()
        proc = install(ws)
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        progress = (ws.root / "installation_progress.log").read_text()
        assert "died without finishing; ended" in progress, progress
        assert ws.marker("slow").is_file() and "slow" in proc.stdout
    finally:
        out.close()
        if orphan is not None and orphan.is_running():
            os.killpg(orphan.pid, signal.SIGKILL)


def test_a_clone_cut_short_is_cleared_before_the_next_clone(ws):
    from tests.kit import status

    use(ws, {"comfyui_core": ws.config["components"]["comfyui_core"]})
    stale = ws.root / ".ComfyUI.partial-99999"
    (stale / "half").mkdir(parents=True)
    install(ws)
    assert not stale.exists() and (ws.comfyui / "main.py").is_file()
    assert status(ws)[1]["verdict"] == "healthy"


def test_credentials_in_a_repo_url_never_stay_in_the_clone(ws):
    """A private repo given as https://user:pass@host/...: cloned, updated, and the password
    is in no file of the workspace (git's own config included)."""
    from tests.helpers import commit_files
    from tests.kit import all_files

    password = "pw-s3cr3t-@-in-it"
    fake = f"https://user:{password}@git.example.invalid/org/"
    upstream = ws.upstreams / "node-a"
    env = {"GIT_CONFIG_COUNT": "1",  # the host, without credentials, is a local folder
           "GIT_CONFIG_KEY_0": f"url.{ws.upstreams.as_uri()}/.insteadOf",
           "GIT_CONFIG_VALUE_0": "https://git.example.invalid/org/"}
    use(ws, {"private": {"kind": "git", "repo": fake + "node-a", "dest": "{workspace}/private",
                         "update": True}})
    install(ws, env=env)
    assert (ws.root / "private" / "__init__.py").is_file()
    commit_files(upstream, {"new.py": "x = 1\n"})
    ws.marker("private").unlink()  # reinstall: a pull with the credentials
    install(ws, env=env)
    assert (ws.root / "private" / "new.py").is_file()
    leaked = [str(p) for p in all_files(ws.root) if password.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_url_credentials_reach_git_through_its_credential_helper():
    """What git would send to the server: the helper answers with the URL's user and
    password (percent-decoded), while git's argv holds only the bare URL."""
    import subprocess

    from agent.kinds.gitops import credentials
    from agent.procs import base_env

    url, opts, env = credentials("https://me%40corp:p%40ss@git.example.invalid/org/x.git")
    assert url == "https://git.example.invalid/org/x.git"
    assert not any("p@ss" in o or "p%40ss" in o for o in opts)
    out = subprocess.run(["git", *opts, "credential", "fill"], env=base_env(env), text=True,
                         input="protocol=https\nhost=git.example.invalid\n\n",
                         capture_output=True, timeout=30)
    assert "username=me@corp" in out.stdout and "password=p@ss" in out.stdout, out
    assert credentials("file:///srv/x.git") == ("file:///srv/x.git", [], None)
