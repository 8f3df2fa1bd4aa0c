"""`pod-agent verify`: the model files of `download` components, checked on demand.

Without --hash: each file exists with the size its marker recorded (what the agent's probe
checks). With --hash: its sha256 is computed and compared with the configured one, else the one
recorded when it was downloaded. Reads only: nothing is removed or downloaded (a file that fails
is fixed by `pod-agent install --force NAME`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from agent import clikit


@click.command("verify")
@click.argument("names", nargs=-1)
@click.option("--hash", "full_hash", is_flag=True,
              help="Also compute each file's sha256 (reads every byte: minutes for large "
                   "models).")
@clikit.json_option
@clikit.common
@clikit.handled
def verify(names: tuple[str, ...], full_hash: bool, json_out: bool,
           workspace: Optional[Path], config: Optional[Path]) -> None:
    """Check the model files of download components (size; sha256 with --hash).

    Exit 0 when every file is fine, 1 when one is missing, truncated or (with --hash) does not
    match its sha256."""
    from agent import markers
    from agent.download import sha256_file
    from agent.kinds import download as kind
    from agent.model import AgentError

    conf = clikit.load(config, workspace)
    comps = {n: c for n, c in conf.components.items() if c.kind == "download"}
    for name in names:
        if name not in conf.components:
            raise AgentError(f"unknown component '{name}' (download components: "
                             f"{', '.join(comps) or 'none'})")
        if name not in comps:
            raise AgentError(f"'{name}' is a {conf.components[name].kind} component, not a "
                             "download")
    chosen = [comps[n] for n in names] if names else list(comps.values())
    results = []
    for comp in chosen:
        marker = markers.read(conf.markers_dir, comp.name)
        skipped = kind.skip_reason(comp, None)  # type: ignore[arg-type] - ctx is not used
        if skipped:
            results.append({"component": comp.name, "file": "", "ok": True, "problem": "",
                            "size": None, "sha256": None, "note": skipped})
            continue
        for item in kind.items(comp):
            size, sha = kind.recorded(marker, item)
            expected_sha = item.sha256 or (sha if sha and sha != "-" else None)
            entry = {"component": comp.name, "file": str(item.dest), "ok": True,
                     "problem": "", "size": None, "sha256": None}
            problem = kind._file_problem(item, marker)
            if problem is None and marker is None and item.dest.exists():
                entry["note"] = "no marker: not installed by the agent yet"
            if problem is None:
                entry["size"] = item.dest.stat().st_size
                if full_hash:
                    entry["sha256"] = got = sha256_file(item.dest)
                    if expected_sha and got != expected_sha:
                        problem = (f"sha256 {got[:12]}... does not match {expected_sha[:12]}... "
                                   f"(run `pod-agent install --force {comp.name}`)")
                    elif not expected_sha:
                        entry["note"] = "no sha256 to compare with"
            if problem:
                entry.update(ok=False, problem=problem)
            results.append(entry)
    ok = all(r["ok"] for r in results)
    if json_out:
        clikit.out(json.dumps({"ok": ok, "hash": full_hash, "files": results}))
    elif not results:
        clikit.out("no download components" + (" named" if names else " in the config"))
    else:
        for r in results:
            if r["ok"] and not r["file"]:
                clikit.out(f"skipped  {r['component']}: {r['note']}")
            elif r["ok"]:
                what = f"sha256 {r['sha256'][:12]}..." if r["sha256"] else "size ok"
                extra = f" ({r['note']})" if r.get("note") else ""
                clikit.out(f"ok       {r['component']}: {r['file']} ({r['size']} bytes, "
                           f"{what}){extra}")
            else:
                clikit.out(f"FAILED   {r['component']}: {r['problem']}")
    if not ok:
        raise clikit.Exit(1)
