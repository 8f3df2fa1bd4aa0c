"""The running agent's reconcile passes wait while an update, rollback or snapshot restore runs.

Both run installers into the same interpreter: an agent pass during an update reinstalled the
components whose checkouts the update had just moved, beside the update's own installs (and
restarted ComfyUI a second time). So a reconcile worker that is about to run a pass while an
update runs (`agent.updates.running`: a live holder of the update lock, or a journal whose
writer lives) holds it, says so once per update ("update running: reconcile deferred"), and runs
it as soon as the update has ended and its result is known. The requests that came meanwhile
(periodic, marker and node events, health repairs, retries) join that one pass. A journal whose
writer died is finished or undone first (the same recovery as the agent's 5 s job), so the pass
never reconciles a half-done update. The update restarted ComfyUI itself (or asked the agent to),
so the held requests lose their restart flag: the pass restarts ComfyUI only when it changes what
ComfyUI loaded (the daemon's usual comparison).

A pass that began before the update is not cut short: each pass holds the pass lock
(journal.pass_lock_path) shared, and an update, once it holds the update lock, waits until it
can take that lock exclusively (`waiting for the running agent's reconcile pass to finish`).
The worker takes the pass lock before it looks for an update, so no pass slips in between.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Callable

from loguru import logger

from agent import updates
from agent.reconcile import Batch, Reconciler
from agent.updates import journal

POLL = 0.5  # seconds between looks at whether the update still runs


class Deferral:
    """Shared by the agent's workers: the log line once per update, and the check."""

    def __init__(self, config: Callable[[], object]):
        self.config = config
        self._lock = threading.Lock()
        self._said = False
        self.deferred = 0  # passes held so far (for tests and status)

    def running(self) -> bool:
        try:
            return updates.running(self.config())
        except Exception as exc:  # noqa: BLE001 - unsure: do not hold the agent's work
            logger.warning(f"cannot tell whether an update runs ({exc}): reconciling")
            return False

    def held(self, what: str) -> None:
        with self._lock:
            self.deferred += 1
            if not self._said:
                self._said = True
                logger.info(f"update running: reconcile deferred ({what})")

    def ended(self) -> None:
        """The update is over (or its writer died): a journal left behind is finished or
        undone now (the agent's recovery, never raises), before any pass reconciles."""
        conf = self.config()
        left = Path(conf.state_dir) / "updates" / "journal.json"
        for _ in range(3):  # recovery takes the lock without waiting: a look may be in its way
            if not left.exists() or self.running():
                break
            updates.recover_orphan(conf, logger.warning)
            if left.exists():
                time.sleep(0.2)
        with self._lock:
            said, self._said = self._said, False
        if said:
            logger.info("update ended: reconciling")


class DeferringReconciler(Reconciler):
    """A Reconciler whose passes wait while an update runs (see the module docstring)."""

    def __init__(self, *args, deferral: Deferral, **kw):
        super().__init__(*args, **kw)
        self.deferral = deferral
        self._pass_fd: int | None = None

    def _take(self) -> Batch | None:
        self._end_pass()  # the pass before this one is over
        batch = super()._take()
        if batch is None:
            return batch
        self._begin_pass()  # before the check: an update that starts now waits for this pass
        if not self.deferral.running():
            self.deferral.ended()  # one stat when no update journal was left
            if not self.deferral.running():
                return batch
        self._end_pass()
        batch = self._hold(batch)
        if batch is not None:
            self._begin_pass()
        return batch

    def _begin_pass(self) -> None:
        """The pass lock, shared (journal.pass_lock_path): never refused by another pass; an
        update's brief exclusive look only delays it."""
        if self._pass_fd is not None:
            return
        try:
            path = journal.pass_lock_path(self.deferral.config())
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return  # the pass runs anyway; an update just cannot wait for it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            os.close(fd)
            return
        self._pass_fd = fd
        journal.passes_here[0] += 1

    def _end_pass(self) -> None:
        if self._pass_fd is None:
            return
        journal.passes_here[0] -= 1
        try:
            fcntl.flock(self._pass_fd, fcntl.LOCK_UN)
        finally:
            os.close(self._pass_fd)
            self._pass_fd = None

    def _hold(self, batch: Batch) -> Batch | None:
        self.deferral.held("; ".join(dict.fromkeys(batch.reasons))[:200])
        while not self._stop.is_set():
            if not self.deferral.running():
                self.deferral.ended()
                if not self.deferral.running():
                    break
            self._stop.wait(POLL)
        if self._stop.is_set():
            return None
        with self._cond:  # what came meanwhile joins this one pass
            if self._batch is not None:
                batch.reasons += self._batch.reasons
                self._batch = None
        batch.reasons.append("after the update")
        batch.restart = False  # the update restarted ComfyUI itself
        return batch
