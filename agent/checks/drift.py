"""`drift`: the target environment's distributions changed outside the agent's own installs.

The resident agent notices drift (agent/drift.py: before and after each ComfyUI start, and at each
periodic reconcile) and writes one record per change to <state_dir>/history.jsonl. This check reads
the newest one: WARN while it is younger than `warn_for` seconds (default 1 h), then OK with the
last drift named. Without records: OK. `pod-agent health --now` reads the same file.
"""

from __future__ import annotations

import time

from agent import drift
from agent.checks.base import CheckCtx, Result


def check(ctx: CheckCtx) -> Result:
    records = drift.recent(ctx.config, kind="drift", limit=1)
    if not records:
        return Result("ok", "no drift seen")
    rec = records[-1]
    try:
        when = float(rec.get("time") or 0)
    except (TypeError, ValueError):
        when = 0.0
    age = time.time() - when
    text = f"{rec.get('summary', '?')} ({rec.get('source', '?')}, {rec.get('stamp', '?')}"
    by = drift.who(rec)
    if by:
        text += f", {'by ' if rec.get('by') else ''}{by}"
    text += ")"
    if rec.get("repeats", 1) and int(rec.get("repeats", 1)) > 1:
        text += f", {int(rec['repeats'])} times in a row"
    data = {"last": {k: rec.get(k) for k in ("stamp", "source", "by", "installer", "changed",
                                               "added", "removed", "affected", "repeats")}}
    if age < ctx.settings["warn_for"]:
        affected = rec.get("affected") or []
        if affected:
            text += f"; re-checked: {', '.join(map(str, affected))}"
        return Result("warn", "environment drift: " + text, data=data, actionable=False)
    return Result("ok", "no drift for " + _ago(age) + "; last: " + text, data=data)


def _ago(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"
