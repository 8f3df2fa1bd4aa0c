"""After an update (or a rollback): restart ComfyUI and see that it answers and that every
custom node that imported before still imports.

ComfyUI names its failed imports at start (nodes.py, `init_external_custom_nodes` and
`load_custom_node`):

    Cannot import /…/custom_nodes/NAME module for custom nodes: <the exception>
    Import times for custom nodes:
       0.0 seconds (IMPORT FAILED): /…/custom_nodes/NAME
       0.1 seconds: /…/custom_nodes/OTHER

With a resident agent running ComfyUI, the restart goes through it, as `pod-agent restart comfyui`
asks for one (a request file in <runtime_dir>/requests, agent/services.py: queue-aware, so a
running generation finishes first); the agent's service.json then tells when the new ComfyUI
answers.
Without one, a ComfyUI is started here on its configured port for the check only and stopped
again; when that port is taken by a ComfyUI nobody supervises, the import check is skipped and
the report says so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent import procs
from agent.markers import atomic_write, read_json

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TIMES = re.compile(r"\d+\.\d+ seconds( \(IMPORT FAILED\))?: (.+?)\s*$")
_CANNOT = re.compile(r"Cannot import (.+?) module for custom nodes: (.*)$")
SUMMARY = "Import times for custom nodes"
LOG_TAIL = 512 * 1024


@dataclass
class Check:
    ok: bool
    how: str  # "agent" | "started here" | "skipped"
    detail: str = ""
    failed: dict[str, str] = field(default_factory=dict)  # node -> import error (new ones)
    all_failed: dict[str, str] = field(default_factory=dict)


def _node(path: str) -> str:
    return os.path.basename(path.strip().rstrip("/\\"))


def parse_imports(text: str) -> tuple[set[str], dict[str, str]] | None:
    """(nodes that imported, {node: error} that failed) from the last import summary in text;
    None when text has no summary."""
    text = _ANSI.sub("", text)
    at = text.rfind(SUMMARY)
    if at < 0:
        return None
    start = text.rfind("\n" + "To see the GUI", 0, at)  # the previous start's end, if any
    errors: dict[str, str] = {}
    for line in text[max(0, start):at].splitlines():
        m = _CANNOT.search(line)
        if m:
            errors[_node(m.group(1))] = m.group(2).strip()[:500]
    ok: set[str] = set()
    failed: dict[str, str] = {}
    for line in text[at:].splitlines()[1:]:
        m = _TIMES.search(line)
        if not m:
            continue
        name = _node(m.group(2))
        if m.group(1):
            failed[name] = errors.get(name, "IMPORT FAILED (see ComfyUI's log)")
        else:
            ok.add(name)
    return ok, failed


def _read_from(path: Path, offset: int, ident: tuple | None) -> str:
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            same = ident is not None and ident == (st.st_dev, st.st_ino) and st.st_size >= offset
            fh.seek(offset if same else max(0, st.st_size - LOG_TAIL))
            return fh.read(LOG_TAIL * 2).decode("utf-8", "replace")
    except OSError:
        return ""


def log_mark(path: Path) -> tuple[int, tuple | None]:
    try:
        st = os.stat(path)
        return st.st_size, (st.st_dev, st.st_ino)
    except OSError:
        return 0, None


def baseline(conf) -> tuple[set[str], dict[str, str]] | None:
    """The import result of ComfyUI's latest start, from the tail of its log (None: unknown)."""
    path = Path(conf.comfyui.log)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            fh.seek(max(0, size - LOG_TAIL))
            return parse_imports(fh.read().decode("utf-8", "replace"))
    except OSError:
        return None


def agent_running(conf) -> dict | None:
    """agent.json of a live agent for this workspace on this host, else None."""
    data = read_json(conf.runtime_dir / "agent.json")
    if not data or not procs.alive(data.get("pid"), data.get("create_time")):
        return None
    return data


def _service(conf) -> dict:
    return read_json(conf.runtime_dir / "service.json") or {}


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # as agent/comfyhttp.py:
# a local ComfyUI is never asked through the pod's HTTP(S)_PROXY


def _get(url: str, timeout: float = 2.0) -> bool:
    try:
        with _OPENER.open(url, timeout=timeout) as r:  # noqa: S310 - local
            return r.status == 200
    except (OSError, ValueError):
        return False


def _host(conf) -> str:
    args = list(conf.comfyui.args)
    host = conf.comfyui.host
    if "--listen" in args:
        i = args.index("--listen")
        if i + 1 < len(args) and not args[i + 1].startswith("-"):
            host = args[i + 1]
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _port_open(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _judge(how: str, parsed, before, changed_nodes: set[str], whole: bool) -> Check:
    if parsed is None:
        return Check(True, how, "ComfyUI answers (it printed no custom node import summary)")
    ok, failed = parsed
    if before is not None:
        _, failed_before = before
        new = {n: e for n, e in failed.items() if n not in failed_before}
    else:  # no earlier start to compare with: the nodes this change touched
        new = {n: e for n, e in failed.items() if whole or n in changed_nodes}
    if new:
        return Check(False, how, "custom nodes failed to import: " + "; ".join(
            f"{n}: {e}" for n, e in sorted(new.items())), new, failed)
    return Check(True, how, f"ComfyUI answers; {len(ok)} custom nodes imported"
                 + (f", {len(failed)} failed as before ({', '.join(sorted(failed))})"
                    if failed else ""), {}, failed)


_UNSET = object()


def restart_and_check(conf, reason: str, changed_nodes: set[str], whole: bool,
                      say: Callable[[str], None], timeout: float | None = None,
                      before=_UNSET) -> Check:
    """Restart ComfyUI on what is on disk now and judge its start (see the module docstring):
    a node failing now that imported in `before` (default: ComfyUI's latest start, from its
    log) fails the check."""
    if before is _UNSET:
        before = baseline(conf)
    agent = agent_running(conf)
    limit = timeout if timeout is not None else float(conf.agent.get("ready_timeout", 600))
    if agent is not None and agent.get("start_comfyui", True):
        return _through_agent(conf, reason, before, changed_nodes, whole, say, limit)
    host, port = _host(conf), int(conf.comfyui.port)
    if _port_open(host, port):
        return Check(True, "skipped", f"not verified: port {port} is taken by a ComfyUI no "
                     "agent supervises (restart it yourself to load the change)")
    if not (Path(conf.comfyui.dir) / "main.py").is_file():
        return Check(False, "skipped", f"ComfyUI cannot start: no main.py in {conf.comfyui.dir}")
    return _started_here(conf, before, changed_nodes, whole, say, limit, host, port)


def _through_agent(conf, reason, before, changed_nodes, whole, say, limit) -> Check:
    log = Path(conf.comfyui.log)
    offset, ident = log_mark(log)
    old = _service(conf).get("pid")
    req = request_restart(conf)
    say("restarting ComfyUI through the running agent (after its queue is empty)")
    max_wait = float(conf.agent.get("restart_max_wait", 0) or 0)
    deadline = time.monotonic() + limit + max(max_wait, 60.0)
    told_queue = False
    while time.monotonic() < deadline:
        snap = _service(conf)
        pid = snap.get("pid")
        taken = not req.exists()
        if taken and pid and pid != old and snap.get("state") == "running" \
                and snap.get("ready") and not snap.get("pending_restart"):
            break
        if taken and snap.get("state") in ("backoff", "degraded") and pid != old:
            text = _read_from(log, offset, ident)
            return Check(False, "agent", "ComfyUI did not come back: "
                         + str(snap.get("last_failure") or snap.get("state")),
                         *(_failures(text)))
        answer = read_json(req.with_suffix(".answer")) if taken else None
        if answer is not None and answer.get("ok") is False:
            return Check(False, "agent", "the agent did not restart ComfyUI: "
                         + str(answer.get("error") or "refused"))
        pending = snap.get("pending_restart") or {}
        if taken and pending.get("waiting_for") and not told_queue:
            say(f"ComfyUI restart waits for {pending['waiting_for']}")
            told_queue = True
        time.sleep(0.2)
    else:
        for stale in (req, req.with_suffix(".answer")):
            try:
                stale.unlink()
            except OSError:
                pass
        return Check(False, "agent", f"ComfyUI did not answer again within {limit:g}s "
                     "after the restart request")
    try:
        req.with_suffix(".answer").unlink()
    except OSError:
        pass
    text = _wait_summary(log, offset, ident)
    return _judge("agent", parse_imports(text), before, changed_nodes, whole)


def _failures(text: str) -> tuple[dict, dict]:
    parsed = parse_imports(text)
    return ({}, {}) if parsed is None else (parsed[1], parsed[1])


def _wait_summary(log: Path, offset: int, ident, wait: float = 5.0) -> str:
    """ComfyUI prints the summary before it listens, but the log pipe may lag a little."""
    deadline = time.monotonic() + wait
    while True:
        text = _read_from(log, offset, ident)
        if SUMMARY in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def _started_here(conf, before, changed_nodes, whole, say, limit, host, port) -> Check:
    s = conf.comfyui
    out = Path(conf.state_dir) / "updates" / "verify-comfyui.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = procs.base_env(dict(s.env))
    say(f"starting ComfyUI on port {port} to check the imports (no agent runs it)")
    with open(out, "wb") as fh:
        proc = subprocess.Popen([str(s.python), "main.py", *s.args], cwd=str(s.dir), env=env,
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + limit
        url = f"http://{host}:{port}/system_stats"
        while True:
            if proc.poll() is not None:
                text = out.read_text(errors="replace")
                failed, all_failed = _failures(text)
                last = (text.strip().splitlines() or ["no output"])[-1][:300]
                return Check(False, "started here", f"ComfyUI exited with status "
                             f"{proc.returncode} at start: {last} (log {out})", failed,
                             all_failed)
            if _get(url):
                break
            if time.monotonic() > deadline:
                return Check(False, "started here",
                             f"ComfyUI did not answer within {limit:g}s (log {out})")
            time.sleep(0.2)
        text = _wait_summary(out, 0, None, 3.0)
        check = _judge("started here", parse_imports(text), before, changed_nodes, whole)
        return check
    finally:
        procs.kill_group(proc, 20.0)  # SIGTERM, SIGKILL after 20 s, the group's leftovers


# The health checks an update can break without a component probe or ComfyUI's start noticing:
# a node's requirements replacing torch (no GPU any more, or SageAttention's kernel built for
# another torch), or filling the disk. The others are the probes (components) and the ComfyUI
# check itself (comfyui_http, comfyui_process), or about the agent (agent).
HEALTH_CHECKS = ("gpu", "sageattention", "disk")


def health(conf) -> dict[str, list[str]]:
    """{check: [status, detail]} of the enabled HEALTH_CHECKS, run now (no action, no report
    written: the agent's own report is left as it is). The SageAttention probe keeps its cache,
    keyed by what decides it (torch's and sageattention's versions and files): an update that
    changes neither costs no second probe."""
    if not conf.health.get("enabled", True):
        return {}
    from agent.checks import REGISTRY
    from agent.checks.base import CheckCtx, Hooks

    out: dict[str, list[str]] = {}
    for name in HEALTH_CHECKS:
        s = conf.health["checks"].get(name)
        if not s or not s.get("enabled") or name not in REGISTRY:
            continue
        try:
            r = REGISTRY[name](CheckCtx(conf, s, Hooks(), {}))
            out[name] = [r.status, r.detail]
        except Exception as exc:  # noqa: BLE001 - a check that crashes is a failing check
            out[name] = ["fail", f"check crashed: {type(exc).__name__}: {exc}"]
    return out


def health_regressions(before: dict, after: dict) -> list[str]:
    """The checks that fail now and did not fail at the restore point."""
    return [f"health check {name} fails after the change: {detail[:300]}"
            for name, (status, detail) in after.items()
            if status == "fail" and (before.get(name) or ["ok"])[0] != "fail"]


def request_restart(conf, wait_answer: float = 0.0) -> Path:
    """The request `pod-agent restart comfyui` writes (agent/services.py takes it and answers
    in a `.answer` file). wait_answer > 0: a request nobody waits on: its answer is waited for
    that long and removed (none left behind)."""
    from agent.services import REQUESTS_DIR

    folder = conf.runtime_dir / REQUESTS_DIR
    req = folder / f"restart-{time.time_ns()}-{os.getpid()}.json"
    atomic_write(req, json.dumps({"name": "comfyui", "now": False}))
    answer = req.with_suffix(".answer")
    deadline = time.monotonic() + wait_answer
    while wait_answer > 0:
        if answer.exists() or time.monotonic() > deadline:
            for stale in (answer, req):
                try:
                    stale.unlink()
                except OSError:
                    pass
            break
        time.sleep(0.1)
    return req
