"""Execute a plan: per-component lock, check again inside it, install, probe, marker last."""

from __future__ import annotations

import json
import threading
from pathlib import Path
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from agent import markers, procs
from agent.kinds import KINDS
from agent.kinds.base import Ctx, InstallError
from agent.locks import Lock
from agent.fserr import explain
from agent.markers import atomic_write
from agent.model import Action, AgentError, Config, Observed, Outcome, State, Step
from agent.observe import (OK_STATES, failure_path, fingerprint, lock_path, observe,
                           observe_one, observe_overall)
from agent.plan import closure, make
from agent.redact import redact


MAX_RETRY_DELAY = 300.0  # seconds: the longest wait between two attempts


def backoff(initial: float, attempt: int) -> float:
    """initial * 2**attempt, capped (no huge powers: retries may be large)."""
    return min(MAX_RETRY_DELAY, initial * (2 ** min(attempt, 20)))


class Reporter(Protocol):
    def begin(self, step: Step) -> None: ...
    def end(self, outcome: Outcome) -> None: ...


def describe(outcome: Outcome) -> str:
    """One line for an outcome, the status said once: `x: installed in 2.0s (1.0)`,
    `x: already installed (...)`, `x: failed: <reason>` (never `installed: installed`)."""
    msg = outcome.message or ""
    if not msg:
        return f"{outcome.name}: {outcome.status}"
    # an install's message says what was done ("installed in 2.0s", "already installed",
    # "repaired by ..."); the others are reasons that need their status in front
    if outcome.status in ("installed", "already") or msg.startswith(outcome.status):
        return f"{outcome.name}: {msg}"
    return f"{outcome.name}: {outcome.status}: {msg}"


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    requested: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return all(o.status in ("installed", "already", "skipped", "disabled")
                   for o in self.outcomes if o.name in self.requested)

    @property
    def changed(self) -> list[str]:
        return [o.name for o in self.outcomes if o.status == "installed"]


class Executor:
    def __init__(self, config: Config, reporter: Reporter | None = None,
                 stop: threading.Event | None = None, gpu: bool | None = None,
                 lock_timeout: float | None = None, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.ctx = Ctx(config, gpu=gpu)
        self.reporter = reporter
        self.stop = stop or threading.Event()
        self.lock_timeout = lock_timeout
        self._sleep = sleep

    # ------------------------------------------------------------------ progress
    def progress(self, text: str) -> None:
        line = f"[{markers.now_stamp()}] {redact(text)}\n"
        try:
            self.config.progress_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.config.progress_log, "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError:
            pass

    # ------------------------------------------------------------------ main
    def run(self, names: Iterable[str] | None = None, force: bool = False,
            phase: str = "all") -> Report:
        """Converge the named components (with their dependencies) or all of them.

        phase: "all", "foreground" (skip background components) or "background"."""
        comps = self.config.components
        named = list(names) if names is not None else None
        for n in named or []:
            if n not in comps:
                raise AgentError(f"unknown component '{n}' (known: {', '.join(comps)})")
        targets = closure(comps, named) if named is not None else None
        observed = observe(self.ctx)
        steps = make(self.config.order(), comps, observed, targets, force,
                     set(named) if named is not None else None)
        report = Report(requested=set(targets) if targets is not None else set(comps))
        status: dict[str, str] = {}
        self.progress(f"install started: {len(steps)} components"
                      + (f" ({', '.join(named)})" if named else ""))
        for step in steps:
            comp = comps[step.name]
            if phase == "foreground" and comp.background or \
                    phase == "background" and not comp.background:
                status[step.name] = "installed" if observed[step.name].state in OK_STATES \
                    else "pending"
                continue
            if self.stop.is_set():
                break
            outcome = self._step(step, observed[step.name], status)
            status[step.name] = outcome.status
            report.outcomes.append(outcome)
        if not self.stop.is_set() and phase != "background" and named is None:
            report.outcomes.extend(self._guarded("user_nodes", self._user_nodes))
        if not self.stop.is_set():
            # nothing installed and everything fine when the pass began: what observe() saw
            # is still the truth, the overall marker needs no second probe of every component
            unchanged = observed if not report.changed and all(
                o.state in OK_STATES for n, o in observed.items()
                if comps[n].kind != "overall") else None
            report.outcomes.extend(self._guarded(
                "overall", lambda: self._overall(targets, quiet=phase == "foreground",
                                                 observed=unchanged)))
        failed = [o.name for o in report.outcomes if o.status in ("failed", "blocked")]
        self.progress("install finished: " + ("ok" if not failed else
                                              "not installed: " + ", ".join(failed)))
        return report

    def _guarded(self, what: str, fn: Callable[[], list[Outcome]]) -> list[Outcome]:
        """A pass-wide step (user nodes, the overall marker) that fails is reported as such,
        after every component had its turn."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - as in _step
            reason = explain(exc)
            self.progress(f"{what}: failed: {reason}")
            # named after the component when there is one, and shown: `install` must not say
            # "Nothing to do" (exit 0) when the overall marker could not be written
            names = [n for n, c in self.config.components.items()
                     if c.kind == "overall" and c.enabled] if what == "overall" else []
            outcomes = [Outcome(n, "failed", redact(reason)) for n in names or [what]]
            for outcome in outcomes:
                if self.reporter:
                    self.reporter.end(outcome)
            return outcomes

    # ------------------------------------------------------------------ one step
    def _blocked_by(self, step: Step, status: dict[str, str]) -> str | None:
        """The dependency that is not installed, or None. A dependency this pass found
        installed when it began is looked at again before the step does any work: a burst of
        marker removals can land while the pass runs, and a dependent must never be reinstalled
        before its dependency (the next pass, which the removal requested, does both in order)."""
        recheck = step.action not in (Action.SKIP, Action.UPGRADE_MARKER)
        for dep in step.needs:
            st = status.get(dep)
            if st == "installed" or (st == "already" and not recheck):
                continue
            if st in (None, "already"):
                obs = observe_one(self.config.components[dep], self.ctx)
                if obs.state == State.INSTALLED:
                    continue
            return dep
        return None

    def _step(self, step: Step, obs: Observed, status: dict[str, str]) -> Outcome:
        """One component. Whatever goes wrong in it (a filesystem error, a bug in a probe) is
        this component's failure with a one-line reason, never the end of the run: the
        components that do not depend on it are still converged."""
        try:
            return self._step_inner(step, obs, status)
        except Exception as exc:  # noqa: BLE001 - one component's failure stays its own
            comp = self.config.components[step.name]
            reason = explain(exc)
            if not isinstance(exc, (OSError, AgentError)):  # a bug: keep the traceback
                self._log_traceback(comp, exc)
            self._record_failure(comp, reason)
            return self._report(step, Outcome(step.name, "failed", redact(reason),
                                              log=str(comp.log)))

    def _log_traceback(self, comp, exc: BaseException) -> None:
        import traceback

        try:
            comp.log.parent.mkdir(parents=True, exist_ok=True)
            with open(comp.log, "a", encoding="utf-8") as fh:
                fh.write(f"\n=== {markers.now_stamp()} internal error (please report it)\n")
                fh.write(redact("".join(traceback.format_exception(exc))))
        except OSError:
            pass

    def _record_failure(self, comp, reason: str) -> None:
        """The failure record `status` shows; best effort: on a full or read-only disk the
        outcome (and the missing marker) still tell the truth."""
        if self.stop.is_set():  # an install cut short by shutdown is not a failure
            return
        record = {"time": markers.now_stamp(), "reason": redact(reason), "log": str(comp.log)}
        try:
            atomic_write(failure_path(self.config, comp.name), json.dumps(record))
        except OSError as exc:
            self.progress(f"{comp.name}: cannot record the failure: {explain(exc)}")

    def _step_inner(self, step: Step, obs: Observed, status: dict[str, str]) -> Outcome:
        comp = self.config.components[step.name]
        if step.action == Action.DISABLED:
            return self._report(step, Outcome(step.name, "disabled", "disabled in config"),
                                announce=False)
        if step.action == Action.SKIP_NO_GPU:
            return self._report(step, Outcome(step.name, "skipped", step.reason),
                                announce=False)
        blocker = self._blocked_by(step, status)
        if blocker is not None:
            outcome = Outcome(step.name, "blocked", f"blocked by {blocker}")
            self._report(step, outcome, announce=False)
            return outcome
        if step.action == Action.SKIP:
            return self._report(step, self._already(step.name, obs), announce=False)
        # a broken component after a dependency was reinstalled in this pass may well be fine
        # now: "reinstalling" is said once the check inside the lock shows it is not
        defer = step.action == Action.REINSTALL and not step.forced and \
            any(st == "installed" for st in status.values())
        if self.reporter and step.action != Action.UPGRADE_MARKER and not defer:
            self.reporter.begin(step)  # a legacy marker upgrade installs nothing: no "installing"
        lock = Lock(lock_path(self.config, step.name))
        timeout = self.lock_timeout if self.lock_timeout is not None else comp.timeout + 60
        waited = []
        if not lock.acquire(timeout, on_wait=lambda h: waited.append(h)):
            return self._report(step, Outcome(step.name, "failed",
                                              f"another installer held the lock for {timeout:g}s"))
        with lock:
            if lock.previous:
                dead = lock.previous
                self.progress(f"{step.name}: the previous installer (pid {dead.get('pid')} on "
                              f"{dead.get('host')}) died without finishing"
                              + (f"; ended {len(lock.ended)} process(es) it left running "
                                 f"(pids {', '.join(map(str, lock.ended))})"
                                 if lock.ended else ""))
            # Check again inside the lock: another process may have finished the work.
            self.ctx.invalidate()
            now = observe_one(comp, self.ctx)
            forced = step.forced
            if now.state == State.INSTALLED and now.legacy and not forced:
                return self._report(step, self._upgrade(step.name, now))
            if now.state == State.INSTALLED and (waited or not forced):
                if obs.state != State.INSTALLED and not waited:
                    return self._report(step, self._repaired(step, now, status))
                return self._report(step, self._already(step.name, now, by_other=bool(waited)))
            if defer and self.reporter:
                self.reporter.begin(step)
            return self._report(step, self._install(step, now))

    def _report(self, step: Step, outcome: Outcome, announce: bool = True) -> Outcome:
        if self.reporter:
            self.reporter.end(outcome)
        if announce or outcome.status in ("blocked", "failed"):
            self.progress(describe(outcome))
        return outcome

    def _already(self, name: str, obs: Observed, by_other: bool = False) -> Outcome:
        m = obs.marker
        version = m.meta.get("version", "-") if m else "-"
        who = " by another process" if by_other else ""
        return Outcome(name, "already",
                       f"already installed{who} ({m.timestamp if m else '?'}, {version})")

    def _repaired(self, step: Step, obs: Observed, status: dict[str, str]) -> Outcome:
        """Planned for a reinstall (its probe failed), fine by the time its turn came: a
        dependency reinstalled earlier in this pass repaired it. Said so, not `already
        installed (<old time>)` right after it was reported broken."""
        m = obs.marker
        version = m.meta.get("version", "-") if m else "-"
        deps = [d for d in step.needs if status.get(d) == "installed"] or \
            [d for d, st in status.items() if st == "installed"]
        what = (f"repaired by reinstalling its dependency {', '.join(deps)}" if deps else
                "fine again when its turn came (was: " + (step.reason or "broken") + ")")
        return Outcome(step.name, "already", f"{what}; its own install is kept "
                                             f"({m.timestamp if m else '?'}, {version})")

    def _write_marker(self, name: str, meta: dict[str, str], duration: float,
                      stamp: str | None = None) -> None:
        comp = self.config.components[name]
        fp, parts = fingerprint(comp, self.ctx)
        full = {"version": meta.pop("version", "-"), "fingerprint": fp, "inputs": parts,
                "python": str(self.config.comfyui.python), "duration": f"{duration:.1f}s",
                "kind": comp.kind}
        full.update(meta)
        markers.write(self.config.markers_dir, name, full, stamp=stamp)

    def _upgrade(self, name: str, obs: Observed) -> Outcome:
        comp = self.config.components[name]
        meta = KINDS[comp.kind].current_meta(comp, self.ctx)
        # Keep the recorded install time: upgrading the format installs nothing.
        self._write_marker(name, meta, 0.0, stamp=obs.marker.timestamp if obs.marker else None)
        stamp = obs.marker.timestamp if obs.marker else "?"
        return Outcome(name, "already", f"already installed ({stamp}, legacy marker upgraded)")

    def _install(self, step: Step, obs: Observed) -> Outcome:
        comp = self.config.components[step.name]
        kind = KINDS[comp.kind]
        verb = "reinstalling" if step.action == Action.REINSTALL else "installing"
        self.progress(f"{comp.name}: {verb}" + (f" ({step.reason})" if step.reason else ""))
        if obs.state != State.INSTALLED:
            # A stale or broken marker must not survive a failed attempt: scripts that only
            # look at marker files (the old check_install_status.sh) would believe it.
            markers.remove(self.config.markers_dir, comp.name)
        start = time.monotonic()
        error = ""
        for attempt in range(comp.retries + 1):
            if self.stop.is_set():
                error = "stopped"
                break
            try:
                meta = kind.install(comp, self.ctx, obs.marker)
                self.ctx.invalidate()
                problem = kind.probe(comp, self.ctx, None)
                if problem is not None:
                    raise InstallError(f"installer finished but the probe fails: {problem.reason}")
            except InstallError as exc:
                error = str(exc)
                if attempt < comp.retries and not self.stop.is_set():
                    delay = backoff(comp.retry_backoff, attempt)
                    self.progress(f"{comp.name}: attempt {attempt + 1} failed ({error}); "
                                  f"retrying in {delay:g}s")
                    self.stop.wait(delay) if delay else None
                continue
            except (OSError, AgentError) as exc:  # a full disk, a read-only folder: no retry
                error = explain(exc)
                break
            duration = time.monotonic() - start
            self._write_marker(comp.name, dict(meta), duration)
            try:
                failure_path(self.config, comp.name).unlink(missing_ok=True)
            except OSError:
                pass
            version = meta.get("version", "-")
            self._history(comp.name, obs, version, "ok", f"in {duration:.1f}s")
            return Outcome(comp.name, "installed", f"installed in {duration:.1f}s ({version})",
                           log=str(comp.log), duration=duration)
        duration = time.monotonic() - start
        tail = procs.tail(comp.log, 15)
        self._record_failure(comp, error)
        if not self.stop.is_set():
            self._history(comp.name, obs, "-", "failed", redact(error))
        return Outcome(comp.name, "failed", redact(error), log=str(comp.log), tail=tail,
                       duration=duration)

    def _history(self, name: str, obs: Observed, to: str, result: str, detail: str) -> None:
        """One history record per installer run (agent/history.py): a repair when the
        component was there but broken, else an install."""
        from agent import history

        kind = "repair" if obs.state == State.BROKEN else "install"
        frm = obs.marker.meta.get("version", "-") if obs.marker else "-"
        problem = history.quietly(self.config, kind, component=name, frm=frm, to=to,
                                  result=result, detail=detail)
        if problem:
            self.progress(f"{name}: {problem}")

    def _user_nodes(self) -> list[Outcome]:
        """Nodes cloned by hand or by ComfyUI-Manager: requirements and install.py."""
        from agent import usernodes

        changed, failures = usernodes.converge(self.ctx)
        log = str(usernodes.pseudo_component(self.config).log)
        out = [Outcome(f"custom_nodes/{n}", "installed", what, log=log)
               for n, what in changed.items()]
        out += [Outcome("user_nodes", "failed", f, log=log, tail=procs.tail(Path(log), 15))
                for f in failures]
        for o in out:
            self.progress(describe(o))
        return out

    # ------------------------------------------------------------------ derived
    def _overall(self, targets: set[str] | None, quiet: bool = False,
                 observed: dict[str, Observed] | None = None) -> list[Outcome]:
        """Write or remove the overall markers. `observed`: the components' states when they
        are known to be current (a pass that changed nothing); else each is observed again."""
        out = []
        for name, comp in self.config.components.items():
            if comp.kind != "overall" or not comp.enabled:
                continue
            if observed is None:
                observed = {n: observe_one(c, self.ctx) for n, c in
                            self.config.components.items() if c.kind != "overall"}
            others = {n: o for n, o in observed.items()
                      if self.config.components[n].kind != "overall"}
            obs = observe_overall(comp, self.ctx, others)
            all_ok = all(o.state in OK_STATES for o in others.values())
            if all_ok and obs.state != State.INSTALLED:
                self._write_marker(name, KINDS["overall"].current_meta(comp, self.ctx), 0.0)
                out.append(Outcome(name, "installed", "every component is installed"))
                self.progress(f"{name}: written (every component is installed)")
            elif all_ok:
                if obs.legacy:
                    self._write_marker(name, KINDS["overall"].current_meta(comp, self.ctx), 0.0,
                                       stamp=obs.marker.timestamp if obs.marker else None)
                out.append(self._already(name, obs))
            else:
                if markers.remove(self.config.markers_dir, name):
                    self.progress(f"{name}: marker removed ({obs.reason})")
                if targets is None and not quiet:
                    out.append(Outcome(name, "blocked", obs.reason.replace(
                        "marker present but ", "")))
        return out
