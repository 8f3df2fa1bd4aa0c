"""Pure planning: (desired components, observed states) -> ordered steps. No I/O."""

from __future__ import annotations

from typing import Iterable, Mapping

from agent.model import Action, Component, Observed, State, Step


def closure(components: Mapping[str, Component], names: Iterable[str]) -> set[str]:
    """The named components and everything they depend on."""
    out: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in out:
            continue
        out.add(name)
        stack.extend(components[name].depends_on)
    return out


def step_for(comp: Component, obs: Observed, force: bool) -> Step:
    deps = comp.depends_on
    if obs.state == State.DISABLED:
        return Step(comp.name, Action.DISABLED, obs.reason, deps)
    if obs.state == State.SKIPPED:
        return Step(comp.name, Action.SKIP_NO_GPU, obs.reason, deps)
    if obs.state == State.INSTALLED:
        if force:
            return Step(comp.name, Action.REINSTALL, "forced", deps, forced=True)
        if obs.legacy:
            return Step(comp.name, Action.UPGRADE_MARKER, "legacy marker, probe passed", deps)
        return Step(comp.name, Action.SKIP, "", deps)
    if obs.state in (State.MISSING, State.FAILED, State.INSTALLING):
        return Step(comp.name, Action.INSTALL, obs.reason, deps)
    return Step(comp.name, Action.REINSTALL, obs.reason, deps)


def make(order: Iterable[str], components: Mapping[str, Component],
         observed: Mapping[str, Observed], targets: set[str] | None = None,
         force: bool = False, forced: set[str] | None = None) -> list[Step]:
    """Steps in dependency order for `targets` (all when None), derived components excluded.

    `force` reinstalls the components in `forced` (default: the targets)."""
    forced = forced if forced is not None else (targets if targets is not None else None)
    steps = []
    for name in order:
        comp = components[name]
        if comp.kind == "overall" or (targets is not None and name not in targets):
            continue
        this_forced = force and (forced is None or name in forced)
        steps.append(step_for(comp, observed[name], this_forced))
    return steps
