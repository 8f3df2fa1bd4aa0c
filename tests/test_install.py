"""`pod-agent install` end to end: order, idempotence, truthful markers, failures, kills, locks."""

from __future__ import annotations

import pytest

import importlib.util
import json
import os
import re
import signal
import subprocess

import psutil

from tests.helpers import commit_files, git, installed_dists, run_cli, wait_for
from tests.kit import (STAMP_RE, cmd, counting, install, marker_lines, runs, start_cli, status,
                       use)

ORDER = ["comfyui_core", "dependencies_main", "dependencies_additional", "custom_nodes",
         "gguf_node"]


def _installing_lines(text: str) -> list[str]:
    return re.findall(r"^(?:\[[^\]]*\] )?(\w+): (?:re)?installing\b", text, re.M)


# ----------------------------------------------------------------------------- 1: fresh + no-op
@pytest.mark.slow
def test_fresh_install_in_dependency_order_then_second_run_does_nothing(ws):
    first = install(ws)

    # Dependency order, on screen and in the progress log the original template also wrote.
    assert _installing_lines(first.stdout) == ORDER
    progress = (ws.root / "installation_progress.log").read_text()
    assert _installing_lines(progress) == ORDER
    deps = {n: c.get("depends_on", []) for n, c in ws.config["components"].items()}
    for name in ORDER:
        for dep in deps[name]:
            assert ORDER.index(dep) < ORDER.index(name)

    # Packages went into the workspace's interpreter, not into the one running the agent.
    dists = installed_dists(ws.python)
    assert {"podtest-alpha", "podtest-beta", "podtest-gamma", "podtest-nodea", "podtest-nodeb",
            "podtest-delta"} <= dists
    assert importlib.util.find_spec("podtest_alpha") is None
    assert (ws.comfyui / "main.py").is_file()
    assert (ws.comfyui / "custom_nodes" / "node-a" / "__init__.py").is_file()

    # Markers: old first line, then metadata.
    core_head = git("rev-parse", "HEAD", cwd=ws.upstreams / "ComfyUI")
    for name in ORDER + ["overall_installation"]:
        first_line, meta = marker_lines(ws.marker(name))
        assert STAMP_RE.match(first_line), first_line
        assert meta["fingerprint"] and meta["version"] and meta["version"] != ""
        assert meta["python"] == str(ws.python)
        assert re.fullmatch(r"\d+\.\d+s", meta["duration"]), meta["duration"]
    assert marker_lines(ws.marker("comfyui_core"))[1]["version"] == f"git {core_head[:12]}"
    assert "podtest-alpha==2.0" in marker_lines(ws.marker("dependencies_main"))[1]["version"]
    assert not ws.marker("sageattention").exists()  # no GPU here: skipped, not faked

    markers_before = {p.name: p.read_text() for p in ws.markers.iterdir()}
    logs_before = {p.name: p.stat().st_size for p in (ws.root / "logs" / "install").iterdir()}

    second = install(ws)
    assert "Nothing to do" in second.stdout
    assert _installing_lines(second.stdout) == []
    for name in ORDER:
        stamp = marker_lines(ws.marker(name))[0]
        version = marker_lines(ws.marker(name))[1]["version"]
        assert f"{name}: already installed ({stamp}, {version})" in second.stdout
    # Nothing ran: no installer output, markers untouched.
    assert {p.name: p.stat().st_size for p in (ws.root / "logs" / "install").iterdir()} \
        == logs_before
    assert {p.name: p.read_text() for p in ws.markers.iterdir()} == markers_before


# ----------------------------------------------------------------------------- 2: broken
def _core_and_main(ws) -> None:
    comps = ws.config["components"]
    use(ws, {"comfyui_core": comps["comfyui_core"],
             "dependencies_main": comps["dependencies_main"]})


@pytest.mark.slow
def test_package_removed_from_venv_is_detected_and_reinstalled(ws):
    _core_and_main(ws)
    install(ws)
    subprocess.run([str(ws.python), "-m", "pip", "uninstall", "-y", "podtest-beta"], check=True,
                   capture_output=True)
    assert ws.marker("dependencies_main").exists()  # the marker alone would lie

    text = run_cli("status", *ws.args())
    assert text.returncode == 1
    want = f"marker present but broken: podtest-beta not installed in {ws.root / 'venv'}"
    assert want in text.stdout
    code, data = status(ws)
    assert code == 1
    assert data["components"]["dependencies_main"]["state"] == "broken"
    assert data["verdict"] == "broken"  # dependencies_main is required

    again = install(ws)
    assert f"dependencies_main: reinstalling ({want})" in again.stdout
    assert "comfyui_core: already installed" in again.stdout
    assert "podtest-beta" in installed_dists(ws.python)
    code, data = status(ws)
    assert (code, data["verdict"]) == (0, "healthy")


# ----------------------------------------------------------------------------- 3: stale
@pytest.mark.slow
def test_pulled_comfyui_with_new_requirements_is_stale_and_reinstalled(ws):
    _core_and_main(ws)
    install(ws)
    old_head = git("rev-parse", "HEAD", cwd=ws.comfyui)
    new_head = commit_files(ws.upstreams / "ComfyUI", {
        "requirements.txt": "podtest-alpha>=1.0\npodtest-beta\npodtest-delta\n"})
    git("pull", "-q", "--ff-only", cwd=ws.comfyui)

    code, data = status(ws)
    assert code == 1
    core = data["components"]["comfyui_core"]
    assert core["state"] == "stale"
    assert f"HEAD moved from {old_head[:12]} to {new_head[:12]}" in core["reason"]
    main = data["components"]["dependencies_main"]
    assert main["state"] == "stale" and "requirements" in main["reason"]

    again = install(ws)
    assert _installing_lines(again.stdout) == ["comfyui_core", "dependencies_main"]
    assert "podtest-delta" in installed_dists(ws.python)
    assert marker_lines(ws.marker("comfyui_core"))[1]["commit"] == new_head
    assert "Nothing to do" in install(ws).stdout


@pytest.mark.slow
def test_edited_requirements_file_makes_pip_component_stale(ws):
    req = ws.root / "extra-requirements.txt"
    req.write_text("podtest-gamma\n")
    use(ws, {"extras": {"kind": "pip", "requirements": ["{workspace}/extra-requirements.txt"]}})
    install(ws)
    assert "podtest-alpha" not in installed_dists(ws.python)

    req.write_text("podtest-gamma\npodtest-alpha==1.0\n")
    code, data = status(ws)
    assert code == 1
    assert data["components"]["extras"]["state"] == "stale"
    assert "requirements" in data["components"]["extras"]["reason"]

    again = install(ws)
    assert "extras: reinstalling (stale" in again.stdout
    _, data = status(ws)
    assert data["components"]["extras"]["state"] == "installed"
    assert "podtest-alpha==1.0" in data["components"]["extras"]["version"]


# ----------------------------------------------------------------------------- 4: kill -9
def test_kill_9_during_install_leaves_no_marker_and_rerun_completes(ws, tmp_path):
    out = ws.root / "slow.out"
    use(ws, {"slow": cmd(f"test -f {ws.root}/fast || sleep 30; echo done > {out}",
                         check=f"test -f {out}")})
    log = ws.root / "logs" / "install" / "slow.log"
    group = None
    with open(tmp_path / "agent.out", "w") as fh:
        agent = start_cli("install", *ws.args(), stdout=fh)
        try:
            wait_for(lambda: log.exists() and "===" in log.read_text(), timeout=30,
                     what="the installer to start")
            me = psutil.Process(agent.pid)
            installer = wait_for(lambda: [c for c in me.children(recursive=True)
                                          if "sleep" in " ".join(c.cmdline())],
                                 what="the installer's sleep")[0]
            group = os.getpgid(installer.pid)
            assert group != os.getpgid(agent.pid)  # installers run in their own group
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            os.killpg(group, signal.SIGKILL)
            wait_for(lambda: not installer.is_running()
                     or installer.status() == psutil.STATUS_ZOMBIE, what="the installer to die")
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            if group is not None:  # the orphaned installer is no longer our child
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    assert not ws.marker("slow").exists()
    lock = ws.root / ".pod-agent" / "locks" / "slow.lock"
    assert lock.exists() and str(agent.pid) in lock.read_text()  # the dead holder's lock file
    code, data = status(ws)
    assert data["components"]["slow"]["state"] == "missing"  # not "installing": holder is dead
    assert code == 1

    (ws.root / "fast").touch()
    again = run_cli("install", *ws.args(), timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "slow: installed" in again.stdout
    assert ws.marker("slow").exists()
    assert out.read_text() == "done\n"


# ----------------------------------------------------------------------------- 5: failure
def test_failing_installer_blocks_dependents_only_and_is_retried(ws):
    fixed = ws.root / "fixed"
    use(ws, {
        "base": counting(ws, "base"),
        "flaky": counting(ws, "flaky", extra=(
            f"echo preparing the build; test -f {fixed} || "
            "{ echo 'error: the compiler exploded' >&2; exit 3; }"),
            depends_on=["base"], retries=2, retry_backoff=0.01),
        "child": counting(ws, "child", depends_on=["flaky"]),
        "grandchild": counting(ws, "grandchild", depends_on=["child"]),
        "independent": counting(ws, "independent"),
        "overall_installation": {"kind": "overall"},
    })
    proc = install(ws, expect=1)
    out = proc.stdout
    log = ws.root / "logs" / "install" / "flaky.log"
    assert "flaky: failed: flaky: command failed (exit 3)" in out
    assert f"  log: {log}" in out
    assert "  | error: the compiler exploded" in out
    assert "child: blocked: blocked by flaky" in out
    assert "grandchild: blocked: blocked by child" in out
    assert "independent: installed" in out
    assert re.search(r"Not installed: .*flaky.*child.*grandchild", out)

    assert runs(ws, "flaky") == 3  # one try + retries: 2
    assert runs(ws, "child") == runs(ws, "grandchild") == 0
    assert runs(ws, "base") == runs(ws, "independent") == 1
    for name in ("flaky", "child", "grandchild", "overall_installation"):
        assert not ws.marker(name).exists(), name
    for name in ("base", "independent"):
        assert ws.marker(name).exists(), name
    progress = (ws.root / "installation_progress.log").read_text()
    assert "flaky: attempt 1 failed" in progress and "flaky: attempt 2 failed" in progress

    code, data = status(ws)
    assert code == 1
    flaky = data["components"]["flaky"]
    assert flaky["state"] == "failed" and "exit 3" in flaky["reason"]
    assert flaky["log"] == str(log)
    assert data["components"]["child"]["state"] == "missing"

    fixed.touch()
    again = install(ws)
    assert _installing_lines(again.stdout) == ["flaky", "child", "grandchild"]
    assert runs(ws, "base") == runs(ws, "independent") == 1
    assert ws.marker("overall_installation").exists()
    code, data = status(ws)
    assert (code, data["verdict"]) == (0, "healthy")


# ----------------------------------------------------------------------------- 9: concurrency
def test_two_concurrent_installs_run_each_installer_once(ws, tmp_path):
    go = ws.root / "go"
    wait_go = f"while [ ! -f {go} ]; do sleep 0.05; done"
    use(ws, {"first": counting(ws, "first", extra=wait_go),
             "second": counting(ws, "second", depends_on=["first"]),
             "overall_installation": {"kind": "overall"}})
    out_a, out_b = tmp_path / "a.out", tmp_path / "b.out"
    with open(out_a, "w") as fa, open(out_b, "w") as fb:
        a = start_cli("install", *ws.args(), stdout=fa)
        b = None
        try:
            wait_for(lambda: runs(ws, "first") == 1, timeout=30, what="A's installer to run")
            b = start_cli("install", *ws.args(), stdout=fb)
            # B planned the same install and now waits for A's lock.
            wait_for(lambda: "first: installing" in out_b.read_text(), timeout=30,
                     what="B to reach the lock")
            go.touch()
            assert a.wait(60) == 0, out_a.read_text()
            assert b.wait(60) == 0, out_b.read_text()
        finally:
            go.touch()  # never leave an installer polling for it
            for p in (a, b):
                if p is not None:
                    try:
                        p.wait(60)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
    assert runs(ws, "first") == 1 and runs(ws, "second") == 1
    assert "first: already installed by another process" in out_b.read_text()
    assert ws.marker("overall_installation").exists()


# ----------------------------------------------------------------------------- 13: GPU
def test_requires_gpu_is_skipped_without_gpu_and_installed_with_one(ws):
    use(ws, {"base": counting(ws, "base"),
             "sage": counting(ws, "sage", requires_gpu=True, background=True,
                              depends_on=["base"]),
             "after": counting(ws, "after", depends_on=["base"]),
             "overall_installation": {"kind": "overall"}})
    install(ws)  # POD_AGENT_GPU=0 (conftest): exit 0 although sage is not installed
    assert runs(ws, "sage") == 0 and not ws.marker("sage").exists()
    assert ws.marker("overall_installation").exists()  # a skipped component never blocks it
    code, data = status(ws)
    assert data["components"]["sage"]["state"] == "skipped"
    assert data["components"]["sage"]["reason"] == "skipped: no GPU"
    assert (code, data["verdict"]) == (0, "healthy")
    assert "skipped: no GPU" in run_cli("status", *ws.args()).stdout

    gpu = {"POD_AGENT_GPU": "1"}
    proc = install(ws, env=gpu)
    assert "sage: installed" in proc.stdout
    assert runs(ws, "sage") == 1 and runs(ws, "base") == 1
    code, data = status(ws, env=gpu)
    assert data["components"]["sage"]["state"] == "installed"
    assert code == 0


# ----------------------------------------------------------------------------- 14: overall
def test_overall_marker_is_derived_from_the_others(ws):
    blocked, out = ws.root / "b.blocked", ws.root / "b.out"
    use(ws, {"a": counting(ws, "a"),
             "b": cmd(f"test ! -f {blocked} && echo ok > {out}", check=f"test -f {out}"),
             "overall_installation": {"kind": "overall"}})
    install(ws)
    first_line, meta = marker_lines(ws.marker("overall_installation"))
    assert STAMP_RE.match(first_line) and meta["fingerprint"]

    # Removed by hand while everything is installed: written again, nothing reinstalled.
    ws.marker("overall_installation").unlink()
    proc = install(ws)
    assert _installing_lines(proc.stdout) == []
    assert ws.marker("overall_installation").exists() and runs(ws, "a") == 1

    # b breaks and cannot be reinstalled: the next install removes overall_installation.
    out.unlink()
    blocked.touch()
    code, data = status(ws)
    assert data["components"]["b"]["state"] == "broken"
    assert data["components"]["overall_installation"]["state"] != "installed"
    proc = install(ws, expect=1)
    assert "b: failed" in proc.stdout
    assert not ws.marker("overall_installation").exists()
    assert not ws.marker("b").exists()  # a broken marker does not survive a failed attempt
    assert ws.marker("a").exists()


# ----------------------------------------------------------------------------- 16: targets
def test_install_named_components_and_force(ws):
    use(ws, {"a": counting(ws, "a"),
             "b": counting(ws, "b", depends_on=["a"]),
             "c": counting(ws, "c"),
             "overall_installation": {"kind": "overall"}})
    proc = install(ws, "b")
    assert _installing_lines(proc.stdout) == ["a", "b"]
    assert (runs(ws, "a"), runs(ws, "b"), runs(ws, "c")) == (1, 1, 0)
    assert not ws.marker("c").exists() and not ws.marker("overall_installation").exists()

    install(ws)
    assert runs(ws, "c") == 1 and ws.marker("overall_installation").exists()

    proc = install(ws, "--force", "b")
    assert "b: reinstalling (forced)" in proc.stdout
    assert "a: already installed" in proc.stdout
    assert (runs(ws, "a"), runs(ws, "b"), runs(ws, "c")) == (1, 2, 1)

    bad = install(ws, "nosuch", expect=1)
    assert "unknown component 'nosuch'" in bad.stderr
    assert "a, b, c" in bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr


# ----------------------------------------------------------------------------- timeout
def test_installer_timeout_kills_the_whole_process_group(ws):
    pidfile = ws.root / "background.pid"
    use(ws, {"hangs": cmd(f"sleep 300 & echo $! > {pidfile}; wait", timeout=1, retries=0)})
    proc = install(ws, expect=1)
    assert "hangs: failed: hangs: command failed (timed out after 1s)" in proc.stdout
    assert "timed out after 1s; process group killed" in \
        (ws.root / "logs" / "install" / "hangs.log").read_text()
    assert not ws.marker("hangs").exists()
    pid = int(pidfile.read_text())

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, what="the installer's background child to be killed")


def test_install_json_output(ws):
    use(ws, {"a": counting(ws, "a"), "b": cmd("exit 5"),
             "c": counting(ws, "c", depends_on=["b"])})
    proc = run_cli("install", "--json", *ws.args())
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["ok"] is False and data["changed"] == ["a"]
    outcomes = {o["name"]: o for o in data["outcomes"]}
    assert outcomes["a"]["status"] == "installed"
    assert outcomes["b"]["status"] == "failed" and outcomes["b"]["log"].endswith("b.log")
    assert (outcomes["c"]["status"], outcomes["c"]["message"]) == ("blocked", "blocked by b")
