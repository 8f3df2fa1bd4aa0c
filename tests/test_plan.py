"""plan.make is pure: (desired, observed) -> steps. Table-driven, no I/O."""

from __future__ import annotations

import pytest

from agent.model import Action, Component, Observed, State, Step
from agent.plan import closure, make


def comp(name: str, *deps: str, kind: str = "command") -> Component:
    return Component(name=name, kind=kind, depends_on=tuple(deps))


COMPONENTS = {
    "core": comp("core"),
    "main": comp("main", "core"),
    "extra": comp("extra", "main"),
    "nodes": comp("nodes", "core", "main"),
    "lone": comp("lone"),
    "overall": comp("overall", kind="overall"),
}
ORDER = ["core", "main", "extra", "nodes", "lone", "overall"]

INSTALLED = Observed(State.INSTALLED)


# (observed, force, expected action, expected reason)
SINGLE = [
    (Observed(State.MISSING, "no marker"), False, Action.INSTALL, "no marker"),
    (Observed(State.FAILED, "last install failed"), False, Action.INSTALL, "last install failed"),
    (Observed(State.INSTALLING, "installing (pid 1)"), False, Action.INSTALL,
     "installing (pid 1)"),
    (INSTALLED, False, Action.SKIP, ""),
    (INSTALLED, True, Action.REINSTALL, "forced"),
    (Observed(State.INSTALLED, legacy=True), False, Action.UPGRADE_MARKER,
     "legacy marker, probe passed"),
    (Observed(State.INSTALLED, legacy=True), True, Action.REINSTALL, "forced"),
    (Observed(State.BROKEN, "marker present but broken: x not installed"), False,
     Action.REINSTALL, "marker present but broken: x not installed"),
    (Observed(State.STALE, "stale: requirements changed since install"), False,
     Action.REINSTALL, "stale: requirements changed since install"),
    (Observed(State.SKIPPED, "skipped: no GPU"), False, Action.SKIP_NO_GPU, "skipped: no GPU"),
    (Observed(State.SKIPPED, "skipped: no GPU"), True, Action.SKIP_NO_GPU, "skipped: no GPU"),
    (Observed(State.DISABLED, "disabled in config"), False, Action.DISABLED,
     "disabled in config"),
    (Observed(State.DISABLED, "disabled in config"), True, Action.DISABLED,
     "disabled in config"),
]


@pytest.mark.parametrize("obs, force, action, reason", SINGLE,
                         ids=[f"{o.state.value}{'-legacy' if o.legacy else ''}"
                              f"{'-force' if f else ''}" for o, f, _, _ in SINGLE])
def test_one_component(obs, force, action, reason):
    steps = make(["main"], {"main": COMPONENTS["main"]}, {"main": obs}, force=force)
    assert steps == [Step("main", action, reason, ("core",), forced=reason == "forced")]


def _all(state: State = State.INSTALLED, **overrides: Observed) -> dict[str, Observed]:
    obs = {n: Observed(state) for n in ORDER}
    obs.update(overrides)
    return obs


def _actions(steps: list[Step]) -> list[tuple[str, Action]]:
    return [(s.name, s.action) for s in steps]


@pytest.mark.parametrize("observed, targets, force, forced, expected", [
    # everything missing: all in dependency order, the derived component is not a step
    (_all(State.MISSING), None, False, None,
     [("core", Action.INSTALL), ("main", Action.INSTALL), ("extra", Action.INSTALL),
      ("nodes", Action.INSTALL), ("lone", Action.INSTALL)]),
    # everything installed: a no-op plan
    (_all(), None, False, None, [(n, Action.SKIP) for n in ORDER[:-1]]),
    # one broken in the middle: only it is reinstalled, dependents are not touched
    (_all(main=Observed(State.BROKEN, "x")), None, False, None,
     [("core", Action.SKIP), ("main", Action.REINSTALL), ("extra", Action.SKIP),
      ("nodes", Action.SKIP), ("lone", Action.SKIP)]),
    # targets: the closure only, in order
    (_all(State.MISSING), {"core", "main", "extra"}, False, None,
     [("core", Action.INSTALL), ("main", Action.INSTALL), ("extra", Action.INSTALL)]),
    # --force NAME: only NAME is forced, its installed dependencies are skipped
    (_all(), {"core", "main"}, True, {"main"}, [("core", Action.SKIP), ("main", Action.REINSTALL)]),
    # --force without names forces everything installed
    (_all(lone=Observed(State.SKIPPED, "skipped: no GPU")), None, True, None,
     [("core", Action.REINSTALL), ("main", Action.REINSTALL), ("extra", Action.REINSTALL),
      ("nodes", Action.REINSTALL), ("lone", Action.SKIP_NO_GPU)]),
], ids=["fresh", "noop", "one-broken", "targets", "force-one", "force-all"])
def test_whole_plan(observed, targets, force, forced, expected):
    steps = make(ORDER, COMPONENTS, observed, targets, force, forced)
    assert _actions(steps) == expected
    for step in steps:
        assert step.needs == COMPONENTS[step.name].depends_on


def test_plan_is_pure_and_repeatable():
    observed = _all(State.MISSING, main=Observed(State.STALE, "stale: x"))
    before = dict(observed)
    assert make(ORDER, COMPONENTS, observed) == make(ORDER, COMPONENTS, observed)
    assert observed == before


@pytest.mark.parametrize("names, expected", [
    (["extra"], {"core", "main", "extra"}),
    (["nodes"], {"core", "main", "nodes"}),
    (["lone"], {"lone"}),
    (["core", "lone"], {"core", "lone"}),
    ([], set()),
])
def test_closure(names, expected):
    assert closure(COMPONENTS, names) == expected
