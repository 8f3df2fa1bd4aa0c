"""pod-agent's command line: one click group whose commands are imported only when one runs.

`COMMANDS` maps each command to the module and function that implement it, with the one-line
help `pod-agent --help` shows, so that `--help` and every command import only what they use
(the common options and error mapping are in agent/clikit.py). Adding a command is one line here
and a click command in its own agent/cli_<topic>.py.
"""

from __future__ import annotations

import importlib
import sys

import click

COMMANDS: dict[str, tuple[str, str, str]] = {
    "install": ("agent.cli_core", "install",
                "Converge the workspace: install what is missing, broken or out of date."),
    "status": ("agent.cli_core", "status",
               "What is installed, since when, at which version, what is broken, what runs."),
    "reset": ("agent.cli_core", "reset",
              "Remove markers so the next install (or the running agent) reinstalls them."),
    "health": ("agent.cli_core", "health",
               "The latest health report (exit 0 healthy, 1 degraded or stale, 2 failing)."),
    "run": ("agent.cli_core", "run",
            "The resident agent: watch, reconcile, supervise ComfyUI (entrypoint.sh)."),
    "snapshot": ("agent.cli_snapshot", "snapshot",
                 "ComfyUI-Manager snapshots: save the custom nodes, restore them (save|restore)."),
    "verify": ("agent.cli_models", "verify",
               "Check the model files of download components (size; sha256 with --hash)."),
    "restart": ("agent.cli_services", "restart",
                "Restart one service (comfyui, jupyter, sshd, yours) through the running agent."),
    "logs": ("agent.cli_services", "logs", "Print a service's log; -f keeps following it."),
    "update": ("agent.cli_update", "update",
               "Update git components and nodes; verified, rolled back by itself on failure."),
    "rollback": ("agent.cli_update", "rollback",
                 "Go back to a restore point (the latest update by default), verified."),
    "history": ("agent.cli_update", "history",
                "Every install, update, rollback, repair and drift, with time and result."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        return getattr(importlib.import_module(entry[0]), entry[1])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):  # from the table: no command module imported
            formatter.write_dl([(name, entry[2]) for name, entry in COMMANDS.items()])


def _group_options(fn):  # imported here: clikit is light, but keep one place for the options
    from agent.clikit import group_options

    return group_options(fn)


@click.group(cls=_LazyGroup, no_args_is_help=True,
             context_settings={"help_option_names": ["--help"]})
@_group_options
@click.pass_context
def app(ctx: click.Context, workspace, config) -> None:
    """Keep a ComfyUI pod installed, healthy and running."""
    from agent.clikit import COMMON

    ctx.meta[COMMON] = {"workspace": workspace, "config": config}


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # a file name with undecodable bytes never crashes
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    from agent.clikit import err

    try:
        code = app.main(standalone_mode=False, prog_name=_prog_name())
    except click.exceptions.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `pod-agent`: the help
            exc.show()
            sys.exit(exc.exit_code)
        # one line, not click's four (usage, hint, blank, error): exit 2 as click does
        where = exc.ctx.command_path if exc.ctx is not None else "pod-agent"
        err(f"usage error: {' '.join(exc.format_message().split())} (see `{where} --help`)")
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err("aborted")
        sys.exit(1)
    except click.exceptions.ClickException as exc:
        err(f"error: {' '.join(exc.format_message().split())}")
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _prog_name() -> str:
    """`pod-agent` for the console script, `python -m agent` for the module, as click says."""
    import os

    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "pod-agent"
    return "python -m agent" if name == "__main__.py" else name
