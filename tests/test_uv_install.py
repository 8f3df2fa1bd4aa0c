"""uv installs into the volume's venv without touching what the venv inherits from the image
(agent/uvinstall.py): inherited packages pinned for the resolution and excluded from the install,
a conflict with an inherited version handled, pip when uv is missing."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import make_venv
from tests.helpers import build_wheel, run_cli, write_yaml


def own_dists(venv):
    site = next((venv / "lib").glob("python*")) / "site-packages"
    return sorted(n for n in os.listdir(site) if n.endswith(".dist-info"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """Local wheels, and an "image" interpreter (itself a venv, as /opt/venv images are) that
    has podtest-uvbase 1.0 installed, as a pod image has its CUDA torch."""
    root = tmp_path_factory.mktemp("uvimage")
    wheels = root / "wheels"
    build_wheel(wheels, "podtest-uvbase", "1.0")
    build_wheel(wheels, "podtest-uvbase", "2.0")
    build_wheel(wheels, "podtest-uvtop", "1.0", requires=["podtest-uvbase>=1.0"])
    build_wheel(wheels, "podtest-uvnew", "1.0", requires=["podtest-uvbase>=2"])
    python = make_venv(root / "image")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links",
                    str(wheels), "podtest-uvbase==1.0"], check=True)
    return python, wheels


def _setup(tmp_path, image, packages, installer="auto"):
    python, wheels = image
    ws = tmp_path / "ws"
    conf = write_yaml(tmp_path / "c.yaml", {
        "installer": installer,
        "installer_args": ["--no-index", "--find-links", str(wheels)],
        "defaults": {"retries": 0},
        "comfyui": {"base_python": str(python)},
        "components": {"deps": {"kind": "pip", "packages": packages}}})
    return ws, conf


def _install(ws, conf):
    return run_cli("install", "--workspace", str(ws), "--config", str(conf))


@pytest.mark.slow
def test_uv_keeps_an_inherited_dependency_inherited(tmp_path, image):
    ws, conf = _setup(tmp_path, image, ["podtest-uvtop"])
    proc = _install(ws, conf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = own_dists(ws / "venv")
    assert any(n.startswith("podtest_uvtop-1.0") for n in names), names
    # the dependency the image has was neither installed again nor upgraded in the venv
    assert not any(n.startswith("podtest_uvbase") for n in names), names
    log = (ws / "logs" / "install" / "deps.log").read_text()
    assert "uv, inherited packages excluded" in log and "installing with pip" not in log
    check = subprocess.run([str(ws / "venv" / "bin" / "python"), "-c",
                            "import podtest_uvbase, podtest_uvtop; print(podtest_uvbase.__file__)"],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "uvimage" in check.stdout, check.stdout + check.stderr


@pytest.mark.slow
def test_a_requirement_conflicting_with_the_image_fails_under_uv_and_uses_pip_under_auto(
        tmp_path, image):
    ws, conf = _setup(tmp_path, image, ["podtest-uvnew"], installer="uv")
    proc = _install(ws, conf)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    line = next(ln for ln in out.splitlines() if "podtest-uvbase>=2" in ln)
    assert "the image has podtest-uvbase 1.0" in line, out
    assert "Traceback" not in out
    assert not any(n.startswith("podtest_uv") for n in own_dists(ws / "venv"))

    # auto: the same conflict falls back to pip, which installs 2.0 into the venv over the
    # image's 1.0 (what pip always did), and the log says why
    _, conf = _setup(tmp_path, image, ["podtest-uvnew"], installer="auto")
    proc = _install(ws, conf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = own_dists(ws / "venv")
    assert any(n.startswith("podtest_uvbase-2.0") for n in names), names
    log = (ws / "logs" / "install" / "deps.log").read_text()
    assert ("uv: the requirements want podtest-uvbase>=2, the image has podtest-uvbase 1.0: "
            "installing with pip") in log


@pytest.mark.slow
def test_without_uv_pip_installs_and_says_so(tmp_path, image, monkeypatch):
    from agent import config as config_mod, uvinstall
    from agent.kinds.base import Ctx

    _, wheels = image
    python = make_venv(tmp_path / "venv")
    conf_path = write_yaml(tmp_path / "c.yaml", {
        "installer_args": ["--no-index", "--find-links", str(wheels)],
        "comfyui": {"venv": None, "python": str(python)},
        "components": {"deps": {"kind": "pip", "packages": ["podtest-uvbase==1.0"]}}})
    conf = config_mod.load(conf_path, tmp_path / "ws")
    ctx = Ctx(conf, gpu=False)
    monkeypatch.setattr(ctx, "uv", lambda: None)
    comp = conf.components["deps"]
    assert uvinstall.install(ctx, comp, ["podtest-uvbase==1.0"], "deps: install") == "pip"
    assert "installer: uv not found (on PATH or beside the agent's Python): installing with " \
           "pip" in comp.log.read_text()
    assert any(n.startswith("podtest_uvbase-1.0") for n in own_dists(tmp_path / "venv"))


def test_pip_options_the_uv_path_passes_on_and_one_it_refuses():
    from agent.uvinstall import UvUnusable, split_args

    files, specs, options = split_args([
        "-r", "a.txt", "--requirement=b.txt", "-rc.txt", "x>=1", "--no-index", "-f", "/w",
        "--extra-index-url=https://i/simple", "--pre", "-c", "k.txt"])
    assert files == ["a.txt", "b.txt", "c.txt"] and specs == ["x>=1"]
    assert options == ["--no-index", "--find-links", "/w", "--extra-index-url",
                       "https://i/simple", "--prerelease=allow", "-c", "k.txt"]
    with pytest.raises(UvUnusable, match="--user"):
        split_args(["x", "--user"])
