"""The ComfyUI supervisor against real processes: tests/fake_comfyui/main.py on a free port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest
from loguru import logger

from agent.config import AGENT_FIELDS
from agent.model import ComfyUISettings
from agent.supervisor import IllegalTransition, ServiceState, Supervisor

FAKE = Path(__file__).parent / "fake_comfyui" / "main.py"

FAST = dict(
    stop_timeout=3.0,
    ready_timeout=10.0,
    ready_poll_interval=0.1,
    liveness_interval=0.2,
    liveness_failures=3,
    backoff_initial=0.1,
    backoff_max=1.0,
    backoff_reset_after=600.0,
    degraded_after=5,
    degraded_window=900.0,
    degraded_retry=0.4,
    restart_max_wait=30.0,
    queue_poll_interval=0.1,
)


def wait_for(predicate: Callable[[], Any], timeout: float, tick: Supervisor | None = None,
             interval: float = 0.02, message: str = "") -> Any:
    """Poll predicate until it is truthy (returns its value) or the deadline passes (fails).

    With `tick`, the supervisor is driven from this loop (no background thread)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        if tick is not None:
            tick.tick()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s {message}")
        pause.wait(interval)


def holds_for(predicate: Callable[[], Any], duration: float, interval: float = 0.02) -> bool:
    """True when predicate stays truthy for the whole duration."""
    deadline = time.monotonic() + duration
    pause = threading.Event()
    while time.monotonic() < deadline:
        if not predicate():
            return False
        pause.wait(interval)
    return bool(predicate())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pod:
    """A temporary ComfyUI folder with the fake server, and every supervisor a test makes."""

    def __init__(self, root: Path):
        self.root = root
        self.comfy = root / "ComfyUI"
        self.comfy.mkdir()
        shutil.copy(FAKE, self.comfy / "main.py")
        self.control = root / "control"
        self.control.mkdir()
        self.record = root / "starts.jsonl"
        self.state_dir = root / "state"
        self.log = root / "logs" / "comfyui.log"
        self.port = free_port()
        self.sups: list[Supervisor] = []
        self.runners: list[tuple[threading.Event, threading.Thread]] = []

    def settings(self, env: dict[str, str] | None = None, **over: Any) -> ComfyUISettings:
        values: dict[str, Any] = dict(
            dir=self.comfy, python=Path(sys.executable), venv=None, base_python=sys.executable,
            args=("--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch"),
            port=self.port, host="127.0.0.1",
            env={"FAKE_COMFY_CONTROL": str(self.control), "FAKE_COMFY_RECORD": str(self.record),
                 **(env or {})},
            log=self.log, sage_attention="off",
        )
        values.update(over)
        return ComfyUISettings(**values)

    def supervisor(self, settings: ComfyUISettings | None = None, http_timeout: float = 0.5,
                   extra_args: Callable[[], list[str]] = lambda: [], **agent: Any) -> Supervisor:
        values = {k: default for k, (_typ, default) in AGENT_FIELDS.items()}
        values.update(FAST)
        values.update(agent)
        sup = Supervisor(settings or self.settings(), values, self.state_dir,
                         extra_args=extra_args, http_timeout=http_timeout)
        self.sups.append(sup)
        return sup

    def run(self, sup: Supervisor, interval: float = 0.02) -> threading.Event:
        """Tick sup from a background thread (as the daemon does)."""
        stop = threading.Event()
        thread = threading.Thread(target=sup.run_forever, args=(stop, interval), daemon=True)
        thread.start()
        self.runners.append((stop, thread))
        return stop

    def halt_runners(self) -> None:
        for stop, thread in self.runners:
            stop.set()
        for stop, thread in self.runners:
            thread.join(10)
            assert not thread.is_alive(), "supervisor thread did not stop"

    def set(self, name: str, text: str = "") -> None:
        (self.control / name).write_text(text)

    def clear(self, name: str) -> None:
        (self.control / name).unlink(missing_ok=True)

    def records(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def procs(self) -> list[psutil.Process]:
        """Live (non-zombie) processes running in the fake ComfyUI folder."""
        out = []
        want = os.path.realpath(self.comfy)
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and os.path.realpath(proc.cwd()) == want:
                    out.append(proc)
            except (psutil.Error, OSError):
                continue
        return out

    def fake_servers(self) -> list[psutil.Process]:
        return [p for p in self.procs() if "main.py" in (p.cmdline() or [])]

    def teardown(self) -> None:
        self.halt_runners()
        for sup in reversed(self.sups):
            sup.stop(timeout=2)
        leaked = self.procs()
        for proc in leaked:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(leaked, timeout=5)
        assert not leaked, f"processes left behind: {[p.pid for p in leaked]}"


@pytest.fixture
def pod(tmp_path):
    p = Pod(tmp_path)
    yield p
    p.teardown()


def state(sup: Supervisor) -> str:
    return sup.snapshot()["state"]


def running(sup: Supervisor) -> bool:
    return state(sup) == "running"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def warnings():
    records: list[str] = []
    sink = logger.add(lambda m: records.append(str(m)), level="WARNING", format="{message}")
    yield records
    logger.remove(sink)


# ---------------------------------------------------------------------- start, stop
def test_starts_and_becomes_running(pod):
    sup = pod.supervisor(extra_args=lambda: ["--use-sage-attention"])
    sup.start()
    assert state(sup) == "starting"
    wait_for(lambda: running(sup), 10, tick=sup)
    snap = sup.snapshot()
    assert snap["pid"] and snap["ready"] and not snap["adopted"]
    assert snap["restarts"] == 0 and snap["failures"] == 0 and snap["pending_restart"] is None
    (rec,) = pod.records()
    assert rec["pid"] == snap["pid"]
    assert rec["argv"][1:] == ["--listen", "127.0.0.1", "--port", str(pod.port),
                               "--disable-auto-launch", "--use-sage-attention"]
    saved = json.loads((pod.state_dir / "comfyui.json").read_text())
    assert saved["pid"] == snap["pid"] and saved["port"] == pod.port
    assert saved["create_time"] == psutil.Process(snap["pid"]).create_time()
    assert os.getpgid(snap["pid"]) == snap["pid"]  # its own process group
    assert "pod-agent starts ComfyUI" in pod.log.read_text()
    assert "fake-comfyui" in pod.log.read_text()  # its output goes straight to the log

    sup.stop()
    assert state(sup) == "stopped" and sup.snapshot()["pid"] is None
    assert gone(rec["pid"]) and not pod.procs()
    assert not (pod.state_dir / "comfyui.json").exists()
    assert sup.snapshot()["last_exit"]["code"] == 0  # the fake exits 0 on SIGTERM


def test_stop_terminates_the_whole_group(pod):
    sup = pod.supervisor(pod.settings(env={"FAKE_COMFY_SPAWN_CHILD": "1"}))
    sup.start()
    wait_for(lambda: running(sup), 10, tick=sup)
    (rec,) = pod.records()
    assert rec["child_pid"] and psutil.pid_exists(rec["child_pid"])
    sup.stop()
    assert gone(rec["pid"]) and gone(rec["child_pid"])
    assert not pod.procs()


def test_stop_sigkills_a_group_that_ignores_sigterm(pod):
    settings = pod.settings(env={"FAKE_COMFY_SPAWN_CHILD": "1", "FAKE_COMFY_IGNORE_SIGTERM": "1"})
    sup = pod.supervisor(settings)
    sup.start()
    wait_for(lambda: running(sup), 10, tick=sup)
    (rec,) = pod.records()
    began = time.monotonic()
    sup.stop(timeout=0.5)
    assert time.monotonic() - began >= 0.5
    assert sup.snapshot()["last_exit"]["signal"] == 9
    assert gone(rec["pid"]) and gone(rec["child_pid"]) and not pod.procs()


def test_missing_python_or_main_is_a_failed_start(pod):
    sup = pod.supervisor(pod.settings(python=pod.root / "no-such-python"))
    sup.start()  # no exception
    snap = sup.snapshot()
    assert snap["state"] == "backoff" and snap["failures"] == 1
    assert "python not found" in snap["last_failure"]
    assert snap["next_start_in"] is not None
    sup.stop()
    assert state(sup) == "stopped"

    (pod.comfy / "main.py").unlink()
    sup2 = pod.supervisor()
    sup2.start()
    assert "main.py not found" in sup2.snapshot()["last_failure"]
    assert not pod.procs()


def test_never_starts_on_a_port_someone_else_holds(pod):
    with socket.socket() as other:
        other.bind(("127.0.0.1", pod.port))
        other.listen()
        sup = pod.supervisor()
        sup.start()
        snap = sup.snapshot()
        assert snap["state"] == "backoff" and "already in use" in snap["last_failure"]
        assert not pod.records()


def test_illegal_transition_raises(pod):
    sup = pod.supervisor()
    with pytest.raises(IllegalTransition):
        sup._transition(ServiceState.STOPPING, "nothing to stop")
    assert sup.state is ServiceState.STOPPED


# ---------------------------------------------------------------------- failures
@pytest.mark.slow  # a real crash loop: 2.5 s
def test_crash_loop_backs_off_then_degrades_and_keeps_retrying(pod):
    pod.set("crash")  # the fake exits 1 at start while this file exists
    sup = pod.supervisor(degraded_after=3)
    sup.start()
    delays: list[tuple[str, float]] = []

    def step() -> bool:
        snap = sup.snapshot()
        if snap["state"] in ("backoff", "degraded") and snap["failures"] > len(delays):
            assert snap["failures"] == len(delays) + 1
            delays.append((snap["state"], snap["next_start_in"]))
        return snap["state"] == "degraded"

    wait_for(step, 15, tick=sup)
    assert [s for s, _ in delays] == ["backoff", "backoff", "backoff", "degraded"]
    # the delays themselves (doubling, jitter, the slow retry) are tested on the fake clock below
    snap = sup.snapshot()
    assert "4 failed starts" in snap["degraded_reason"]
    assert snap["last_exit"]["code"] == 1

    starts = len(pod.records())
    wait_for(lambda: len(pod.records()) > starts and state(sup) == "degraded", 5, tick=sup,
             message="(a slow retry while DEGRADED)")

    pod.clear("crash")
    wait_for(lambda: running(sup), 10, tick=sup)
    snap = sup.snapshot()
    assert snap["degraded_reason"] is None and snap["failures"] >= 5


def test_crash_on_start_env(pod):
    sup = pod.supervisor(pod.settings(env={"FAKE_COMFY_CRASH_ON_START": "1"}), backoff_initial=5,
                         backoff_max=60)
    sup.start()
    wait_for(lambda: state(sup) == "backoff", 5, tick=sup)
    snap = sup.snapshot()
    assert snap["last_exit"]["code"] == 1 and "exited with status 1" in snap["last_failure"]
    assert snap["next_start_in"] > 1  # 5 s + jitter: exactly on the fake clock below


def test_crash_while_running_restarts_and_failures_reset(pod):
    sup = pod.supervisor(backoff_reset_after=0.3)
    pod.run(sup)
    sup.start()
    wait_for(lambda: running(sup), 10)
    pid = sup.snapshot()["pid"]
    pod.set("crash")
    wait_for(lambda: sup.snapshot()["failures"] == 1, 5)
    assert gone(pid)
    pod.clear("crash")
    wait_for(lambda: running(sup) and sup.snapshot()["pid"] != pid, 10)
    wait_for(lambda: sup.snapshot()["failures"] == 0, 5, message="(reset after healthy run)")
    assert sup.snapshot()["restarts"] >= 1


def test_ready_timeout_kills_and_counts_as_failure(pod):
    sup = pod.supervisor(pod.settings(env={"FAKE_COMFY_START_DELAY": "30"}), ready_timeout=0.5,
                         backoff_initial=5, backoff_max=60)
    sup.start()
    pid = sup.snapshot()["pid"]
    wait_for(lambda: state(sup) == "backoff", 5, tick=sup)
    assert "not ready within" in sup.snapshot()["last_failure"]
    assert gone(pid) and not pod.procs()


def test_hang_fails_liveness_and_is_restarted(pod):
    sup = pod.supervisor(http_timeout=0.3)
    pod.run(sup)
    sup.start()
    wait_for(lambda: running(sup), 10)
    pid = sup.snapshot()["pid"]
    pod.set("hang")
    wait_for(lambda: sup.snapshot()["failures"] >= 1, 10, message="(3 liveness failures)")
    assert "3 consecutive liveness failures" in sup.snapshot()["last_failure"]
    assert gone(pid)
    pod.clear("hang")
    wait_for(lambda: running(sup) and sup.snapshot()["pid"] != pid, 10)
    assert len(pod.fake_servers()) == 1


# ---------------------------------------------------------------------- restart requests
def test_restart_waits_for_an_empty_queue(pod):
    pod.set("busy", "2")
    sup = pod.supervisor()
    pod.run(sup)
    sup.start()
    wait_for(lambda: running(sup), 10)
    pid = sup.snapshot()["pid"]
    sup.request_restart("custom node changed")
    sup.request_restart("custom node changed")
    sup.request_restart("marker removed")
    pending = sup.snapshot()["pending_restart"]
    assert pending["waiting_for"] == "queue"
    assert pending["reason"] == "custom node changed; marker removed"
    assert holds_for(lambda: sup.snapshot()["pid"] == pid, 0.8)  # busy: it waits
    pod.clear("busy")
    wait_for(lambda: running(sup) and sup.snapshot()["pid"] != pid, 10)
    snap = sup.snapshot()
    assert snap["pending_restart"] is None and snap["restarts"] == 1 and snap["failures"] == 0
    assert len(pod.records()) == 2  # coalesced: one restart
    assert gone(pid)


def test_restart_max_wait_forces_it(pod, warnings):
    pod.set("busy")
    sup = pod.supervisor(restart_max_wait=0.6)
    pod.run(sup)
    sup.start()
    wait_for(lambda: running(sup), 10)
    pid = sup.snapshot()["pid"]
    asked = time.monotonic()
    sup.request_restart("custom node changed")
    wait_for(lambda: sup.snapshot()["pid"] not in (pid, None), 10)
    assert time.monotonic() - asked >= 0.6
    assert any("restarting anyway" in w for w in warnings)
    wait_for(lambda: running(sup), 10)
    assert sup.snapshot()["failures"] == 0


def test_urgent_restart_does_not_wait_and_gets_fresh_extra_args(pod):
    pod.set("busy", "1")
    calls = []

    def extra() -> list[str]:
        calls.append(1)
        return ["--use-sage-attention"] if len(calls) > 1 else []

    sup = pod.supervisor(extra_args=extra, restart_max_wait=60)
    pod.run(sup)
    sup.start()
    wait_for(lambda: running(sup), 10)
    pid = sup.snapshot()["pid"]
    sup.request_restart("sageattention installed", urgent=True)
    wait_for(lambda: running(sup) and sup.snapshot()["pid"] != pid, 5)
    first, second = pod.records()
    assert "--use-sage-attention" not in first["argv"]
    assert second["argv"][-1] == "--use-sage-attention"


def test_request_when_stopped_starts_and_shutdown_ignores_requests(pod):
    sup = pod.supervisor()
    sup.request_restart("user asked")
    assert sup.snapshot()["pending_restart"]["waiting_for"] == "start"
    wait_for(lambda: running(sup), 10, tick=sup)
    assert sup.snapshot()["pending_restart"] is None
    sup.shutdown()
    sup.request_restart("late event")
    sup.tick()
    assert state(sup) == "stopped" and not pod.procs()


def test_request_while_starting_restarts_now(pod):
    sup = pod.supervisor(pod.settings(env={"FAKE_COMFY_START_DELAY": "0.5"}))
    sup.start()
    pid = sup.snapshot()["pid"]
    sup.request_restart("config changed")
    sup.tick()
    assert sup.snapshot()["pid"] not in (pid, None) and gone(pid)
    wait_for(lambda: running(sup), 10, tick=sup)


# ---------------------------------------------------------------------- adoption
def test_new_supervisor_adopts_instead_of_starting_a_second(pod):
    first = pod.supervisor()
    first.start()
    wait_for(lambda: running(first), 10, tick=first)
    pid = first.snapshot()["pid"]
    # The agent "dies": the first supervisor is simply abandoned.
    second = pod.supervisor()
    second.start()
    snap = second.snapshot()
    assert snap["adopted"] and snap["pid"] == pid and snap["state"] == "running"
    assert len(pod.records()) == 1 and [p.pid for p in pod.fake_servers()] == [pid]

    # An adopted process that dies is noticed and replaced by our own child.
    pod.run(second)
    pod.set("crash")
    wait_for(lambda: second.snapshot()["failures"] == 1, 5)
    assert second.snapshot()["last_exit"]["code"] in (1, None)
    pod.clear("crash")
    wait_for(lambda: running(second) and second.snapshot()["pid"] != pid, 10)
    assert not second.snapshot()["adopted"] and len(pod.fake_servers()) == 1
    pod.halt_runners()
    second.stop()
    assert not pod.procs()


def test_adopt_by_cmdline_scan_and_stop_it(pod):
    first = pod.supervisor()
    first.start()
    wait_for(lambda: running(first), 10, tick=first)
    pid = first.snapshot()["pid"]
    (pod.state_dir / "comfyui.json").unlink()
    second = pod.supervisor()
    assert second.adopt()
    assert second.snapshot()["pid"] == pid and second.snapshot()["adopted"]
    saved = json.loads((pod.state_dir / "comfyui.json").read_text())
    assert saved["pid"] == pid
    second.stop()
    assert gone(pid) and not pod.procs()
    assert state(second) == "stopped"


def test_stale_state_file_is_not_adopted(pod):
    pod.state_dir.mkdir()
    (pod.state_dir / "comfyui.json").write_text(json.dumps(
        {"pid": os.getpid(), "create_time": 1.0, "port": pod.port}))
    sup = pod.supervisor()
    assert not sup.adopt()
    sup.start()
    assert not sup.snapshot()["adopted"] and sup.snapshot()["pid"] != os.getpid()
    wait_for(lambda: running(sup), 10, tick=sup)


# ---------------------------------------------------------------------- log rotation
def test_log_rotation_copytruncate_keeps_three(pod):
    sup = pod.supervisor()
    sup.log_max_bytes = 100
    pod.log.parent.mkdir(parents=True)
    fd = os.open(pod.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # like ComfyUI's stdout
    try:
        for i in range(1, 5):
            os.write(fd, str(i).encode() * 200)
            sup.tick()
            assert pod.log.stat().st_size == 0
        os.write(fd, b"after")
    finally:
        os.close(fd)
    assert pod.log.read_bytes() == b"after"  # O_APPEND writers continue at the new end
    assert [(pod.log.parent / f"comfyui.log.{n}").read_bytes()[:1] for n in (1, 2, 3)] == \
        [b"4", b"3", b"2"]
    assert not (pod.log.parent / "comfyui.log.4").exists()


# ---------------------------------------------------------------------- the fake clock
# Backoff, DEGRADED, the reset after a healthy run, the ready timeout and liveness are decided in
# `tick(now)`: these tests pass the time themselves (real processes, no wall-clock margins).
# They use the real defaults (config.AGENT_FIELDS), read the schedule from `_next_start` and the
# failure times from `_failure_times`.
DEFAULTS = {k: default for k, (_typ, default) in AGENT_FIELDS.items()}


class Clock:
    """Monotonic time that moves only when told (starts at the real clock: a request's own
    timestamp is real time, and compares with it)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def at(self, t: float) -> float:
        self.now = max(self.now, t)
        return self.now

    def advance(self, dt: float) -> float:
        self.now += dt
        return self.now


def defaults_supervisor(pod: "Pod", settings: ComfyUISettings | None = None, **over: Any
                        ) -> Supervisor:
    sup = pod.supervisor(settings, http_timeout=0.3)
    sup.agent = {**DEFAULTS, **over}
    return sup


def no_python(pod: "Pod") -> ComfyUISettings:
    return pod.settings(python=pod.root / "no-such-python")  # a failed start, no process


def fail_again(sup: Supervisor, clock: Clock) -> float:
    """Tick exactly when the next start is due (it fails again); the delay it then scheduled."""
    due = sup._next_start
    assert due is not None
    sup.tick(clock.at(due - 0.001))
    assert sup._next_start == due, "started before its backoff delay was over"
    before = sup.snapshot()["failures"]
    sup.tick(clock.at(due))
    assert sup.snapshot()["failures"] == before + 1
    return sup._next_start - clock.now


def until_running(sup: Supervisor, clock: Clock, step: float = 0.2, timeout: float = 15) -> None:
    """Tick (the fake clock moving `step` per tick) until the real fake ComfyUI answers."""
    wait_for(lambda: sup.tick(clock.advance(step)) or running(sup), timeout)


def test_backoff_doubles_from_5s_to_300s_with_at_most_10_percent_jitter(pod, monkeypatch):
    jitter: list[tuple[float, float]] = []

    def most(a: float, b: float) -> float:
        jitter.append((a, b))
        return b

    monkeypatch.setattr("agent.supervisor.random.uniform", most)
    sup = defaults_supervisor(pod, no_python(pod), degraded_after=100)
    clock = Clock()
    sup.start()
    first = sup._next_start - sup._failure_times[-1]
    clock.at(sup._failure_times[-1])
    delays = [first] + [fail_again(sup, clock) for _ in range(8)]
    bases = [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert jitter == [(0, b * 0.1) for b in bases]
    assert delays == pytest.approx([b * 1.1 for b in bases])
    assert state(sup) == "backoff"
    monkeypatch.undo()

    # with the real random jitter: always within [delay, delay * 1.1]
    sup = defaults_supervisor(pod, no_python(pod), degraded_after=100)
    clock = Clock()
    sup.start()
    clock.at(sup._failure_times[-1])
    delays = [sup._next_start - sup._failure_times[-1]] + [fail_again(sup, clock)
                                                         for _ in range(11)]
    for n, delay in enumerate(delays):
        base = min(5 * 2 ** n, 300)
        assert base <= delay <= base * 1.1, (n, delay)


def test_more_than_5_failed_starts_in_15_min_is_degraded_with_a_slow_retry(pod, monkeypatch):
    monkeypatch.setattr("agent.supervisor.random.uniform", lambda a, b: a)  # no jitter
    sup = defaults_supervisor(pod, no_python(pod))
    clock = Clock()
    sup.start()
    t0 = clock.at(sup._failure_times[-1])
    assert [fail_again(sup, clock) for _ in range(4)] == pytest.approx([10, 20, 40, 80])
    assert state(sup) == "backoff" and clock.now - t0 == pytest.approx(75)
    assert fail_again(sup, clock) == pytest.approx(600)  # 6th failure at t0 + 155 s: DEGRADED, retry in 10 min
    snap = sup.snapshot()
    assert snap["state"] == "degraded"
    assert snap["degraded_reason"].startswith("6 failed starts within 900s; last: python not")
    # the slow retry: every degraded_retry, still DEGRADED while it fails
    assert fail_again(sup, clock) == pytest.approx(600) and state(sup) == "degraded"
    # ComfyUI can start again: the next retry brings it back, DEGRADED is left
    sup.settings = pod.settings()
    sup.tick(clock.at(sup._next_start))
    assert state(sup) == "starting"
    until_running(sup, clock)
    assert sup.snapshot()["degraded_reason"] is None


def test_failed_starts_spread_over_more_than_the_window_never_degrade(pod, monkeypatch):
    monkeypatch.setattr("agent.supervisor.random.uniform", lambda a, b: a)
    # one failure every 200 s: never more than 5 inside a 900 s window
    sup = defaults_supervisor(pod, no_python(pod), backoff_initial=200, backoff_max=200)
    clock = Clock()
    sup.start()
    clock.at(sup._failure_times[-1])
    for _ in range(10):
        assert fail_again(sup, clock) == pytest.approx(200)
        assert state(sup) == "backoff"
    assert len(sup._failure_times) == 5
    # one every 150 s: the 6th inside 900 s degrades
    sup = defaults_supervisor(pod, no_python(pod), backoff_initial=150, backoff_max=150)
    clock = Clock()
    sup.start()
    clock.at(sup._failure_times[-1])
    for _ in range(4):
        fail_again(sup, clock)
        assert state(sup) == "backoff"
    fail_again(sup, clock)
    assert state(sup) == "degraded"


def test_failure_count_resets_after_10_minutes_healthy(pod, monkeypatch):
    monkeypatch.setattr("agent.supervisor.random.uniform", lambda a, b: a)
    sup = defaults_supervisor(pod, no_python(pod))
    clock = Clock()
    sup.start()
    clock.at(sup._failure_times[-1])
    assert fail_again(sup, clock) == pytest.approx(10)  # 2 failures
    sup.settings = pod.settings()
    sup.tick(clock.at(sup._next_start))
    until_running(sup, clock)
    up = sup._running_since
    assert up == clock.now
    sup.tick(clock.at(up + 599.9))
    assert sup.snapshot()["failures"] == 2  # not yet: a crash now would wait 20 s
    sup.tick(clock.at(up + 600))
    assert sup.snapshot()["failures"] == 0
    # a crash after the reset starts the backoff from 5 s again
    pod.set("crash")
    wait_for(lambda: sup.tick(clock.advance(0.01)) or state(sup) == "backoff", 10)
    assert sup.snapshot()["failures"] == 1
    assert sup._next_start - clock.now == pytest.approx(5)
    pod.clear("crash")


def test_a_crash_before_10_minutes_healthy_keeps_doubling(pod, monkeypatch):
    monkeypatch.setattr("agent.supervisor.random.uniform", lambda a, b: a)
    sup = defaults_supervisor(pod, no_python(pod))
    clock = Clock()
    sup.start()
    clock.at(sup._failure_times[-1])
    fail_again(sup, clock)
    sup.settings = pod.settings()
    sup.tick(clock.at(sup._next_start))
    until_running(sup, clock)
    sup.tick(clock.at(sup._running_since + 599))
    pod.set("crash")
    wait_for(lambda: sup.tick(clock.advance(0.01)) or state(sup) == "backoff", 10)
    assert sup.snapshot()["failures"] == 3 and sup._next_start - clock.now == pytest.approx(20)
    pod.clear("crash")


def test_startup_grace_is_the_ready_timeout_then_a_failed_start(pod):
    # a ComfyUI that does not answer for a long time (loading models): no liveness failures
    # while STARTING, only the ready timeout (600 s by default) ends it
    sup = defaults_supervisor(pod, pod.settings(env={"FAKE_COMFY_START_DELAY": "120"}))
    clock = Clock()
    sup.start()
    deadline = sup._ready_deadline
    pid = sup.snapshot()["pid"]
    for t in range(0, 600, 60):
        sup.tick(clock.at(deadline - 600 + t + 1))
        snap = sup.snapshot()
        assert snap["state"] == "starting" and snap["failures"] == 0 and snap["pid"] == pid
    sup.tick(clock.at(deadline - 0.01))
    assert state(sup) == "starting"
    sup.tick(clock.at(deadline))
    snap = sup.snapshot()
    assert snap["state"] == "backoff" and snap["failures"] == 1
    assert snap["last_failure"] == "not ready within 600s"
    assert gone(pid) and not pod.procs()


def test_liveness_fails_after_3_consecutive_misses_and_a_success_resets_them(pod, warnings):
    sup = defaults_supervisor(pod)
    clock = Clock()
    sup.start()
    until_running(sup, clock)
    pid = sup.snapshot()["pid"]
    up = clock.now  # liveness every 10 s from here

    def at(t: float) -> int:
        sup.tick(clock.at(up + t))
        return sup._live_failures

    pod.set("hang")
    assert at(10) == 1 and at(15) == 1 and at(20) == 2  # a probe only every 10 s
    pod.clear("hang")
    assert at(30) == 0  # one answer resets the count
    pod.set("hang")
    assert at(40) == 1 and at(50) == 2 and state(sup) == "running"
    assert at(60) == 3
    snap = sup.snapshot()
    assert snap["state"] == "backoff" and snap["failures"] == 1
    assert snap["last_failure"] == "3 consecutive liveness failures"
    assert gone(pid)
    assert sum("liveness check failed" in w for w in warnings) == 5
    pod.clear("hang")


def test_restart_max_wait_on_the_fake_clock(pod, warnings):
    pod.set("busy")
    sup = defaults_supervisor(pod, restart_max_wait=1800)
    clock = Clock()
    sup.start()
    until_running(sup, clock)
    pid = sup.snapshot()["pid"]
    sup.request_restart("custom node changed")
    since = sup._pending.since
    for t in (0, 60, 900, 1799.9):
        sup.tick(clock.at(since + t))
        assert sup.snapshot()["pid"] == pid and sup.snapshot()["pending_restart"]
    assert not any("restarting anyway" in w for w in warnings)
    sup.tick(clock.at(since + 1800 + 1e-6))  # (since + 1800) - since may round below 1800
    assert any("restarting anyway" in w for w in warnings)
    assert sup.snapshot()["pid"] not in (pid, None) and gone(pid)
    assert sup.snapshot()["failures"] == 0


def test_a_pending_restart_does_not_bypass_the_backoff(pod):
    sup = defaults_supervisor(pod, no_python(pod))
    clock = Clock()
    sup.request_restart("health: comfyui_http failed 3 times")
    sup.tick(clock.now)
    assert sup.snapshot()["failures"] == 1
    for _ in range(8):  # 4 s: inside the first 5 s backoff
        sup.tick(clock.advance(0.5))
    assert sup.snapshot()["failures"] == 1


# ---------------------------------------------------------------------- ComfyUI-Manager's restart
def manager_reboot(pod: Pod) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{pod.port}/manager/reboot", timeout=5) as resp:
        assert resp.status == 200


def test_manager_restart_with_the_session_file_is_a_requested_restart(pod):
    # a crash would wait 60 s in BACKOFF: the restart must come at once, not as a failure
    sup = pod.supervisor(backoff_initial=60, backoff_max=60)
    seen: list[str] = []
    sup.start()
    wait_for(lambda: running(sup), 10, tick=sup)
    pid = sup.snapshot()["pid"]
    manager_reboot(pod)
    wait_for(lambda: seen.append(state(sup)) or (running(sup) and sup.snapshot()["pid"] != pid),
             15, tick=sup, message="(started again at once)")
    snap = sup.snapshot()
    assert snap["failures"] == 0 and snap["restarts"] == 1 and snap["last_failure"] is None
    assert snap["last_exit"]["code"] == 0 and "backoff" not in seen and "degraded" not in seen
    assert not sup.reboot_file.exists()  # the request was answered
    assert snap["last_restart"]["by"] == "itself" and "ComfyUI-Manager" in \
        snap["last_restart"]["reason"]
    assert gone(pid) and len(pod.records()) == 2
    assert "Restarting..." in pod.log.read_text()


def test_a_plain_exit_0_without_the_session_file_is_still_a_crash(pod):
    sup = pod.supervisor(backoff_initial=60, backoff_max=60)
    pod.state_dir.mkdir()
    sup.reboot_file.write_text("")  # left from before this start: not this process's request
    sup.start()
    wait_for(lambda: running(sup), 10, tick=sup)
    os.kill(sup.snapshot()["pid"], signal.SIGTERM)  # the fake exits 0 on SIGTERM
    wait_for(lambda: state(sup) == "backoff", 10, tick=sup)
    assert sup.snapshot()["failures"] == 1 and sup.snapshot()["last_exit"]["code"] == 0


@pytest.mark.slow  # 1.5 s without answers, twice a start: ~5 s
def test_manager_restart_in_place_is_followed_not_a_crash_or_a_hang(pod):
    # without __COMFY_CLI_SESSION__ (a ComfyUI started by someone else) the Manager execs itself:
    # same pid, same create_time; the answers stop for a moment, then come back
    sup = pod.supervisor(pod.settings(env={"FAKE_COMFY_REBOOT": "exec",
                                           "FAKE_COMFY_START_DELAY": "1.5"}),
                         backoff_initial=60, backoff_max=60)
    pod.run(sup)
    sup.start()
    wait_for(lambda: running(sup), 15)
    pid = sup.snapshot()["pid"]
    create_time = psutil.Process(pid).create_time()
    pipe = json.loads((pod.state_dir / "comfyui.json").read_text())["log_pipe"]
    manager_reboot(pod)
    # 1.5 s without answers is 7 liveness intervals of 0.2 s: as a hang it would be restarted
    wait_for(lambda: len(pod.records()) == 2 and running(sup), 20, message="(back after exec)")
    snap = sup.snapshot()
    assert snap["pid"] == pid and psutil.Process(pid).create_time() == create_time
    assert snap["failures"] == 0 and snap["restarts"] == 1 and snap["last_failure"] is None
    assert [r["pid"] for r in pod.records()] == [pid, pid]
    assert snap["last_restart"]["reason"] == "re-executed in place"
    # the exec keeps its stdout: the same log pipe carries the new image's output
    assert json.loads((pod.state_dir / "comfyui.json").read_text())["log_pipe"] == pipe
    wait_for(lambda: pod.log.read_text().count(f"[fake-comfyui {pid}] starting") == 2, 10,
             message="(the second start's output in comfyui.log)")
    assert json.loads((pod.state_dir / "comfyui.json").read_text())["pid"] == pid
    pod.halt_runners()
    sup.stop()
    assert gone(pid) and not pod.procs()
