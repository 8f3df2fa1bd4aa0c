"""The volume's virtualenv: created on demand, reusing the image interpreter's packages."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import make_venv
from tests.helpers import run_cli, write_yaml


def site_packages(venv):
    return next((venv / "lib").glob("python*")) / "site-packages"


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
