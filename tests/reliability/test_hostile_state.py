"""Hostile state: a workspace in a state nobody planned for (issue 7).

Every case builds a small workspace (command components a, b and c, c depending on a, plus the
overall marker), installs it, removes b's marker and artifact (independent work that must still
get done), plants one fault, then runs `status`, `health --now`, `install` and `reset a`, and (in
the full run, and for a few faults in the short one) the running agent, `run --no-comfyui`. Then
it removes the fault and runs `install` once more.

What counts (tally columns):
- crash: exit 3, a traceback (loguru's "Logging error" included), a hang, an error that is not
  one line naming the path, the agent dying or not stopping cleanly, or the fault at a stopping
  the independent repair of b;
- lie: `status` calling a component installed whose artifact is missing, a healthy verdict while
  a marker path holds something that is not a marker, or a marker written during the case for a
  component whose artifact is missing;
- leak: anything outside the workspace touched (symlink targets, a sibling folder);
- converged: after the fault is removed, one `install` exits 0, `status` is healthy, every marker
  is a regular file and every artifact exists ("-" where removing the fault means another path).

Short (CI) run: the faults in SHORT, the agent for those in AGENT_SHORT. Full run
(POD_AGENT_RELIABILITY=full): every fault, the agent for each. Faults that need root powers
(mount, chattr) are skipped with the reason when this machine refuses them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import make_venv
from tests.helpers import write_yaml
from tests.kit import tree_snapshot
from tests.reliability.conftest import FULL

NAMES = ("a", "b", "c")
STAMP = "2024-01-02 03:04:05"
SHORT = {"marker is a folder", "50 MB marker", "marker symlink to a file outside",
         "immutable marker", "marker folder is a file", "workspace read-only", "full disk",
         "workspace is a file", "marker is a FIFO", "state files are folders"}
AGENT_SHORT = {"marker is a folder", "full disk"}
CMD_TIMEOUT = 60
STATUS_MAX = 64 * 1024  # bytes of `status` output, whatever a marker holds


# ----------------------------------------------------------------------------- root powers
def _try(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


_powers: dict[str, str | None] = {}


def refused(power: str, scratch: Path) -> str | None:
    """Why this machine refuses `mount` or `chattr` (None: it allows it)."""
    if power in _powers:
        return _powers[power]
    spot = scratch / f"power-{power}"
    spot.mkdir(parents=True, exist_ok=True)
    if power == "mount":
        why = _try(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spot)])
        if why is None:
            why = _try(["mount", "-o", "remount,ro", str(spot)])
            _try(["umount", str(spot)])
    else:
        (spot / "f").write_text("x")
        why = _try(["chattr", "+i", str(spot / "f")])
        if why is None:
            _try(["chattr", "-i", str(spot / "f")])
    _powers[power] = None if why is None else f"{power} refused here: {why}"
    return _powers[power]


# ----------------------------------------------------------------------------- one case
@dataclass
class Case:
    base: Path  # holds ws, outside and the config
    ws: Path
    config: Path
    outside: Path  # symlink targets and a sibling folder: must never change
    logs: Path  # agent output, outside base
    mounts: list[Path] = field(default_factory=list)
    crash: bool = False
    lie: bool = False
    leak: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def markers(self) -> Path:
        return self.ws / ".install_markers"

    def marker(self, name: str) -> Path:
        return self.markers / f"{name}.done"

    def artifact(self, name: str) -> Path:
        return self.ws / "runs" / name

    def args(self, ws: Path | str | None = None) -> list[str]:
        return ["--workspace", str(ws or self.ws), "--config", str(self.config)]

    def fail(self, kind: str, note: str) -> None:
        setattr(self, kind, True)
        note = " ".join(note.split())
        self.notes.append(note if len(note) <= 300 else note[:297] + "...")

    def cli(self, *args: str, ws: Path | str | None = None) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run([sys.executable, "-m", "agent", *args, *self.args(ws)],
                                  capture_output=True, text=True, timeout=CMD_TIMEOUT,
                                  stdin=subprocess.DEVNULL, errors="backslashreplace")
        except subprocess.TimeoutExpired:
            self.fail("crash", f"`{args[0]}` hung (> {CMD_TIMEOUT}s)")
            return None


def config_for(case: Case, python: Path) -> dict:
    comps = {}
    for name in NAMES:
        art = case.artifact(name)
        comps[name] = {"kind": "command", "run": f"mkdir -p {art.parent} && echo ran >> {art}",
                       "check": f"test -s {art}"}
    comps["c"]["depends_on"] = ["a"]
    comps["overall_installation"] = {"kind": "overall"}
    return {"installer": "pip", "comfyui": {"venv": None, "python": str(python)},
            "defaults": {"retries": 0, "retry_backoff": 0, "timeout": 60},
            "components": comps, "http": {"port": 0, "address": "127.0.0.1"},
            "agent": {"reconcile_interval": 600}}


# ----------------------------------------------------------------------------- checking
ERROR_RE = re.compile(r"^(error|warning|config error): ")
LOG_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| (WARNING|INFO|ERROR) +\| ")


def check_output(case: Case, what: str, proc: subprocess.CompletedProcess | None,
                 paths: tuple[str, ...]) -> None:
    """No crash, bounded output, and every stderr line one clear line naming a path."""
    if proc is None:
        return
    text = proc.stdout + proc.stderr
    if proc.returncode == 3 or proc.returncode < 0:
        case.fail("crash", f"{what}: exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    if "Traceback" in text or "Logging error" in text:
        case.fail("crash", f"{what}: traceback: {text[-300:]}")
    if len(proc.stdout) > (STATUS_MAX if what == "status" else 256 * 1024):
        case.fail("crash", f"{what}: printed {len(proc.stdout)} bytes")
    for line in proc.stderr.splitlines():
        if LOG_RE.match(line) or line.startswith("log: "):
            continue
        if not ERROR_RE.match(line):
            case.fail("crash", f"{what}: stray stderr line: {line[:200]}")
        elif line.startswith("error: ") and not any(p in line for p in paths):
            case.fail("crash", f"{what}: error does not name the path: {line[:200]}")


def check_truth(case: Case, what: str, before: dict[str, tuple[int, int]],
                install_ok: bool = False) -> None:
    """`status` and the markers written meanwhile claim nothing untrue (and an `install` that
    exited 0 left a healthy workspace)."""
    proc = case.cli("status", "--json")
    if proc is None or not proc.stdout.strip():
        return
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        case.fail("crash", f"{what}: status --json is not JSON: {proc.stdout[:200]}")
        return
    done = {n: case.artifact(n).exists() for n in NAMES}
    unusable = [n for n in (*NAMES, "overall_installation") if _not_regular(case.marker(n))]
    for name, comp in data["components"].items():
        real = all(done.values()) if name == "overall_installation" else done.get(name)
        if comp["state"] == "installed" and not real:
            case.fail("lie", f"{what}: status says {name} installed, its artifact is missing")
        if comp["state"] == "installed" and name in unusable:
            case.fail("lie", f"{what}: status says {name} installed, its marker path holds "
                             "something that is not a marker file")
    if data["verdict"] == "healthy" and (unusable or not all(done.values())):
        case.fail("lie", f"{what}: verdict healthy with {unusable or 'artifacts missing'}")
    if install_ok and data["verdict"] != "healthy":
        case.fail("lie", f"{what}: install exited 0, status says {data['verdict']}")
    now = marker_stamps(case)
    for name in NAMES:
        if now.get(name) is not None and now.get(name) != before.get(name) and not done[name]:
            case.fail("lie", f"{what}: a marker for {name} was written, its artifact is missing")


def _not_regular(path: Path) -> bool:
    """Something stands at path that is not a regular file (absent: False)."""
    try:
        return not stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
    except OSError:
        return True


def marker_stamps(case: Case) -> dict[str, tuple[int, int] | None]:
    out = {}
    for name in (*NAMES, "overall_installation"):
        try:
            st = os.lstat(case.marker(name))
            out[name] = (st.st_mtime_ns, st.st_size)
        except OSError:
            out[name] = None
    return out


def outside_state(case: Case) -> dict:
    return {"outside": tree_snapshot(case.outside),
            "base": sorted(p.name for p in case.base.iterdir())}


def converged(case: Case, ws: Path | None = None) -> bool:
    ws = ws or case.ws
    proc = case.cli("install", ws=ws)
    if proc is None or proc.returncode != 0:
        case.notes.append(f"no convergence: install exit "
                          f"{proc.returncode if proc else 'hang'}: "
                          f"{(proc.stdout + proc.stderr)[-300:] if proc else ''}")
        return False
    proc = case.cli("status", "--json", ws=ws)
    try:
        data = json.loads(proc.stdout) if proc else {}
    except ValueError:
        data = {}
    markers_ok = all(os.path.isfile(ws / ".install_markers" / f"{n}.done")
                     and not os.path.islink(ws / ".install_markers" / f"{n}.done")
                     for n in (*NAMES, "overall_installation"))
    runs_ok = all(case.artifact(n).exists() for n in NAMES)
    if data.get("verdict") != "healthy" or not markers_ok or not runs_ok:
        case.notes.append(f"no convergence: verdict {data.get('verdict')}, markers "
                          f"{markers_ok}, artifacts {runs_ok}")
        return False
    return True


# ----------------------------------------------------------------------------- the agent
def agent_case(case: Case, fault: "Fault", paths: tuple[str, ...]) -> None:
    """`run --no-comfyui` under the fault: it keeps going (or refuses in one line), repairs b
    when the fault allows writes, and stops cleanly on SIGTERM."""
    out = case.logs / f"agent-{uuid.uuid4().hex[:8]}.out"
    ws = fault.workspace(case) if fault.workspace else case.ws
    with open(out, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--no-comfyui",
                                 *case.args(ws)], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        handled = re.compile(r"\| b: (installed|failed)")
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if proc.poll() is not None or handled.search(out.read_text(errors="replace")):
                break
            time.sleep(0.1)
        log = out.read_text(errors="replace")
        if proc.poll() is not None:
            lines = [ln for ln in log.splitlines() if not LOG_RE.match(ln)]
            if proc.returncode not in (1, 2) or len(lines) != 1 or \
                    not ERROR_RE.match(lines[0]) or not any(p in lines[0] for p in paths):
                case.fail("crash", f"agent exited {proc.returncode}: {log[-400:]}")
            return
        if not handled.search(log):
            case.fail("crash", f"agent did not get to b within 40 s: {log[-400:]}")
        if not fault.blocks_writes and not (case.marker("b").is_file()
                                            and case.artifact("b").exists()):
            case.fail("crash", "agent: the fault at a stopped the repair of b")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            case.fail("crash", "agent did not stop within 30 s of SIGTERM")
            code = None
        if code not in (0, None):
            case.fail("crash", f"agent exit {code} after SIGTERM")
        log = out.read_text(errors="replace")
        for bad in ("Traceback", "Logging error", "reconcile (foreground) crashed",
                    "reconcile (background) crashed"):
            if bad in log:
                case.fail("crash", f"agent log: {bad}: "
                                   f"{log[max(0, log.find(bad) - 200):log.find(bad) + 300]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# ----------------------------------------------------------------------------- the faults
@dataclass
class Fault:
    name: str
    apply: Callable[[Case], None]
    undo: Callable[[Case], None] = lambda case: None
    needs: str = ""  # "mount" or "chattr"
    blocks_writes: bool = False  # no marker can be written while it lasts (b cannot be repaired)
    workspace: Callable[[Case], Path] | None = None  # the commands use this path instead
    can_converge: bool = True
    on_tmpfs: bool = False  # the workspace is a small tmpfs (full disk)


def _bytes(data: bytes) -> Callable[[Case], None]:
    return lambda case: case.marker("a").write_bytes(data)


def _link(target: str) -> Callable[[Case], None]:
    def apply(case: Case) -> None:
        case.marker("a").unlink()
        case.marker("a").symlink_to(case.outside / target)
    return apply


def _folder_marker(name: str) -> Callable[[Case], None]:
    def apply(case: Case) -> None:
        case.marker(name).unlink()
        case.marker(name).mkdir()
        (case.marker(name) / "inside").write_text("someone's file\n")
    return apply


def _huge(case: Case) -> None:
    with open(case.marker("a"), "wb") as fh:
        chunk = b"x" * (1 << 20)
        for _ in range(50):
            fh.write(chunk)


def _fifo(case: Case) -> None:
    case.marker("a").unlink()
    os.mkfifo(case.marker("a"))


def _immutable(case: Case) -> None:
    case.artifact("a").unlink()  # a needs a reinstall, so its marker must go
    subprocess.run(["chattr", "+i", str(case.marker("a"))], check=True)


def _mutable(case: Case) -> None:
    subprocess.run(["chattr", "-i", str(case.marker("a"))], check=True)


def _ro_mount(which: Callable[[Case], Path]) -> Callable[[Case], None]:
    def apply(case: Case) -> None:
        path = which(case)
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        case.mounts.append(path)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
    return apply


def _unmount(case: Case) -> None:
    while case.mounts:
        subprocess.run(["umount", str(case.mounts.pop())], check=True)


def _markers_file(case: Case) -> None:
    shutil.rmtree(case.markers)
    case.markers.write_text("not a folder\n")


def _fill(case: Case) -> None:
    try:  # the install may have left the 4 MiB volume full already: even open() says ENOSPC
        with open(case.ws / "fill", "wb") as fh:
            while True:
                fh.write(b"\0" * (64 * 1024))
                fh.flush()
    except OSError:
        pass


def _ws_file(case: Case) -> Path:
    return case.base / "ws-file"


def _make_ws_file(case: Case) -> None:
    _ws_file(case).write_text("a file, not a folder\n")


def _nonutf8(case: Case) -> None:
    with open(os.path.join(os.fsencode(case.markers), b"\xff\xfe-odd.done"), "w") as fh:
        fh.write(STAMP + "\n")


def _many(case: Case) -> None:
    for i in range(10_000):
        (case.markers / f"junk{i}.done").write_text(STAMP + "\n")


def _lock_dir(case: Case) -> None:
    case.artifact("a").unlink()
    lock = case.ws / ".pod-agent" / "locks" / "a.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.exists():
        lock.unlink()
    lock.mkdir()


def _state_files(case: Case) -> list[Path]:
    run = case.ws / ".pod-agent" / "run" / socket.gethostname()
    return [case.ws / ".pod-agent" / "failed" / "a.json", run / "health.json",
            run / "agent.json", run / "service.json", case.ws / ".pod-agent" / "user_nodes.json",
            case.ws / ".pod-agent" / "health-actions.json"]


def _garbage_state(case: Case) -> None:
    case.marker("a").unlink()  # so that a's failure record is read
    rng = random.Random(7)
    bodies = [b'{"time": [], "reason": {"x": "y\\nz"}}', rng.randbytes(512),
              b'{"pid": "x", "create_time": "y"}', b'{"state": ["x"], "uptime": "y"}',
              b'{"ComfyUI-x": 5}', b'{"events": {"reinstall:a": "x"}, "quarantine": []}']
    for path, body in zip(_state_files(case), bodies):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


def _state_dirs(case: Case) -> None:
    case.marker("a").unlink()
    for path in _state_files(case):
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        (path / "inside").write_text("x")


def _undo_state_dirs(case: Case) -> None:
    for path in _state_files(case):
        if path.is_dir():
            shutil.rmtree(path)


FAULTS = [
    Fault("empty marker", _bytes(b"")),
    Fault("binary marker", _bytes(random.Random(1).randbytes(4096))),
    Fault("marker with NUL bytes", _bytes(STAMP.encode() + b"\0\0\nfingerprint: \0x\n")),
    Fault("50 MB marker", _huge),
    Fault("marker symlink to a file outside", _link("stamp.txt")),
    Fault("marker symlink to nothing", _link("nothing")),
    Fault("marker symlink to a folder outside", _link("folder")),
    Fault("marker is a folder", _folder_marker("a"), lambda c: shutil.rmtree(c.marker("a"))),
    Fault("overall marker is a folder", _folder_marker("overall_installation"),
          lambda c: shutil.rmtree(c.marker("overall_installation"))),
    Fault("marker is a FIFO", _fifo, lambda c: c.marker("a").unlink(missing_ok=True)),
    Fault("immutable marker", _immutable, _mutable, needs="chattr"),
    Fault("marker folder read-only", _ro_mount(lambda c: c.markers), _unmount, needs="mount",
          blocks_writes=True),
    Fault("marker folder is a file", _markers_file, lambda c: c.markers.unlink(),
          blocks_writes=True),
    Fault("workspace read-only", _ro_mount(lambda c: c.ws), _unmount, needs="mount",
          blocks_writes=True),
    Fault("full disk", _fill, lambda c: (c.ws / "fill").unlink(missing_ok=True), needs="mount",
          blocks_writes=True, on_tmpfs=True),
    Fault("workspace is a file", _make_ws_file, lambda c: _ws_file(c).unlink(),
          workspace=_ws_file),
    Fault("workspace cannot be created", lambda c: None,
          workspace=lambda c: Path(f"/proc/pod-agent-{c.base.name}"), can_converge=False),
    Fault("non-UTF-8 name in the marker folder", _nonutf8),
    Fault("10,000 files in the marker folder", _many),
    Fault("lock file is a folder", _lock_dir,
          lambda c: (c.ws / ".pod-agent" / "locks" / "a.lock").rmdir()),
    Fault("garbage state files", _garbage_state),
    Fault("state files are folders", _state_dirs, _undo_state_dirs),
]
SELECTED = [f for f in FAULTS if FULL or f.name in SHORT]


# ----------------------------------------------------------------------------- the test
@pytest.fixture
def case(tmp_path):
    base = tmp_path / "case"
    base.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    outside = base / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "folder" / "kept.txt").write_text("kept\n")
    (outside / "stamp.txt").write_text(STAMP + "\n")
    c = Case(base=base, ws=base / "ws", config=base / "config.yaml", outside=outside, logs=logs)
    yield c
    for path in reversed(c.mounts):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
    subprocess.run(["chattr", "-R", "-i", str(base)], capture_output=True)


@pytest.mark.parametrize("fault", SELECTED, ids=[f.name for f in SELECTED])
def test_hostile_state(case, fault, tally, tmp_path):
    if fault.needs:
        why = refused(fault.needs, tmp_path)
        if why:
            pytest.skip(why)
    case.ws.mkdir()
    if fault.on_tmpfs:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(case.ws)],
                       check=True)
        case.mounts.append(case.ws)
    python = make_venv(case.ws / "venv")
    write_yaml(case.config, config_for(case, python))
    first = case.cli("install")
    assert first is not None and first.returncode == 0, first
    case.marker("b").unlink()
    case.artifact("b").unlink()
    ws = fault.workspace(case) if fault.workspace else case.ws
    paths = (str(ws), str(case.ws)) if fault.workspace else (str(case.ws),)

    fault.apply(case)
    outside = outside_state(case)
    before = marker_stamps(case)
    if not fault.workspace:
        check_truth(case, "under the fault", before)
    for args in (("status",), ("health", "--now"), ("install",), ("reset", "a")):
        proc = case.cli(*args, ws=ws)
        check_output(case, " ".join(args), proc, paths)
        if fault.workspace and args[0] != "reset" and proc is not None \
                and proc.returncode == 0:
            case.fail("lie", f"{args[0]}: exit 0 on an unusable workspace {ws}")
        if args == ("install",) and not fault.workspace:
            check_truth(case, "after install", before,
                        install_ok=proc is not None and proc.returncode == 0)
            if not fault.blocks_writes and not (case.marker("b").is_file()
                                                and case.artifact("b").exists()):
                case.fail("crash", "install: the fault at a stopped the repair of b")
    if FULL or fault.name in AGENT_SHORT:
        if not fault.workspace:  # b's work is redone by the agent
            for path in (case.marker("b"), case.artifact("b")):
                try:
                    path.unlink()
                except OSError:
                    pass
        agent_case(case, fault, paths)
    if outside_state(case) != outside:
        case.fail("leak", "something outside the workspace changed")

    fault.undo(case)
    ok = None
    if fault.can_converge:
        ok = converged(case, ws)
    note = f"{fault.name}: " + "; ".join(case.notes)
    assert tally.case("hostile state", crash=case.crash, lie=case.lie, leak=case.leak,
                      converged=ok, note=note), note
