"""The volume's virtualenv, built so that an interruption at any instant leaves either a whole
venv or one that the next run finds incomplete and repairs.

`python -m venv` writes pyvenv.cfg, the interpreter links and pip in several steps; a pod stop
between them leaves a venv whose `bin/python` exists but which lacks pip or the configured
inheritance. So existence proves nothing: the venv is complete only when its completion record
(written last, atomically) is there, it inherits what the base interpreter sees (below), and the
interpreter runs (and imports pip when pip is the installer). An incomplete venv is repaired in
place (`venv` over an existing folder keeps the installed packages); one that still does not run
is moved aside (never deleted) and created anew.

Inheritance: the venv sees exactly the site-packages folders the base interpreter sees, after its
own. A plain interpreter (the system's, conda's) is inherited with `--system-site-packages`. An
interpreter that is itself a venv cannot be: a venv made from it points at *its* base, so
`--system-site-packages` would expose that base's packages, which the venv base may not see
(`include-system-site-packages = false`). So a venv base gives a venv without system
site-packages plus a .pth file that adds the base's own site folders (`site.addsitedir`, so the
.pth files in them run as they do for the base); only a venv base that includes its own system
site-packages passes those on, because then they are among its site folders. A venv built
otherwise (by an older agent: system site-packages of the venv base's base) is incomplete and
repaired in place.
"""

from __future__ import annotations

import configparser
import json
import os
import time
from pathlib import Path

from agent import procs
from agent.markers import atomic_write

DONE = "pod-agent-venv.json"  # the completion record, written last
PTH = "_pod_agent_base_venv.pth"
# [is a venv, the site folders it sees, in sys.path order (user site included when enabled)]
_BASE = r"""
import json, os, site, sys
dirs = list(site.getsitepackages())
if site.ENABLE_USER_SITE:
    dirs.append(site.getusersitepackages())
want = {os.path.realpath(d) for d in dirs}
seen = []
for p in sys.path:
    if p and p not in seen and os.path.realpath(p) in want:
        seen.append(p)
print(json.dumps([sys.prefix != sys.base_prefix, seen]))
"""
_OWN = "import json, site; print(json.dumps(site.getsitepackages()))"


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


def base_sites(base: str) -> list[str] | None:
    """The site folders to pass on from a base that is itself a venv, [] for a plain one
    (inherited with --system-site-packages), None when the base does not answer."""
    code, out = procs.quick([base, "-E", "-c", _BASE], 60)
    try:
        is_venv, sites = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError, TypeError):
        return None
    if code != 0 or not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        return None
    return sites if is_venv else []


def pth_text(sites: list[str]) -> str:
    return "".join(f"import site; site.addsitedir({s!r})\n" for s in sites)


def _pth_files(venv: Path) -> list[Path]:
    found: dict[str, Path] = {}
    for p in venv.glob(f"lib*/python*/site-packages/{PTH}"):
        found.setdefault(os.path.realpath(p), p)
    return list(found.values())


def inheritance_problem(venv: Path, base: str) -> str | None:
    """Why the venv does not inherit what `base` sees, or None (also when the base does not
    run: then nothing can be said, and a working venv is left alone)."""
    sites = base_sites(base)
    if sites is None:
        return None
    pths = _pth_files(venv)
    if not sites:
        if not inherits_system_site(venv):
            return "pyvenv.cfg does not inherit the system site-packages"
        if pths:
            return f"it has {PTH} although {base} is not a venv"
        return None
    if inherits_system_site(venv):
        return (f"it inherits the system site-packages of {base}'s own base "
                f"instead of what {base} sees")
    want = pth_text(sites)
    for p in pths:
        try:
            if p.read_text() == want:
                return None
        except (OSError, UnicodeDecodeError):
            pass
    return f"its {PTH} does not name the site-packages {base} sees"


def problem(venv: Path, python: Path, need_pip: bool, base: str | None = None) -> str | None:
    """Why the venv is not complete, or None. Costs one or two short interpreter starts."""
    if not python.exists():
        return f"{python} does not exist"
    if base is None and not inherits_system_site(venv):
        return "pyvenv.cfg does not inherit the system site-packages"
    if not (venv / DONE).is_file():
        return "its creation did not finish"
    if base is not None:
        why = inheritance_problem(venv, base)
        if why is not None:
            return why
    code, out = procs.quick([str(python), "-c", "import pip" if need_pip else "pass"], 60)
    if code != 0:
        last = (out.strip().splitlines() or ["no output"])[-1]
        return ("pip is not importable" if "pip" in last else "the interpreter does not run") \
            + f" ({last[:120]})"
    return None


def ensure(venv: Path, python: Path, base: str, log: Path, need_pip: bool) -> None:
    """Make the venv complete: nothing when it is, a repair in place, else a fresh one."""
    why = problem(venv, python, need_pip, base)
    if why is None:
        return
    _note(log, f"virtualenv {venv} is incomplete ({why}): repairing it in place")
    _build(venv, python, base, log)
    why = problem(venv, python, need_pip, base)
    if why is None:
        return
    aside = venv.with_name(f"{venv.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    _note(log, f"virtualenv {venv} still incomplete ({why}): moved aside to {aside}; "
               "creating a new one")
    venv.rename(aside)
    _build(venv, python, base, log)
    why = problem(venv, python, need_pip, base)
    if why is not None:
        raise VenvError(f"could not create the virtualenv {venv} with {base}: {why}")


def _note(log: Path, text: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def _build(venv: Path, python: Path, base: str, log: Path) -> None:
    (venv / DONE).unlink(missing_ok=True)
    sites = base_sites(base)
    flags = [] if sites else ["--system-site-packages"]
    result = procs.run([base, "-m", "venv", *flags, str(venv)],
                       log=log, timeout=600, title="create virtualenv")
    if not result.ok or not python.exists():
        return  # problem() says what is missing
    for old in _pth_files(venv):
        old.unlink(missing_ok=True)
    if sites:
        code, out = procs.quick([str(python), "-c", _OWN], 30)
        try:
            own = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return
        if code != 0 or not own:
            return
        atomic_write(Path(own[0], PTH), pth_text(sites))
    atomic_write(venv / DONE, json.dumps({"base": base, "inherits": sites or "system",
                                          "created": time.time()}) + "\n")
