"""The pod's other services (JupyterLab, sshd, the user's own) and the image's start hooks.

Services are declared in the config's `services:` (agent/service_config.py). The manager starts
each one on the process engine (agent/engine.py) at the right moment: on a resumed volume all of
them at once, before any verification; on a fresh volume those with no `depends_on` at once and
the others once their components are installed. It restarts them per their policy and stops
them when the agent stops.

Also here: `ensure_authorized_keys` (sshd's PUBLIC_KEY, added once with the right permissions)
and the `/pre_start.sh` / `/post_start.sh` hooks (agent/service_config.Hooks).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Mapping

from loguru import logger

from agent.model import AgentError
from agent.service_config import Hooks, ServiceSpec, expand_env


# --------------------------------------------------------------------------- authorized_keys
def _key_lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def ensure_authorized_keys(keys_text: str, home: Path) -> list[str]:
    """Put each key of `keys_text` (one per line) in `home`/.ssh/authorized_keys unless it is
    there already: ~/.ssh is mode 700 and the file 600 (sshd's StrictModes refuses looser ones).
    Returns the keys added (none when all were there). AgentError (one line) when it cannot."""
    keys = _key_lines(keys_text)
    ssh = home / ".ssh"
    path = ssh / "authorized_keys"
    try:
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(ssh, 0o700)
        try:
            existing = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            existing = ""
        have = set(_key_lines(existing))
        added = [k for k in dict.fromkeys(keys) if k not in have]
        if added:
            text = existing + ("" if not existing or existing.endswith("\n") else "\n")
            text += "".join(k + "\n" for k in added)
            tmp = ssh / ".authorized_keys.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        if path.exists():
            os.chmod(path, 0o600)
    except OSError as exc:
        raise AgentError(f"cannot set up {path}: {exc.strerror or exc}") from None
    return added


def prepare(spec: ServiceSpec, environ: Mapping[str, str]) -> None:
    """What a service needs before each start (today: its authorized_keys)."""
    if spec.authorized_keys:
        text = expand_env(spec.authorized_keys, environ)
        home = Path(environ.get("HOME") or os.path.expanduser("~"))
        if text.strip():
            added = ensure_authorized_keys(text, home)
            if added:
                logger.info(f"service {spec.name}: added {len(added)} key(s) to "
                            f"{home / '.ssh' / 'authorized_keys'}")


# --------------------------------------------------------------------------- hooks
def run_hook(which: str, hooks: Hooks | None, stop: threading.Event | None = None) -> int | None:
    """Run the `pre_start` or `post_start` hook with bash when its file exists, its output in
    hooks.log; wait for it (up to hooks.timeout, or until `stop` is set: then its process group
    is ended). Returns its exit status (None: no such hook)."""
    from agent import procs

    if hooks is None:
        return None
    path = getattr(hooks, which)
    if path is None or not Path(path).is_file():
        return None
    logger.info(f"hook {which}: running {path} (output in {hooks.log})")
    result: list = []

    def work() -> None:
        try:
            result.append(procs.run(["bash", str(path)], log=hooks.log, timeout=hooks.timeout,
                                    title=f"hook {which}"))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=work, name=f"hook-{which}", daemon=True)
    thread.start()
    stopped = False
    while thread.is_alive():
        if stop is not None and stop.wait(0.2):
            stopped = True
            procs.terminate_all()
            thread.join(10)
            break
        thread.join(0.2)
    if stopped or not result:
        logger.warning(f"hook {which}: {path} ended: the agent is shutting down")
        return None
    res = result[0]
    if isinstance(res, OSError):
        logger.warning(f"hook {which}: cannot run {path}: {res.strerror or res}")
        return None
    if res.timed_out:
        logger.warning(f"hook {which}: {path} did not finish within {hooks.timeout:g}s: ended "
                       f"(see {hooks.log})")
    elif res.returncode != 0:
        logger.warning(f"hook {which}: {path} exited {res.returncode} (see {hooks.log})")
    else:
        logger.info(f"hook {which}: {path} done in {res.duration:.1f}s")
    return res.returncode
