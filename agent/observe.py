"""Observed state: marker AND recorded inputs AND a cheap probe of the real artifact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from agent import markers
from agent.kinds import KINDS
from agent.fserr import explain
from agent.kinds.base import Ctx
from agent.locks import held_by_other
from agent.model import Component, Config, Observed, State


def _h(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(comp: Component, ctx: Ctx) -> tuple[str, str]:
    """(fingerprint, per-input short hashes) of the component's desired inputs."""
    inputs = KINDS[comp.kind].inputs(comp, ctx)
    parts = " ".join(f"{k}={_h(v)[:8]}" for k, v in sorted(inputs.items()))
    return _h(inputs)[:16], parts


def changed_inputs(recorded: str, current: str) -> list[str]:
    old = dict(p.split("=", 1) for p in recorded.split() if "=" in p)
    new = dict(p.split("=", 1) for p in current.split() if "=" in p)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def lock_path(config: Config, name: str) -> Path:
    return config.state_dir / "locks" / f"{name}.lock"


def failure_path(config: Config, name: str) -> Path:
    return config.state_dir / "failed" / f"{name}.json"


def read_failure(config: Config, name: str) -> dict | None:
    return markers.read_json(failure_path(config, name))


def observe_one(comp: Component, ctx: Ctx, check_locks: bool = False) -> Observed:
    """The component's observed state. Never raises: whatever goes wrong while looking (an
    unreadable marker, a probe that crashes) is this component's BROKEN state with the reason,
    never the end of a whole observe pass."""
    try:
        return _observe_one(comp, ctx, check_locks)
    except Exception as exc:  # noqa: BLE001 - one component's problem stays its own
        return Observed(State.BROKEN, f"cannot check it: {explain(exc)}")


def _observe_one(comp: Component, ctx: Ctx, check_locks: bool) -> Observed:
    config = ctx.config
    if not comp.enabled:
        return Observed(State.DISABLED, "disabled in config")
    if comp.requires_gpu and not ctx.gpu:
        return Observed(State.SKIPPED, "skipped: no GPU")
    skip = getattr(KINDS[comp.kind], "skip_reason", None)  # e.g. download: token not set
    reason = skip(comp, ctx) if skip else None
    if reason:
        return Observed(State.SKIPPED, reason)
    if check_locks:
        holder = held_by_other(lock_path(config, comp.name))
        if holder is not None:
            return Observed(State.INSTALLING, f"installing (pid {holder.get('pid')} on "
                                              f"{holder.get('host', '?')})")
    marker, unusable = markers.inspect(config.markers_dir, comp.name)
    if unusable:  # a folder, a symlink, an unreadable file at the marker's path
        return Observed(State.BROKEN, unusable)
    if marker is None:
        failure = read_failure(config, comp.name)
        if failure:
            return Observed(State.FAILED, f"last install failed at {failure.get('time')}: "
                                          f"{failure.get('reason')}")
        return Observed(State.MISSING, "no marker")
    if not marker.legacy:
        fp, parts = fingerprint(comp, ctx)
        if marker.meta.get("fingerprint") != fp:
            keys = changed_inputs(marker.meta.get("inputs", ""), parts) or ["inputs"]
            problem = KINDS[comp.kind].probe(comp, ctx, marker)
            detail = f" ({problem.reason})" if problem else ""
            return Observed(State.STALE, f"stale: {', '.join(keys)} changed since install"
                            f"{detail}", marker)
    problem = KINDS[comp.kind].probe(comp, ctx, marker)
    if problem is not None:
        prefix = "marker present but broken" if problem.state == State.BROKEN else "stale"
        return Observed(problem.state, f"{prefix}: {problem.reason}", marker)
    return Observed(State.INSTALLED, "", marker, legacy=marker.legacy)


def observe_overall(comp: Component, ctx: Ctx, others: Mapping[str, Observed]) -> Observed:
    if not comp.enabled:
        return Observed(State.DISABLED, "disabled in config")
    try:
        marker, unusable = markers.inspect(ctx.config.markers_dir, comp.name)
    except Exception as exc:  # noqa: BLE001 - as in observe_one
        return Observed(State.BROKEN, f"cannot check it: {explain(exc)}")
    if unusable:
        return Observed(State.BROKEN, unusable)
    missing = [n for n, o in others.items() if o.state not in OK_STATES]
    if missing:
        if marker:
            return Observed(State.BROKEN, f"marker present but {missing[0]} is "
                                          f"{others[missing[0]].state.value}", marker)
        return Observed(State.MISSING, "waiting for: " + ", ".join(missing))
    if marker is None:
        return Observed(State.MISSING, "every component is installed; marker not written yet")
    return Observed(State.INSTALLED, "", marker, legacy=marker.legacy)


OK_STATES = (State.INSTALLED, State.SKIPPED, State.DISABLED)


def observe(ctx: Ctx, names: Iterable[str] | None = None, check_locks: bool = False
            ) -> dict[str, Observed]:
    config = ctx.config
    wanted = set(names) if names is not None else set(config.components)
    out: dict[str, Observed] = {}
    for name in config.order():
        comp = config.components[name]
        if comp.kind == "overall" or name not in wanted:
            continue
        out[name] = observe_one(comp, ctx, check_locks)
    for name, comp in config.components.items():
        if comp.kind == "overall" and name in wanted:
            others = {n: o for n, o in out.items()} if names is None else {
                n: observe_one(c, ctx) for n, c in config.components.items()
                if c.kind != "overall"}
            out[name] = observe_overall(comp, ctx, others)
    return out
