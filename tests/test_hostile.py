"""Hostile files where markers and state files go: reading is bounded and never raises, writing
never follows a link out of the workspace, removing never takes a folder, and every error is one
line naming the path. (The whole matrix over the CLI and the agent is
tests/reliability/test_hostile_state.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent import health, markers
from agent.cli_core import _cell, render_status
from agent.clikit import check_workspace
from agent.fserr import FsError
from tests.kit import counting, install, status, tree_snapshot, use
from tests.helpers import run_cli

STAMP = "2024-01-02 03:04:05"


def bounded(fn, timeout: float = 5.0):
    """Run fn in a thread: a read that blocks (a FIFO) fails the test instead of hanging it."""
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(value=fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the read blocked"
    return box.get("value")


@pytest.fixture
def folder(tmp_path) -> Path:
    f = tmp_path / "markers"
    f.mkdir()
    return f


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("content", [
    b"", b"\n\n", os.urandom(4096), b"\x00" * 100, STAMP.encode() + b"\x00\x00\nversion: \x00x\n",
    b"\xff\xfe" + "2024-01-02 03:04:05".encode("utf-16-le"), b"x" * 100_000 + b"\nversion: 1\n",
])
def test_any_regular_file_reads_as_a_bounded_one_line_marker(folder, content):
    (folder / "a.done").write_bytes(content)
    marker, problem = markers.inspect(folder, "a")
    assert problem == "" and marker is not None
    assert len(marker.timestamp) <= markers.FIELD_LIMIT
    assert all(ch.isprintable() for ch in marker.timestamp)
    for key, value in marker.meta.items():
        assert key.isprintable() and value.isprintable() and len(value) <= markers.FIELD_LIMIT


def test_nul_bytes_are_dropped_and_the_timestamp_kept(folder):
    (folder / "a.done").write_bytes(STAMP.encode() + b"\x00\x00\nversion: 1\x00\n")
    marker = markers.read(folder, "a")
    assert marker.timestamp == STAMP and marker.meta["version"] == "1"


def test_a_50_mb_marker_is_read_only_up_to_the_limit(folder):
    path = folder / "a.done"
    with open(path, "wb") as fh:  # sparse: 50 MB of NULs without a newline, instantly
        fh.truncate(50 << 20)
    started = time.monotonic()
    marker = markers.read(folder, "a")
    assert time.monotonic() - started < 1.0
    assert marker is not None and marker.timestamp == ""
    path.write_bytes(b"9" * (50 << 20))  # a 50 MB first line of text
    assert len(markers.read(folder, "a").timestamp) == markers.FIELD_LIMIT


def test_what_is_not_a_regular_file_is_unusable_with_a_reason_naming_the_path(folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "stamp").write_text(STAMP + "\n")
    cases = {
        "dir": (lambda p: p.mkdir(), "is a folder"),
        "link_file": (lambda p: p.symlink_to(outside / "stamp"), "symbolic link"),
        "link_none": (lambda p: p.symlink_to(outside / "nothing"), "symbolic link"),
        "link_dir": (lambda p: p.symlink_to(outside), "symbolic link"),
        "fifo": (lambda p: os.mkfifo(p), "named pipe"),
    }
    for name, (make, what) in cases.items():
        path = markers.path_for(folder, name)
        make(path)
        marker, problem = bounded(lambda: markers.inspect(folder, name))
        assert marker is None and str(path) in problem and what in problem, problem
        assert "\n" not in problem
        assert markers.read(folder, name) is None
    assert sorted(markers.present(folder)) == sorted(cases)  # listed, whatever they are


def test_a_marker_folder_that_is_a_file_blames_that_file(tmp_path):
    folder = tmp_path / "markers"
    folder.write_text("not a folder")
    marker, problem = markers.inspect(folder, "a")
    assert marker is None and problem.startswith(f"{folder}: is a file, not a folder")
    assert markers.present(folder) == []
    with pytest.raises(FsError, match=f"^{folder}: is a file"):
        markers.remove(folder, "a")


def test_read_json_is_bounded_and_never_raises(tmp_path):
    cases = {
        "garbage": b"{not json", "list": b"[1, 2]", "binary": os.urandom(256),
        "deep": b"[" * 100_000, "huge": b'{"a": "' + b"x" * (markers.JSON_LIMIT + 10) + b'"}',
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert markers.read_json(tmp_path / name) is None, name
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for name in ("dir", "fifo", "absent"):
        assert bounded(lambda: markers.read_json(tmp_path / name)) is None, name
    (tmp_path / "ok").write_text(json.dumps({"a": 1}))
    assert markers.read_json(tmp_path / "ok") == {"a": 1}


# ----------------------------------------------------------------------------- writing, removing
def test_writing_over_a_symlink_replaces_the_link_and_never_touches_its_target(folder, tmp_path):
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    (folder / "a.done").symlink_to(target)
    markers.write(folder, "a", {"version": "1"})
    assert target.read_text() == "precious\n"
    assert (folder / "a.done").is_file() and not (folder / "a.done").is_symlink()
    assert markers.read(folder, "a").meta["version"] == "1"


def test_remove_takes_a_link_not_its_target_and_refuses_a_folder(folder, tmp_path):
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    (folder / "a.done").symlink_to(target)
    (folder / "b.done").mkdir()
    (folder / "b.done" / "inside").write_text("kept")
    assert markers.remove(folder, "a") is True
    assert target.read_text() == "precious\n" and not (folder / "a.done").is_symlink()
    with pytest.raises(FsError) as err:
        markers.remove(folder, "b")
    assert str(folder / "b.done") in str(err.value) and "is a folder" in str(err.value)
    assert (folder / "b.done" / "inside").read_text() == "kept"
    assert markers.remove(folder, "absent") is False


def test_a_failed_write_names_the_target_and_the_watcher_still_sees_the_marker(tmp_path):
    folder = tmp_path / "markers"
    folder.write_text("a file")
    with pytest.raises(OSError) as err:
        markers.write(folder, "a", {})
    assert err.value.filename == str(folder)
    folder.unlink()
    folder.mkdir()
    (folder / "a.done").mkdir()
    with pytest.raises(OSError) as err:
        markers.write(folder, "a", {})
    assert err.value.filename == str(folder / "a.done")
    assert not markers.is_own_event(folder / "a.done")  # the failed write is forgotten
    assert [p.name for p in folder.iterdir()] == ["a.done"]  # no temp file left


def chattr(flag: str, path: Path) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this filesystem refuses chattr {flag}: {done.stderr.strip()}")


def test_an_immutable_marker_cannot_be_removed_and_says_so(folder):
    markers.write(folder, "a", {})
    path = folder / "a.done"
    chattr("+i", path)
    try:
        with pytest.raises(FsError) as err:
            markers.remove(folder, "a")
        text = str(err.value)
        assert text.startswith(f"{path}: cannot remove the marker") and "chattr -i" in text
        assert markers._own.get(str(path)) is not None  # not remembered as removed
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# ----------------------------------------------------------------------------- CLI pieces
def test_workspace_checks_are_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FsError, match="the workspace is a file"):
        check_workspace(afile, create=True)
    with pytest.raises(FsError, match=f"^{afile}: is a file, not a folder"):
        check_workspace(afile / "ws", create=True)
    with pytest.raises(FsError, match="cannot create the workspace"):
        check_workspace(Path("/proc/pod-agent-ws"), create=True)
    check_workspace(tmp_path / "later", create=False)  # status on a volume not made yet
    assert not (tmp_path / "later").exists()
    check_workspace(tmp_path / "new" / "ws", create=True)
    assert (tmp_path / "new" / "ws").is_dir()


def test_status_table_rows_stay_narrow_whatever_a_marker_holds():
    row = {"state": "installed", "timestamp": "9" * 200, "version": "v" * 500,
           "reason": "two\nlines " * 1000}
    data = {"workspace": "/w", "verdict": "healthy", "components": {"a": row},
            "processes": [], "logs": [], "agent": None, "comfyui": None, "health": None}
    text = render_status(data)
    assert max(len(line) for line in text.splitlines()) < 2200
    assert "two lines" in text and "two\nlines" not in text
    assert _cell("x" * 50, 10) == "x" * 7 + "..."


def test_garbage_health_state_files_read_as_empty(ws, tmp_path):
    from agent import config

    conf = config.load(ws.config_path, ws.root)
    path = health.state_path(conf)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"checks": {"disk": 5, "gpu": {"status": ["x"]}},
                                "quarantined": ["a"]}))
    state = health.load_state(conf)
    assert state["checks"] == {"gpu": {"status": ["x"]}} and state["quarantined"] == {}
    limiter = health.Limiter(tmp_path / "actions.json")
    limiter.path.write_text(json.dumps({"events": {"reinstall:a": ["x", 1e400, None]},
                                        "quarantine": {"reinstall:a": {"until": "never"}}}))
    assert limiter.quarantined() == {}
    assert limiter.allow("reinstall", "a", 1, 60.0) == (True, "")
    path.unlink()
    path.mkdir()  # a folder where health.json goes
    assert health.load_state(conf) is None


def test_reset_refuses_a_folder_marker_and_still_removes_the_others(ws):
    use(ws, {"a": counting(ws, "a"), "b": counting(ws, "b"),
             "overall_installation": {"kind": "overall"}})
    install(ws)
    ws.marker("a").unlink()
    ws.marker("a").mkdir()
    (ws.marker("a") / "keep").write_text("mine")
    proc = run_cli("reset", "a", *ws.args())
    assert proc.returncode == 1, proc
    assert proc.stderr.strip().splitlines() == [
        f"error: {ws.marker('a')}: is a folder, not a marker file: not removed (the agent never "
        "removes a folder); move it away yourself"]
    assert f"removed {ws.marker('overall_installation')}" in proc.stdout
    assert (ws.marker("a") / "keep").read_text() == "mine"
    proc = run_cli("reset", "--all", "--yes", *ws.args())
    assert proc.returncode == 1 and f"removed {ws.marker('b')}" in proc.stdout
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    code, data = status(ws)
    assert data["components"]["a"]["state"] == "broken"
    assert str(ws.marker("a")) in data["components"]["a"]["reason"]


def test_reset_all_prints_an_undecodable_marker_name(ws):
    use(ws, {"a": counting(ws, "a")})
    install(ws)
    odd = os.path.join(os.fsencode(ws.markers), b"\xff\xfe.done")
    with open(odd, "w") as fh:
        fh.write(STAMP + "\n")
    proc = run_cli("reset", "--all", "--yes", *ws.args())
    assert proc.returncode == 0, proc.stderr
    assert "\\udcff\\udcfe.done" in proc.stdout and not os.path.exists(odd)


def test_an_oserror_reaching_the_cli_is_one_line_exit_1(ws, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for cmd in (["install"], ["status"], ["reset", "--all", "--yes"], ["health", "--now"]):
        proc = run_cli(*cmd, "--workspace", str(afile), "--config", str(ws.config_path))
        assert proc.returncode == 1, (cmd, proc.stderr)
        assert proc.stderr.splitlines() == [
            f"error: {afile}: the workspace is a file, not a folder: move it away or pass "
            "another --workspace"], cmd
    snapshot = tree_snapshot(tmp_path / "ws")
    proc = run_cli("install", "--workspace", "/proc/pod-agent-ws", "--config",
                   str(ws.config_path))
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: /proc/pod-agent-ws: cannot create the workspace")
    assert tree_snapshot(tmp_path / "ws") == snapshot


def test_a_sage_probe_that_cannot_write_its_log_fails_in_one_line(ws, tmp_path, monkeypatch):
    from tests.test_health import Recorder, configure, sage_marker, set_fakes

    monkeypatch.setenv("POD_AGENT_GPU", "1")
    fakes = tmp_path / "fakes"
    set_fakes(fakes, sage="ok")
    cfg = configure(ws, fakes)
    sage_marker(cfg)
    log = ws.root / "logs" / "sageattention-probe.log"
    log.mkdir(parents=True)  # a folder where the probe's log goes
    entry = health.Monitor(cfg, Recorder().hooks()).run("sageattention")
    assert entry["status"] == "fail" and entry["action"] == "none"
    assert entry["detail"].startswith(f"cannot run the probe: {log}: Is a directory")
    assert "crashed" not in entry["detail"] and "\n" not in entry["detail"]
