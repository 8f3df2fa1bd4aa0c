"""The single worker that performs observe -> plan -> execute.

Watchdog events, timers, the CLI and signals only call `request(reason)`. Requests arriving while
the worker waits or works coalesce: a burst (`rm *.done`) is one reconcile in dependency order.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from loguru import logger

from agent.execute import Executor, Report, describe
from agent.model import Config, Outcome, Step


RETRY_FIRST = 5.0  # seconds after the first pass that did not converge


class LogReporter:
    """The executor's progress in the agent log, as it happens: a component's start and its
    install at INFO, a failure or a block at WARNING; an unchanged one at DEBUG. It also
    remembers what it logged, so the pass's summary does not log an outcome twice."""

    def __init__(self, phase: str):
        self.phase = phase
        self.logged: set[tuple[str, str]] = set()
        self._started: dict[str, float] = {}

    def begin(self, step: Step) -> None:
        self._started[step.name] = time.monotonic()
        verb = "reinstalling" if step.action.value == "reinstall" else "installing"
        logger.info(f"{step.name}: {verb}" + (f" ({step.reason})" if step.reason else ""))

    def end(self, outcome: Outcome) -> None:
        self.log(outcome)

    def log(self, outcome: Outcome) -> None:
        key = (outcome.name, outcome.status)
        if key in self.logged:
            return
        self.logged.add(key)
        news = outcome.status == "installed" or outcome.name in self._started or \
            outcome.message.startswith("repaired") or outcome.message == "stopped"
        level = "WARNING" if outcome.status in ("failed", "blocked") and \
            outcome.message != "stopped" else "INFO" if news else "DEBUG"
        logger.log(level, describe(outcome))


@dataclass
class Batch:
    reasons: list[str] = field(default_factory=list)
    restart: bool = False
    settled: bool = False
    first: float = 0.0
    last: float = 0.0


class Reconciler:
    """One worker thread for one phase ("foreground" or "background")."""

    def __init__(self, name: str, phase: str, config: Callable[[], Config],
                 on_done: Callable[["Reconciler", Report, Batch], None],
                 quiet: float = 0.25, max_delay: float = 1.0):
        self.name = name
        self.phase = phase
        self._config = config
        self._on_done = on_done
        self.quiet = quiet
        self.max_delay = max_delay
        self._cond = threading.Condition()
        self._batch: Batch | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"reconcile-{name}", daemon=True)
        self.busy = False
        self.runs = 0
        self.last: dict | None = None
        # passes in a row that did not converge (a component failed, or the pass crashed):
        # the `agent` health check reports a reconcile that keeps failing
        self.failures = 0
        self.failing_since: str | None = None
        # a pass that did not converge is tried again on its own (the fault may be gone: a disk
        # freed, a network back), sooner than the periodic reconcile: RETRY_FIRST s doubling
        self._retry_at: float | None = None
        self.executor: Executor | None = None

    def retry_delay(self) -> float:
        """RETRY_FIRST s, doubling with each failed pass, at most the periodic interval."""
        try:
            cap = float(self._config().agent["reconcile_interval"])
        except Exception:  # noqa: BLE001 - a config without it: the default
            cap = 300.0
        return min(cap, RETRY_FIRST * 2 ** min(self.failures - 1, 16))

    def start(self) -> None:
        self._thread.start()

    def request(self, reason: str, restart: bool = False, settled: bool = False) -> None:
        """Ask for a reconcile. `settled`: the caller already waited out its own burst (the
        node-change quiet period), so this request does not wait for more quiet."""
        now = time.monotonic()
        with self._cond:
            if self._batch is None:
                self._batch = Batch(first=now)
            self._batch.reasons.append(reason)
            self._batch.restart |= restart
            self._batch.last = now
            self._batch.settled |= settled
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self.executor is not None:
            self.executor.stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> Batch | None:
        with self._cond:
            while self._batch is None and not self._stop.is_set():
                now = time.monotonic()
                if self._retry_at is not None and now >= self._retry_at:
                    self._retry_at = None
                    self._batch = Batch(reasons=[f"retry: the last pass did not converge "
                                                 f"({self.failures}x)"], first=now, last=now,
                                        settled=True)
                    break
                wait = 1.0 if self._retry_at is None else min(1.0, self._retry_at - now)
                self._cond.wait(max(0.01, wait))
            while self._batch is not None and not self._stop.is_set():
                now = time.monotonic()
                due = min(self._batch.last + self.quiet, self._batch.first + self.max_delay)
                if self._batch.settled:
                    due = now
                if now >= due:
                    break
                self._cond.wait(due - now)
            batch, self._batch = self._batch, None
            return None if self._stop.is_set() else batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if batch is None:
                continue
            self.busy = True
            start = time.monotonic()
            reasons = list(dict.fromkeys(batch.reasons))
            # every request reaches both workers: the pass line is said once, by the
            # foreground; the background's components are logged as they start and finish
            logger.log("INFO" if self.phase == "foreground" else "DEBUG",
                       f"reconcile ({self.phase}): {'; '.join(reasons[:5])}"
                       + (f" (+{len(reasons) - 5} more)" if len(reasons) > 5 else ""))
            try:
                reporter = LogReporter(self.phase)
                self.executor = Executor(self._config(), stop=self._stop, reporter=reporter)
                report = self.executor.run(phase=self.phase)
                # what the executor reports as a pass-wide step (user nodes, the overall
                # marker) is logged here, once; each component was logged as it finished
                for o in report.outcomes:
                    if o.status in ("installed", "failed", "blocked"):
                        reporter.log(o)
                result = "ok" if report.ok else "failed: " + ", ".join(
                    o.name for o in report.outcomes if o.status in ("failed", "blocked"))
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything
                logger.exception(f"reconcile ({self.phase}) crashed: {exc}")
                report, result = Report(), f"error: {exc}"
            self.runs += 1
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            if result == "ok" or self._stop.is_set():
                self.failures, self.failing_since, self._retry_at = 0, None, None
            else:
                self.failures += 1
                self.failing_since = self.failing_since or stamp
                self._retry_at = time.monotonic() + self.retry_delay()
            self.last = {"time": stamp, "phase": self.phase,
                         "result": result, "duration": round(time.monotonic() - start, 2),
                         "changed": report.changed, "failures_in_a_row": self.failures,
                         "failing_since": self.failing_since}
            try:
                if not self._stop.is_set():
                    self._on_done(self, report, batch)
            except Exception as exc:  # noqa: BLE001
                logger.exception(f"after reconcile: {exc}")
            finally:
                self.busy = False
