"""Apply a set of checkout changes safely: restore point, journal, install, verify, roll back.

Public contract (agent/updates/__init__.py re-exports it):

    apply(conf, changes, reason, actor="cli", *, force=False, say=None, verify=True) -> Report

    changes: Change(name, path, from_commit, to_commit, component=None) per git checkout
      (a `git` component's dest, a node of a `nodes` component, or any git checkout under
      custom_nodes: component None). from_commit None means "its HEAD now"; a change whose
      HEAD is not from_commit is refused (AgentError: it moved since it was planned).
    What it does, in this order (each step recorded in the journal before the next begins):
      1. one update at a time per workspace (a lock in <state_dir>/updates; a journal that a
         dead run left is finished or rolled back first, see `recover`);
      2. refuses checkouts with local edits to tracked files (AgentError naming them) unless
         force, which saves the edits with `git stash` (never thrown away);
      3. records the restore point: every change's commit and branch, the target interpreter's
         distributions (name -> version), every component's marker text, which components
         pass their probes, which custom nodes ComfyUI imported at its latest start;
      4. writes the journal (fsync + rename), then moves each checkout (its branch moves with
         it when it is on one), marking each done in the journal;
      5. installs what the new commits need: the components that record the moved checkouts
         and everything that depends on them (agent/execute.py, which also writes their
         markers), and the requirements of moved unmanaged nodes (agent/usernodes.py);
      6. verifies: every component that passed its probe before still does; the health checks
         an update can break (gpu, sageattention, disk: verify.HEALTH_CHECKS) do not fail where
         they did not fail at the restore point; ComfyUI restarted
         (through the running agent, or started here for the check) answers and every custom
         node that imported before still imports (verify=False skips the ComfyUI part);
      7. on success the journal becomes restore point <id> (history: one `update` record per
         change); on any failure it rolls back by itself: checkouts to the recorded commits,
         packages to the recorded versions (changed ones reinstalled, added ones removed),
         markers as they were, ComfyUI restarted and verified again (history: the changes as
         `rolled back`, and a `rollback` record).
    Report.ok is True only for a verified update. Raises AgentError only before anything
    changed (a bad change, a refused checkout, a lock held by a live update, unreadable
    packages); everything after that is in the Report.

    rollback(conf, to=None, actor="cli", say=None) -> Report: back to a restore point (the
      latest good one by default), the same way (it is itself an update with a restore point).

    record_external(conf, changes, reason, actor="external", before_dists=None) -> id: a restore
      point (and history records) for changes someone else already made (ComfyUI-Manager's
      UI), so that `rollback` can undo them.

    exclusive(conf, say=None): a context manager holding the update lock (re-entrant in one
      thread; `apply` takes it too), for a caller whose own steps around `apply` install (a
      snapshot restore): the running agent then defers its passes for all of them.

    recover(conf, say=None, restart=False) -> str | None: a journal left by a run that died
      (kill -9, a pod stop) is completed when its verification had passed, otherwise rolled
      back; returns the one line that says which (None: nothing to do).
"""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from agent import history, markers
from agent.model import AgentError
from agent.updates import git, journal, packages, verify

LOCK_WAIT = 10.0  # seconds to wait for another update's lock before refusing


@dataclass
class Change:
    name: str
    path: Path
    from_commit: str | None
    to_commit: str
    component: str | None = None
    count: int | None = None  # commits between (informational)


@dataclass
class Report:
    id: str
    op: str
    ok: bool = False
    changes: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    import_errors: dict[str, str] = field(default_factory=dict)
    rolled_back: bool = False
    rollback_problems: list[str] = field(default_factory=list)
    verification: str = ""
    packages: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """What happened, for people."""
        out = []
        verb = "rollback" if self.op == "rollback" else "updated"
        for c in self.changes:
            n = f" ({c['count']} commits)" if c.get("count") else ""
            out.append(f"{verb}: {c['name']} {short(c['from'])} -> {short(c['to'])}{n}")
        if self.packages:
            out.append(f"packages: {self.packages}")
        if self.verification.startswith("not verified"):
            out.append(self.verification)
        elif self.verification:
            out.append(f"verified: {self.verification}" if self.ok or not self.failed
                       else f"verification: {self.verification}")
        for f in self.failed:
            out.append(f"failed: {f}")
        for node, error in self.import_errors.items():
            out.append(f"import error: {node}: {error}")
        if self.rolled_back:
            out.append("rolled back: " + (", ".join(
                f"{c['name']} {short(c['to'])} -> {short(c['from'])}" for c in self.changes)
                or "nothing had changed") + "; packages and markers as before"
                + ("" if not self.rollback_problems else " EXCEPT:"))
            out += [f"  not restored: {p}" for p in self.rollback_problems]
        out += [f"note: {n}" for n in self.notes]
        return out


def short(commit: Any) -> str:
    return str(commit)[:12] if commit else "-"


def _quiet(text: str) -> None:
    pass


# ---------------------------------------------------------------------- the state around
def _marker_texts(conf) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in conf.components:
        path = markers.path_for(conf.markers_dir, name)
        try:
            out[name] = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            out[name] = None
    return out


def _restore_markers(conf, texts: dict[str, str | None]) -> list[str]:
    problems = []
    for name, text in texts.items():
        path = markers.path_for(conf.markers_dir, name)
        try:
            if text is None:
                if path.exists() or path.is_symlink():
                    path.unlink()
            else:
                markers.atomic_write(path, text)
        except OSError as exc:
            from agent.fserr import explain

            problems.append(f"marker {name}: {explain(exc)}")
    return problems


def _ok_components(conf) -> set[str]:
    from agent.kinds.base import Ctx
    from agent.observe import OK_STATES, observe

    obs = observe(Ctx(conf))
    return {n for n, o in obs.items() if o.state in OK_STATES}


def _probe_failures(conf, wanted: set[str]) -> list[str]:
    from agent.kinds.base import Ctx
    from agent.observe import OK_STATES, observe

    obs = observe(Ctx(conf))
    return [f"{n}: {obs[n].state.value}: {obs[n].reason}" for n in sorted(wanted)
            if n in obs and obs[n].state not in OK_STATES]


def _converge_broken(conf, wanted: set[str], say) -> list[str]:
    """After a rollback put markers back: the components of `wanted` (those that passed their
    probe at the restore point) that fail it now are installed (a restored marker does not put
    back what the update moved away, e.g. ComfyUI-Manager v3's clone parked in
    custom_nodes/.disabled by the switch to v4), then probed again. Returns what still fails."""
    from agent.execute import Executor

    broken = sorted(p.split(":", 1)[0] for p in _probe_failures(conf, wanted))
    if not broken:
        return []
    say("installing what the restore point had working: " + ", ".join(broken))
    history.set_during("rollback")
    try:
        report = Executor(conf).run(broken)
    except AgentError as exc:
        return [f"{', '.join(broken)}: {exc}"]
    finally:
        history.set_during(None)
    problems = [f"{o.name}: {o.message}" + (f" (log {o.log})" if o.log else "")
                for o in report.outcomes if o.status in ("failed", "blocked")]
    return problems or _probe_failures(conf, wanted)


def _dependents(conf, names: set[str]) -> set[str]:
    out = set(names)
    grew = True
    while grew:
        grew = False
        for n, comp in conf.components.items():
            if n not in out and comp.enabled and set(comp.depends_on) & out:
                out.add(n)
                grew = True
    return {n for n in out if conf.components[n].kind != "overall"}


def _log(conf) -> Path:
    return Path(conf.workspace) / "logs" / "update.log"


def _hist(conf, say, *args, **kw) -> None:
    problem = history.quietly(conf, *args, **kw)
    if problem:
        say(f"warning: {problem}")


# ---------------------------------------------------------------------- apply
def apply(conf, changes: list[Change], reason: str, actor: str = "cli", *, force: bool = False,
          say: Callable[[str], None] | None = None, verify_comfyui: bool = True,
          op: str = "update", target_packages: dict[str, str] | None = None,
          target_markers: dict[str, str | None] | None = None,
          target_ok: list[str] | None = None) -> Report:
    """See the module docstring. op/target_packages/target_markers/target_ok are `rollback`'s:
    packages and markers put back to those of a restore point instead of installing, then the
    components that passed their probe there (target_ok) and fail now installed again."""
    say = say or _quiet
    with exclusive(conf, say):
        line = _recover_locked(conf, say, restart=False)
        if line:
            say(line)
        return _apply_locked(conf, changes, reason, actor, force, say, verify_comfyui, op,
                             target_packages, target_markers, target_ok)


_held_here: dict[tuple[str, int], int] = {}  # (update lock path, thread) -> depth


@contextmanager
def exclusive(conf, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the update lock (one update at a time; the running agent defers its reconcile
    passes meanwhile, after the pass it may be in has ended). Re-entrant in one thread: a
    snapshot restore can hold it around its own steps and the `apply` inside. AgentError when
    another live update holds it for LOCK_WAIT s."""
    from agent.locks import Lock

    key = (str(journal.lock_path(conf)), threading.get_ident())
    if _held_here.get(key):
        _held_here[key] += 1
        try:
            yield
        finally:
            _held_here[key] -= 1
        return
    lock = Lock(journal.lock_path(conf))
    if not lock.acquire(LOCK_WAIT):
        holder = journal.running_elsewhere(conf) or {}
        raise AgentError(f"another update or rollback runs (pid {holder.get('pid', '?')}): "
                         "wait for it to finish")
    _held_here[key] = 1
    try:
        with lock:
            journal.wait_for_agent_pass(conf, say or _quiet)
            yield
    finally:
        _held_here.pop(key, None)


def _check(changes: list[Change], force: bool) -> list[Change]:
    dirty = []
    out = []
    for c in changes:
        head = git.head(c.path)
        if head is None:
            raise AgentError(f"{c.name}: {c.path} is not a git checkout: nothing changed")
        if c.from_commit and head != c.from_commit and not head.startswith(c.from_commit):
            raise AgentError(f"{c.name}: HEAD is {head[:12]}, not {c.from_commit[:12]} as "
                             "planned (it moved meanwhile): nothing changed; run it again")
        c.from_commit = head
        if not git.has_commit(c.path, c.to_commit):
            raise AgentError(f"{c.name}: commit {c.to_commit[:12]} is not in {c.path} "
                             "(fetch it first): nothing changed")
        if head == c.to_commit:
            continue
        edits = git.dirty(c.path)
        if edits and not force:
            dirty.append(f"{c.name} ({len(edits)} file{'s' if len(edits) > 1 else ''}: "
                         f"{', '.join(edits[:3])}{', ...' if len(edits) > 3 else ''})")
        out.append(c)
    if dirty:
        raise AgentError("local edits in " + "; ".join(dirty) + ": not updated, nothing "
                         "changed; commit or stash them, or pass --force (the edits are then "
                         "kept with `git stash`)")
    return out


def _apply_locked(conf, changes, reason, actor, force, say, verify_comfyui, op,
                  target_packages, target_markers, target_ok=None) -> Report:
    changes = _check(list(changes), force)
    python = str(conf.comfyui.python)
    j = journal.new(op, reason, actor, python)
    report = Report(id=j["id"], op=op)
    if not changes and op == "update":
        report.ok = True
        report.verification = "nothing to change"
        return report
    # 3. the restore point
    dists = packages.snapshot(conf.comfyui.python)
    before_imports = verify.baseline(conf)
    j["before"] = {"dists": dists, "markers": _marker_texts(conf),
                   "ok": sorted(_ok_components(conf)), "health": verify.health(conf),
                   "imports": None if before_imports is None else
                   {"ok": sorted(before_imports[0]), "failed": before_imports[1]}}
    j["changes"] = [{"name": c.name, "path": str(c.path), "component": c.component,
                     "from": c.from_commit, "to": c.to_commit, "count": c.count,
                     "branch": git.branch(c.path), "moved": False, "stash": None}
                    for c in changes]
    j["packages"] = target_packages
    j["markers"] = target_markers
    j["target_ok"] = target_ok
    journal.write(conf, j)  # 4. written before the first change
    report.changes = [{k: e[k] for k in ("name", "from", "to", "count", "component")}
                      for e in j["changes"]]
    say(f"restore point {j['id']} recorded ({len(changes)} checkout"
        f"{'s' if len(changes) > 1 else ''}, {len(dists)} packages)")
    try:
        problems, _ = _forward_and_verify(conf, j, say, verify_comfyui, before_imports,
                                          reason, report)
    except KeyboardInterrupt:  # Ctrl-C: stop what runs, then undo at once (not at next start)
        from agent import procs

        procs.terminate_all()
        problems = ["interrupted (Ctrl-C)"]
        # undone at once; ComfyUI restarted only where an agent runs it (the old state back in
        # the supervised ComfyUI), not started here for another check
        verify_comfyui = verify_comfyui and verify.agent_running(conf) is not None
    if not problems:
        j["phase"] = "verified"
        journal.write(conf, j)
        for e in j["changes"]:
            _hist(conf, say, op, component=e["name"], frm=short(e["from"]), to=short(e["to"]),
                  result="ok", actor=actor, id=j["id"], reason=reason,
                  detail=(f"{e['count']} commits" if e.get("count") else "")
                  + (f"; local edits kept in git stash {short(e['stash'])}" if e["stash"]
                     else ""))
        journal.finish(conf, j, "ok")
        report.ok = True
        report.packages = _pkg_summary(j)
        report.notes += [f"{e['name']}: local edits kept with git stash ({short(e['stash'])})"
                         for e in j["changes"] if e["stash"]]
        return report
    report.failed = problems
    if not j.get("after"):  # what the failed update had changed, for the report
        try:
            j["after"] = {"dists": packages.snapshot(conf.comfyui.python)}
        except AgentError:
            pass
    report.packages = _pkg_summary(j)
    say("failed: " + problems[0] + ("" if len(problems) == 1 else f" (+{len(problems) - 1} more)")
        + "; rolling back")
    rb_problems, rb_check = _rollback(conf, j, say, restart=verify_comfyui,
                                      before_imports=before_imports)
    report.rolled_back = True
    report.rollback_problems = rb_problems
    report.notes += [f"{e['name']}: local edits kept with git stash ({short(e['stash'])}); "
                     "`git stash pop` there brings them back" for e in j["changes"] if e["stash"]]
    if rb_check is not None:
        report.notes.append(f"after the rollback: {rb_check.detail}")
    error = problems[0]
    for e in j["changes"]:
        _hist(conf, say, op, component=e["name"], frm=short(e["from"]), to=short(e["to"]),
              result="rolled back", actor=actor, id=j["id"], reason=reason, error=error,
              detail=f"failed: {error}"[:500])
    _hist(conf, say, "rollback", components=[e["name"] for e in j["changes"]],
          frm=", ".join(short(e["to"]) for e in j["changes"])[:200],
          to=", ".join(short(e["from"]) for e in j["changes"])[:200],
          result="ok" if not rb_problems else "incomplete", actor=actor, id=j["id"],
          detail=f"automatic, after {op} {j['id']} failed"
                 + (": not restored: " + "; ".join(rb_problems) if rb_problems else ""))
    journal.finish(conf, j, "rolled back" if not rb_problems else "rollback incomplete")
    return report


def _forward_and_verify(conf, j, say, verify_comfyui, before_imports, reason,
                        report: Report) -> tuple[list[str], "verify.Check | None"]:
    try:
        problems = _forward(conf, j, say)
    except Exception as exc:  # noqa: BLE001 - whatever broke, the journal knows how to undo
        from agent.fserr import explain

        problems = [explain(exc)]
    check = None
    if not problems:
        j["phase"] = "verifying"
        j["after"] = {"dists": packages.snapshot(conf.comfyui.python)}
        journal.write(conf, j)
        problems = _probe_failures(conf, set(j["before"]["ok"]))
        if not problems:
            problems = verify.health_regressions(j["before"].get("health") or {},
                                                 verify.health(conf))
        if not problems and verify_comfyui:
            check = _comfy_check(conf, j, say, before_imports, reason)
            report.verification = check.detail
            if not check.ok:
                problems = [check.detail]
                report.import_errors = dict(check.failed)
        elif not problems:
            report.verification = "component probes pass (ComfyUI not restarted)"
            if verify.agent_running(conf) is not None:  # it loads the change, unchecked
                verify.request_restart(conf, wait_answer=10.0)
                report.verification = ("component probes pass; the running agent restarts "
                                       "ComfyUI (imports not checked)")
    return problems, check


def _pkg_summary(j: dict) -> str:
    from agent import drift

    before = j.get("before", {}).get("dists") or {}
    after = (j.get("after") or {}).get("dists")
    if after is None:
        return ""
    d = drift.diff(before, after)
    return drift.summary(d) if not drift.empty(d) else "unchanged"


def _forward(conf, j: dict, say) -> list[str]:
    """Steps 4 and 5: move the checkouts, then install (or put back packages and markers)."""
    for e in j["changes"]:
        path = Path(e["path"])
        if git.dirty(path):
            e["stash"] = git.stash(path, f"pod-agent {j['op']} {j['id']}: local edits")
            journal.write(conf, j)
        git.keep(path, f"restore-{j['id']}", e["from"])
        git.move(path, e["to"], e["branch"])
        e["moved"] = True
        journal.write(conf, j)
        say(f"{e['name']}: {short(e['from'])} -> {short(e['to'])}")
    if j["op"] != "update":  # a rollback: the restore point's packages and markers
        problems: list[str] = []
        if j.get("packages") is not None:
            _, problems = packages.restore(conf, j["packages"], _log(conf))
        if j.get("markers") is not None:
            problems += _restore_markers(conf, j["markers"])
        if not problems and j.get("target_ok") is not None:
            problems += _converge_broken(conf, set(j["target_ok"]), say)
        return problems
    return _install(conf, j, say)


def _install(conf, j: dict, say) -> list[str]:
    from agent.execute import Executor

    comps = {e["component"] for e in j["changes"] if e.get("component")}
    problems: list[str] = []
    if comps:
        names = sorted(_dependents(conf, comps))
        say("installing what the new commits need: " + ", ".join(names))
        history.set_during(f"{j['op']} {j['id']}")
        try:
            report = Executor(conf).run(names, phase="foreground")
        finally:
            history.set_during(None)
        problems += [f"{o.name}: {o.message}" + (f" (log {o.log})" if o.log else "")
                     for o in report.outcomes if o.status in ("failed", "blocked")]
    if any(not e.get("component") for e in j["changes"]) and not problems:
        from agent import usernodes
        from agent.kinds.base import Ctx

        changed, failures = usernodes.converge(Ctx(conf))
        for node, what in changed.items():
            say(f"custom_nodes/{node}: {what}")
        problems += failures
    return problems


def _comfy_check(conf, j, say, before_imports, reason) -> verify.Check:
    names = {e["name"] for e in j["changes"]} | {Path(e["path"]).name for e in j["changes"]}
    whole = any(Path(e["path"]).resolve() == Path(conf.comfyui.dir).resolve()
                for e in j["changes"])
    return verify.restart_and_check(conf, reason, names, whole, say, before=before_imports)


def _rollback(conf, j: dict, say, restart: bool, before_imports=None,
              recovering: bool = False) -> tuple[list[str], verify.Check | None]:
    """Back to the journal's before-state: checkouts, packages, markers; then verify."""
    j["phase"] = "rolling_back"
    journal.write(conf, j)
    problems: list[str] = []
    for e in reversed(j["changes"]):
        path = Path(e["path"])
        try:
            if recovering:
                git.clear_stale_lock(path)
            if git.head(path) != e["from"] or recovering:
                git.move(path, e["from"], e.get("branch"), force=True)
                say(f"{e['name']}: back to {short(e['from'])}")
        except AgentError as exc:
            problems.append(f"{e['name']}: {exc}")
    try:
        done, pkg_problems = packages.restore(conf, j["before"]["dists"], _log(conf))
        if done != "packages unchanged":
            say(f"packages put back: {done}")
        problems += pkg_problems
    except AgentError as exc:
        problems.append(str(exc))
    problems += _restore_markers(conf, j["before"]["markers"])
    if j["op"] == "update" and any(not e.get("component") for e in j["changes"]):
        try:  # unmanaged nodes: their recorded state follows the checkouts
            from agent import usernodes
            from agent.kinds.base import Ctx

            usernodes.converge(Ctx(conf))
        except Exception as exc:  # noqa: BLE001 - reported, the rollback goes on
            problems.append(f"custom nodes: {exc}")
    try:  # what passed before and fails now (markers alone do not bring it back): install
        still = _converge_broken(conf, set(j["before"].get("ok") or ()), say)
    except Exception as exc:  # noqa: BLE001 - reported, the rollback goes on
        from agent.fserr import explain

        still = [explain(exc)]
    problems += [f"still failing after the rollback: {p}" for p in still]
    check = None
    if not restart and not recovering and verify.agent_running(conf) is not None:
        verify.request_restart(conf, wait_answer=10.0)  # the supervised ComfyUI: old state
    if restart and not problems:
        check = verify.restart_and_check(
            conf, f"rollback of {j['id']}", {e["name"] for e in j["changes"]}, False, say,
            before=before_imports)
        if not check.ok:
            problems.append(f"ComfyUI after the rollback: {check.detail}")
    return problems, check


# ---------------------------------------------------------------------- recovery
def recover(conf, say: Callable[[str], None] | None = None, restart: bool = False) -> str | None:
    """Finish or undo what a dead update left (see the module docstring); None when nothing
    was left. Never waits for a live update: returns None while one runs."""
    from agent.locks import Lock

    say = say or _quiet
    if not journal.journal_path(conf).exists():
        return None
    lock = Lock(journal.lock_path(conf))
    if not lock.acquire(0):
        return None
    with lock:
        return _recover_locked(conf, say, restart)


def _recover_locked(conf, say, restart: bool) -> str | None:
    j = journal.load(conf)
    if j is None:
        return None
    who = f"{j['op']} {j['id']} (pid {j.get('pid')} on {j.get('host')})"
    if j.get("host") not in (None, socket.gethostname()):
        say(f"note: the interrupted {who} was another pod's; finishing it here")
    if j["phase"] == "verified":
        for e in j["changes"]:
            _hist(conf, say, j["op"], component=e["name"], frm=short(e["from"]),
                  to=short(e["to"]), result="ok", id=j["id"],
                  detail="verified before an interruption; completed at the next start")
        journal.finish(conf, j, "ok")
        return f"interrupted {who}: it had been verified; completed"
    say(f"interrupted {who} in phase {j['phase']}: rolling it back")
    before = j["before"].get("imports")
    before_imports = None if before is None else (set(before["ok"]), dict(before["failed"]))
    problems, _ = _rollback(conf, j, say, restart=restart, before_imports=before_imports,
                            recovering=True)
    for e in j["changes"]:
        _hist(conf, say, j["op"], component=e["name"], frm=short(e["from"]),
              to=short(e["to"]), result="rolled back", id=j["id"],
              detail="interrupted (the process died); rolled back at the next start")
    _hist(conf, say, "rollback", components=[e["name"] for e in j["changes"]],
          result="ok" if not problems else "incomplete", id=j["id"],
          detail=f"interrupted {j['op']} {j['id']} rolled back at the next start"
                 + (": not restored: " + "; ".join(problems) if problems else ""))
    journal.finish(conf, j, "rolled back" if not problems else "rollback incomplete")
    if problems:
        return f"interrupted {who}: rolled back, but not everything: " + "; ".join(problems)
    return f"interrupted {who}: rolled back to the state before it"


def recover_at_start(conf, say: Callable[[str], None]) -> None:
    """For `install` and `run`: recover, saying what happened; never raises."""
    try:
        line = recover(conf, say)
    except Exception as exc:  # noqa: BLE001 - the start goes on; the journal stays for later
        from agent.fserr import explain

        say(f"warning: an interrupted update could not be finished: {explain(exc)} "
            f"(journal {journal.journal_path(conf)} kept)")
        return
    if line:
        say(line)


# ---------------------------------------------------------------------- changes made elsewhere
def record_external(conf, changes: list[Change], reason: str, actor: str = "external",
                    before_dists: dict[str, str] | None = None,
                    before_markers: dict[str, str | None] | None = None) -> str:
    """A restore point for changes someone else already made (ComfyUI-Manager's UI pulled a
    node, a snapshot restore): `rollback` can then undo them like an update. before_dists /
    before_markers: the state before, when the caller knows it (the agent's last dists
    listing); otherwise the current one (the rollback then leaves packages and markers as they
    are now). Writes one history record per change. Returns the restore point's id."""
    j = journal.new("external", reason, actor, str(conf.comfyui.python))
    j["before"] = {"dists": before_dists if before_dists is not None
                   else packages.snapshot(conf.comfyui.python),
                   "markers": before_markers if before_markers is not None
                   else _marker_texts(conf), "ok": [], "imports": None}
    j["changes"] = [{"name": c.name, "path": str(c.path), "component": c.component,
                     "from": c.from_commit, "to": c.to_commit, "count": c.count,
                     "branch": git.branch(c.path), "moved": True, "stash": None}
                    for c in changes]
    for c in changes:
        if c.from_commit:
            try:
                git.keep(c.path, f"restore-{j['id']}", c.from_commit)
            except AgentError:
                pass  # the commit is gone already: rollback will say so
    dest = journal.points_dir(conf) / f"{j['id']}.json"
    j.update(result="ok", phase="done", finished=j["started"])
    import json as _json

    markers.atomic_write(dest, _json.dumps(j, indent=1, default=str))
    journal.prune(conf)
    for c in changes:
        history.quietly(conf, "external", component=c.name, frm=short(c.from_commit),
                        to=short(c.to_commit), result="ok", actor=actor, id=j["id"],
                        detail=reason)
    return j["id"]


# ---------------------------------------------------------------------- rollback by hand
def rollback(conf, to: str | None = None, actor: str = "cli",
             say: Callable[[str], None] | None = None, verify_comfyui: bool = True) -> Report:
    """Back to restore point `to` (an id or its unique prefix), default the latest whose
    update succeeded: every checkout any later restore point moved goes back to its commit
    then, packages and markers as they were then. Itself recorded as a restore point."""
    say = say or _quiet
    pts = journal.points(conf)
    if not pts:
        raise AgentError("no restore point yet: `pod-agent update` records one before it "
                         "changes anything")
    if to is None:
        good = [p for p in pts if p.get("result") == "ok"]
        if not good:
            raise AgentError("no restore point of a finished update (the failed ones were "
                             "rolled back already): see `pod-agent history`")
        point = good[-1]
    else:
        hits = [p for p in pts if p["id"] == to] or [p for p in pts if p["id"].startswith(to)]
        if len(hits) != 1:
            known = ", ".join(p["id"] for p in pts[-10:])
            raise AgentError(f"no restore point {to!r}" + (" (ambiguous)" if hits else "")
                             + f" (known: {known})")
        point = hits[0]
    later = pts[pts.index(point):]
    wanted: dict[str, dict] = {}
    for p in later:  # the earliest `from` of every path wins: the state at `point`
        for e in p["changes"]:
            if e.get("from"):  # a node that did not exist before has no commit to go back to
                wanted.setdefault(e["path"], e)
    changes = []
    for path, e in wanted.items():
        head = git.head(Path(path))
        if head is None:
            raise AgentError(f"{e['name']}: {path} is not a git checkout any more: cannot "
                             "roll back to its commit")
        changes.append(Change(e["name"], Path(path), head, e["from"], e.get("component")))
    return apply(conf, changes, f"rollback to {point['id']}", actor, force=False, say=say,
                 verify_comfyui=verify_comfyui, op="rollback",
                 target_packages=point["before"]["dists"],
                 target_markers=point["before"]["markers"],
                 target_ok=point["before"].get("ok"))
