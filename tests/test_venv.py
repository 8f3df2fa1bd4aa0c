"""The volume's virtualenv: created on demand, reusing the image interpreter's packages."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys

from tests.conftest import make_venv
from tests.helpers import run_cli, write_yaml


def site_packages(venv):
    return next((venv / "lib").glob("python*")) / "site-packages"


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
    assert (venv / "pyvenv.cfg").read_text().count("include-system-site-packages = true") == 1
    names = os.listdir(site_packages(venv))
    assert any(n.startswith("podtest_beta-1.0") for n in names)
    # alpha was reused from the image interpreter, not installed again into the volume's venv
    assert not any(n.startswith("podtest_alpha") for n in names)
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
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
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
