"""A run that dies (kill -9 of the CLI, a crashed agent) leaves its installers running: they run
in sessions of their own. The next holder of the component's lock ends them before it redoes
the work, and clones cut short are cleared."""

from __future__ import annotations

import os
import signal

import psutil

from tests.helpers import wait_for
from tests.kit import cmd, install, start_cli, use


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
