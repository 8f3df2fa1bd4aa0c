"""Marker files: the original one-line format stays readable, the new format is written last and
atomically, and legacy markers are trusted only as far as the probe goes."""

from __future__ import annotations

import os

import pytest

from agent import markers
from tests.helpers import installed_dists
from tests.kit import STAMP_RE, counting, install, marker_lines, runs, status, use

LEGACY = "2024-01-02 03:04:05"


# ----------------------------------------------------------------------------- unit
def test_legacy_one_line_marker_parses():
    m = markers.parse(LEGACY + "\n")
    assert m.timestamp == LEGACY and m.legacy and dict(m.meta) == {}


def test_render_parse_round_trip_keeps_the_timestamp_first():
    meta = {"version": "git abc", "fingerprint": "f00", "inputs": "a=1 b=2",
            "python": "/w/venv/bin/python", "duration": "1.5s", "note": "two\nlines"}
    text = markers.render(markers.parse(markers.render(
        markers.Marker(timestamp=LEGACY, meta=meta))))
    lines = text.splitlines()
    assert lines[0] == LEGACY
    parsed = markers.parse(text)
    assert not parsed.legacy
    assert parsed.meta["inputs"] == "a=1 b=2"
    assert parsed.meta["note"] == "two lines"  # a value never spills onto a new line
    assert len(lines) == 1 + len(meta)


def test_write_read_remove_present(tmp_path):
    folder = tmp_path / "m"
    written = markers.write(folder, "comfyui_core", {"version": "1", "fingerprint": "x"})
    assert STAMP_RE.match(written.timestamp)
    assert (folder / "comfyui_core.done").read_text().splitlines()[0] == written.timestamp
    assert markers.read(folder, "comfyui_core") == written
    assert markers.read(folder, "nothing") is None
    markers.write(folder, "a", {}, stamp=LEGACY)
    (folder / "notes.txt").write_text("not a marker")
    assert markers.present(folder) == ["a", "comfyui_core"]
    assert markers.remove(folder, "a") is True
    assert markers.remove(folder, "a") is False
    assert markers.present(folder) == ["comfyui_core"]
    assert markers.present(tmp_path / "absent") == []
    assert sorted(p.name for p in folder.iterdir()) == ["comfyui_core.done", "notes.txt"]


def test_failed_atomic_write_leaves_neither_marker_nor_temp_file(tmp_path):
    target = tmp_path / "x.done"
    target.mkdir()
    (target / "blocker").write_text("")  # os.replace cannot replace a non-empty folder
    with pytest.raises(OSError):
        markers.atomic_write(target, "2024-01-01 00:00:00\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.done"]
    assert markers.read(tmp_path, "x") is None


def test_atomic_write_replaces_without_partial_content(tmp_path):
    path = tmp_path / "a.done"
    markers.atomic_write(path, "old\n")
    inode = os.stat(path).st_ino
    markers.atomic_write(path, "new\n")
    assert path.read_text() == "new\n"
    assert os.stat(path).st_ino != inode  # a new file renamed over the old one
    assert [p.name for p in tmp_path.iterdir()] == ["a.done"]


# ----------------------------------------------------------------------------- end to end
def _legacy(ws, *names: str) -> None:
    ws.markers.mkdir(exist_ok=True)
    for name in names:
        ws.marker(name).write_text(LEGACY + "\n")  # exactly what the old template wrote


@pytest.mark.slow
def test_legacy_markers_are_accepted_when_the_probe_passes_and_upgraded_without_reinstall(ws):
    comps = ws.config["components"]
    use(ws, {"comfyui_core": comps["comfyui_core"],
             "tool": counting(ws, "tool", depends_on=["comfyui_core"]),
             "overall_installation": {"kind": "overall"}})
    install(ws)
    _legacy(ws, "comfyui_core", "tool", "overall_installation")
    logs = ws.root / "logs" / "install"
    sizes = {p.name: p.stat().st_size for p in logs.iterdir()}

    code, data = status(ws)
    assert (code, data["verdict"]) == (0, "healthy")
    for name in ("comfyui_core", "tool", "overall_installation"):
        comp = data["components"][name]
        assert comp["state"] == "installed", (name, comp)
        assert comp["timestamp"] == LEGACY

    proc = install(ws)
    for name in ("comfyui_core", "tool"):
        assert f"{name}: already installed ({LEGACY}, legacy marker upgraded)" in proc.stdout
    assert "installing" not in proc.stdout
    assert runs(ws, "tool") == 1
    assert {p.name: p.stat().st_size for p in logs.iterdir()} == sizes  # nothing ran
    for name in ("comfyui_core", "tool", "overall_installation"):
        first, meta = marker_lines(ws.marker(name))
        assert first == LEGACY  # the install time is not rewritten by a format upgrade
        assert meta["fingerprint"] and meta["python"] == str(ws.python)
    assert marker_lines(ws.marker("comfyui_core"))[1]["version"].startswith("git ")

    again = install(ws)
    assert "Nothing to do" in again.stdout
    assert f"comfyui_core: already installed ({LEGACY}, git " in again.stdout


@pytest.mark.slow
def test_legacy_markers_that_lie_are_reported_broken_and_reinstalled(ws):
    """The original failure: markers on the volume, packages gone with the container disk."""
    comps = ws.config["components"]
    use(ws, {"comfyui_core": comps["comfyui_core"],
             "dependencies_main": comps["dependencies_main"],
             "tool": counting(ws, "tool"),
             "gone": {"kind": "git", "repo": ws.urls["node_a"], "dest": "{workspace}/gone"}})
    install(ws, "comfyui_core")
    _legacy(ws, "comfyui_core", "dependencies_main", "tool", "gone")

    code, data = status(ws)
    assert code == 1 and data["verdict"] == "broken"
    c = data["components"]
    assert c["comfyui_core"]["state"] == "installed"
    venv = ws.root / "venv"
    assert c["dependencies_main"]["state"] == "broken"
    assert c["dependencies_main"]["reason"].startswith(
        f"marker present but broken: podtest-alpha not installed in {venv}")
    assert c["tool"]["state"] == "broken"
    assert c["tool"]["reason"].startswith("marker present but broken: check failed")
    assert c["gone"]["state"] == "broken" and "is missing" in c["gone"]["reason"]

    proc = install(ws)
    assert "dependencies_main: reinstalling (marker present but broken" in proc.stdout
    assert "tool: reinstalling (marker present but broken" in proc.stdout
    assert "gone: reinstalling" in proc.stdout
    assert {"podtest-alpha", "podtest-beta"} <= installed_dists(ws.python)
    assert runs(ws, "tool") == 1 and (ws.root / "gone" / ".git").is_dir()
    code, data = status(ws)
    assert (code, data["verdict"]) == (0, "healthy")
