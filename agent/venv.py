"""The volume's virtualenv, built so that an interruption at any instant leaves either a whole
venv or one that the next run finds incomplete and repairs.

`python -m venv` writes pyvenv.cfg, the interpreter links and pip in several steps; a pod stop
between them leaves a venv whose `bin/python` exists but which lacks pip or the configured
inheritance. So existence proves nothing: the venv is complete only when its completion record
(written last, atomically) is there, pyvenv.cfg inherits the system site-packages, and the
interpreter runs (and imports pip when pip is the installer). An incomplete venv is repaired in
place (`venv` over an existing folder keeps the installed packages); one that still does not run
is moved aside (never deleted) and created anew.
"""

from __future__ import annotations

import configparser
import json
import time
from pathlib import Path

from agent import procs
from agent.markers import atomic_write

DONE = "pod-agent-venv.json"  # the completion record, written last
PTH = "_pod_agent_base_venv.pth"
_SITES = ("import json, site, sys; "
          "print(json.dumps([sys.prefix != sys.base_prefix, site.getsitepackages()]))")


class VenvError(Exception):
    pass


def inherits_system_site(venv: Path) -> bool:
    try:
        text = "[v]\n" + (venv / "pyvenv.cfg").read_text()
    except (OSError, UnicodeDecodeError):
        return False
    parser = configparser.ConfigParser()
    try:
        parser.read_string(text)
    except configparser.Error:
        return False
    return parser.get("v", "include-system-site-packages", fallback="false").lower() == "true"


def problem(venv: Path, python: Path, need_pip: bool) -> str | None:
    """Why the venv is not complete, or None. Costs one short interpreter start."""
    if not python.exists():
        return f"{python} does not exist"
    if not inherits_system_site(venv):
        return "pyvenv.cfg does not inherit the system site-packages"
    if not (venv / DONE).is_file():
        return "its creation did not finish"
    code, out = procs.quick([str(python), "-c", "import pip" if need_pip else "pass"], 60)
    if code != 0:
        last = (out.strip().splitlines() or ["no output"])[-1]
        return ("pip is not importable" if "pip" in last else "the interpreter does not run") \
            + f" ({last[:120]})"
    return None


def ensure(venv: Path, python: Path, base: str, log: Path, need_pip: bool) -> None:
    """Make the venv complete: nothing when it is, a repair in place, else a fresh one."""
    why = problem(venv, python, need_pip)
    if why is None:
        return
    _note(log, f"virtualenv {venv} is incomplete ({why}): repairing it in place")
    _build(venv, python, base, log)
    why = problem(venv, python, need_pip)
    if why is None:
        return
    aside = venv.with_name(f"{venv.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    _note(log, f"virtualenv {venv} still incomplete ({why}): moved aside to {aside}; "
               "creating a new one")
    venv.rename(aside)
    _build(venv, python, base, log)
    why = problem(venv, python, need_pip)
    if why is not None:
        raise VenvError(f"could not create the virtualenv {venv} with {base}: {why}")


def _note(log: Path, text: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def _build(venv: Path, python: Path, base: str, log: Path) -> None:
    (venv / DONE).unlink(missing_ok=True)
    result = procs.run([base, "-m", "venv", "--system-site-packages", str(venv)],
                       log=log, timeout=600, title="create virtualenv")
    if not result.ok or not python.exists():
        return  # problem() says what is missing
    _inherit_from_venv(base, python)
    atomic_write(venv / DONE, json.dumps({"base": base, "created": time.time()}) + "\n")


def _inherit_from_venv(base: str, python: Path) -> None:
    """--system-site-packages only reaches the *base* interpreter's packages. When the image's
    Python is itself a venv (/opt/venv, conda), a .pth file makes its packages (its CUDA torch)
    visible too, after the new venv's own, as system site-packages would be."""
    code, out = procs.quick([base, "-c", _SITES], 30)
    mine = procs.quick([str(python), "-c", _SITES], 30)
    try:
        is_venv, sites = json.loads(out.strip().splitlines()[-1])
        _, own_sites = json.loads(mine[1].strip().splitlines()[-1])
    except (ValueError, IndexError):
        return
    if code != 0 or not is_venv or not own_sites:
        return
    extra = [s for s in sites if s not in own_sites]
    if extra:
        atomic_write(Path(own_sites[0], PTH), "\n".join(extra) + "\n")
