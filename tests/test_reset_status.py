"""`pod-agent reset` and `pod-agent status` (text and the stable --json contract)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from tests.helpers import run_cli, wait_for
from tests.kit import STAMP_RE, counting, install, runs, start_cli, status, tree_snapshot, use


def _setup(ws) -> None:
    comps = ws.config["components"]
    use(ws, {"comfyui_core": comps["comfyui_core"],
             "a": counting(ws, "a", depends_on=["comfyui_core"]),
             "b": counting(ws, "b"),
             "overall_installation": {"kind": "overall"}})
    install(ws)


def _done(ws) -> list[str]:
    return sorted(p.name for p in ws.markers.glob("*.done"))


ALL = ["a.done", "b.done", "comfyui_core.done", "overall_installation.done"]


# ----------------------------------------------------------------------------- reset
def test_reset_name_removes_it_and_overall_then_install_reinstalls_it(ws):
    _setup(ws)
    proc = run_cli("reset", "a", *ws.args())
    assert proc.returncode == 0, proc.stderr
    assert f"removed {ws.marker('a')}" in proc.stdout
    assert f"removed {ws.marker('overall_installation')}" in proc.stdout
    assert _done(ws) == ["b.done", "comfyui_core.done"]
    _, data = status(ws)
    assert data["components"]["a"]["state"] == "missing"

    again = install(ws)
    assert "a: installing" in again.stdout and "b: already installed" in again.stdout
    assert runs(ws, "a") == 2 and runs(ws, "b") == 1
    assert _done(ws) == ALL


def test_reset_unknown_name_lists_the_valid_ones_and_removes_nothing(ws):
    _setup(ws)
    proc = run_cli("reset", "a", "nosuch", *ws.args())
    assert proc.returncode != 0
    assert "unknown component 'nosuch'" in proc.stderr
    assert "comfyui_core, a, b, overall_installation" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _done(ws) == ALL


def test_reset_needs_names_or_all(ws):
    _setup(ws)
    proc = run_cli("reset", *ws.args())
    assert proc.returncode != 0 and "--all" in proc.stderr
    assert _done(ws) == ALL


def test_reset_all_without_yes_refuses_when_not_on_a_terminal(ws):
    _setup(ws)
    proc = run_cli("reset", "--all", *ws.args())  # stdin is not a TTY
    assert proc.returncode != 0
    assert "--yes" in proc.stderr
    assert _done(ws) == ALL


def test_reset_all_yes_removes_every_marker_and_nothing_else(ws):
    _setup(ws)
    (ws.markers / "notes.txt").write_text("mine\n")
    (ws.markers / "old-style.done.bak").write_text("2024-01-01 00:00:00\n")
    (ws.markers / "leftover_from_old_template.done").write_text("2024-01-01 00:00:00\n")
    keep = {name: tree_snapshot(ws.root / name) for name in ("ComfyUI", "venv", "logs", "runs")}
    proc = run_cli("reset", "--all", "--yes", *ws.args())
    assert proc.returncode == 0, proc.stderr
    assert _done(ws) == []
    assert sorted(p.name for p in ws.markers.iterdir()) == ["notes.txt", "old-style.done.bak"]
    for name, snap in keep.items():
        assert tree_snapshot(ws.root / name) == snap, name
    assert (ws.root / "installation_progress.log").exists()

    again = run_cli("reset", "--all", "--yes", *ws.args())
    assert again.returncode == 0 and "No markers" in again.stdout


def _reset_on_tty(ws, answer: bytes) -> tuple[int, str]:
    """Run `reset --all` with a terminal on stdin/stdout and type `answer`."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "reset", "--all", *ws.args()],
                                stdin=follower, stdout=follower, stderr=follower)
        os.close(follower)
        follower = -1
        seen = b""

        def prompt() -> bool:
            nonlocal seen
            seen += os.read(leader, 4096)
            return b"?" in seen

        wait_for(prompt, timeout=30, what="the confirmation prompt")
        os.write(leader, answer)
        code = proc.wait(30)
        try:
            while True:
                chunk = os.read(leader, 4096)
                if not chunk:
                    break
                seen += chunk
        except OSError:
            pass
        return code, seen.decode(errors="replace")
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)


def test_reset_all_asks_on_a_terminal(ws):
    _setup(ws)
    code, out = _reset_on_tty(ws, b"n\n")
    assert code != 0 and "Remove 4 markers" in out
    assert _done(ws) == ALL
    code, out = _reset_on_tty(ws, b"y\n")
    assert code == 0, out
    assert _done(ws) == []


# ----------------------------------------------------------------------------- status
COMPONENT_KEYS = {"state", "timestamp", "version", "reason", "log"}


def test_status_json_contract_and_verdicts(ws):
    use(ws, {"req": counting(ws, "req", required=True),
             "opt": counting(ws, "opt"),
             "gpu": counting(ws, "gpu", requires_gpu=True),
             "off": counting(ws, "off", enabled=False),
             "overall_installation": {"kind": "overall"}})
    code, data = status(ws)
    assert {"components", "processes", "logs", "verdict"} <= set(data)
    assert (code, data["verdict"]) == (1, "broken")
    assert list(data["components"]) == ["req", "opt", "gpu", "off", "overall_installation"]
    for name, c in data["components"].items():
        assert COMPONENT_KEYS <= set(c), name
    req = data["components"]["req"]
    assert (req["state"], req["timestamp"], req["version"]) == ("missing", None, None)
    assert data["components"]["req"]["log"] == str(ws.root / "logs" / "install" / "req.log")
    assert isinstance(data["processes"], list) and isinstance(data["logs"], list)

    install(ws)
    code, data = status(ws)
    assert (code, data["verdict"]) == (0, "healthy")
    states = {n: c["state"] for n, c in data["components"].items()}
    assert states == {"req": "installed", "opt": "installed", "gpu": "skipped",
                      "off": "disabled", "overall_installation": "installed"}
    req = data["components"]["req"]
    assert STAMP_RE.match(req["timestamp"]) and req["reason"] == "" and req["version"]
    logs = {entry["path"]: entry for entry in data["logs"]}
    progress = logs[str(ws.root / "installation_progress.log")]
    assert progress["size"] > 0 and "install finished" in progress["last_line"]
    assert {"path", "size", "age", "last_line"} <= set(progress)

    # A non-required component breaks: degraded.
    (ws.root / "runs" / "opt").unlink()
    code, data = status(ws)
    assert (code, data["verdict"]) == (1, "degraded")
    assert data["components"]["opt"]["state"] == "broken"
    assert data["components"]["opt"]["reason"].startswith(
        "marker present but broken: check failed (exit 1)")
    assert data["components"]["overall_installation"]["state"] == "broken"

    # A required one breaks: broken.
    (ws.root / "runs" / "req").unlink()
    code, data = status(ws)
    assert (code, data["verdict"]) == (1, "broken")

    text = run_cli("status", *ws.args())
    assert text.returncode == 1
    assert "verdict: BROKEN" in text.stdout
    for name in ("req", "opt", "gpu", "off"):
        assert name in text.stdout
    assert "marker present but broken: check failed" in text.stdout
    assert "skipped: no GPU" in text.stdout


def test_status_during_an_install_shows_the_installer(ws, tmp_path):
    go = ws.root / "go"
    use(ws, {"slow": counting(ws, "slow", extra=f"while [ ! -f {go} ]; do sleep 0.05; done")})
    with open(tmp_path / "install.out", "w") as fh:
        agent = start_cli("install", *ws.args(), stdout=fh)
        try:
            wait_for(lambda: runs(ws, "slow") == 1, timeout=30, what="the installer to run")
            code, data = status(ws)
            assert code == 1 and data["verdict"] == "installing"
            assert data["components"]["slow"]["state"] == "installing"
            assert f"pid {agent.pid}" in data["components"]["slow"]["reason"]
            installers = [p for p in data["processes"] if p["role"] == "installer"]
            assert [(p["component"], p["pid"]) for p in installers] == [("slow", agent.pid)]
            assert installers[0]["uptime"] is not None
            text = run_cli("status", *ws.args()).stdout
            assert f"installer pid {agent.pid}" in text and "component=slow" in text
        finally:
            go.touch()
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
    assert agent.returncode == 0
    code, data = status(ws)
    assert (code, data["verdict"]) == (0, "healthy")
    assert data["processes"] == []
