"""The target interpreter's distributions: recorded before an update, put back on rollback.

Putting back means: every distribution whose version changed or that went missing is installed
again at its recorded version (`name==version`, without dependencies: the recorded set is
complete), and every distribution the update added is uninstalled. pip, setuptools, wheel and
uv are left alone (the installers themselves).
"""

from __future__ import annotations

from pathlib import Path

from agent import drift, procs
from agent.model import AgentError

LEAVE = {"pip", "setuptools", "wheel", "uv"}


def snapshot(python: Path) -> dict[str, str]:
    found = drift.dists(python, timeout=60.0)
    if found is None:
        raise AgentError(f"cannot list the packages of {python}: no restore point can be "
                         "recorded, nothing was changed (is comfyui.python right?)")
    return found


def difference(current: dict[str, str], wanted: dict[str, str]) -> dict[str, dict]:
    """What restoring `wanted` does: {"install": {name: version}, "remove": {name: version}}."""
    install = {n: v for n, v in wanted.items()
               if n not in LEAVE and v and current.get(n) != v}
    remove = {n: v for n, v in current.items() if n not in LEAVE and n not in wanted}
    return {"install": dict(sorted(install.items())), "remove": dict(sorted(remove.items()))}


def describe(d: dict[str, dict], current: dict[str, str]) -> str:
    parts = [f"{n} {current.get(n, 'missing')} -> {v}" for n, v in d["install"].items()]
    parts += [f"{n} {v} removed" for n, v in d["remove"].items()]
    return ", ".join(parts[:8]) + (f" (+{len(parts) - 8} more)" if len(parts) > 8 else "")


def restore(conf, wanted: dict[str, str], log: Path, timeout: float = 3600.0) -> tuple[str, list[str]]:
    """Put the interpreter's distributions back to `wanted`. Returns (what was done, problems):
    each problem one line naming the package."""
    from agent.kinds.base import Ctx, InstallError
    from agent.model import Component

    python = conf.comfyui.python
    current = snapshot(python)
    d = difference(current, wanted)
    if not d["install"] and not d["remove"]:
        return "packages unchanged", []
    done = describe(d, current)
    problems: list[str] = []
    ctx = Ctx(conf)
    comp = Component(name="update", kind="pip", log=log, timeout=timeout, retries=0)
    log.parent.mkdir(parents=True, exist_ok=True)
    if d["remove"]:
        uv = ctx.uv() if conf.installer != "pip" else None
        if uv:
            cmd = [uv, "pip", "uninstall", "--python", str(python), *d["remove"]]
        else:
            cmd = [str(python), "-m", "pip", "uninstall", "-y", *d["remove"]]
        result = procs.run(cmd, log=log, timeout=timeout, title="rollback: uninstall added",
                           env=conf.installer_env)
        if not result.ok:
            problems.append("could not uninstall " + ", ".join(d["remove"])
                            + f" (exit {result.returncode}, log {log})")
    if d["install"]:
        pins = [f"{n}=={v}" for n, v in d["install"].items()]
        try:
            ctx.pip_install(comp, ["--no-deps", *pins], "rollback: reinstall")
        except InstallError:  # one by one, to name the ones that cannot be had
            for pin in pins:
                try:
                    ctx.pip_install(comp, ["--no-deps", pin], f"rollback: {pin}")
                except InstallError:
                    problems.append(f"could not reinstall {pin} (log {log})")
    after = drift.dists(python, timeout=60.0) or {}
    left = difference(after, wanted)
    if (left["install"] or left["remove"]) and not problems:
        problems.append("packages still differ: " + describe(left, after))
    return done, problems
