"""`pod-agent snapshot save|restore`: ComfyUI-Manager snapshots (agent/snapshot.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from agent import clikit


@click.group("snapshot")
def snapshot() -> None:
    """ComfyUI-Manager snapshots: save the custom nodes (and packages), restore them."""


def _counts(snap: dict) -> str:
    return (f"{len(snap['git_custom_nodes'])} git nodes, {len(snap['cnr_custom_nodes'])} "
            f"registry nodes, {len(snap['file_custom_nodes'])} file nodes, "
            f"{len(snap['pips'])} packages")


@snapshot.command("save")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@clikit.json_option
@clikit.common
@clikit.handled
def save(path: Optional[Path], json_out: bool, workspace, config) -> None:
    """Write the workspace's snapshot in ComfyUI-Manager's format.

    PATH ends in .json or .yaml; without it, the Manager's own snapshot folder for the detected
    generation (v3: ComfyUI/user/default/ComfyUI-Manager/snapshots, v4:
    ComfyUI/user/__manager/snapshots), named as the Manager names them.
    """
    from agent import snapshot as snapmod

    conf = clikit.load(config, workspace)
    target, snap, warnings = snapmod.save(conf, path)
    if json_out:
        clikit.out(json.dumps({"path": str(target), "snapshot": snap, "warnings": warnings}))
        return
    for w in warnings:
        clikit.err(f"warning: {w}")
    clikit.out(f"snapshot written: {target} ({_counts(snap)})")


@snapshot.command("restore")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--prune", is_flag=True,
              help="Disable (move to custom_nodes/.disabled, never delete) nodes the snapshot "
                   "does not list.")
@click.option("--pips", is_flag=True, help="Also install the snapshot's Python packages.")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--no-verify", is_flag=True,
              help="Do not restart ComfyUI to check that every node still imports.")
@click.option("--registry", metavar="<url>", default=None,
              help="The Comfy Registry API for registry nodes (default: the comfyui_manager "
                   "component's `registry`, env POD_AGENT_REGISTRY_URL, https://api.comfy.org).")
@clikit.json_option
@clikit.common
@clikit.handled
def restore(path: Path, prune: bool, pips: bool, dry_run: bool, no_verify: bool,
            registry: Optional[str], json_out: bool, workspace, config) -> None:
    """Make the custom nodes match a ComfyUI-Manager snapshot (.json or .yaml).

    Every git node at its commit, disabled ones in custom_nodes/.disabled, registry nodes from
    the Comfy Registry; nodes the snapshot does not list are left alone unless --prune.
    Like an update: a restore point first, ComfyUI restarted and checked (every node that
    imported before still imports), everything undone when that fails. Every node that could
    not be restored is named with the reason, and the exit status is 1.
    """
    from agent import snapshot as snapmod

    conf = clikit.load(config, workspace, create=not dry_run)
    snap = snapmod.read(path)
    if dry_run:
        plan = snapmod.plan(conf, snap, prune=prune, pips=pips)
        if json_out:
            clikit.out(json.dumps({"ok": not plan.failures, "dry_run": True,
                                   "changes": [c.text() for c in plan.changes],
                                   "failed": [{"name": n, "reason": r}
                                              for n, r in plan.failures],
                                   "notes": plan.notes, "unchanged": plan.unchanged}))
        else:
            for note in plan.notes:
                clikit.out(f"note: {note}")
            for c in plan.changes:
                clikit.out(f"would {c.text()}")
            for n, r in plan.failures:
                clikit.out(f"cannot restore {n}: {r}")
            clikit.out(f"{len(plan.changes)} change(s), {plan.unchanged} already as in the "
                       f"snapshot, {len(plan.failures)} cannot be restored (dry run: nothing "
                       "changed)")
        raise clikit.Exit(1 if plan.failures else 0)
    outcome = snapmod.restore_cli(conf, snap, path, prune=prune, pips=pips, registry=registry,
                                  progress=None if json_out else clikit.out,
                                  verify=not no_verify)
    plan, result = outcome["plan"], outcome["result"]
    if json_out:
        clikit.out(json.dumps({"ok": result.ok, "done": result.done,
                               "failed": [{"name": n, "reason": r} for n, r in result.failed],
                               "notes": plan.notes, "unchanged": plan.unchanged,
                               "rolled_back": outcome.get("rolled_back", False)}))
    else:
        for note in plan.notes:
            clikit.out(f"note: {note}")
        for n, r in result.failed:
            clikit.err(f"FAILED {n}: {r}")
        extra = outcome.get("message")
        if extra:
            clikit.err(extra)
        if outcome.get("verification"):
            clikit.out(f"verified: {outcome['verification']}")
        report = outcome.get("report")
        if report is not None and report.verification and report.ok:
            clikit.out(f"verified: {report.verification}")
        if outcome.get("rolled_back"):
            clikit.out("rolled back: the restore was undone (checkouts, folders, packages)")
        clikit.out(f"{len(result.done)} change(s) made, {plan.unchanged} already as in the "
                   f"snapshot, {len(result.failed)} could not be restored")
    if not result.ok:
        raise clikit.Exit(1)
