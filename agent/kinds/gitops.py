"""Git checkouts shared by the `git` and `nodes` kinds.

Reading HEAD reads `.git/HEAD` and the ref it points to directly (loose refs, packed-refs,
detached HEADs, worktree and submodule `.git` files): a no-op check reads two or three small
files per checkout and imports nothing. Every operation that changes a checkout runs the git
binary through procs (own session, timeout, no prompts).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import time
from pathlib import Path

from agent import procs
from agent.kinds.base import Ctx, InstallError, requirement_problems
from agent.model import Component, State

SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")


_HEX_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_READ_LIMIT = 4096  # HEAD, a loose ref and a .git file are one short line


def _read_small(path: str) -> str | None:
    """The first _READ_LIMIT bytes of a file as text; None when it cannot be read (a folder
    fails to read, a FIFO answers EAGAIN: O_NONBLOCK never waits)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    try:
        return os.read(fd, _READ_LIMIT).decode("utf-8", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_regular(path: str, limit: int | None = None) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        chunks = []
        left = st.st_size if limit is None else min(st.st_size, limit)
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def git_dir(dest: Path) -> Path | None:
    """The checkout's git directory: `.git` itself, or where a `.git` file (`gitdir: PATH`, as
    worktrees and submodules write it) points; None when there is neither."""
    dot = os.path.join(dest, ".git")
    if os.path.isdir(dot):
        return Path(dot)
    text = _read_small(dot)
    if text is None or not text.startswith("gitdir:"):
        return None
    return Path(os.path.join(dest, text[len("gitdir:"):].strip()))  # absolute stays absolute


def _common_dir(gdir: str) -> str:
    """A worktree's git dir shares branches and packed-refs with the main one (`commondir`)."""
    text = _read_small(os.path.join(gdir, "commondir"))
    return os.path.join(gdir, text) if text else gdir


def _packed(common: str, ref: str) -> str | None:
    try:
        with open(os.path.join(common, "packed-refs"), encoding="utf-8",
                  errors="replace") as fh:
            for line in fh:
                if line.startswith(("#", "^")):
                    continue
                sha, _, name = line.rstrip("\n").partition(" ")
                if name == ref:
                    return sha
    except OSError:
        pass
    return None


def read_head(dest: Path) -> tuple[str | None, str]:
    """(the commit HEAD points to, "") or (None, why not: "missing", "not a git checkout (...)").
    Reads `.git/HEAD` and the ref it names (loose, else packed-refs; a worktree's branches in
    its common dir); never raises, never spawns git except for a reftable repository."""
    gdir = os.path.join(dest, ".git")
    text = _read_small(os.path.join(gdir, "HEAD"))  # the common case: one open
    common = gdir
    if text is None:
        found = git_dir(dest)
        if found is None:
            return None, "not a git checkout" if os.path.exists(dest) else "missing"
        gdir = str(found)
        text = _read_small(os.path.join(gdir, "HEAD"))
        if text is None:
            return None, f"not a git checkout ({os.path.join(gdir, 'HEAD')} cannot be read)"
        common = _common_dir(gdir)
    seen: list[str] = []
    while text.startswith("ref:"):
        ref = text[4:].strip()
        if ref in seen or len(seen) > 5 or not ref.startswith("refs/") or ".." in ref:
            return None, f"not a git checkout (HEAD points to {ref[:100]!r})"
        seen.append(ref)
        found_ref = _read_small(os.path.join(gdir, ref))
        if found_ref is None and common != gdir:
            found_ref = _read_small(os.path.join(common, ref))
        if found_ref is None:
            found_ref = _packed(common, ref)
        if found_ref is None:
            if os.path.isdir(os.path.join(common, "reftable")):  # refs not in files: ask git
                return _rev_parse(dest)
            return None, f"not a git checkout (HEAD is {ref}, which has no commit yet)"
        text = found_ref
    if not _HEX_RE.match(text):
        return None, f"not a git checkout (HEAD is {text[:60]!r}, not a commit)"
    return text, ""


def _rev_parse(dest: Path) -> tuple[str | None, str]:
    code, out = procs.quick(["git", "-C", str(dest), "rev-parse", "--verify", "-q", "HEAD"], 30)
    sha = out.strip().splitlines()[-1:] or [""]
    if code == 0 and _HEX_RE.match(sha[0]):
        return sha[0], ""
    return None, "not a git checkout (git cannot resolve HEAD)"


def head(dest: Path) -> str | None:
    """The commit HEAD points to, or None when dest is not a readable git checkout."""
    return read_head(dest)[0]


def repo_name(url: str) -> str:
    tail = url.rstrip("/").rsplit("/", 1)[-1]
    return tail[:-4] if tail.endswith(".git") else tail


def checkout_problem(dest: Path, recorded: str | None, ref: str | None) -> tuple[State, str] | None:
    commit, why = read_head(dest)
    if commit is None:
        return State.BROKEN, f"{dest} is {why}"
    if ref and SHA_RE.match(ref) and not commit.startswith(ref):
        return State.STALE, f"HEAD is {commit[:12]}, ref {ref} wanted"
    if recorded and commit != recorded:
        return State.STALE, f"HEAD moved from {recorded[:12]} to {commit[:12]}"
    return None


def requirements_file(dest: Path) -> Path:
    return dest / "requirements.txt"


def deps_digest(dest: Path) -> str:
    """What a node's dependencies come from (requirements.txt, install.py): the same digest as
    agent.reqs.files_digest of those that are regular files, "-" when neither is."""
    h = hashlib.sha256()
    found = False
    for name in ("requirements.txt", "install.py"):
        path = os.path.join(dest, name)
        data = _read_regular(path)
        if data is None:  # absent, not a regular file, or a regular file we cannot read
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):
                    continue
            except (OSError, ValueError):
                continue
        found = True
        h.update(path.encode())
        h.update(b"<missing>" if data is None else data)
    return h.hexdigest()[:16] if found else "-"


def deps_problem(ctx: Ctx, dest: Path, recorded_digest: str | None) -> tuple[State, str] | None:
    from agent.reqs import read_reqs

    if recorded_digest and recorded_digest != deps_digest(dest):
        return State.STALE, f"{dest.name}: requirements.txt or install.py changed"
    req = os.path.join(dest, "requirements.txt")
    if os.path.isfile(req):
        reqs = read_reqs(req)
        problems = requirement_problems(ctx, reqs)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            return State.BROKEN, problems[0] + more
    return None


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    return aside


def ensure_checkout(comp: Component, ctx: Ctx, repo: str, dest: Path, ref: str | None,
                    depth: int | None, update: bool, label: str) -> str:
    """Clone (into a temporary sibling, then rename) or update dest; return HEAD."""
    current = head(dest)
    if current is None:
        if dest.exists():
            if dest.is_dir() and not any(dest.iterdir()):
                dest.rmdir()
            else:
                aside = _move_aside(dest)
                with open(comp.log, "a") as fh:
                    fh.write(f"=== {dest} was not a git checkout; moved aside to {aside}\n")
        dest.parent.mkdir(parents=True, exist_ok=True)
        # clones cut short by a run that died (we hold the component's lock: none is live)
        for stale in dest.parent.iterdir():
            if stale.name.startswith(f".{dest.name}.partial-"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
        try:
            args = ["clone", "--no-progress"]
            is_sha = bool(ref and SHA_RE.match(ref))
            if depth and not is_sha:
                args += ["--depth", str(depth)]
            if ref and not is_sha:
                args += ["--branch", ref]
            url, auth, env = credentials(repo)
            ctx.git(comp, auth + args + ["--", url, str(tmp)], f"{label}: git clone", env=env)
            if is_sha:
                ctx.git(comp, ["checkout", "--detach", "--quiet", ref], f"{label}: checkout {ref}",
                        cwd=tmp)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif ref and (update or not _at_ref(dest, current, ref)):
        if not (SHA_RE.match(ref) and _has_commit(comp, ctx, dest, ref)):
            url, auth, env = credentials(repo)
            fetch = ["fetch", "--no-progress", url, ref]
            if depth:
                fetch[1:1] = ["--depth", str(depth)]
            ctx.git(comp, auth + fetch, f"{label}: git fetch {ref}", cwd=dest, env=env)
            ref_to = "FETCH_HEAD"
        else:
            ref_to = ref
        ctx.git(comp, ["checkout", "--detach", "--quiet", ref_to], f"{label}: checkout {ref}",
                cwd=dest)
    elif update and not ref:
        url, auth, env = credentials(repo)
        ctx.git(comp, auth + ["pull", "--ff-only", "--no-progress", url], f"{label}: git pull",
                cwd=dest, env=env)
    commit = head(dest)
    if commit is None:
        raise InstallError(f"{label}: {dest} has no readable HEAD after checkout")
    return commit


def anonymous(url: str) -> str:
    """url without the credentials of its authority (`https://user:pass@host/x` -> `https://host/x`);
    git itself records only this form in FETCH_HEAD and the reflog."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


GIT_USER_ENV, GIT_PASSWORD_ENV = "POD_AGENT_GIT_USERNAME", "POD_AGENT_GIT_PASSWORD"
# A credential helper that answers from the environment: the secret never appears in git's
# argv, its config, its reflog (which records the command line of a pull) or FETCH_HEAD.
_HELPER = ('!f() { test "$1" = get || exit 0; echo "username=${%s}"; '
           'test -n "${%s}" && echo "password=${%s}"; }; f'
           % (GIT_USER_ENV, GIT_PASSWORD_ENV, GIT_PASSWORD_ENV))


def credentials(repo: str) -> tuple[str, list[str], dict[str, str] | None]:
    """(URL without credentials, git options, env) to reach repo. A URL written with
    `user:password@` is fetched as the bare URL, the credentials handed to git by a helper."""
    from urllib.parse import unquote, urlsplit

    url = anonymous(repo)
    if url == repo:
        return repo, [], None
    userinfo = urlsplit(repo).netloc.rsplit("@", 1)[0]
    user, _, password = userinfo.partition(":")
    return url, ["-c", "credential.helper=", "-c", f"credential.helper={_HELPER}"], {
        GIT_USER_ENV: unquote(user), GIT_PASSWORD_ENV: unquote(password)}


def _at_ref(dest: Path, current: str, ref: str) -> bool:
    if SHA_RE.match(ref):
        return current.startswith(ref)
    return True  # a branch or tag: keep the checkout unless an update was asked for


def _has_commit(comp: Component, ctx: Ctx, dest: Path, ref: str) -> bool:
    code, _ = procs.quick(["git", "-C", str(dest), "cat-file", "-e", f"{ref}^{{commit}}"], 30)
    return code == 0


def install_deps(comp: Component, ctx: Ctx, dest: Path, label: str) -> None:
    """What ComfyUI-Manager does for a node: requirements.txt, then install.py."""
    req = requirements_file(dest)
    if req.is_file():
        ctx.pip_install(comp, ["-r", str(req)], f"{label}: requirements")
    script = dest / "install.py"
    if script.is_file():
        ctx.ensure_python(comp)
        result = procs.run([str(ctx.python), "install.py"], log=comp.log, timeout=comp.timeout,
                           cwd=dest, title=f"{label}: install.py",
                           env={"COMFYUI_PATH": str(ctx.config.comfyui.dir)})
        ctx.invalidate()
        if not result.ok:
            why = "timed out" if result.timed_out else f"exit {result.returncode}"
            raise InstallError(f"{label}: install.py failed ({why})")
