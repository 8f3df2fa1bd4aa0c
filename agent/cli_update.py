"""`pod-agent update`, `pod-agent rollback`, `pod-agent history` (issue 10; the work is in
agent/updates/, the records in agent/history.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from agent import clikit


def _say(json_out: bool):
    """Progress on stdout; with --json only the lines about an interrupted update, on stderr
    (stdout stays one JSON object)."""
    if not json_out:
        return clikit.out
    return lambda text: clikit.err(text) if "interrupted" in text else None


def _existing(config, workspace, what: str):
    """The config, for a workspace that exists (nothing to update or roll back otherwise)."""
    from agent.model import AgentError

    conf = clikit.load(config, workspace)
    if not conf.workspace.is_dir():
        raise AgentError(f"the workspace {conf.workspace} does not exist: nothing to {what}; "
                         "pass the right --workspace (or POD_AGENT_WORKSPACE)")
    return conf


def _plan_line(p) -> str:
    u = p.unit
    if p.error:
        return f"{u.name}: cannot update: {p.error}"
    if p.note:
        return f"{u.name}: {p.note}"
    if not p.moves:
        return f"{u.name}: up to date ({(p.head or '-')[:12]})"
    n = f"{p.count} commit{'s' if p.count != 1 else ''}" if p.count >= 0 else "? commits"
    line = f"{u.name}: {p.head[:12]} -> {p.target[:12]} ({n})"
    req = p.requirements
    if req.get("added") or req.get("removed") or req.get("changed"):
        line += "; requirements: " + ", ".join(
            [f"+{r}" for r in req.get("added", [])] + [f"-{r}" for r in req.get("removed", [])]
            + list(req.get("changed", [])))
    if req.get("install.py"):
        line += f"; install.py {req['install.py'][0]}"
    if p.dirty:
        line += f"; LOCAL EDITS in {len(p.dirty)} file{'s' if len(p.dirty) > 1 else ''} " \
                f"({', '.join(p.dirty[:3])}): refused without --force"
    return line


@click.command("update")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--all", "all_", is_flag=True, help="Every git component and custom node.")
@click.option("--dry-run", is_flag=True, help="Fetch and show old -> new commits and "
              "requirement changes; change nothing.")
@click.option("--force", is_flag=True, help="Update checkouts with local edits too (the edits "
              "are kept with `git stash`, never thrown away).")
@click.option("--no-verify", is_flag=True, help="Do not restart ComfyUI to check the imports "
              "(the component probes are still checked).")
@clikit.json_option
@clikit.common
@clikit.handled
def update(names: tuple[str, ...], all_: bool, dry_run: bool, force: bool, no_verify: bool,
           json_out: bool, workspace: Optional[Path], config: Optional[Path]) -> None:
    """Update git components and custom nodes to the newest commit of their branch (or a newly
    pinned ref), verify, and roll back by itself when something broke.

    NAME: a git component, a custom node folder, or a `nodes` component (all its nodes)."""
    from agent.model import AgentError
    from agent.updates import Change, apply, recover_at_start
    from agent.updates.targets import plan, select

    if not names and not all_:
        raise AgentError("name what to update (components or custom node folders), or pass "
                         "--all")
    if names and all_:
        raise AgentError("give names or --all, not both")
    conf = _existing(config, workspace, "update")
    say = _say(json_out)
    if not dry_run:
        recover_at_start(conf, say)
    planned = plan(conf, select(conf, names, all_))
    refused = [p for p in planned if p.moves and p.dirty and not force]
    errors = [p for p in planned if p.error]
    if dry_run:
        if json_out:
            clikit.out(json.dumps({"ok": not errors, "dry_run": True,
                                   "units": [p.to_json() for p in planned]}, indent=2))
        else:
            for p in planned:
                clikit.out(_plan_line(p))
            moving = [p for p in planned if p.moves]
            clikit.out(f"{len(moving)} of {len(planned)} would be updated (dry run: nothing "
                       "changed)")
        if errors:
            raise clikit.Exit(1)
        return
    for p in planned:
        if p.error or p.note or p in refused:
            say(_plan_line(p))
    changes = [Change(p.unit.name, p.unit.path, p.head, p.target, p.unit.component, p.count)
               for p in planned if p.moves and p not in refused]
    if not changes:
        result = {"ok": not (errors or refused), "updated": [], "refused":
                  [p.unit.name for p in refused], "errors": [p.to_json() for p in errors]}
        if json_out:
            clikit.out(json.dumps(result, indent=2))
        elif not (errors or refused):
            clikit.out(f"everything is up to date ({len(planned)} checked)")
        if errors or refused:
            raise clikit.Exit(1)
        return
    what = ", ".join(names) if names else "--all"
    report = apply(conf, changes, f"update {what}", "cli", force=force, say=say,
                   verify_comfyui=not no_verify)
    if json_out:
        clikit.out(json.dumps({**report.to_json(), "refused": [p.unit.name for p in refused],
                               "errors": [p.to_json() for p in errors]}, indent=2))
    else:
        for line in report.lines():
            clikit.out(line)
        if report.ok:
            clikit.out(f"update {report.id} done; `pod-agent rollback` goes back to before it")
        else:
            clikit.err("error: the update failed and was rolled back"
                       + ("" if not report.rollback_problems else " INCOMPLETELY (see above)"))
    if not report.ok or errors or refused:
        raise clikit.Exit(1)


@click.command("rollback")
@click.option("--to", "to", metavar="ID", default=None, help="A restore point's id (see "
              "`pod-agent history`); default: the latest finished update.")
@click.option("--no-verify", is_flag=True, help="Do not restart ComfyUI to check the imports.")
@clikit.json_option
@clikit.common
@clikit.handled
def rollback(to: Optional[str], no_verify: bool, json_out: bool, workspace: Optional[Path],
             config: Optional[Path]) -> None:
    """Go back to a restore point (the latest update by default): commits, packages, markers;
    verified like an update."""
    from agent.updates import recover_at_start
    from agent.updates import rollback as do_rollback

    conf = _existing(config, workspace, "roll back")
    say = _say(json_out)
    recover_at_start(conf, say)
    report = do_rollback(conf, to, "cli", say, verify_comfyui=not no_verify)
    if json_out:
        clikit.out(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            clikit.out(line)
        if report.ok:
            clikit.out(f"rollback {report.id} done")
        else:
            clikit.err("error: the rollback failed; the state before it was put back")
    if not report.ok:
        raise clikit.Exit(1)


@click.command("history")
@click.argument("name", required=False)
@click.option("--limit", "-n", type=int, default=50, show_default=True,
              help="The newest N records (0: all).")
@clikit.json_option
@clikit.common
@clikit.handled
def history(name: Optional[str], limit: int, json_out: bool, workspace: Optional[Path],
            config: Optional[Path]) -> None:
    """Every install, update, rollback, repair and drift, oldest first (NAME: only those about
    that component or node)."""
    from agent import history as hist

    conf = clikit.load(config, workspace)
    records = hist.read(conf, name, limit if limit > 0 else None)
    if json_out:
        clikit.out(json.dumps({"records": records, "file": str(hist.path(conf))}, indent=2))
        return
    if not records:
        clikit.out("no history yet" + (f" for {name}" if name else ""))
        return
    for rec in records:
        clikit.out(hist.line(rec))
