"""Filesystem errors as one line: the path, what went wrong, and what to do about it.

Library code raises FsError (an AgentError: the CLI prints it as one line, exit 1); code that
handles one component at a time turns any OSError into that component's one-line reason.
"""

from __future__ import annotations

import errno

from agent.model import AgentError

HINTS = {
    errno.EACCES: "check the owner and permissions of the path",
    errno.EPERM: "the path is protected (immutable? `lsattr`, `chattr -i`) or not yours",
    errno.EROFS: "the filesystem is mounted read-only: remount it read-write or use another "
                 "--workspace",
    errno.ENOSPC: "the disk is full: free some space (`df -h`, `du -sh`)",
    errno.EDQUOT: "the disk quota is exhausted: free some space or raise the quota",
    errno.ENOTDIR: "a part of the path is a file, not a folder: move that file away",
    errno.EISDIR: "a folder stands where a file is expected: move that folder away",
    errno.ENAMETOOLONG: "the path or a name in it is too long: shorten it",
    errno.ENOENT: "a part of the path does not exist or cannot be created",
    errno.EEXIST: "a file stands where a folder is expected: move that file away",
    errno.ELOOP: "too many symbolic links: fix the link loop",
    errno.EIO: "the disk reported an I/O error: check the volume",
    errno.EMFILE: "too many open files: raise the open-file limit (`ulimit -n`)",
    errno.ENOMEM: "out of memory",
}


class FsError(AgentError):
    """A filesystem error described as one line."""


def describe(exc: OSError, what: str = "") -> str:
    """'<path>: <what failed>: <strerror>: <what to do>' on one line."""
    path = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    parts = [str(path) if path != "" else None, what or None, reason,
             HINTS.get(exc.errno or 0)]
    text = ": ".join(p for p in parts if p)
    return " ".join(text.split())  # one line, whatever the path or message held


def wrap(exc: OSError, what: str = "") -> FsError:
    return FsError(describe(exc, what))


def explain(exc: BaseException) -> str:
    """Any exception as one line: OSError through describe(), others as 'Type: message'."""
    if isinstance(exc, OSError):
        return describe(exc)
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, AgentError) and type(exc).__name__ not in ("InstallError",):
        text = f"{type(exc).__name__}: {text}"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."
