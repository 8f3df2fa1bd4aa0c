"""What every command shares: the common options, the error mapping, output, loading the config.

A command module (agent/cli_*.py) is imported only when its command runs (agent/cli.py), so this
module stays light: click and the standard library at the top, everything else inside functions.

Exit codes (pre-commit's error_handler): expected error 1, config error 2, Ctrl-C 130,
anything else 3 with the traceback in <workspace>/logs/pod-agent-crash.log. A filesystem error
(OSError) that reaches a command is an expected error: one line naming the path and what to do
(agent/fserr.py), exit 1.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import click
from click.exceptions import Exit

__all__ = ["Exit", "common", "json_option", "handled", "load", "out", "err", "COMMON"]

WS_HELP = "The persistent volume [default: /workspace]."
CONFIG_HELP = "A config file that replaces the built-in default."
COMMON = "pod_agent.common"  # ctx.meta key: --workspace/--config given before the command
_PATH = click.Path(path_type=Path)


def _path_opts(after: bool) -> list[Callable[[Any], Any]]:
    """--workspace/-w and --config/-c: with their environment variables on a command; without
    on the group, where `after` tells that they are also accepted after the command."""
    ws_help, cf_help = WS_HELP, CONFIG_HELP
    if after:
        ws_help += " Also accepted after the command (env POD_AGENT_WORKSPACE)."
        cf_help += " Also accepted after the command (env POD_AGENT_CONFIG)."
        extra: dict[str, Any] = {}
        cf_extra: dict[str, Any] = {}
    else:
        extra = {"envvar": "POD_AGENT_WORKSPACE", "show_envvar": True}
        cf_extra = {"envvar": "POD_AGENT_CONFIG", "show_envvar": True}
    return [
        click.option("--workspace", "-w", type=_PATH, metavar="<path>", default=None,
                     help=ws_help, **extra),
        click.option("--config", "-c", type=_PATH, metavar="<path>", default=None,
                     help=cf_help, **cf_extra),
    ]


def common(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --workspace/-w and --config/-c (parameters `workspace`, `config`)."""
    for opt in reversed(_path_opts(after=False)):
        fn = opt(fn)
    return fn


def group_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(_path_opts(after=True)):
        fn = opt(fn)
    return fn


json_option = click.option("--json", "json_out", is_flag=True, help="Print one JSON object.")


def _safe(text: str) -> str:
    """Printable whatever a path holds: undecodable bytes of a file name (surrogates) shown as
    escapes instead of raising UnicodeEncodeError."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def out(text: str = "") -> None:
    sys.stdout.write(_safe(text) + "\n")
    sys.stdout.flush()


def err(text: str) -> None:
    sys.stderr.write(_safe(text) + "\n")
    sys.stderr.flush()


_workspace_hint: list[Path] = []


def _crash_log(exc: BaseException) -> str:
    import traceback

    from agent.redact import redact

    folders = [w / "logs" for w in _workspace_hint[-1:]] + [Path("/tmp")]
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "pod-agent-crash.log"
            with open(path, "a") as fh:
                fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {redact(' '.join(sys.argv))}\n")
                fh.write(redact("".join(traceback.format_exception(exc))))
            return str(path)
        except OSError:
            continue
    return "(no writable log folder)"


def _common_args(kwargs: dict[str, Any]) -> None:
    """--workspace/--config given before the command (`pod-agent -w DIR status`), as git does:
    the command's own option wins when given on the command line too, then the one before the
    command, then the environment variable, then the default."""
    ctx = click.get_current_context(silent=True)
    common_ = ctx.find_root().meta.get(COMMON) if ctx is not None else None
    if not common_:
        return
    for name, value in common_.items():
        if name not in kwargs or value is None:
            continue
        source = ctx.get_parameter_source(name)
        if getattr(source, "name", None) != "COMMANDLINE":
            kwargs[name] = value


def handled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Maps what a command raises to one line and an exit code (see the module's docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from agent.model import AgentError, ConfigError

        try:
            _common_args(kwargs)
            return fn(*args, **kwargs)
        except (Exit, click.exceptions.Abort, click.exceptions.ClickException):
            raise
        except ConfigError as exc:
            from agent.redact import redact

            err(f"config error: {redact(str(exc))}")
            raise Exit(2)
        except AgentError as exc:
            from agent.redact import redact

            err(f"error: {redact(str(exc))}")
            raise Exit(1)
        except KeyboardInterrupt:
            err("interrupted")
            raise Exit(130)
        except OSError as exc:  # a full disk, a read-only volume, a file where a folder goes
            from agent.fserr import describe
            from agent.redact import redact

            err(f"error: {redact(describe(exc))}")
            raise Exit(1)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            from agent.redact import redact

            where = _crash_log(exc)
            err(f"internal error: {type(exc).__name__}: {redact(str(exc))[:200]} "
                f"(traceback in {where})")
            raise Exit(3)

    return wrapper


def load(config: Optional[Path], workspace: Optional[Path], create: bool = False):
    """The config (agent.model.Config), with a workspace that is usable: a folder (created when
    `create`)."""
    from agent import config as cfg
    from agent.log import quiet

    quiet()
    conf = cfg.load(config, workspace)
    check_workspace(conf.workspace, create)
    _workspace_hint.append(conf.workspace)
    return conf


def check_workspace(ws: Path, create: bool) -> None:
    """One line (FsError) when the workspace is a file, sits below a file, cannot be reached or
    (with `create`) cannot be created. A workspace that does not exist yet is fine for the
    commands that only read (`status` on a fresh volume shows everything missing)."""
    import os
    import stat

    from agent.fserr import FsError, describe
    from agent.markers import blocking_ancestor

    try:
        mode = os.stat(ws).st_mode
    except FileNotFoundError:
        if not create:
            return
        try:
            ws.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            culprit = blocking_ancestor(ws)
            if culprit is not None:
                raise FsError(f"{culprit}: is a file, not a folder: cannot create the "
                              f"workspace {ws} below it: move that file away or pass another "
                              "--workspace") from None
            raise FsError(describe(exc, "cannot create the workspace") +
                          "; or pass another --workspace") from None
        return
    except (OSError, ValueError) as exc:
        culprit = blocking_ancestor(ws) if isinstance(exc, NotADirectoryError) else None
        if culprit is not None:
            raise FsError(f"{culprit}: is a file, not a folder: the workspace {ws} cannot be "
                          "below it: move that file away or pass another --workspace") from None
        if isinstance(exc, ValueError):
            raise FsError(f"workspace {ws!r}: not a usable path ({exc})") from None
        raise FsError(describe(exc, "the workspace cannot be used")) from None
    if not stat.S_ISDIR(mode):
        raise FsError(f"{ws}: the workspace is a file, not a folder: move it away or pass "
                      "another --workspace")


def age(seconds: float | None) -> str:
    """A short age: 42s, 3m05s, 2h10m, 4d03h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"
