"""`components`: the probes of every component, the same truth `pod-agent status` shows.

A marker whose component fails its probe (BROKEN) or whose inputs changed (STALE) is a lying
marker: `reinstall` removes it and asks for a reconcile. A missing or failed install is the
reconcile loop's business already, so it is reported but not acted on.
"""

from __future__ import annotations

from agent.checks.base import CheckCtx, Result
from agent.kinds.base import Ctx
from agent.model import State
from agent.observe import observe

LYING = (State.BROKEN, State.STALE)
FINE = (State.INSTALLED, State.SKIPPED, State.DISABLED, State.INSTALLING)


def check(ctx: CheckCtx) -> Result:
    config = ctx.config
    observed = observe(Ctx(config, gpu=ctx.gpu()), check_locks=True)
    states = {name: obs.state.value for name, obs in observed.items()}
    lying = [n for n, o in observed.items() if o.state in LYING
             and config.components[n].kind != "overall"]
    absent = [n for n, o in observed.items() if o.state not in FINE and n not in lying
              and config.components[n].kind != "overall"]
    healthy = tuple(n for n, o in observed.items() if o.state == State.INSTALLED)
    data = {"states": states}
    if not lying and not absent:
        counts: dict[str, int] = {}
        for s in states.values():
            counts[s] = counts.get(s, 0) + 1
        return Result("ok", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
                      data=data, healthy=healthy)
    parts = [f"{n}: {observed[n].reason}" for n in lying]
    parts += [f"{n}: {observed[n].state.value}" + (f" ({observed[n].reason})"
                                                  if observed[n].reason else "")
              for n in absent]
    required_absent = [n for n in absent if config.components[n].required]
    status = "fail" if lying or required_absent else "warn"
    return Result(status, "; ".join(parts), data=data, targets=tuple(lying), healthy=healthy,
                  actionable=bool(lying))
