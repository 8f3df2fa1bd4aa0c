"""ComfyUI's output through a redacting pipe into comfyui.log, without losing adoption.

The supervisor starts `python -I agent/logpipe.py LOG FD` (the agent's interpreter) in a new
session, with stdout/stderr on the log file, FD the write end of a status pipe, and a JSON request
on stdin: {"cmd": [...], "secrets": [...]}.
That bootstrap process:

1. reads the request, puts /dev/null on stdin;
2. makes a pipe and double-forks the *redactor*: a grandchild in the same session and process
   group (so stopping ComfyUI's group covers it) whose parent is init (or the nearest subreaper),
   never ComfyUI. The redactor writes `pipe PID` on the status fd;
3. puts the pipe's write end on its own stdout/stderr, restores the signal dispositions a normal
   spawn would give, and `exec`s ComfyUI's command. ComfyUI therefore keeps the pid the supervisor
   got from Popen, is its session's and group's leader, and has the command line the adoption scan
   looks for; the status fd closes on exec, which tells the supervisor the start is done.

The redactor reads the pipe, masks secrets (the registered values it was given, its environment's
secret values - ComfyUI's environment - and the patterns of agent/redact.py) and appends the
lines to LOG. It ignores SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGPIPE, so a stop of ComfyUI's group lets
it drain ComfyUI's last words, and exits on EOF: when ComfyUI and every child that inherited its
output have exited. A write error (full disk) drops that output and reading goes on, so ComfyUI
never blocks on a full pipe; a deleted or replaced log file is reopened. It survives an agent
restart (it is not the agent's child), and the next agent finds it through comfyui.json.

What ComfyUI sees if the redactor dies anyway (SIGKILL): writes to stdout/stderr fail with EPIPE.
Python (ComfyUI) ignores SIGPIPE and raises BrokenPipeError from print(); logging handlers swallow
it. The supervisor notices the dead redactor and asks for a queue-aware restart, which gives
ComfyUI a new pipe. Nothing kills ComfyUI because of it.
"""

import sys

if __name__ == "__main__":  # run by path with -I: make `agent` importable, shadow nothing
    import os.path as _p

    sys.path[:0] = [_p.dirname(_p.dirname(_p.abspath(__file__)))]

import errno
import json
import os
import select
import signal
import time

CHUNK = 65536  # a line longer than this is redacted in pieces of this size
IDLE_FLUSH = 0.5  # seconds: a partial line (no newline yet) is written after this much quiet
REOPEN_CHECK = 2.0  # seconds between checks that LOG is still the file we write to
NAME = "logpipe.py"  # how the supervisor recognises the redactor in ComfyUI's group
IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE,
           signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2)


def _say(fd: int, text: str) -> None:
    try:
        os.write(fd, f"=== pod-agent log pipe: {text}\n".encode())
    except OSError:
        pass


class _Log:
    """LOG opened for appending, reopened when it was deleted or replaced."""

    def __init__(self, path: str, fallback: int):
        self.path = path
        self.fd = fallback
        self.owned = False
        self.checked = 0.0
        self._open()

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            return
        if self.owned:
            os.close(self.fd)
        self.fd, self.owned = fd, True

    def check(self, now: float) -> None:
        if now - self.checked < REOPEN_CHECK:
            return
        self.checked = now
        try:
            mine = os.fstat(self.fd)
            there = os.stat(self.path)
            if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                return
        except OSError:
            pass
        self._open()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # full disk, I/O error: drop it, keep draining so ComfyUI never blocks
            view = view[n:]


def redactor(read_fd: int, log_path: str, secrets: list[str]) -> None:
    """Read ComfyUI's output until EOF, append it redacted to the log. Never raises."""
    for sig in IGNORED:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (OSError, ValueError):
            pass
    from agent.redact import redact, register

    register(*secrets)
    log = _Log(log_path, 1)

    def emit(data: bytes) -> None:
        try:
            text = redact(data.decode("utf-8", "surrogateescape"))
            out = text.encode("utf-8", "surrogateescape")
        except Exception:  # noqa: BLE001 - never pass unredacted text on
            out = b"=== pod-agent log pipe: output dropped (could not be redacted)\n"
        log.check(time.monotonic())
        log.write(out)

    buf = b""
    while True:
        try:
            ready, _, _ = select.select([read_fd], [], [], IDLE_FLUSH if buf else None)
        except InterruptedError:
            continue
        except OSError:
            break
        if not ready:  # quiet with a partial line: write it
            emit(buf)
            buf = b""
            continue
        try:
            chunk = os.read(read_fd, CHUNK)
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                continue
            break
        if not chunk:
            break
        buf += chunk
        cut = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
        if cut >= 0:
            emit(buf[:cut + 1])
            buf = buf[cut + 1:]
        while len(buf) >= CHUNK:
            emit(buf[:CHUNK])
            buf = buf[CHUNK:]
    if buf:
        emit(buf)


def main() -> int:
    log_fd = 1
    log_path = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        request = json.loads(sys.stdin.buffer.read() or b"null")
        cmd = [str(a) for a in request["cmd"]]
        secrets = [str(s) for s in request.get("secrets") or []]
        if not cmd or not log_path:
            raise ValueError("no command or no log")
    except (ValueError, TypeError, KeyError, OSError) as exc:
        _say(log_fd, f"bad start request ({exc}); ComfyUI not started")
        return 127
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        status = int(sys.argv[2])
        os.fstat(status)
    except (IndexError, ValueError, OSError):
        status = None
    read_fd, write_fd = os.pipe()
    try:
        child = os.fork()
    except OSError as exc:
        _say(log_fd, f"cannot fork the redactor ({exc.strerror}); ComfyUI not started")
        return 127
    if child == 0:  # intermediate: fork the redactor and leave, so init adopts it
        try:
            if os.fork() == 0:
                os.close(write_fd)
                if status is not None:
                    try:
                        os.write(status, f"pipe {os.getpid()}\n".encode())
                    except OSError:
                        pass
                    os.close(status)
                try:
                    redactor(read_fd, log_path, secrets)
                finally:
                    os._exit(0)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    os.close(read_fd)
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # as subprocess's restore_signals does
        signal.signal(sig, signal.SIG_DFL)
    if status is not None:
        os.set_inheritable(status, False)  # closes on exec: the supervisor's "started" signal
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        msg = f"cannot start {cmd[0]}: {exc.strerror}"
        _say(2, msg + "; ComfyUI not started")
        if status is not None:
            try:
                os.write(status, f"error {msg}\n".encode())
            except OSError:
                pass
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
