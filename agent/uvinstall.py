"""Install into comfyui.python with uv's speed, without touching what the venv inherits.

The volume's venv sees the image's packages (`--system-site-packages`, or the .pth file written
for an image whose Python is itself a venv), but uv only looks at the venv's own site-packages:
asked for `torch`, it downloads and installs a second torch into the venv although the image
has one (astral-sh/uv#4466, #7358). So, when the target interpreter inherits packages:

1. `uv pip compile` resolves the same requirements with every inherited distribution pinned to
   the version the image has (`-c`, one `name==version` line each, the local label dropped:
   `2.4.0+cu124` is pinned as `==2.4.0`, which PEP 440 matches with any local label). The
   resolution keeps the image's versions and picks versions of everything else that fit them.
   Only metadata is fetched for the inherited packages, never their wheels.
2. `uv pip install` installs the same requirements constrained to that resolution, with every
   inherited name excluded (`--excludes`): uv neither downloads nor installs them.
3. The venv's own site-packages is listed again: an inherited name that appeared there is a
   duplicate. It is uninstalled from the venv (only the venv's copy) and the component is
   installed with pip instead.

`installer: auto` falls back to pip, with one line in the component's log saying why, when uv
is not there, when an option is not one this path knows, when the resolution with the image's
versions fails (for example a requirement wants a newer torch than the image has: pip then
installs that newer release into the venv, as it always did), or when a duplicate was found.
`installer: uv` never falls back: those cases are an install failure with that one line.
`installer: pip` always uses pip.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from agent import procs

if TYPE_CHECKING:
    from agent.kinds.base import Ctx
    from agent.model import Component

# The target interpreter's distributions, split into its own (under sys.prefix) and inherited
# (every other sys.path entry: the base interpreter's site-packages, the image venv's through
# the .pth, the user site). The first on sys.path wins, as for imports: a package the venv has
# itself shadows the image's and is the venv's.
_LISTING = r"""
import json, os, sys
prefix = os.path.realpath(sys.prefix)
own, inherited = {}, {}
for p in sys.path:
    if not p:
        continue
    try:
        names = sorted(os.listdir(p))
    except OSError:
        continue
    real = os.path.realpath(p)
    mine = real == prefix or real.startswith(prefix + os.sep)
    for n in names:
        if n.endswith('.dist-info'):
            name, _, ver = n[:-10].partition('-')
        elif n.endswith('.egg-info'):
            parts = n[:-9].split('-')
            name, ver = parts[0], (parts[1] if len(parts) > 1 else '')
        else:
            continue
        key = name.lower().replace('_', '-').replace('.', '-')
        while '--' in key:
            key = key.replace('--', '-')
        if key in own or key in inherited:
            continue
        (own if mine else inherited)[key] = ver
print(json.dumps({'own': own, 'inherited': inherited}))
"""

# Options the two-step uv path passes on (pip spelling -> uv spelling); anything else in a
# component's `args` or in `installer_args` sends that install to pip (auto) or fails (uv).
_VALUED = {"-i": "--index-url", "--index-url": "--index-url",
           "--extra-index-url": "--extra-index-url", "-f": "--find-links",
           "--find-links": "--find-links", "-c": "-c", "--constraint": "-c"}
_FLAGS = {"--no-index": "--no-index", "--pre": "--prerelease=allow",
          "--no-build-isolation": "--no-build-isolation", "-q": "-q", "--quiet": "-q",
          "--no-deps": "--no-deps"}  # both `uv pip compile` and `install` take it


_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?==[^\s;@]+(\s*;.*)?$")

_PIN_EXTRAS = re.compile(r"\[[^\]]*\](?===)")  # constraints carry no extras


class UvUnusable(Exception):
    """Why this install cannot go through uv (one line)."""


@dataclass(frozen=True)
class Layout:
    own: dict[str, str]
    inherited: dict[str, str]  # not shadowed by the venv's own


def layout(python: Path, timeout: float = 60) -> Layout:
    code, out = procs.quick([str(python), "-c", _LISTING], timeout)
    try:
        data = json.loads(out.strip().splitlines()[-1])
        return Layout(dict(data["own"]), dict(data["inherited"]))
    except (ValueError, IndexError, KeyError, TypeError):
        last = (out.strip().splitlines() or ["no output"])[-1][:160]
        raise UvUnusable(f"cannot list the packages of {python} ({last})") from None


def pins(inherited: dict[str, str]) -> list[str]:
    """name==version for each inherited distribution (local label dropped); versions that are
    not PEP 440 are left unpinned (their name is still excluded from the install)."""
    from packaging.version import InvalidVersion, Version

    lines = []
    for name, ver in sorted(inherited.items()):
        try:
            lines.append(f"{name}=={Version(ver).public}")
        except InvalidVersion:
            continue
    return lines


def split_args(args: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(requirement files, package specs, uv options) from a pip argument list; raises
    UvUnusable for an option the uv path does not know."""
    files: list[str] = []
    specs: list[str] = []
    options: list[str] = []
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            specs.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name in ("-r", "--requirement") or (arg.startswith("-r") and len(arg) > 2):
            if arg.startswith("-r") and len(arg) > 2 and not eq:
                files.append(arg[2:])
            elif eq:
                files.append(value)
            elif i < len(items):
                files.append(items[i])
                i += 1
            continue
        if name in _VALUED:
            if not eq:
                if i >= len(items):
                    raise UvUnusable(f"option {name} has no value")
                value = items[i]
                i += 1
            options += [_VALUED[name], value]
            continue
        if name in _FLAGS and not eq:
            options.append(_FLAGS[name])
            continue
        raise UvUnusable(f"option {arg[:60]} is not one the uv path passes on")
    return files, specs, options


_EXCLUDES: dict[str, bool] = {}


def knows_excludes(uv: str) -> bool:
    """Whether this uv's `pip install` takes --excludes (asked once per binary)."""
    if uv not in _EXCLUDES:
        code, out = procs.quick([uv, "pip", "install", "--help"], 30)
        _EXCLUDES[uv] = code == 0 and "--excludes" in out
    return _EXCLUDES[uv]


def _note(log: Path, text: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} installer: {text}\n")


def _error_lines(log: Path, since: int) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(since)
            text = fh.read(65536).decode("utf-8", "replace")
    except OSError:
        return ""
    return text


def conflict_reason(text: str, inherited: dict[str, str]) -> str:
    """One line from uv's failed resolution: which inherited package stood in the way, with
    the image's version and the wanted one, when uv's explanation names them."""
    for name, ver in sorted(inherited.items()):
        pat = re.escape(name).replace(r"\-", "[-_.]")
        if not re.search(rf"(?<![\w-]){pat}==", text, re.I):
            continue
        for m in re.finditer(rf"(?<![\w-]){pat}\s*((?:[<>!~]=?|==)\s*[\w.*+!-]+"
                             rf"(?:\s*,\s*(?:[<>!~]=?|==)\s*[\w.*+!-]+)*)", text, re.I):
            spec = m.group(1).replace(" ", "")
            try:
                from packaging.version import Version

                if spec.startswith("==") and Version(spec[2:]) == Version(
                        Version(ver).public):
                    continue
            except Exception:  # noqa: BLE001 - only a comparison for a clearer line
                pass
            return f"the requirements want {name}{spec}, the image has {name} {ver}"
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.startswith("===")]
    picked = [ln for ln in lines if ln.startswith(("error", "×", "cause", "╰", "Because"))]
    line = " ".join((picked or lines or ["no output"])[:3])
    return f"uv could not resolve with the image's versions pinned: {line[:220]}"


def install(ctx: "Ctx", comp: "Component", args: Sequence[str], title: str) -> str:
    """Install args (pip's argument list) into ctx.python; returns the installer used:
    "pip", "uv" (a venv that inherits nothing) or "uv+pins"."""
    from agent.kinds.base import InstallError

    conf = ctx.config
    python = ctx.python
    log = comp.log
    deadline = time.monotonic() + comp.timeout
    extra = list(conf.installer_args)

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    def run(cmd: list[str], what: str) -> procs.Result:
        return procs.run(cmd, log=log, timeout=left(), title=what, env=conf.installer_env)

    def failed(result: procs.Result, what: str) -> InstallError:
        why = "timed out" if result.timed_out else f"exit {result.returncode}"
        return InstallError(f"{what} failed ({why})")

    def pip(reason: str | None) -> str:
        if reason:
            _note(log, f"{reason}: installing with pip")
        result = run([str(python), "-m", "pip", "install", *args, *extra], title)
        if not result.ok:
            raise failed(result, title)
        return "pip"

    choice = conf.installer
    if choice == "pip":
        return pip(None)
    uv = ctx.uv()
    if not uv:
        if choice == "uv":
            raise InstallError("installer: uv was asked for but no uv binary is on PATH")
        return pip("uv not found (on PATH or beside the agent's Python)")

    def give_up(reason: str) -> str:
        if choice == "uv":
            raise InstallError(f"{title}: {reason} (installer: uv; `installer: auto` would "
                               "install it with pip)")
        return pip(f"uv: {reason}")

    try:
        before = layout(python)
    except UvUnusable as exc:
        return give_up(str(exc))
    if not before.inherited:
        result = run([uv, "pip", "install", "--python", str(python), *args, *extra], title)
        if not result.ok:
            raise failed(result, title)
        return "uv"
    try:
        files, specs, options = split_args([*args, *extra])
    except UvUnusable as exc:
        return give_up(str(exc))
    if not knows_excludes(uv):
        return give_up(f"{uv} is too old for this path (its `pip install` has no --excludes: "
                       "upgrade uv)")

    with tempfile.TemporaryDirectory(prefix="pod-agent-uv-") as tmp:
        work = Path(tmp)
        (work / "inherited.txt").write_text("\n".join(pins(before.inherited)) + "\n")
        (work / "excluded.txt").write_text("\n".join(sorted(before.inherited)) + "\n")
        sources = list(files)
        if specs:
            (work / "packages.in").write_text("\n".join(specs) + "\n")
            sources.append(str(work / "packages.in"))
        resolved = work / "resolved.txt"
        common = ["--python", str(python), "--index-strategy", "unsafe-best-match", *options]
        start = log.stat().st_size if log.exists() else 0
        result = run([uv, "pip", "compile", "--quiet", "--no-header", "--no-annotate",
                      "-c", str(work / "inherited.txt"), "-o", str(resolved), *common,
                      *sources], f"{title} (uv: resolve with the image's versions pinned)")
        if result.timed_out:
            raise failed(result, title)
        if not result.ok or not resolved.is_file():
            return give_up(conflict_reason(_error_lines(log, start), before.inherited))
        # the resolution's name==version pins (URL and editable lines are not constraints:
        # the requirements that named them still do)
        pinned = work / "pinned.txt"
        pinned.write_text("".join(_PIN_EXTRAS.sub("", ln.strip()) + "\n"
                                  for ln in resolved.read_text().splitlines()
                                  if _PIN.match(ln.strip())))
        result = run([uv, "pip", "install", *common, "-c", str(pinned),
                      "--excludes", str(work / "excluded.txt"),
                      *[a for f in files for a in ("-r", f)], *specs],
                     f"{title} (uv, inherited packages excluded)")
    if result.timed_out:
        raise failed(result, title)
    if not result.ok:
        return give_up(f"uv pip install failed (exit {result.returncode})")
    try:
        after = layout(python)
    except UvUnusable as exc:
        return give_up(str(exc))
    dups = sorted(n for n in after.own if n in before.inherited and n not in before.own)
    if dups:
        shown = ", ".join(f"{n} {after.own[n]} (the image has {before.inherited[n]})"
                          for n in dups[:5]) + (f" and {len(dups) - 5} more" if len(dups) > 5
                                                else "")
        run([uv, "pip", "uninstall", "--python", str(python), *dups],
            f"{title} (uv: remove what shadows the image's packages)")
        return give_up(f"it put into the venv what the venv inherits: {shown}; removed")
    return "uv+pins"
