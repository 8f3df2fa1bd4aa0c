"""`pip` components: requirement files and/or package specs installed into comfyui.python."""

from __future__ import annotations

from typing import Any, Callable

from agent.kinds.base import Ctx, Problem, requirement_problems
from agent.model import Component, Marker, State
from agent.reqs import Req, files_digest, parse_spec, read_file, versions
from agent.pyenv import canonical

FIELDS = {
    "requirements": ("list[path]", ()),
    "packages": ("list[str]", ()),
    "args": ("list[str]", ()),
}


def validate(values: dict[str, Any], expand: Callable[[str], str]) -> dict[str, Any]:
    for index, spec in enumerate(values["packages"]):
        try:
            parse_spec(spec)
        except ValueError as exc:
            err = ValueError(f"packages: {exc}; quote the spec in YAML, e.g. \"transformers>=4.28.1\"")
            err.key = "packages"  # type: ignore[attr-defined]
            err.index = index  # type: ignore[attr-defined]
            raise err from None
    if not values["packages"] and not values["requirements"]:
        err = ValueError("a pip component needs 'requirements' and/or 'packages'")
        err.key = "packages"  # type: ignore[attr-defined]
        raise err
    return values


def _all_reqs(comp: Component) -> tuple[list[Req], list, list[str]]:
    reqs: list[Req] = []
    files = []
    missing = []
    for path in comp.spec["requirements"]:
        if not path.is_file():
            missing.append(str(path))
            continue
        more, read = read_file(path)
        reqs += more
        files += read
    for spec in comp.spec["packages"]:
        req = parse_spec(spec)
        reqs.append(Req(req, canonical(req.name), "package"))
    return reqs, files, missing


def inputs(comp: Component, ctx: Ctx) -> dict[str, Any]:
    _, files, missing = _all_reqs(comp)
    return {"requirements": files_digest(files) + ("+missing" if missing else ""),
            "packages": sorted(comp.spec["packages"]), "args": list(comp.spec["args"])}


def probe(comp: Component, ctx: Ctx, marker: Marker | None) -> Problem | None:
    reqs, _, missing = _all_reqs(comp)
    if missing:
        return Problem(State.BROKEN, f"requirements file {missing[0]} is missing")
    problems = requirement_problems(ctx, reqs)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Problem(State.BROKEN, problems[0] + more)
    return None


def install(comp: Component, ctx: Ctx, marker: Marker | None = None) -> dict[str, str]:
    _, _, missing = _all_reqs(comp)
    if missing:
        from agent.kinds.base import InstallError

        raise InstallError(f"requirements file {missing[0]} does not exist")
    args: list[str] = []
    for path in comp.spec["requirements"]:
        args += ["-r", str(path)]
    args += list(comp.spec["packages"]) + list(comp.spec["args"])
    ctx.pip_install(comp, args, f"{comp.name}: install")
    return current_meta(comp, ctx)


def current_meta(comp: Component, ctx: Ctx) -> dict[str, str]:
    reqs, _, _ = _all_reqs(comp)
    try:
        text = versions(reqs, ctx.pyenv())
    except Exception:  # noqa: BLE001 - the version line is informative only
        text = ""
    if len(text) > 300:
        text = text[:297] + "..."
    return {"version": text or "-"}
