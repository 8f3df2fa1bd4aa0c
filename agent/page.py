"""The status page served at `/` (and `/index.html`) by the agent's HTTP endpoint: a pure
function from what the agent already observed to one self-contained HTML document.

Safe to expose: read-only (no forms, no scripts, no actions), no external assets (works
offline; inline CSS only), every text through `redact` and then `html.escape`, refreshing
itself with `<meta http-equiv="refresh">`. agent/endpoints.py gathers the inputs from the
agent's cached observation (never probing per request) and serves the result.
"""

from __future__ import annotations

import html
import math
import time
from datetime import datetime
from typing import Any, Iterable

from agent.redact import redact

REFRESH = 5  # seconds between the page's own reloads
MAX_TEXT = 400  # one cell's text, at most
MAX_EVENTS = 20

# the overall verdict: the worse of `status` (components, ComfyUI) and the health checks
RANK = {"healthy": 0, "installing": 1, "unknown": 2, "stale": 2, "degraded": 2, "failing": 3,
        "broken": 4}
COLOUR = {"healthy": "#1a7f37", "installing": "#0969da", "degraded": "#9a6700",
          "stale": "#9a6700", "unknown": "#57606a", "failing": "#cf222e", "broken": "#cf222e"}
STATE_CLASS = {  # a state or check status -> the badge's class
    "installed": "ok", "ok": "ok", "running": "ok", "listening": "ok", "healthy": "ok",
    "skipped": "mute", "disabled": "mute", "skip": "mute", "stopped": "mute", "off": "mute",
    "installing": "busy", "starting": "busy", "restarting": "busy", "pending": "busy",
    "waiting": "busy", "stopping": "busy",
    "warn": "warn", "degraded": "warn", "backoff": "warn", "stale": "warn", "retrying": "warn",
    "missing": "warn", "outdated": "warn",
}

CSS = """
:root{color-scheme:light}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
margin:0;background:#f6f8fa;color:#1f2328}
main{max-width:1150px;margin:0 auto;padding:16px 20px 32px}
header.verdict{color:#fff;padding:16px 20px;border-radius:8px;margin:8px 0 18px}
header.verdict h1{margin:0;font-size:30px;letter-spacing:.04em}
header.verdict p{margin:4px 0 0;font-size:15px;opacity:.95}
h2{font-size:17px;margin:22px 0 6px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d0d7de;
border-radius:6px}
th,td{text-align:left;padding:5px 9px;border-bottom:1px solid #eaeef2;vertical-align:top}
th{background:#f0f3f6;font-weight:600;font-size:13px}
td.why{color:#57606a;word-break:break-word;max-width:560px}
td.num{white-space:nowrap}
.b{display:inline-block;padding:0 7px;border-radius:10px;font-size:12px;font-weight:600;
color:#fff;background:#cf222e;white-space:nowrap}
.b.ok{background:#1a7f37}.b.mute{background:#8c959f}.b.busy{background:#0969da}
.b.warn{background:#9a6700}
.meta{color:#57606a;font-size:12.5px}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
"""


def text(value: Any, limit: int = MAX_TEXT) -> str:
    """Any value as safe HTML text: secrets masked, one bounded line, escaped."""
    if value is None:
        return ""
    s = " ".join(redact(str(value)).split())
    if len(s) > limit:
        s = s[:limit - 3] + "..."
    return html.escape(s, quote=True)


def badge(state: Any) -> str:
    s = str(state or "?")
    return f'<span class="b {STATE_CLASS.get(s.lower(), "bad")}">{text(s, 40)}</span>'


def duration(seconds: Any) -> str:
    """3d 4h, 2h 5m, 5m 02s, 12s; '' for nothing usable."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) \
            or not math.isfinite(seconds):
        return ""
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def when(ts: float | None, now: float) -> str:
    """A Unix time as local HH:MM:SS (with the date when not today) and its age."""
    if not ts:
        return ""
    t = time.localtime(ts)
    day = "" if time.strftime("%Y-%m-%d", t) == time.strftime("%Y-%m-%d",
                                                               time.localtime(now)) \
        else time.strftime("%Y-%m-%d ", t)
    ago = now - ts
    rel = f" ({duration(ago)} ago)" if ago >= 0 else ""
    return html.escape(day + time.strftime("%H:%M:%S", t) + rel)


def timestamp(value: Any) -> float | None:
    """A time as the agent writes them (Unix number, ISO text, 'YYYY-mm-dd HH:MM:SS' local)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) and value > 0 else None
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def overall(status: dict | None, health: dict | None) -> tuple[str, str]:
    """(verdict, one line saying why): the worse of `status`'s verdict and the health checks'."""
    hv = str((health or {}).get("verdict") or "") or None
    why: list[str] = []
    if status is None:
        sv = "unknown"
        why.append("the agent is observing the workspace for the first time")
    else:
        sv = str(status.get("verdict") or "unknown")
        comps = {n: c for n, c in (status.get("components") or {}).items()
                 if isinstance(c, dict)}
        counted = [c for c in comps.values() if c.get("state") not in ("skipped", "disabled")]
        done = sum(c.get("state") == "installed" for c in counted)
        bad = [n for n, c in comps.items() if c.get("state") not in
               ("installed", "skipped", "disabled")]
        why.append(f"{done}/{len(counted)} components installed"
                   + (f" ({', '.join(bad[:4])}{'...' if len(bad) > 4 else ''} not)"
                      if bad else ""))
        comfy = status.get("comfyui") if isinstance(status.get("comfyui"), dict) else None
        if comfy is not None:
            why.insert(0, f"ComfyUI {comfy.get('state') or 'unknown'}")
        elif status.get("agent") is None:
            why.insert(0, "no agent running")
    if hv:
        failing = [n for n, e in ((health or {}).get("checks") or {}).items()
                   if isinstance(e, dict) and e.get("status") in ("fail", "warn")]
        why.append(f"health checks {hv}" + (f" ({', '.join(failing)})" if failing else ""))
    worst = max((v for v in (sv, hv) if v), key=lambda v: RANK.get(v, 2))
    return worst, ", ".join(why)


def _rows(rows: Iterable[str], head: str, empty: str, cols: int) -> str:
    body = "".join(rows) or f'<tr><td colspan="{cols}" class="why">{html.escape(empty)}</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _th(*names: str) -> str:
    return "".join(f"<th>{html.escape(n)}</th>" for n in names)


def services_html(status: dict, now: float) -> str:
    rows = []
    agent = status.get("agent") if isinstance(status.get("agent"), dict) else None
    if agent is not None:
        http = agent.get("http") if isinstance(agent.get("http"), dict) else {}
        rows.append(
            f"<tr><td>pod-agent</td><td>{badge('running')}</td>"
            f"<td class=num>{text(agent.get('pid'))}</td>"
            f"<td class=num>{duration(agent.get('uptime'))}</td><td class=num></td>"
            f"<td class=why>last reconcile {text(agent.get('last_reconcile'))}: "
            f"{text(agent.get('last_result'))}; http {text(http.get('detail'))}</td></tr>")
    services: list[tuple[str, dict]] = []
    if isinstance(status.get("comfyui"), dict):
        services.append(("ComfyUI", status["comfyui"]))
    extra = status.get("services")  # more services (design.md section 7), when they land
    if isinstance(extra, dict):
        services += [(str(n), s) for n, s in extra.items() if isinstance(s, dict)]
    elif isinstance(extra, list):
        services += [(str(s.get("name", "?")), s) for s in extra if isinstance(s, dict)]
    for name, s in services:
        notes = []
        if s.get("degraded_reason"):
            notes.append(f"degraded: {s['degraded_reason']}")
        if s.get("last_failure"):
            notes.append(f"last failure: {s['last_failure']}")
        last_exit = s.get("last_exit")
        if isinstance(last_exit, dict):
            notes.append("last exit: " + ", ".join(f"{k} {v}" for k, v in last_exit.items()
                                                   if v is not None))
        if isinstance(s.get("pending_restart"), dict):
            notes.append("restart pending: " + str(s["pending_restart"].get("reason") or ""))
        if s.get("next_start_in") is not None:
            notes.append(f"next start in {duration(s.get('next_start_in'))}")
        if s.get("adopted"):
            notes.append("adopted")
        failures = s.get("failures")
        restarts = text(s.get("restarts") if s.get("restarts") is not None else "")
        if failures:
            restarts += f" ({text(failures)} failed)"
        rows.append(f"<tr><td>{text(name, 80)}</td><td>{badge(s.get('state'))}</td>"
                    f"<td class=num>{text(s.get('pid'))}</td>"
                    f"<td class=num>{duration(s.get('uptime'))}</td>"
                    f"<td class=num>{restarts}</td>"
                    f"<td class=why>{text('; '.join(notes))}</td></tr>")
    if agent is None:
        empty = "no agent is running for this workspace"
    else:
        empty = "no services"
    return _rows(rows, _th("service", "state", "pid", "uptime", "restarts", "notes"), empty, 6)


def components_html(status: dict) -> str:
    rows = []
    for name, c in (status.get("components") or {}).items():
        if not isinstance(c, dict):
            continue
        flags = ", ".join(f for f, on in (("required", c.get("required")),
                                          ("background", c.get("background"))) if on)
        since = c.get("timestamp") or ""
        if c.get("installing_for") is not None:
            since = f"{since} (for {duration(c.get('installing_for'))})"
        rows.append(f"<tr><td>{text(name, 120)}</td><td>{badge(c.get('state'))}</td>"
                    f"<td>{text(c.get('version'), 80)}</td><td class=num>{text(since)}</td>"
                    f"<td class=meta>{text(flags)}</td>"
                    f"<td class=why>{text(c.get('reason'))}</td></tr>")
    return _rows(rows, _th("component", "state", "version", "since", "", "reason"),
                 "no components", 6)


def checks_html(health: dict | None, now: float) -> str:
    rows = []
    checks = (health or {}).get("checks") or {}
    for name, e in checks.items():
        if not isinstance(e, dict):
            continue
        action = e.get("action")
        detail = e.get("detail")
        if action and action != "none":
            detail = f"{detail or ''} (action: {action})"
        failures = e.get("failures")
        rows.append(f"<tr><td>{text(name, 80)}</td><td>{badge(e.get('status'))}</td>"
                    f"<td class=num>{when(timestamp(e.get('time')), now)}</td>"
                    f"<td class=num>{text(failures) if failures else ''}</td>"
                    f"<td class=why>{text(detail)}</td></tr>")
    quarantined = (health or {}).get("quarantined") or {}
    for name, why in quarantined.items():
        rows.append(f"<tr><td>{text(name, 80)}</td><td>{badge('quarantined')}</td><td></td>"
                    f"<td></td><td class=why>{text(why)}</td></tr>")
    return _rows(rows, _th("check", "status", "when", "failures", "detail"),
                 "no health results yet", 5)


def events_html(events: list[dict], now: float) -> str:
    rows = []
    for ev in events[:MAX_EVENTS]:
        rows.append(f"<tr><td class=num>{when(timestamp(ev.get('time')), now)}</td>"
                    f"<td>{text(ev.get('source'), 40)}</td>"
                    f"<td>{badge(ev.get('status')) if ev.get('status') else ''}</td>"
                    f"<td class=why>{text(ev.get('text'))}</td></tr>")
    return _rows(rows, _th("when", "from", "", "what happened"), "nothing recorded yet", 4)


def render(status: dict | None, health: dict | None, events: list[dict] | None = None, *,
           now: float | None = None, observed_at: float | None = None,
           observe_error: str | None = None, version: str = "", refresh: int = REFRESH) -> str:
    """The whole page.

    status: the `pod-agent status --json` object (None: not observed yet); health: {"verdict",
    "checks": {name: latest entry (status, detail, time, failures, action)}, "quarantined":
    {name: why}}; events: recent history, newest first, each {"time", "source", "status",
    "text"}. Pure: the same inputs give the same page."""
    now = time.time() if now is None else now
    verdict, why = overall(status, health)
    colour = COLOUR.get(verdict, COLOUR["unknown"])
    workspace = (status or {}).get("workspace")
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{int(refresh)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{html.escape(verdict.upper())} - pod-agent</title>",
        f"<style>{CSS}</style></head><body><main>",
        f'<header class="verdict" id="verdict" data-verdict="{html.escape(verdict)}" '
        f'style="background:{colour}"><h1>{html.escape(verdict.upper())}</h1>'
        f"<p>{text(why, 600)}</p></header>",
        f'<p class="meta">pod-agent {text(version, 40)}'
        + (f" &middot; workspace <code>{text(workspace, 200)}</code>" if workspace else "")
        + (f" &middot; observed {when(observed_at, now)}" if observed_at else "")
        + (f" &middot; status {text((status or {}).get('verdict'))}" if status else "")
        + (f" &middot; health {text((health or {}).get('verdict'))}"
           if (health or {}).get("verdict") else "")
        + f" &middot; refreshes every {int(refresh)} s</p>",
    ]
    if observe_error:
        parts.append(f'<p class="meta">the latest observation failed: '
                     f"{text(observe_error)}</p>")
    if status is not None:
        parts += ["<h2>Services</h2>", services_html(status, now),
                  "<h2>Components</h2>", components_html(status)]
    parts += ["<h2>Health checks</h2>", checks_html(health, now),
              "<h2>Recent history</h2>", events_html(events or [], now),
              '<p class="meta">Read-only. The same as JSON: <a href="/status">/status</a>, '
              '<a href="/readyz">/readyz</a>, <a href="/healthz">/healthz</a>, '
              '<a href="/metrics">/metrics</a>; details: <code>pod-agent status</code>, '
              "<code>pod-agent health</code>.</p>",
              "</main></body></html>\n"]
    return "".join(parts)
