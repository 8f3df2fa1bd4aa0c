"""Updates, rollback, history (issue 10): agent/history.py, agent/update.py, agent/cli_update.py.

Real git upstreams that gain commits, a real venv with small local wheels, the fake ComfyUI.
"""

from __future__ import annotations

import json
import socket

import pytest

from agent import drift, history
from agent.config import load
from tests.helpers import (ROOT, commit_files, git, installed_dists, make_repo, run_cli,
                           wait_for)
from tests.kit import install, status
from tests.test_daemon import aws, service, starts  # noqa: F401 - the agent fixture
from tests.test_manager import manager_wheels, mws  # noqa: F401 - the Manager fixtures

FAKE = ROOT / "tests" / "fake_comfyui" / "main.py"


# ---------------------------------------------------------------------- history
def test_history_records_filters_and_stays_bounded(ws, monkeypatch):
    conf = load(ws.config_path, ws.root)
    assert history.read(conf) == []  # no file yet
    history.record(conf, "update", component="node-a", frm="aaa", to="bbb", result="ok",
                   actor="cli", id="u1")
    drift.append(conf, drift.record("between checks", drift.diff({"x": "1"}, {"x": "2"}), "",
                                    ["dependencies_main"]))
    history.record(conf, history.event("rollback", "", "bbb", "aaa", "ok",
                                       components=["node-a", "node-b"]))
    assert [r["kind"] for r in history.read(conf)] == ["update", "drift", "rollback"]
    assert [r["kind"] for r in history.read(conf, "node-a")] == ["update", "rollback"]
    assert [r["kind"] for r in history.read(conf, "dependencies_main")] == ["drift"]
    assert history.read(conf, limit=1)[0]["kind"] == "rollback"
    rec = history.read(conf, "node-a")[0]
    assert (rec["from"], rec["to"], rec["result"], rec["actor"]) == ("aaa", "bbb", "ok", "cli")
    assert "aaa -> bbb" in history.line(rec)
    # bounded: trimmed to whole lines, newest kept
    monkeypatch.setattr(history, "MAX_BYTES", 4096)
    for i in range(200):
        history.record(conf, "install", component=f"c{i}", to=str(i))
    lines = history.path(conf).read_text().splitlines()
    assert history.path(conf).stat().st_size <= 4096 + 400
    assert all(json.loads(x) for x in lines)
    assert history.read(conf, limit=1)[0]["component"] == "c199"


@pytest.mark.slow
def test_install_and_repair_go_to_history(ws):
    install(ws)
    conf = load(ws.config_path, ws.root)
    recs = history.read(conf, kind="install")
    names = {r["component"] for r in recs}
    assert {"comfyui_core", "dependencies_main", "custom_nodes", "gguf_node"} <= names
    assert all(r["actor"] == "cli" and r["result"] == "ok" for r in recs)
    core = next(r for r in recs if r["component"] == "comfyui_core")
    assert core["from"] == "-" and core["to"].startswith("git ")
    # a component broken on disk is repaired, and said so
    (ws.comfyui / "custom_nodes" / "ComfyUI-GGUF" / ".git").rename(ws.root / "gguf-git-aside")
    install(ws)
    rep = history.read(conf, "gguf_node", kind="repair")
    assert rep and rep[-1]["result"] == "ok", history.read(conf)


# ---------------------------------------------------------------------- updates
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def uws(ws):
    """`ws` installed, ComfyUI being the fake server that imports its custom nodes at start
    (FAKE_COMFY_LOAD_NODES), each node importing its requirement; no agent runs."""
    port = _free_port()
    commit_files(ws.upstreams / "ComfyUI", {"main.py": FAKE.read_text()}, "fake server")
    for node, module in (("node-a", "podtest_nodea"), ("node-b", "podtest_nodeb")):
        commit_files(ws.upstreams / node, {"__init__.py": f"import {module}\n"
                                           "NODE_CLASS_MAPPINGS = {}\n"}, "imports")
    ws.config["comfyui"].update({"args": ["--listen", "127.0.0.1", "--port", str(port)],
                                 "port": port, "env": {"FAKE_COMFY_LOAD_NODES": "1"}})
    ws.save()
    install(ws)
    return ws


def head(path) -> str:
    return git("rev-parse", "HEAD", cwd=path)


def update(ws, *args: str, expect: int | None = None):
    proc = run_cli("update", *args, *ws.args())
    if expect is not None:
        assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.mark.slow
def test_dry_run_then_update_then_rollback(uws):
    ws = uws
    node_a = ws.comfyui / "custom_nodes" / "node-a"
    old = head(node_a)
    commit_files(ws.upstreams / "node-a", {"README": "one\n"}, "one")
    new = commit_files(ws.upstreams / "node-a", {
        "requirements.txt": "podtest-nodea\npodtest-nodec\n",
        "__init__.py": "import podtest_nodea, podtest_nodec\nNODE_CLASS_MAPPINGS = {}\n"}, "two")
    # the dry run fetches and tells, and changes nothing
    proc = update(ws, "custom_nodes", "--dry-run", "--json", expect=0)
    units = {u["name"]: u for u in json.loads(proc.stdout)["units"]}
    assert units["node-a"]["from"] == old and units["node-a"]["to"] == new
    assert units["node-a"]["commits"] == 2 and units["node-a"]["update"]
    assert units["node-a"]["requirements"]["added"] == ["podtest-nodec"]
    assert not units["node-b"]["update"]
    assert head(node_a) == old and "podtest-nodec" not in installed_dists(ws.python)
    text = update(ws, "node-a", "--dry-run", expect=0).stdout
    assert f"node-a: {old[:12]} -> {new[:12]} (2 commits); requirements: +podtest-nodec" in text
    # the update: moved, installed, verified by a ComfyUI started for the check
    proc = update(ws, "node-a", expect=0)
    assert head(node_a) == new and "podtest-nodec" in installed_dists(ws.python)
    assert f"updated: node-a {old[:12]} -> {new[:12]} (2 commits)" in proc.stdout
    assert "verified: ComfyUI answers; 3 custom nodes imported" in proc.stdout, proc.stdout
    assert kit_status(ws)["components"]["custom_nodes"]["state"] == "installed"
    conf = load(ws.config_path, ws.root)
    rec = history.read(conf, "node-a", kind="update")[-1]
    assert (rec["from"], rec["to"], rec["result"], rec["actor"]) == (old[:12], new[:12], "ok",
                                                                     "cli")
    assert not (conf.state_dir / "updates" / "journal.json").exists()
    # and back, by hand: commit and packages as they were
    proc = run_cli("rollback", *ws.args())
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert head(node_a) == old and "podtest-nodec" not in installed_dists(ws.python)
    assert history.read(conf, "node-a", kind="rollback")[-1]["result"] == "ok"
    assert kit_status(ws)["components"]["custom_nodes"]["state"] == "installed"
    text = run_cli("history", "node-a", *ws.args()).stdout
    assert "update  node-a" in text and "rollback  node-a" in text


def kit_status(ws) -> dict:
    return status(ws)[1]


@pytest.mark.slow
def test_requirements_that_cannot_be_installed_roll_everything_back(uws):
    ws = uws
    node_a, core = ws.comfyui / "custom_nodes" / "node-a", ws.comfyui
    before = {p: head(p) for p in (node_a, core)}
    assert drift.dists(ws.python)["podtest-alpha"] == "2.0"
    commit_files(ws.upstreams / "ComfyUI", {"requirements.txt": "podtest-alpha<2\n"
                                            "podtest-beta\n"}, "alpha 1")
    commit_files(ws.upstreams / "node-a", {"requirements.txt": "podtest-nodea\n"
                                           "podtest-nowhere\n"}, "a requirement nobody has")
    markers_before = {p.name: p.read_text() for p in ws.markers.glob("*.done")}
    proc = update(ws, "--all", expect=1)
    out = proc.stdout + proc.stderr
    assert "failed: custom_nodes:" in out and "rolled back:" in out, out
    assert {p: head(p) for p in (node_a, core)} == before
    assert "packages: podtest-alpha 2.0 -> 1.0" in out  # changed by the update...
    assert drift.dists(ws.python)["podtest-alpha"] == "2.0"  # ...and put back
    assert {p.name: p.read_text() for p in ws.markers.glob("*.done")} == markers_before
    conf = load(ws.config_path, ws.root)
    assert history.read(conf, "node-a", kind="update")[-1]["result"] == "rolled back"
    assert history.read(conf, kind="rollback")[-1]["result"] == "ok"
    assert kit_status(ws)["verdict"] == "healthy"


@pytest.mark.slow
def test_a_node_that_no_longer_imports_is_rolled_back(uws):
    ws = uws
    node_b = ws.comfyui / "custom_nodes" / "node-b"
    old = head(node_b)
    commit_files(ws.upstreams / "node-b", {"__init__.py": "raise ImportError("
                                           "'node-b 2 needs frobnicate')\n"}, "broken")
    proc = update(ws, "node-b", expect=1)
    assert "import error: node-b: node-b 2 needs frobnicate" in proc.stdout, proc.stdout
    assert "rolled back: node-b" in proc.stdout and head(node_b) == old
    assert "after the rollback: ComfyUI answers; 3 custom nodes imported" in proc.stdout


@pytest.mark.slow
def test_local_edits_are_refused_unless_forced_and_never_lost(uws):
    ws = uws
    node_a = ws.comfyui / "custom_nodes" / "node-a"
    old = head(node_a)
    new = commit_files(ws.upstreams / "node-a", {"README": "new\n"}, "readme")
    (node_a / "requirements.txt").write_text("podtest-nodea  # my edit\n")
    proc = update(ws, "node-a", "--no-verify", expect=1)
    assert "LOCAL EDITS in 1 file (requirements.txt): refused without --force" in proc.stdout
    assert head(node_a) == old and "my edit" in (node_a / "requirements.txt").read_text()
    update(ws, "node-a", "--force", "--no-verify", expect=0)
    assert head(node_a) == new
    assert "pod-agent update" in git("stash", "list", cwd=node_a)
    git("stash", "pop", cwd=node_a)
    assert "my edit" in (node_a / "requirements.txt").read_text()


@pytest.mark.slow  # starts the agent
def test_updates_through_the_running_agent(aws):
    """With `pod-agent run` supervising ComfyUI, the restart goes through it (queue-aware) and
    the new ComfyUI's import summary is judged: a good update stays, a broken node is rolled
    back and ComfyUI restarted on the old state."""
    ws = aws
    for node, module in (("node-a", "podtest_nodea"), ("node-b", "podtest_nodeb")):
        commit_files(ws.upstreams / node, {"__init__.py": f"import {module}\n"}, "imports")
    ws.config["comfyui"]["env"]["FAKE_COMFY_LOAD_NODES"] = "1"
    ws.save()
    install(ws)
    ws.start_agent()
    wait_for(lambda: service(ws).get("state") == "running" and service(ws).get("ready"), 60,
             what="ComfyUI running")
    node_a, node_b = (ws.comfyui / "custom_nodes" / n for n in ("node-a", "node-b"))
    new_a = commit_files(ws.upstreams / "node-a", {"requirements.txt": "podtest-nodea\n"
                                                   "podtest-nodec\n"}, "a new requirement")
    pid = service(ws)["pid"]
    started = len(starts(ws))
    proc = update(ws, "node-a", expect=0)
    assert "restarting ComfyUI through the running agent" in proc.stdout, proc.stdout
    assert "verified: ComfyUI answers; 3 custom nodes imported" in proc.stdout, proc.stdout
    assert head(node_a) == new_a and service(ws)["pid"] != pid
    # one restart: the agent did not restart ComfyUI on its own while the update installed
    assert len(starts(ws)) == started + 1, starts(ws)[started:]
    # the agent looked at the packages when it restarted ComfyUI: the update's own new
    # package is not drift
    conf = load(ws.config_path, ws.root)
    wait_for(lambda: any(r.get("kind") == "update" for r in history.read(conf)), 10)
    assert not history.read(conf, kind="drift"), history.read(conf, kind="drift")
    old_b = head(node_b)
    commit_files(ws.upstreams / "node-b", {"__init__.py": "import podtest_nodeb\n"
                                           "raise RuntimeError('broken by upstream')\n"}, "x")
    proc = update(ws, "node-b", expect=1)
    assert "import error: node-b: broken by upstream" in proc.stdout, proc.stdout
    assert head(node_b) == old_b
    assert "after the rollback: ComfyUI answers; 3 custom nodes imported" in proc.stdout
    assert service(ws).get("state") == "running"


@pytest.mark.slow
def test_a_change_made_elsewhere_can_be_rolled_back(uws):
    """ComfyUI-Manager's UI pulled a node: recorded as a restore point (record_external), then
    `rollback` undoes it like an update."""
    from agent.updates import Change, record_external

    ws = uws
    node_a = ws.comfyui / "custom_nodes" / "node-a"
    old = head(node_a)
    new = commit_files(ws.upstreams / "node-a", {"README": "new\n"}, "readme")
    git("pull", "-q", "--ff-only", cwd=node_a)
    assert head(node_a) == new
    conf = load(ws.config_path, ws.root)
    point = record_external(conf, [Change("node-a", node_a, old, new, "custom_nodes")],
                            "ComfyUI-Manager: update node-a")
    assert history.read(conf, "node-a", kind="external")[-1]["id"] == point
    proc = run_cli("rollback", "--no-verify", *ws.args())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert head(node_a) == old and kit_status(ws)["verdict"] == "healthy"


@pytest.mark.slow  # starts the agent
def test_the_agent_rolls_back_an_update_that_died(aws, monkeypatch):
    """A journal left by an update that died after moving a checkout (simulated in-process:
    the install step never returns) is rolled back when `pod-agent run` starts, which says so,
    and by the running agent when the update dies while it runs."""
    from agent.updates import Change, apply, engine

    ws = aws
    install(ws)
    node_a = ws.comfyui / "custom_nodes" / "node-a"
    old = head(node_a)
    new = commit_files(ws.upstreams / "node-a", {"README": "new\n"}, "readme")
    git("fetch", "-q", "origin", cwd=node_a)

    class Killed(BaseException):
        pass

    def die(*args, **kw):
        raise Killed()

    monkeypatch.setattr(engine, "_install", die)
    conf = load(ws.config_path, ws.root)
    with pytest.raises(Killed):
        apply(conf, [Change("node-a", node_a, old, new, "custom_nodes")], "test", "cli")
    assert head(node_a) == new and (conf.state_dir / "updates" / "journal.json").exists()
    agent = ws.start_agent()
    wait_for(lambda: "rolled back to the state before it" in agent.log(), 60,
             what="the agent to roll back the interrupted update")
    assert head(node_a) == old and not (conf.state_dir / "updates" / "journal.json").exists()
    assert history.read(conf, "node-a", kind="update")[-1]["result"] == "rolled back"
    # the same while the agent runs: undone within seconds, not at the next start
    with pytest.raises(Killed):
        apply(conf, [Change("node-a", node_a, old, new, "custom_nodes")], "test", "cli")
    assert head(node_a) == new
    wait_for(lambda: agent.log().count("rolled back to the state before it") == 2, 60,
             what="the running agent to roll back the orphaned update")
    assert head(node_a) == old and not (conf.state_dir / "updates" / "journal.json").exists()


@pytest.mark.slow
def test_a_node_cloned_by_hand_is_updated_from_its_origin(uws):
    ws = uws
    up = ws.upstreams / "my-node"
    url = make_repo(up, {"__init__.py": "", "requirements.txt": "podtest-gamma\n"})
    mine = ws.comfyui / "custom_nodes" / "my-node"
    git("clone", "-q", url, str(mine))
    install(ws)  # its requirements, as for any node cloned by hand
    old = head(mine)
    new = commit_files(up, {"requirements.txt": "podtest-gamma\npodtest-nodec\n"}, "nodec")
    proc = update(ws, "--all", "--dry-run", expect=0)
    assert f"my-node: {old[:12]} -> {new[:12]} (1 commit); requirements: +podtest-nodec" \
        in proc.stdout
    update(ws, "my-node", "--no-verify", expect=0)
    assert head(mine) == new and "podtest-nodec" in installed_dists(ws.python)
    assert git("symbolic-ref", "--short", "HEAD", cwd=mine) == "main"  # still on its branch
    assert run_cli("rollback", "--no-verify", *ws.args()).returncode == 0
    assert head(mine) == old and "podtest-nodec" not in installed_dists(ws.python)


@pytest.mark.slow
def test_ctrl_c_during_an_update_rolls_it_back_at_once(uws):
    import signal
    import subprocess
    import sys

    ws = uws
    ws.config["comfyui"]["env"]["FAKE_COMFY_START_DELAY"] = "120"  # the check never ends
    ws.save()
    node_a = ws.comfyui / "custom_nodes" / "node-a"
    old = head(node_a)
    commit_files(ws.upstreams / "node-a", {"README": "new\n"}, "readme")
    journal = ws.root / ".pod-agent" / "updates" / "journal.json"
    proc = subprocess.Popen([sys.executable, "-m", "agent", "update", "node-a", *ws.args()],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: journal.exists() and json.loads(journal.read_text())["phase"]
                 == "verifying", 60, what="the update to verify")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    assert "failed: interrupted (Ctrl-C)" in out and "rolled back: node-a" in out, out
    assert head(node_a) == old and not journal.exists()


@pytest.mark.slow
def test_an_update_killed_after_its_verification_is_completed_by_the_next_install(uws,
                                                                                  monkeypatch):
    from agent.updates import Change, apply, engine

    ws = uws
    node_a = ws.comfyui / "custom_nodes" / "node-a"
    old = head(node_a)
    new = commit_files(ws.upstreams / "node-a", {"README": "new\n"}, "readme")
    git("fetch", "-q", "origin", cwd=node_a)

    class Killed(BaseException):
        pass

    real_finish = engine.journal.finish

    def die(conf, j, result):
        if j["phase"] == "verified":
            raise Killed()
        return real_finish(conf, j, result)

    monkeypatch.setattr(engine.journal, "finish", die)
    conf = load(ws.config_path, ws.root)
    with pytest.raises(Killed):
        apply(conf, [Change("node-a", node_a, old, new, "custom_nodes")], "test", "cli",
              verify_comfyui=False)
    monkeypatch.setattr(engine.journal, "finish", real_finish)
    proc = install(ws)
    assert "it had been verified; completed" in proc.stdout, proc.stdout
    assert head(node_a) == new and kit_status(ws)["verdict"] == "healthy"
    assert not (conf.state_dir / "updates" / "journal.json").exists()


def test_comfyui_import_summary_is_read_as_comfyui_prints_it():
    from agent.updates.verify import parse_imports

    log = ("[fake] starting\nTraceback (most recent call last):\n  ...\n"
           "ModuleNotFoundError: No module named 'frobnicate'\n"
           "Cannot import /ws/ComfyUI/custom_nodes/node-b module for custom nodes: "
           "No module named 'frobnicate'\n\nImport times for custom nodes:\n"
           "   0.0 seconds: /ws/ComfyUI/custom_nodes/websocket_image_save.py\n"
           "\x1b[33m   0.0 seconds (IMPORT FAILED): /ws/ComfyUI/custom_nodes/node-b\x1b[0m\n"
           "   0.3 seconds: /ws/ComfyUI/custom_nodes/ComfyUI-Manager/\n\n"
           "To see the GUI go to: http://127.0.0.1:8188\n")
    ok, failed = parse_imports(log)
    assert ok == {"websocket_image_save.py", "ComfyUI-Manager"}
    assert failed == {"node-b": "No module named 'frobnicate'"}
    assert parse_imports("no custom nodes here\n") is None
    # only the latest start counts
    again = log + "starting again\n\nImport times for custom nodes:\n" \
        "   0.0 seconds: /ws/ComfyUI/custom_nodes/node-b\n"
    assert parse_imports(again) == ({"node-b"}, {})


def test_a_comfyui_nobody_supervises_is_not_restarted_and_the_report_says_so(ws):
    from agent.updates.verify import restart_and_check

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        ws.config["comfyui"].update({"port": s.getsockname()[1],
                                     "args": ["--listen", "127.0.0.1"]})
        ws.save()
        check = restart_and_check(load(ws.config_path, ws.root), "test", set(), False,
                                  lambda text: None)
    assert check.ok and check.how == "skipped"
    assert check.detail.startswith("not verified: port ") and "no agent supervises" in check.detail


# ---------------------------------------------------------------------- the agent beside updates
def test_an_update_runs_while_a_live_process_holds_its_lock_or_writes_its_journal(ws):
    """`updates.running` (what the agent defers its passes and restarts on): the lock held,
    or a journal whose writer lives; a journal whose writer is dead is not running."""
    import os
    import subprocess
    import sys

    from agent import updates
    from agent.locks import Lock
    from agent.markers import atomic_write
    from agent.updates import journal

    conf = load(ws.config_path, ws.root)
    assert not updates.running(conf)
    lock = Lock(journal.lock_path(conf))
    assert lock.acquire(10)
    with lock:
        assert updates.running(conf)
    assert not updates.running(conf)
    j = journal.new("update", "test", "cli", "python")
    journal.write(conf, j)  # this process writes it, and lives
    assert updates.running(conf)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    atomic_write(journal.journal_path(conf), json.dumps({**j, "pid": int(dead)}))
    assert not updates.running(conf)
    os.unlink(journal.journal_path(conf))
    # a caller holding it around its own steps (snapshot restore) and the apply inside
    with updates.exclusive(conf):
        assert updates.running(conf)
        assert updates.apply(conf, [], "nothing", "cli").ok  # re-entrant: no wait, no refusal
        assert updates.running(conf)
    assert not updates.running(conf)


def test_an_update_waits_for_the_agents_pass_in_progress(ws):
    """A pass the agent began before the update holds the pass lock shared: the update waits
    for it (said once) and goes on as soon as it ends."""
    import fcntl
    import os
    import threading

    from agent.updates import journal

    conf = load(ws.config_path, ws.root)
    path = journal.pass_lock_path(conf)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)  # the agent's pass
    said: list[str] = []
    waiter = threading.Thread(target=journal.wait_for_agent_pass, args=(conf, said.append))
    waiter.start()
    try:
        wait_for(lambda: said, 30, what="the update to wait for the pass")
        assert "waiting for the running agent's reconcile pass to finish" in said[0]
        assert waiter.is_alive()
    finally:
        os.close(fd)  # the pass ends
    waiter.join(30)
    assert not waiter.is_alive() and len(said) == 1


def test_the_uv_path_passes_no_deps_on():
    from agent.uvinstall import split_args

    assert split_args(["--no-deps", "a==1"]) == ([], ["a==1"], ["--no-deps"])


@pytest.mark.slow  # starts the agent
def test_the_agent_defers_its_reconcile_passes_while_an_update_runs(aws):
    """A pass the agent would run while an update holds the lock waits (said once), and runs
    as soon as the update ends."""
    from agent.locks import Lock
    from agent.updates import journal

    ws = aws
    install(ws)
    conf = load(ws.config_path, ws.root)
    agent = ws.start_agent()
    wait_for(lambda: service(ws).get("state") == "running" and service(ws).get("ready"), 60,
             what="ComfyUI running")
    marker = next(ws.markers.glob("gguf_node*.done"))
    lock = Lock(journal.lock_path(conf))
    assert lock.acquire(10)
    with lock:  # an update runs
        marker.unlink()  # the agent wants to install it again
        wait_for(lambda: "update running: reconcile deferred" in agent.log(), 60,
                 what="the agent to defer its pass")
        assert not marker.exists()  # the pass is held, not run beside the update
    wait_for(marker.exists, 60, what="the held pass to run once the update ended")
    wait_for(lambda: "update ended: reconciling" in agent.log(), 30, what="the log line")
    assert agent.log().count("update running: reconcile deferred") == 1


@pytest.mark.slow
def test_a_rollback_installs_what_worked_at_its_restore_point_and_fails_now(mws):
    """ComfyUI gains manager_requirements.txt: `update comfyui_core` switches the Manager to v4
    and parks the v3 clone in custom_nodes/.disabled. The rollback's restored markers do not
    bring the clone back: it installs the components that passed their probe at the restore
    point and fail now (the Manager moves its clone back), then checks them again."""
    from tests.test_manager import PIN

    ws = mws
    clone = ws.comfyui / "custom_nodes" / "ComfyUI-Manager"
    install(ws)
    old = head(ws.comfyui)
    commit_files(ws.upstreams / "ComfyUI", {"manager_requirements.txt": PIN}, "manager v4")
    update(ws, "comfyui_core", "--no-verify", expect=0)
    assert not clone.exists() and "comfyui-manager" in installed_dists(ws.python)
    proc = run_cli("rollback", "--no-verify", *ws.args())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert head(ws.comfyui) == old and (clone / ".git").is_dir()
    assert "comfyui-manager" not in installed_dists(ws.python)
    assert "installing what the restore point had working: comfyui_manager" in proc.stdout
    st = kit_status(ws)["components"]["comfyui_manager"]
    assert st["state"] == "installed" and st["version"].startswith("v3 git "), st
    assert proc.stdout.count("packages:") == 1, proc.stdout  # said once


@pytest.mark.slow
def test_an_update_that_breaks_sageattention_is_rolled_back(uws, tmp_path):
    """A node's new requirement replaces the SageAttention build with one whose kernel fails:
    no probe and no import notices, the sageattention health check does (issue 10: "the
    component probes and health checks pass"); the update is rolled back, packages included."""
    from tests.helpers import build_wheel
    from tests.test_health import SAGE, set_fakes

    ws = uws
    extra, fakes = tmp_path / "sage-wheels", tmp_path / "fakes"
    build_wheel(extra, "sageattention", "1.0", module_code=SAGE["ok"])
    build_wheel(extra, "sageattention", "2.0", module_code=SAGE["kernel_error"])
    set_fakes(fakes, sage=None)  # a fake torch (with a "GPU") on the path, no sageattention
    ws.config["installer_args"] += ["--find-links", str(extra)]
    ws.config["comfyui"]["env"]["PYTHONPATH"] = str(fakes)
    ws.save()
    node_a = ws.comfyui / "custom_nodes" / "node-a"
    commit_files(ws.upstreams / "node-a", {"requirements.txt": "podtest-nodea\n"
                                           "sageattention==1.0\n"}, "sage 1")
    update(ws, "node-a", "--no-verify", expect=0)
    assert drift.dists(ws.python)["sageattention"] == "1.0"
    old = head(node_a)
    commit_files(ws.upstreams / "node-a", {"requirements.txt": "podtest-nodea\n"
                                           "sageattention==2.0\n"}, "sage 2")
    proc = run_cli("update", "node-a", *ws.args(), env={"POD_AGENT_GPU": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "health check sageattention fails after the change" in out, out
    assert "rolled back: node-a" in out and head(node_a) == old
    assert drift.dists(ws.python)["sageattention"] == "1.0"
