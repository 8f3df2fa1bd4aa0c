"""The git operations of updates and rollbacks: fetch the newest commit, count commits, read a
file at a commit, the dirty check, move a checkout to a commit (keeping its branch), stash.

Every call is the git binary through agent.procs (own session, timeout, no prompts, output
redacted); a network operation is logged to the unit's log. Reading HEAD reuses
agent.kinds.gitops.head (files only, no process).
"""

from __future__ import annotations

from pathlib import Path

from agent import procs
from agent.kinds import gitops
from agent.model import AgentError

TIMEOUT = 600.0  # a fetch of a large repository on a slow link
QUICK = 30.0


class GitError(AgentError):
    """A git command failed; the message names the checkout and git's last line."""


def _q(path: Path, *args: str, timeout: float = QUICK) -> tuple[int, str]:
    return procs.quick(["git", "-C", str(path), *args], timeout,
                       env={"GIT_TERMINAL_PROMPT": "0"})


def _must(path: Path, *args: str, timeout: float = QUICK, what: str = "") -> str:
    code, out = _q(path, *args, timeout=timeout)
    if code != 0:
        last = (out.strip().splitlines() or ["no output"])[-1][:300]
        raise GitError(f"{path}: git {what or args[0]} failed (exit {code}): {last}")
    return out.strip()


def head(path: Path) -> str | None:
    return gitops.head(path)


def branch(path: Path) -> str | None:
    """The branch HEAD is on, or None when detached (or not a checkout)."""
    try:
        text = (path / ".git" / "HEAD").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        code, out = _q(path, "symbolic-ref", "-q", "--short", "HEAD")
        return out.strip() or None if code == 0 else None
    return text[len("ref: refs/heads/"):] if text.startswith("ref: refs/heads/") else None


def dirty(path: Path) -> list[str]:
    """Tracked files with local edits (untracked files do not count: nodes write their own
    config and caches; a checkout keeps them)."""
    code, out = _q(path, "status", "--porcelain", "--untracked-files=no")
    if code != 0:
        last = (out.strip().splitlines() or ["no output"])[-1][:300]
        raise GitError(f"{path}: git status failed (exit {code}): {last}")
    return [line[3:] for line in out.splitlines() if len(line) > 3]


def fetch(path: Path, repo: str | None, ref: str | None, log: Path,
          timeout: float = TIMEOUT) -> str:
    """The commit to update to: a pinned commit itself (fetched only when missing), otherwise
    the newest commit of `ref` (a branch or tag), of the branch the checkout is on, or of the
    remote's default branch. repo None: the checkout's `origin`. Nothing in the work tree
    changes (only .git's objects and FETCH_HEAD)."""
    if ref and gitops.SHA_RE.match(ref):
        code, out = _q(path, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}")
        if code == 0 and out.strip():
            return out.strip()
    if repo:
        url, auth, env = gitops.credentials(repo)
    else:
        url, auth, env = "origin", [], None
    what = ref or branch(path) or "HEAD"
    cmd = ["git", *auth, "-C", str(path), "fetch", "--no-progress", "--no-tags", url, what]
    full_env = {"GIT_TERMINAL_PROMPT": "0", **(env or {})}
    log.parent.mkdir(parents=True, exist_ok=True)
    result = procs.run(cmd, log=log, timeout=timeout, title=f"{path.name}: git fetch {what}",
                       env=full_env)
    if not result.ok:
        why = "timed out" if result.timed_out else f"exit {result.returncode}"
        last = (procs.tail(log, 3).strip().splitlines() or [""])[-1][:300]
        raise GitError(f"{path.name}: git fetch {what} failed ({why})"
                       + (f": {last}" if last else "") + f" (log: {log})")
    target = "FETCH_HEAD" if not (ref and gitops.SHA_RE.match(ref)) else ref
    return _must(path, "rev-parse", "--verify", f"{target}^{{commit}}", what="rev-parse")


def count(path: Path, old: str, new: str) -> int:
    """Commits in new that old lacks (0 when new is old or behind it)."""
    code, out = _q(path, "rev-list", "--count", f"{old}..{new}")
    try:
        return int(out.strip()) if code == 0 else -1
    except ValueError:
        return -1


def is_ancestor(path: Path, a: str, b: str) -> bool:
    code, _ = _q(path, "merge-base", "--is-ancestor", a, b)
    return code == 0


def has_commit(path: Path, commit: str) -> bool:
    code, _ = _q(path, "cat-file", "-e", f"{commit}^{{commit}}")
    return code == 0


def show(path: Path, commit: str, file: str) -> str | None:
    """A file's text at a commit; None when it does not exist there."""
    code, out = procs.quick(["git", "-C", str(path), "show", f"{commit}:{file}"], QUICK)
    return out if code == 0 else None


def keep(path: Path, name: str, commit: str) -> None:
    """A ref that keeps a restore point's commit reachable (git gc never drops it)."""
    _must(path, "update-ref", f"refs/pod-agent/{name}", commit, what="update-ref")


def stash(path: Path, message: str) -> str | None:
    """Local edits saved with `git stash` (tracked files); the stash's commit, None when none."""
    if not dirty(path):
        return None
    _must(path, "-c", "user.name=pod-agent", "-c", "user.email=pod-agent@localhost",
          "stash", "push", "-q", "-m", message, what="stash")
    return _must(path, "rev-parse", "stash@{0}", what="rev-parse stash")


def clear_stale_lock(path: Path) -> bool:
    """Remove .git/index.lock left by a git killed mid-checkout (call only while holding the
    update lock, after the dead run's processes were ended)."""
    lock = path / ".git" / "index.lock"
    try:
        lock.unlink()
        return True
    except FileNotFoundError:
        return False


def move(path: Path, commit: str, on_branch: str | None, force: bool = False) -> None:
    """Check the commit out: on its branch when the checkout was on one (the branch moves to
    the commit), detached otherwise. force: overwrite what a cut-short checkout left behind
    (the journal knows the tree was clean or stashed before)."""
    args = ["-c", "advice.detachedHead=false", "checkout", "-q"]
    if force:
        args.append("-f")
    args += ["-B", on_branch, commit] if on_branch else ["--detach", commit]
    _must(path, *args, timeout=TIMEOUT, what=f"checkout {commit[:12]}")
