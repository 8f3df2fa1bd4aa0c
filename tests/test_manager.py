"""ComfyUI-Manager v3 vs v4: detection from the installed ComfyUI, install, switch, forcing.

Real local git upstreams (a ComfyUI without and then with manager_requirements.txt, a Manager
clone), a real `comfyui-manager` wheel standing in for the PyPI package, real pip installs into
the workspace's venv, the real CLI.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from agent import manager
from agent.config import load
from tests.helpers import build_wheel, commit_files, git, installed_dists, make_repo, run_cli
from tests.kit import install, status

PIN = "comfyui_manager==4.0.5\n"


@pytest.fixture(scope="module")
def manager_wheels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("manager-wheels")
    build_wheel(folder, "comfyui-manager", "4.0.5")
    build_wheel(folder, "podtest-mgrdep", "1.0")
    return folder


@pytest.fixture
def mws(ws, manager_wheels):
    """ws with only ComfyUI and the Manager: a v3-era ComfyUI upstream, a Manager upstream."""
    up = ws.upstreams
    ws.urls["manager"] = make_repo(up / "ComfyUI-Manager", {
        "__init__.py": "", "requirements.txt": "podtest-mgrdep\n"})
    ws.config["installer_args"] += ["--find-links", str(manager_wheels)]
    ws.config["components"] = {
        "comfyui_core": ws.config["components"]["comfyui_core"],
        "comfyui_manager": {"kind": "manager", "repo": ws.urls["manager"],
                            "depends_on": ["comfyui_core"]},
    }
    ws.save()
    return ws


def _conf(ws):
    return load(ws.config_path, ws.root)


def _ship_v4(ws) -> None:
    """The ComfyUI upstream gains manager_requirements.txt; the workspace's ComfyUI pulls it."""
    commit_files(ws.upstreams / "ComfyUI", {"manager_requirements.txt": PIN}, "manager v4")
    git("pull", "-q", "--ff-only", cwd=ws.comfyui)


@pytest.mark.slow
def test_v3_then_comfyui_ships_v4_requirements_switches_to_the_package(mws):
    clone = mws.comfyui / "custom_nodes" / "ComfyUI-Manager"
    install(mws)
    conf = _conf(mws)
    assert manager.generation(conf) == ("v3", "ComfyUI has no manager_requirements.txt")
    assert (clone / ".git").is_dir() and "podtest-mgrdep" in installed_dists(mws.python)
    assert manager.manager_args(conf) == []
    code, st = status(mws)
    assert code == 0 and st["manager"]["generation"] == "v3"
    assert st["components"]["comfyui_manager"]["version"].startswith("v3 git ")
    assert st["manager"]["snapshots"].endswith("user/default/ComfyUI-Manager/snapshots")

    _ship_v4(mws)  # an update of ComfyUI: now it expects the v4 package
    code, st = status(mws)
    assert st["components"]["comfyui_manager"]["state"] == "stale", st["components"]
    assert st["manager"]["generation"] == "v4"
    install(mws)
    conf = _conf(mws)
    assert "comfyui-manager" in installed_dists(mws.python)
    assert manager.manager_args(conf) == ["--enable-manager"]
    # the v3 clone is blocked by ComfyUI under v4: moved aside as the Manager disables, not deleted
    assert not clone.exists()
    assert (mws.comfyui / "custom_nodes" / ".disabled" / "ComfyUI-Manager" / ".git").is_dir()
    code, st = status(mws)
    assert code == 0, st
    assert st["components"]["comfyui_manager"]["version"] == "v4 comfyui-manager 4.0.5"
    assert st["manager"]["args"] == ["--enable-manager"]
    assert st["manager"]["config"].endswith("ComfyUI/user/__manager/config.ini")
    # the package going missing is seen by the probe (a pod stop wiping the venv)
    run_cli("install", *mws.args()).check_returncode()
    subprocess.run([str(mws.python), "-m", "pip", "uninstall", "-q", "-y", "comfyui-manager"],
                   check=True, capture_output=True)
    code, st = status(mws)
    assert st["components"]["comfyui_manager"]["state"] == "broken"
    assert "comfyui_manager not installed" in st["components"]["comfyui_manager"]["reason"]


@pytest.mark.slow
def test_back_to_v3_reenables_the_parked_clone(mws):
    """v4 moved the v3 clone to .disabled; going back to v3 (ComfyUI rolled back, or forced)
    moves that clone back instead of cloning again and leaving a copy in .disabled."""
    clone = mws.comfyui / "custom_nodes" / "ComfyUI-Manager"
    parked = mws.comfyui / "custom_nodes" / ".disabled" / "ComfyUI-Manager"
    install(mws)
    (clone / "sentinel.txt").write_text("the same clone\n")  # untracked: survives only a move
    _ship_v4(mws)
    install(mws)
    assert not clone.exists() and (parked / "sentinel.txt").is_file()
    mws.config["components"]["comfyui_manager"]["generation"] = "v3"
    mws.save()
    install(mws)
    assert (clone / "sentinel.txt").is_file(), "cloned again instead of re-enabled"
    assert not parked.exists()
    code, st = status(mws)
    assert code == 0 and st["components"]["comfyui_manager"]["state"] == "installed", st
    assert st["components"]["comfyui_manager"]["version"].startswith("v3 git ")


@pytest.mark.slow
def test_forcing_a_generation(mws):
    commit_files(mws.upstreams / "ComfyUI", {"manager_requirements.txt": PIN}, "manager v4")
    mws.config["components"]["comfyui_manager"]["generation"] = "v3"
    mws.config["comfyui"]["args"] = ["--port", "8188", "--enable-manager"]
    mws.save()
    install(mws)  # v3 forced on a v4-era ComfyUI: the clone, no flag
    conf = _conf(mws)
    assert manager.generation(conf) == ("v3", "forced by comfyui_manager.generation")
    assert (mws.comfyui / "custom_nodes" / "ComfyUI-Manager" / ".git").is_dir()
    assert manager.manager_args(conf) == []

    mws.config["components"]["comfyui_manager"].update(generation="v4", legacy_ui=True)
    mws.save()
    install(mws)
    # never twice: --enable-manager is already in comfyui.args
    assert manager.manager_args(_conf(mws)) == ["--enable-manager-legacy-ui"]

    # v4 forced on a ComfyUI that predates it: a failure naming the file, nothing passed
    git("reset", "-q", "--hard", "HEAD~1", cwd=mws.comfyui)
    proc = install(mws, "comfyui_manager", expect=1)
    assert "manager_requirements.txt" in proc.stdout + proc.stderr
    assert manager.manager_args(_conf(mws)) == []


def test_bad_generation_is_one_config_line(mws):
    mws.config["components"]["comfyui_manager"]["generation"] = "v5"
    mws.save()
    proc = run_cli("status", "--json", *mws.args())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "generation" in lines[0] and "auto, v3, v4" in lines[0], lines


def test_user_directory_and_default_config(tmp_path):
    conf = load(None, tmp_path)
    assert conf.components["comfyui_manager"].kind == "manager"
    assert manager.describe(conf)["generation"] == "v3"
    (tmp_path / "ComfyUI").mkdir()
    (tmp_path / "ComfyUI" / "manager_requirements.txt").write_text(PIN)
    assert manager.manager_args(conf) == ["--enable-manager"]
    (tmp_path / "pod-agent.yaml").write_text(json.dumps(
        {"comfyui": {"args": ["--user-directory", str(tmp_path / "u")]}}))
    conf = load(None, tmp_path)
    assert manager.snapshot_dir(conf) == tmp_path / "u" / "__manager" / "snapshots"


def test_node_changes_made_in_the_manager_ui_go_into_history(ws):
    """A node cloned, pulled or removed by someone else (the Manager's UI) is recorded as an
    external change with its commits, when the agent's user-node pass notices it."""
    from agent import history, usernodes
    from agent.kinds.base import Ctx

    conf = _conf(ws)
    up = ws.upstreams / "ManagerNode"
    make_repo(up, {"__init__.py": "", "requirements.txt": "podtest-nodec\n"})
    first = git("rev-parse", "HEAD", cwd=up)
    node = ws.comfyui / "custom_nodes" / "ManagerNode"
    node.parent.mkdir(parents=True)
    git("clone", "-q", up.as_uri(), str(node))
    changed, failures = usernodes.converge(Ctx(conf))
    assert changed == {"ManagerNode": "requirements installed"} and not failures
    second = commit_files(up, {"__init__.py": "X = 2\n"})
    git("pull", "-q", "--ff-only", cwd=node)  # "Update" in the Manager's UI
    assert usernodes.converge(Ctx(conf))[0]
    assert usernodes.converge(Ctx(conf)) == ({}, [])  # nothing new: nothing recorded
    (node.parent / ".disabled").mkdir()
    node.rename(node.parent / ".disabled" / "ManagerNode")  # "Disable" in the Manager's UI
    usernodes.converge(Ctx(conf))
    recs = [r for r in history.read(conf, "ManagerNode")]
    assert [(r["kind"], r["actor"], r["from"], r["to"], r["result"]) for r in recs] == [
        ("external", "external", "-", first[:12], "ok"),
        ("external", "external", first[:12], second[:12], "ok"),
        ("external", "external", second[:12], "-", "ok")], recs
    assert recs[1]["id"] and "pod-agent rollback" in recs[1]["detail"]  # a restore point


@pytest.mark.slow
def test_rollback_undoes_an_update_made_in_the_manager_ui(ws):
    """The pull is recorded as a restore point: `pod-agent rollback` puts the node back, with
    the packages its new requirements brought removed."""
    from agent import history, usernodes
    from agent.kinds.base import Ctx

    conf = _conf(ws)
    up = ws.upstreams / "ManagerNode"
    make_repo(up, {"__init__.py": ""})
    first = git("rev-parse", "HEAD", cwd=up)
    node = ws.comfyui / "custom_nodes" / "ManagerNode"
    node.parent.mkdir(parents=True)
    git("clone", "-q", up.as_uri(), str(node))
    usernodes.converge(Ctx(conf))
    second = commit_files(up, {"requirements.txt": "podtest-nodec\n"})
    git("pull", "-q", "--ff-only", cwd=node)  # "Update" in the Manager's UI
    assert usernodes.converge(Ctx(conf))[0] == {"ManagerNode": "requirements installed"}
    assert "podtest-nodec" in installed_dists(ws.python)
    rec = history.read(conf, "ManagerNode")[-1]
    assert rec["id"] and "pod-agent rollback" in rec["detail"], rec
    proc = run_cli("rollback", "--no-verify", *ws.args())
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert git("rev-parse", "HEAD", cwd=node) == first
    assert "podtest-nodec" not in installed_dists(ws.python)
    kinds = [(r["kind"], r["actor"]) for r in history.read(conf, "ManagerNode")]
    assert kinds[-1] == ("rollback", "cli") and ("external", "external") not in kinds[2:], kinds
    # the agent's next pass sees the rollback's move as the agent's own, not an external one
    usernodes.converge(Ctx(conf))
    assert usernodes.converge(Ctx(conf)) == ({}, [])
    after = history.read(conf, "ManagerNode")
    assert [r["kind"] for r in after[len(kinds):]] == [] and second != first, after
