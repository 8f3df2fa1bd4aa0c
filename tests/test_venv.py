"""The volume's virtualenv: created on demand, reusing the image interpreter's packages."""

from __future__ import annotations

import pytest

import json
import os
import re
import shutil
import subprocess
import sys

from agent import uvinstall
from agent.venv import PTH, inheritance_problem
from tests.conftest import make_venv
from tests.helpers import run_cli, write_yaml


def site_packages(venv):
    return next((venv / "lib").glob("python*")) / "site-packages"


def _py(python, code):
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def system_layer():
    """The site-packages folders of the real interpreter under every venv made here, and the
    distributions in them (what a venv made from a venv leaked through --system-site-packages)."""
    home = os.path.join(sys.base_prefix, "bin", "python3")
    sites = _py(home, "import json, site; print(json.dumps(site.getsitepackages()))")
    names = set()
    for s in sites:
        if os.path.isdir(s):
            names |= {re.sub(r"[-_.]+", "-", n[:-10].partition("-")[0]).lower()
                      for n in os.listdir(s) if n.endswith(".dist-info")}
    return [os.path.realpath(s) for s in sites], names


def real_path(python):
    return [os.path.realpath(p) for p in _py(python, "import json, sys; print(json.dumps(sys.path))")
            if p]


@pytest.mark.slow
def test_venv_created_on_demand_and_inherits_the_image_packages(tmp_path, wheels):
    # The "image" interpreter is itself a venv (as /opt/venv images are) holding podtest-alpha.
    image = make_venv(tmp_path / "image")
    subprocess.run([str(image), "-m", "pip", "install", "-q", "--no-index", "--find-links",
                    str(wheels), "podtest-alpha==1.0"], check=True)
    ws = tmp_path / "ws"
    conf = write_yaml(tmp_path / "c.yaml", {
        "installer_args": ["--no-index", "--find-links", str(wheels)],
        "comfyui": {"base_python": str(image)},
        "components": {"deps": {"kind": "pip", "packages": ["podtest-alpha>=1.0",
                                                            "podtest-beta"]}}})
    proc = run_cli("install", "--workspace", str(ws), "--config", str(conf))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    venv = ws / "venv"
    # a venv base is passed on by a .pth (its own base's site-packages come through it only
    # because this image includes them: both layers are seen, as the image sees them)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    assert (site_packages(venv) / PTH).is_file()
    names = os.listdir(site_packages(venv))
    assert any(n.startswith("podtest_beta-1.0") for n in names)
    # alpha was reused from the image interpreter, not installed again into the volume's venv
    assert not any(n.startswith("podtest_alpha") for n in names)
    sites, system_names = system_layer()
    assert set(sites) & set(real_path(venv / "bin" / "python"))
    layout = uvinstall.layout(venv / "bin" / "python")
    assert "podtest-alpha" in layout.inherited
    assert system_names <= set(layout.inherited) | set(layout.own)
    status = run_cli("status", "--json", "--workspace", str(ws), "--config", str(conf))
    assert status.returncode == 0, status.stdout


def _config(tmp_path, wheels, packages):
    return write_yaml(tmp_path / "c.yaml", {
        "installer": "pip",
        "installer_args": ["--no-index", "--find-links", str(wheels)],
        "defaults": {"retries": 0},
        "components": {"deps": {"kind": "pip", "packages": packages}}})


@pytest.mark.slow
def test_a_venv_cut_short_is_repaired_in_place(tmp_path, wheels):
    """What a pod stop during `python -m venv` leaves: bin/python exists, but no pip and no
    inheritance. Existence is not completeness: the next install repairs it."""
    ws = tmp_path / "ws"
    venv = ws / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    conf = _config(tmp_path, wheels, ["podtest-beta"])
    proc = run_cli("install", "--workspace", str(ws), "--config", str(conf))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # it inherits what the default base_python (python3 on PATH) sees
    assert inheritance_problem(venv, shutil.which("python3")) is None
    assert (venv / "pod-agent-venv.json").is_file()
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import pip, podtest_beta"])
    assert check.returncode == 0
    log = (ws / "logs" / "install" / "deps.log").read_text()
    assert "is incomplete" in log and "repairing it in place" in log


@pytest.mark.slow
def test_repair_keeps_installed_packages_and_a_complete_venv_is_left_alone(tmp_path, wheels):
    ws = tmp_path / "ws"
    conf = _config(tmp_path, wheels, ["podtest-beta"])
    assert run_cli("install", "--workspace", str(ws), "--config", str(conf)).returncode == 0
    venv = ws / "venv"
    (venv / "pod-agent-venv.json").unlink()  # as if cut short after the packages went in
    conf = _config(tmp_path, wheels, ["podtest-beta", "podtest-gamma"])
    assert run_cli("install", "--workspace", str(ws), "--config", str(conf)).returncode == 0
    names = os.listdir(site_packages(venv))
    assert any(n.startswith("podtest_beta-1.0") for n in names)  # kept through the repair
    assert any(n.startswith("podtest_gamma-1.0") for n in names)
    before = (venv / "pyvenv.cfg").stat().st_mtime_ns
    conf = _config(tmp_path, wheels, ["podtest-beta", "podtest-gamma", "podtest-delta"])
    assert run_cli("install", "--workspace", str(ws), "--config", str(conf)).returncode == 0
    assert (venv / "pyvenv.cfg").stat().st_mtime_ns == before  # complete: not rebuilt


@pytest.mark.slow
def test_a_venv_base_without_system_site_passes_on_only_its_own_and_old_venvs_are_repaired(
        tmp_path, wheels):
    """/opt/venv-like base made without system site-packages: the volume's venv sees the base's
    packages and not those of the interpreter under the base (nor pins them for uv). A venv built
    the old way (--system-site-packages from the venv base: that lower layer leaked) is repaired
    in place, keeping its own packages."""
    image = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(image)], check=True)
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--find-links", str(wheels), "--target"]
    subprocess.run([*install, str(site_packages(image)), "podtest-alpha==1.0"], check=True)
    base = image / "bin" / "python"
    ws = tmp_path / "ws"
    venv = ws / "venv"
    # the old way, complete with its record, and one package of its own
    subprocess.run([str(base), "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True)
    (site_packages(venv) / PTH).write_text(str(site_packages(image)) + "\n")
    (venv / "pod-agent-venv.json").write_text(json.dumps({"base": str(base)}))
    subprocess.run([*install, str(site_packages(venv)), "podtest-beta==1.0"], check=True)
    sites, system_names = system_layer()
    assert set(sites) & set(real_path(venv / "bin" / "python"))  # the leak, as it was
    conf = write_yaml(tmp_path / "c.yaml", {
        "installer": "pip", "defaults": {"retries": 0},
        "installer_args": ["--no-index", "--find-links", str(wheels)],
        "comfyui": {"base_python": str(base)},
        "components": {"deps": {"kind": "pip", "packages": ["podtest-alpha", "podtest-gamma"]}}})
    proc = run_cli("install", "--workspace", str(ws), "--config", str(conf))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (ws / "logs" / "install" / "deps.log").read_text()
    assert "inherits the system site-packages" in log and "repairing it in place" in log
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    python = venv / "bin" / "python"
    assert not set(sites) & set(real_path(python))
    names = os.listdir(site_packages(venv))
    assert any(n.startswith("podtest_beta-1.0") for n in names)  # kept through the repair
    assert any(n.startswith("podtest_gamma-1.0") for n in names)
    assert not any(n.startswith("podtest_alpha") for n in names)  # the image's, reused
    subprocess.run([str(python), "-c", "import podtest_alpha, podtest_beta, pip"], check=True)
    layout = uvinstall.layout(python)
    assert "podtest-alpha" in layout.inherited
    leaked = (system_names & set(layout.inherited)) - set(layout.own)
    assert not leaked, sorted(leaked)[:5]
    # repaired: the next install leaves it alone
    before = (venv / "pyvenv.cfg").stat().st_mtime_ns
    assert run_cli("install", "--workspace", str(ws), "--config", str(conf)).returncode == 0
    assert (venv / "pyvenv.cfg").stat().st_mtime_ns == before
