"""`pod-agent restart NAME` and `pod-agent logs NAME [-f]`: the services (agent/services.py).

`restart` goes through the running agent: it writes a request file in
<runtime_dir>/requests/ and waits for the agent's answer, so ComfyUI's restart stays
queue-aware (it waits for an empty queue unless --now) and the supervisor that owns a process is
the one that restarts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from agent import clikit

ANSWER_WAIT = 30.0  # how long `restart` waits for the agent to take the request
FOLLOW_POLL = 0.3


def _running_agent(conf) -> int:
    from agent import procs
    from agent.markers import read_json
    from agent.model import AgentError

    info = read_json(conf.runtime_dir / "agent.json") or {}
    if not info.get("create_time") or procs.alive(info.get("pid"), info.get("create_time")) \
            is None:
        raise AgentError(f"no pod-agent runs for {conf.workspace} on this host: `pod-agent "
                         "restart` asks the running agent (start it with `pod-agent run`)")
    return int(info["pid"])


@click.command("restart")
@click.argument("name", metavar="NAME")
@click.option("--now", is_flag=True, help="ComfyUI: restart at once, even while it runs a "
              "prompt (default: when its queue is empty). Other services restart at once.")
@clikit.json_option
@clikit.common
@clikit.handled
def restart(name: str, now: bool, json_out: bool, workspace: Optional[Path],
            config: Optional[Path]) -> None:
    """Restart one service (comfyui, jupyter, sshd, or one of yours) through the running agent."""
    import json
    import os
    import time

    from agent.markers import atomic_write, read_json
    from agent.model import AgentError
    from agent.services import REQUESTS_DIR

    conf = clikit.load(config, workspace)
    known = ["comfyui", *conf.services]
    if name not in known:
        raise AgentError(f"no such service: {name!r} (known: {', '.join(known)})")
    pid = _running_agent(conf)
    folder = conf.runtime_dir / REQUESTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"restart-{time.time_ns()}-{os.getpid()}"
    request, answer = folder / f"{stem}.json", folder / f"{stem}.answer"
    atomic_write(request, json.dumps({"name": name, "now": now}))
    deadline = time.monotonic() + ANSWER_WAIT
    reply = None
    while time.monotonic() < deadline:
        reply = read_json(answer)
        if reply is not None:
            break
        time.sleep(0.1)
    for path in (request, answer):
        try:
            path.unlink()
        except OSError:
            pass
    if reply is None:
        raise AgentError(f"the agent (pid {pid}) did not take the request within "
                         f"{ANSWER_WAIT:g} s; is it stuck? (`pod-agent status`)")
    if json_out:
        clikit.out(json.dumps({"service": name, **reply}))
    if not reply.get("ok"):
        if not json_out:
            clikit.err(f"error: {reply.get('error') or 'refused'}")
        raise clikit.Exit(1)
    if not json_out:
        clikit.out(f"{name}: {reply.get('detail') or 'restart requested'} (agent pid {pid})")


def _log_path(conf, name: str) -> Path:
    from agent.model import AgentError

    paths = {"comfyui": conf.comfyui.log, "agent": conf.workspace / "logs" / "agent.log"}
    if conf.hooks is not None:
        paths["hooks"] = conf.hooks.log
    paths.update({n: s.log for n, s in conf.services.items()})
    if name not in paths:
        raise AgentError(f"no such service: {name!r} (known: {', '.join(paths)})")
    return Path(paths[name])


@click.command("logs")
@click.argument("name", metavar="NAME")
@click.option("--follow", "-f", is_flag=True, help="Keep printing what is written (Ctrl-C "
              "stops).")
@click.option("--lines", "-n", type=click.IntRange(0, 100_000), default=50, show_default=True,
              help="How many of the last lines to print first.")
@clikit.common
@clikit.handled
def logs(name: str, follow: bool, lines: int, workspace: Optional[Path],
         config: Optional[Path]) -> None:
    """Print a service's log (comfyui, jupyter, sshd, yours; also agent and hooks)."""
    import os
    import time

    from agent import procs
    from agent.model import AgentError
    from agent.redact import redact

    conf = clikit.load(config, workspace)
    path = _log_path(conf, name)
    if not path.is_file() and not follow:
        raise AgentError(f"no log yet at {path} ({name} has not written one)")
    if lines and path.is_file():
        text = procs.tail(path, lines)
        if text:
            clikit.out(redact(text))
    if not follow:
        return
    pos, ino = 0, None
    try:
        st = os.stat(path)
        pos, ino = st.st_size, st.st_ino
    except OSError:
        pass
    while True:
        try:
            st = os.stat(path)
        except OSError:
            time.sleep(FOLLOW_POLL)
            continue
        if st.st_ino != ino or st.st_size < pos:  # rotated or truncated: from its start
            pos, ino = 0, st.st_ino
        if st.st_size > pos:
            with open(path, "rb") as fh:
                fh.seek(pos)
                data = fh.read(1 << 20)
            cut = data.rfind(b"\n") + 1  # whole lines only; the rest at the next look
            if cut:
                pos += cut
                clikit.out(redact(data[:cut].decode("utf-8", "replace").rstrip("\n")))
        time.sleep(FOLLOW_POLL)
