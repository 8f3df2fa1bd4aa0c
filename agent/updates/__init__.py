"""Safe updates with automatic rollback (issue 10). See agent/updates/engine.py for the
contract of `apply`, `rollback` and `recover`; targets.py plans (the dry run), journal.py keeps
the write-ahead journal and the restore points, packages.py and git.py do the work, verify.py
restarts ComfyUI and reads its import results."""

from agent.updates.engine import Change, Report, apply, recover, recover_at_start, rollback

__all__ = ["Change", "Report", "apply", "recover", "recover_at_start", "rollback"]
