"""The first five commands: install, status, reset, health, run (imported only when one runs)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click

from agent.clikit import Exit, age, common, err, handled, json_option, load, out
from agent.model import AgentError, ConfigError

# ----------------------------------------------------------------------------- install
class _Printer:
    """Progress: a live line with step and elapsed time on a TTY, plain lines otherwise."""

    def __init__(self, enabled: bool, own_progress: frozenset[str] = frozenset()):
        self.enabled = enabled
        self.tty = enabled and sys.stdout.isatty()
        self.own_progress = own_progress  # components that draw their own bar (downloads)
        self._status = None
        self._started = 0.0
        self._name = ""
        self._thread = None

    def begin(self, step) -> None:
        if not self.enabled:
            return
        verb = "reinstalling" if step.action.value == "reinstall" else "installing"
        why = f" ({step.reason})" if step.reason else ""
        self._name = step.name
        self._started = time.monotonic()
        if self.tty and step.name not in self.own_progress:
            from rich.console import Console

            console = Console()
            self._status = console.status(f"{step.name}: {verb}{why}")
            self._status.start()
            import threading

            stop = threading.Event()
            label = f"{step.name}: {verb}{why}"

            def tick() -> None:
                while not stop.wait(1.0):
                    if self._status:
                        self._status.update(f"{label} [{time.monotonic() - self._started:.0f}s]")

            self._thread = (threading.Thread(target=tick, daemon=True), stop)
            self._thread[0].start()
        else:
            out(f"{step.name}: {verb}{why}")

    def end(self, outcome) -> None:
        if self._status is not None:
            self._thread[1].set()
            self._status.stop()
            self._status = None
        if not self.enabled:
            return
        out(f"{outcome.name}: {outcome.message}"
             if outcome.status in ("already", "installed", "skipped", "disabled")
             else f"{outcome.name}: {outcome.status}: {outcome.message}")
        if outcome.status == "failed":
            if outcome.log:
                out(f"  log: {outcome.log}")
            for line in outcome.tail.splitlines():
                out(f"  | {line}")


@click.command("install")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--force", is_flag=True, help="Reinstall the named (or all) components even "
              "when installed.")
@json_option
@common
@handled
def install(names: tuple[str, ...], force: bool, json_out: bool, workspace: Optional[Path],
            config: Optional[Path]) -> None:
    """Converge the workspace: install what is missing, broken or out of date.

    NAME: components to converge (with what they depend on); all when omitted."""
    from agent.execute import Executor
    from agent.markers import clean_temps

    conf = load(config, workspace, create=True)
    clean_temps(conf)  # temp files of writes a kill -9 cut short
    from agent.updates import recover_at_start
    recover_at_start(conf, err if json_out else out)  # an update cut short: finish or undo it
    from agent.kinds import KINDS

    printer = _Printer(enabled=not json_out, own_progress=frozenset(
        n for n, c in conf.components.items() if getattr(KINDS.get(c.kind), "OWN_PROGRESS", False)))
    report = Executor(conf, reporter=printer).run(list(names) or None, force=force)
    if json_out:
        out(json.dumps({"ok": report.ok, "changed": report.changed, "outcomes": [
            {"name": o.name, "status": o.status, "message": o.message, "log": o.log or None,
             "tail": o.tail or None, "duration": round(o.duration, 2)}
            for o in report.outcomes]}, indent=2))
    else:
        if not report.changed and report.ok:
            out("Nothing to do: everything asked for is already installed.")
        elif report.ok:
            out(f"Done: installed {', '.join(report.changed)}.")
        else:
            bad = [o.name for o in report.outcomes
                   if o.status in ("failed", "blocked") and o.name in report.requested]
            out(f"Not installed: {', '.join(bad)}. See the logs above; rerun "
                 f"`pod-agent install` after fixing the cause.")
    if not report.ok:
        raise Exit(1)


# ----------------------------------------------------------------------------- status
def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cell(value: Any, limit: int) -> str:
    """A table cell: one line, at most `limit` characters (a hostile marker or state file
    never widens every row of the table)."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:max(0, limit - 3)] + "..."


def _exit_text(last: dict[str, Any]) -> str:
    """How ComfyUI last ended: `code 1`, `killed by signal 9 (SIGKILL)`, `unknown` (an adopted
    process that is not our child leaves no status)."""
    import signal as _signal

    code, sig = last.get("code"), last.get("signal")
    if isinstance(sig, int) and not isinstance(sig, bool):
        try:
            name = f" ({_signal.Signals(sig).name})"
        except ValueError:
            name = ""
        return f"killed by signal {sig}{name}"
    if isinstance(code, int) and not isinstance(code, bool):
        return f"code {code}"
    return "unknown (not our child: no exit status)"


def render_status(data: dict[str, Any]) -> str:
    rows = [("COMPONENT", "STATE", "SINCE", "VERSION", "REASON")]
    for name, c in data["components"].items():
        rows.append((name, c["state"], _cell(c["timestamp"] or "-", 25),
                     _cell(c["version"] or "-", 40), _cell(c["reason"] or "", 2000)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    missing = " (MISSING: no such folder)" if data.get("workspace_missing") else ""
    lines = [f"workspace: {data['workspace']}{missing}   verdict: {data['verdict'].upper()}", ""]
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    agent, cui = data.get("agent"), data.get("comfyui")
    if agent:
        lines += ["", f"AGENT     pid {agent['pid']}  up {age(agent.get('uptime'))}  last "
                      f"reconcile {agent.get('last_reconcile') or '-'} "
                      f"({agent.get('last_result') or '-'})"]
        if agent.get("http"):
            lines.append(f"HTTP      {agent['http'].get('detail')}")
        if cui:
            last = cui.get("last_exit") or {}
            text = (f"COMFYUI   {cui.get('state', '?').upper()}  pid {cui.get('pid') or '-'}  "
                    f"up {age(cui.get('uptime'))}  restarts {cui.get('restarts', 0)}")
            if last:
                text += f"  last exit: {_exit_text(last)}"
            lines.append(text)
            if cui.get("pending_restart"):
                pr = cui["pending_restart"]
                lines.append(f"          restart pending ({pr.get('reason')}), waiting for "
                             f"{pr.get('waiting_for')}")
            if cui.get("degraded_reason"):
                lines.append(f"          degraded: {cui['degraded_reason']}")
    elif cui is None and data.get("agent") is None:
        lines += ["", "AGENT     not running (start it with `pod-agent run`)"]
    if data.get("services"):
        from agent.services import render_lines  # JupyterLab, sshd, ... (agent/services.py)
        lines += render_lines(data["services"])
    hs = data.get("health")
    if hs:
        bad = [f"{n} {st}" for n, st in hs["checks"].items() if st in ("fail", "warn")]
        lines.append(f"HEALTH    {str(hs.get('verdict')).upper()}  at {hs.get('time')}"
                     + (f"  ({', '.join(bad)})" if bad else "")
                     + (f"  quarantined: {', '.join(hs['quarantined'])}"
                        if hs.get("quarantined") else "") + "  (`pod-agent health`)")
    if data.get("processes"):
        lines += ["", "PROCESSES"]
        for p in data["processes"]:
            extra = ""
            if p["role"] == "comfyui" and p.get("state"):
                extra = f" state={p['state']} restarts={p.get('restarts', 0)}"
            if p["role"] == "installer":
                extra = f" component={p['component']}" + (
                    f" installing for {age(p['for'])}" if p.get("for") is not None else "")
            if p["role"] == "agent" and p.get("last_reconcile"):
                extra = f" last reconcile {p['last_reconcile']} ({p.get('last_result')})"
            lines.append(f"  {p['role']:<9} pid {p['pid']}  up {age(p.get('uptime'))}{extra}")
    if data.get("logs"):
        lines += ["", "LOGS"]
        for log in data["logs"]:
            lines.append(f"  {log['path']}  {_size(log['size'])}  {age(log['age'])} ago  "
                         f"| {log['last_line'][:100]}")
    return "\n".join(lines)


@click.command("status")
@json_option
@common
@handled
def status(json_out: bool, workspace: Optional[Path], config: Optional[Path]) -> None:
    """What is installed, since when, at which version, what is broken and why, what runs."""
    from agent.status import collect

    conf = load(config, workspace)
    data = collect(conf)
    if data["workspace_missing"]:
        err(f"warning: the workspace {conf.workspace} does not exist: nothing is installed "
             "there; pass the right --workspace (or POD_AGENT_WORKSPACE), or create it with "
             "`pod-agent install` or `pod-agent run`")
    out(json.dumps(data, indent=2) if json_out else render_status(data))
    if data["verdict"] != "healthy":
        raise Exit(1)


# ----------------------------------------------------------------------------- reset
@click.command("reset")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--all", "all_", is_flag=True, help="Remove every marker.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask (needed without a terminal).")
@common
@handled
def reset(names: tuple[str, ...], all_: bool, yes: bool, workspace: Optional[Path],
          config: Optional[Path]) -> None:
    """Remove markers so the next install (or the running agent) reinstalls them.

    NAME: components to reset."""
    from agent import markers
    from agent.redact import redact

    conf = load(config, workspace)
    if bool(names) == all_:
        raise AgentError("name the components to reset, or pass --all "
                         f"(components: {', '.join(conf.components)})")
    _check_markers_dir(conf.markers_dir)
    if all_:
        targets = markers.present(conf.markers_dir)
        if not targets:
            out(f"No markers in {conf.markers_dir}.")
            return
        if not yes:
            if not sys.stdin.isatty():
                raise AgentError("reset --all removes every marker; pass --yes to confirm "
                                 "when not on a terminal")
            if not click.confirm(f"Remove {len(targets)} markers from {conf.markers_dir}?"):
                raise Exit(1)
    else:
        unknown = [n for n in names if n not in conf.components]
        if unknown:
            raise AgentError(f"unknown component '{unknown[0]}' (valid: "
                             f"{', '.join(conf.components)})")
        targets = list(dict.fromkeys(names))
        targets += [n for n, c in conf.components.items() if c.kind == "overall"]
    removed, refused = [], []
    for name in targets:  # one that cannot be removed does not stop the others
        try:
            if markers.remove(conf.markers_dir, name):
                removed.append(name)
                out(f"removed {markers.path_for(conf.markers_dir, name)}")
        except AgentError as exc:
            refused.append(name)
            err(f"error: {redact(str(exc))}")
    if not removed and not refused:
        out("No marker to remove.")
    if refused:
        raise Exit(1)


def _check_markers_dir(folder: Path) -> None:
    """A marker folder that is a file (or below one) is one line, not 'no markers'."""
    import os
    import stat

    from agent.fserr import FsError, describe
    from agent.markers import blocking_ancestor

    try:
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        culprit = blocking_ancestor(folder) if isinstance(exc, NotADirectoryError) else None
        if culprit is not None:
            raise FsError(f"{culprit}: is a file, not a folder (needed for the marker folder "
                          f"{folder}): move that file away") from None
        raise FsError(describe(exc, "cannot read the marker folder")) from None
    if not stat.S_ISDIR(mode):
        raise FsError(f"{folder}: the marker folder is a file, not a folder: move it away "
                      "(`pod-agent install` then recreates the folder and the markers)")


# ----------------------------------------------------------------------------- health
def render_health(data: dict[str, Any]) -> str:
    from agent.health import parse_time

    now = time.time()
    head = f"health: {data['verdict'].upper()}"
    if data.get("stale") and data.get("reported_verdict"):
        head += f" (the report said {str(data['reported_verdict']).upper()})"
    if data.get("time"):
        head += f"   (report by {data.get('source', '?')} pid {data.get('pid', '?')} on " \
                f"{data.get('host', '?')})"
    stale = data.get("stale_checks") or {}
    rows = [("CHECK", "STATUS", "WHEN", "TOOK", "ACTION", "DETAIL")]
    for name, e in data["checks"].items():
        when = age(now - parse_time(e.get("time"))) + " ago" if e.get("time") else "-"
        if name in stale:
            when += " STALE"
        try:
            took = f"{float(e.get('duration') or 0):.2f}s"
        except (TypeError, ValueError):
            took = "?"
        rows.append((_cell(name, 24), _cell(e.get("status", "?"), 8).upper(), when, took,
                     _cell(e.get("action") or "none", 200),
                     " ".join(str(e.get("detail") or "").split())[:2000]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    awidth = min(32, max(len(r[4]) for r in rows))
    lines = [head]
    if data.get("stale"):
        lines += [f"STALE: {data.get('stale_reason')}: the results below are not current; "
                  "start the agent (`pod-agent run`) or run `pod-agent health --now`"]
    lines.append("")
    for r in rows:
        action = r[4] if len(r[4]) <= awidth else r[4][:awidth - 3] + "..."
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  "
                     + action.ljust(awidth) + "  " + r[5])
    for name, why in (data.get("quarantined") or {}).items():
        lines += ["", f"QUARANTINED {name}: {why}"]
    return "\n".join(lines)


@click.command("health")
@json_option
@click.option("--check", metavar="<str>", default=None, help="Only this check (comfyui_http, "
              "comfyui_process, sageattention, components, disk, gpu, agent).")
@click.option("--now", is_flag=True, help="Run the checks now (also without a running agent; "
              "report only, no self-healing) instead of showing the latest report.")
@common
@handled
def health(json_out: bool, check: Optional[str], now: bool, workspace: Optional[Path],
           config: Optional[Path]) -> None:
    """The latest health report (exit 0 healthy, 1 degraded or stale, 2 failing).

    A report is stale when the agent that wrote it no longer runs or a check's result is
    older than 3 intervals: it is then never HEALTHY (exit 1, or 2 when it said failing)."""
    from agent import health as h
    from agent.checks import REGISTRY
    from agent.redact import redact

    conf = load(config, workspace, create=now)
    if check is not None and check not in REGISTRY:
        raise AgentError(f"unknown check '{check}' (known: {', '.join(REGISTRY)})")
    state = None
    if now:
        note = h.open_report(conf)  # a full or read-only disk: the checks still run and print
        try:
            monitor = h.Monitor(conf, source="cli")
            names = [check] if check else monitor.enabled()
            monitor.run_many(names, force=True)
        finally:
            h.close_report()
        if note:
            err(f"warning: {redact(note)}")
        state = monitor.state()  # this run's results, even when health.json was not written
    else:
        state = h.load_state(conf)
    if state is None:
        raise AgentError(f"no health report yet ({h.state_path(conf)}): start the agent "
                         "(`pod-agent run`) or run `pod-agent health --now`")
    checks = state["checks"]
    if check is not None:
        if check not in checks:
            raise AgentError(f"no result for check '{check}' yet: run "
                             f"`pod-agent health --now --check {check}`")
        checks = {check: checks[check]}
    quarantined = state.get("quarantined") or {}
    reported = h.verdict((e.get("status") for e in checks.values()),
                         bool(quarantined) and check is None)
    # a saved report from an agent that is gone, or too old, is not the pod's health now
    fresh = {"stale": False, "reason": None, "checks": {}} if now \
        else h.staleness(conf, state, checks)
    checks = {n: dict(e, stale=n in fresh["checks"]) for n, e in checks.items()}
    data = dict(state, checks=checks, verdict="stale" if fresh["stale"] else reported,
                reported_verdict=reported, stale=fresh["stale"], stale_reason=fresh["reason"],
                stale_checks=fresh["checks"])
    out(json.dumps(data, indent=2) if json_out else render_health(data))
    code = max(h.EXIT_CODES[data["verdict"]], h.EXIT_CODES[reported])
    if code:
        raise Exit(code)


@click.command("run")
@click.option("--poll", metavar="SECONDS", default=None, help="Poll the watched folders every "
              "SECONDS (0.05 to 3600) instead of inotify (network volumes).")
@click.option("--no-comfyui", is_flag=True, help="Keep the workspace installed but do not "
              "start ComfyUI.")
@common
@handled
def run(poll: Optional[str], no_comfyui: bool, workspace: Optional[Path],
        config: Optional[Path]) -> None:
    """The resident agent: watch, reconcile, supervise ComfyUI (used by entrypoint.sh)."""
    from agent.config import AGENT_LIMITS
    from agent.daemon import Daemon

    if poll is not None:  # parsed here, not by click: a bad value is one line, never a spin
        rng = AGENT_LIMITS["poll"]
        try:
            seconds = float(poll)
        except ValueError:
            seconds = float("nan")
        if not rng.lo <= seconds <= rng.hi:  # also refuses nan and inf
            raise ConfigError(f"--poll must be a number of seconds from {rng.lo:g} to "
                              f"{rng.hi:g}, got {poll[:60]!r}")
        poll = seconds  # type: ignore[assignment]
    load(config, workspace, create=True)  # validate first: a config error is one line, exit 2
    code = Daemon(config, workspace, poll=poll,
                  start_comfyui=False if no_comfyui else None).run()
    raise Exit(code)


