"""Secrets (HF tokens, credentials in URLs, secret environment values) never reach a file the
agent writes or its output."""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from agent.redact import redact
from tests.helpers import run_cli
from tests.kit import all_files, cmd, use

HF_ENV = "hf_abcdefghijklmnop1234"  # passed in the environment
HF_PRINTED = "hf_zyxwvutsrqponmlk9876"  # only ever printed by an installer
PASSWORD = "s3cretpass"
URL = f"https://user:{PASSWORD}@example.invalid/org/private.git"
SECRETS = (HF_ENV, HF_PRINTED, PASSWORD)


def test_planted_secrets_never_reach_workspace_files_or_output(ws):
    ok = ws.root / "ok.out"
    use(ws, {
        "leaky": cmd(f'echo "token is $HF_TOKEN"; echo "cloning {URL}"; echo "{HF_PRINTED}"; '
                     f"echo done > {ok}",
                     check=f'test -f {ok} || '
                           f'{{ echo "auth failed for {URL} $HF_TOKEN"; exit 1; }}'),
        "leaky_fail": cmd(f'echo "using {URL}" >&2; echo "Authorization: Bearer $HF_TOKEN"; '
                          f'echo "{HF_PRINTED} rejected"; exit 4', retries=1, retry_backoff=0),
        "private_repo": {"kind": "git", "dest": "{workspace}/private",
                         "repo": f"file://user:{PASSWORD}@localhost/nonexistent/private.git"},
        "overall_installation": {"kind": "overall"},
    })
    env = {"HF_TOKEN": HF_ENV}
    outputs = []
    inst = run_cli("install", *ws.args(), env=env)
    assert inst.returncode == 1  # leaky_fail and private_repo fail
    outputs.append(inst.stdout + inst.stderr)
    as_json = run_cli("install", "--json", *ws.args(), env=env)
    outputs.append(as_json.stdout + as_json.stderr)
    ok.unlink()  # leaky's check now fails and prints the URL and the token
    for args in (["status"], ["status", "--json"]):
        proc = run_cli(*args, *ws.args(), env=env)
        outputs.append(proc.stdout + proc.stderr)

    # The installers really ran and their output was logged (redacted), so the check below
    # is not vacuous.
    logs = ws.root / "logs" / "install"
    leaky_log = (logs / "leaky.log").read_text()
    assert "token is ***" in leaky_log and "https://***@example.invalid" in leaky_log
    assert "hf_***" in leaky_log
    assert "https://***@example.invalid" in (logs / "leaky_fail.log").read_text()
    # the clone ran with the bare URL: the credentials went to git through its helper
    assert "file://localhost/nonexistent/private.git" in (logs / "private_repo.log").read_text()
    joined = "\n".join(outputs)
    assert "leaky_fail: failed" in joined and "  | " in joined  # the log tail was shown
    assert "check failed" in joined

    for text in outputs:
        for secret in SECRETS:
            assert secret not in text, (secret, text)
    files = list(all_files(ws.root))
    assert len(files) > 5
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, (secret, path)


def test_failure_record_and_status_of_a_failed_install_are_redacted(ws):
    """The failure record that `status` reads later keeps no secret from the installer."""
    use(ws, {"bad": cmd(f'echo "{URL}"; exit 2')})
    run_cli("install", *ws.args())
    record = ws.root / ".pod-agent" / "failed" / "bad.json"
    assert record.exists()
    assert PASSWORD not in record.read_text()
    proc = run_cli("status", *ws.args())
    assert "failed" in proc.stdout and PASSWORD not in proc.stdout


# ----------------------------------------------------------------------------- unit
@pytest.mark.parametrize("text, secret, kept", [
    ("token hf_abcdefghijklmnop1234 ok", "hf_abcdefghijklmnop1234", "token hf_*** ok"),
    ("git clone https://user:pa55word@github.com/o/r", "pa55word", "https://***@github.com/o/r"),
    ("git clone https://ghp_0123456789abcdefghijAB@github.com/o/r", "ghp_0123456789abcdefghij",
     "https://***@github.com/o/r"),
    ("push with ghp_0123456789abcdefghijABCD", "0123456789abcdefghij", "ghp_***"),
    ("github_pat_11ABCDEFG0123456789_abcdefghijk", "11ABCDEFG0123456789", "github_pat_***"),
    ("Authorization: Bearer abc.def.ghi", "abc.def.ghi", "Authorization: Bearer ***"),
    ("curl -H 'authorization: token s3cr3tvalue'", "s3cr3tvalue", "authorization: token ***"),
    ("GET https://h/x?token=abcd1234&page=2", "abcd1234", "?token=***&page=2"),
    ("GET https://h/x?a=1&api_key=zzzz9999", "zzzz9999", "&api_key=***"),
    ("ssh://git:hunter22@host/repo", "hunter22", "ssh://***@host/repo"),
])
def test_redact_patterns(text, secret, kept):
    out = redact(text)
    assert secret not in out
    assert kept in out


@pytest.mark.parametrize("text", [
    "plain https://github.com/comfyanonymous/ComfyUI log line",
    "git@github.com:org/repo.git",
    "transformers>=4.28.1 installed; email test@example.invalid",
    "",
])
def test_redact_leaves_ordinary_text_alone(text):
    assert redact(text) == text


def test_redact_masks_secret_environment_values(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "plainvalue123")
    monkeypatch.setenv("CIVITAI_API_KEY", "civitaikey987")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to mask safely
    out = redact("values: plainvalue123 civitaikey987 abc")
    assert "plainvalue123" not in out and "civitaikey987" not in out
    assert out.endswith(" abc")


# ----------------------------------------------------------------------------- the registry
@pytest.fixture
def registry():
    """The process-wide registry, restored after the test (other tests register too)."""
    from agent import redact as r

    saved = r.registered()
    yield r
    r.forget_all()
    r.register(*saved)


@pytest.mark.parametrize("name, secret", [
    ("HF_TOKEN", True), ("MY_PASSWORD", True), ("DB_PASSWD", True), ("CIVITAI_API_KEY", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("--hf-token", True), ("--api-key", True),
    ("api.key", True), ("GH_PAT", True), ("OAUTH_CLIENT", True), ("Authorization", True),
    ("SSH_PASSPHRASE", True), ("session_cookie", True), ("KEY", True), ("passwort", True),
    ("PWD", False), ("OLDPWD", False), ("GIT_ASKPASS", False), ("--tokenizer", False),
    ("max_tokens", False), ("GIT_AUTHOR_NAME", False), ("--port", False), ("PATH", False),
    ("MONKEY", False), ("--listen", False), ("KEYBOARD", False),
])
def test_secret_name_rule(name, secret):
    from agent.redact import secret_name

    assert secret_name(name) is secret


@pytest.mark.parametrize("text, secret, kept", [
    # credentials end at the LAST '@' of the authority: the password may contain '@'
    ("clone https://user:p@ssw0rd@host/x", "ssw0rd", "clone https://***@host/x"),
    ("'https://u:a@b@c@host.invalid:8080/p?q=1'", "a@b@c", "'https://***@host.invalid:8080/p"),
    ("https://host/x and mail me at a@b.invalid", None, "https://host/x and mail me at a@b"),
    ("main.py --hf-token abc123def --port 8188", "abc123def", "--hf-token *** --port 8188"),
    ("main.py --api-key=abc123def --port 8188", "abc123def", "--api-key=*** --port 8188"),
    ("HF_TOKEN=abc123def ./run.sh", "abc123def", "HF_TOKEN=*** ./run.sh"),
    ('{"password": "abc123def", "user": "bob"}', "abc123def", '"password": "***", "user": "bob"'),
    ("key sk-proj-abcdefghijklmnopqrstuvwx", "abcdefghijklmnopqrstuvwx", "sk-proj-***"),
    ("--listen 0.0.0.0 --port 8188 --tokenizer t5", None, "--port 8188 --tokenizer t5"),
])
def test_redact_more_patterns(text, secret, kept):
    out = redact(text)
    if secret:
        assert secret not in out
    assert kept in out


def test_registered_values_are_masked_with_their_percent_encoding(registry):
    registry.register("pl@in value", "abc")  # "abc": too short to register
    out = redact("a pl@in value, in a URL pl%40in%20value, and abc")
    assert out == "a ***, in a URL ***, and abc"


def test_config_registers_what_it_declares_secret(ws, registry):
    from agent.config import load

    ws.config["installer_env"] = {"DEPLOY_TOKEN": "inst-env-value-1", "PLAIN": "plain-value-1",
                                  "MIRROR": "https://mu:mirror-pass-1@mirror.invalid/simple"}
    ws.config["comfyui"].update(
        args=["--port", "8188", "--api-key", "args-flag-value-1", "--auth=args-eq-value-1",
              "--remote", "https://ru:args-url@pass-1@remote.invalid/"],
        env={"COMFY_SECRET": "cui-env-value-1", "LANG": "C.UTF-8-long"})
    ws.config["http"] = {"token": "http-token-value-1"}
    ws.config["components"]["extra"] = cmd("true", env={"MY_PASSWORD": "comp-env-value-1",
                                                       "MODE": "comp-plain-1"})
    ws.config["components"]["private"] = {
        "kind": "git", "dest": "{workspace}/p", "repo": "https://gu:git-url@pass-1@git.invalid/r"}
    ws.save()
    load(ws.config_path, ws.root)
    known = set(registry.registered())
    for value in ("inst-env-value-1", "mirror-pass-1", "args-flag-value-1", "args-eq-value-1",
                  "args-url@pass-1", "cui-env-value-1", "http-token-value-1",
                  "comp-env-value-1", "git-url@pass-1"):
        assert value in known, value
    for value in ("plain-value-1", "C.UTF-8-long", "comp-plain-1", "8188"):
        assert value not in known, value


def test_redact_argv_masks_the_value_after_a_secret_flag():
    from agent.redact import redact_argv

    assert redact_argv(["main.py", "--hf-token", "anything-at-all", "--port", "8188",
                        "--api-key=xyz12345", "--password"]) == \
        ["main.py", "--hf-token", "***", "--port", "8188", "--api-key=***", "--password"]


# ----------------------------------------------------------------------------- the leaks found
MY_PASSWORD = "my-own-pa55word"  # a component's own env value: no pattern matches it
DEPLOY = "deploy-t0ken-value"  # installer_env
AT_URL = "https://user:p@ssw0rd-9@example.invalid/org/repo.git"  # '@' in the password


def test_component_env_and_installer_env_values_stay_out_of_logs_and_install_output(ws):
    use(ws, {
        "own_env": cmd('echo "pw=$MY_PASSWORD deploy=$DEPLOY_KEY url=$REPO_URL"; exit 3',
                       env={"MY_PASSWORD": MY_PASSWORD, "REPO_URL": AT_URL},
                       retries=0),
        "at_url": {"kind": "git", "dest": "{workspace}/private",
                   "repo": "file://user:p@ssw0rd-9@localhost/nonexistent/private.git"},
    }, installer_env={"DEPLOY_KEY": DEPLOY})
    outputs = [run_cli("install", *ws.args()), run_cli("install", "--json", *ws.args())]
    assert all(p.returncode == 1 for p in outputs)
    log = (ws.root / "logs" / "install" / "own_env.log").read_text()
    # the command ran and printed each value; each was masked, not lost
    assert "pw=*** deploy=*** url=https://***@example.invalid/org/repo.git" in log
    text = "\n".join(p.stdout + p.stderr for p in outputs)
    assert "pw=*** deploy=***" in text  # the log tail shown by install and install --json
    for secret in (MY_PASSWORD, DEPLOY, "p@ssw0rd-9", "ssw0rd-9"):
        assert secret not in text, secret
        for path in all_files(ws.root):
            assert secret.encode() not in path.read_bytes(), (secret, path)


def test_crash_log_knows_registered_secrets(ws, registry, monkeypatch):
    from agent import clikit as cli

    registry.register("crash-secret-value")
    monkeypatch.setattr(cli, "_workspace_hint", [ws.root])
    try:
        raise RuntimeError("boom with crash-secret-value inside")
    except RuntimeError as exc:
        where = cli._crash_log(exc)
    text = open(where).read()
    assert "boom with *** inside" in text and "crash-secret-value" not in text


# ----------------------------------------------------------------------------- ComfyUI's output
def _pod_settings(pod, **env):
    return pod.settings(
        args=("--listen", "127.0.0.1", "--port", str(pod.port), "--api-key", "args-key-v4lue",
              "--remote", "https://ru:p@ss-w0rd@remote.invalid/x"),
        env={"COMFY_SECRET": "cui-env-v4lue", "FAKE_COMFY_PRINT_ENV": "COMFY_SECRET", **env})


def _say(pod, text):
    tmp = pod.control / ".say.tmp"
    tmp.write_text(text)
    tmp.replace(pod.control / "say")


@pytest.fixture
def pod(tmp_path, registry):
    from tests.test_supervisor import Pod

    p = Pod(tmp_path)
    yield p
    p.teardown()


PLANTED = ("args-key-v4lue", "p@ss-w0rd", "ss-w0rd", "cui-env-v4lue")


def _clean(path):
    data = path.read_text()
    for secret in PLANTED:
        assert secret not in data, (secret, path, data)
    return data


def _register(settings):
    from agent.redact import config_secrets, register

    class Conf:  # what agent.config.load registers, for a bare Supervisor
        http, installer_env, installer_args, components = {}, {}, (), {}
        comfyui = settings
    register(*config_secrets(Conf))


def test_comfyui_args_and_env_stay_out_of_state_files_and_comfyui_log(pod):
    from tests.test_supervisor import running, wait_for

    settings = _pod_settings(pod)
    _register(settings)
    sup = pod.supervisor(settings)
    sup.start()
    wait_for(lambda: running(sup), 10, tick=sup)
    saved = json.loads(_clean(pod.state_dir / "comfyui.json"))
    assert saved["cmdline"][-4:] == ["--api-key", "***", "--remote", "https://***@remote.invalid/x"]
    assert "args-key-v4lue" not in json.dumps(sup.snapshot())
    # ComfyUI's own output went through the pipe: its argv and env lines, masked
    wait_for(lambda: "env COMFY_SECRET=***" in pod.log.read_text(), 5)
    log = _clean(pod.log)
    assert "pod-agent starts ComfyUI:" in log and "--api-key *** --remote https://***@" in log
    assert "starting: main.py" in log and "progress COMFY_SECRET: *** 100%" in log
    pipe = psutil.Process(saved["log_pipe"]["pid"])
    assert os.getpgid(pipe.pid) == saved["pid"]  # in ComfyUI's group, not the agent's
    assert pipe.ppid() != os.getpid()  # not our child (nor ComfyUI's): it survives us
    sup.stop()
    assert not pipe.is_running() or pipe.status() == psutil.STATUS_ZOMBIE
    assert "SIGTERM: exiting" in _clean(pod.log)  # ComfyUI's last words were drained


def test_log_pipe_survives_an_agent_restart_and_ends_with_comfyui(pod):
    from tests.test_supervisor import running, wait_for

    settings = _pod_settings(pod)
    _register(settings)
    first = pod.supervisor(settings)
    first.start()
    wait_for(lambda: running(first), 10, tick=first)
    saved = json.loads((pod.state_dir / "comfyui.json").read_text())
    # The agent "dies" (the first supervisor is abandoned); a new one adopts ComfyUI and its pipe.
    second = pod.supervisor(settings)
    assert second.adopt() and second.snapshot()["pid"] == saved["pid"]
    assert second._pipe is not None and second._pipe.pid == saved["log_pipe"]["pid"]
    again = json.loads((pod.state_dir / "comfyui.json").read_text())
    assert again["log_pipe"] == saved["log_pipe"]
    _say(pod, "after adoption: token hf_AfterAdoption12345 and cui-env-v4lue")
    wait_for(lambda: "after adoption: token hf_*** and ***" in pod.log.read_text(), 5)
    # The same after adoption by a scan (no state file)
    (pod.state_dir / "comfyui.json").unlink()
    third = pod.supervisor(settings)
    assert third.adopt() and third._pipe is not None
    assert third._pipe.pid == saved["log_pipe"]["pid"]
    # A crash: the pipe writes ComfyUI's last words, then ends on EOF.
    pod.run(third)
    pod.set("crash")
    wait_for(lambda: third.snapshot()["failures"] == 1, 5)
    pod.clear("crash")
    assert "crash file found: exiting with status 1" in _clean(pod.log)
    wait_for(lambda: not psutil.pid_exists(saved["log_pipe"]["pid"]) or psutil.Process(
        saved["log_pipe"]["pid"]).status() == psutil.STATUS_ZOMBIE, 5)


def test_crash_with_a_child_holding_the_pipe_still_drains_and_cleans_up(pod):
    from tests.test_supervisor import running, wait_for

    settings = _pod_settings(pod, FAKE_COMFY_SPAWN_CHILD="1")
    sup = pod.supervisor(settings)
    sup.start()
    wait_for(lambda: running(sup), 10, tick=sup)
    (rec,) = pod.records()
    pod.set("crash")
    wait_for(lambda: sup.snapshot()["failures"] == 1, 5, tick=sup)
    pod.clear("crash")
    assert "crash file found: exiting with status 1" in pod.log.read_text()
    wait_for(lambda: not psutil.pid_exists(rec["child_pid"]) or psutil.Process(
        rec["child_pid"]).status() == psutil.STATUS_ZOMBIE, 5)


def test_a_dead_log_pipe_does_not_kill_comfyui_and_is_replaced_by_a_queue_aware_restart(pod):
    from tests.test_supervisor import running, wait_for

    settings = _pod_settings(pod)
    sup = pod.supervisor(settings)
    sup.start()
    wait_for(lambda: running(sup), 10, tick=sup)
    pid = sup.snapshot()["pid"]
    pipe_pid = json.loads((pod.state_dir / "comfyui.json").read_text())["log_pipe"]["pid"]
    pod.set("busy")  # a generation runs: the restart must wait for it
    os.kill(pipe_pid, signal.SIGKILL)
    _say(pod, "this write fails with EPIPE")
    wait_for(lambda: not (pod.control / "say").exists(), 5)
    wait_for(lambda: sup.snapshot()["pending_restart"], 5, tick=sup)
    assert sup.snapshot()["pid"] == pid and psutil.Process(pid).is_running()
    assert sup.snapshot()["pending_restart"]["waiting_for"] == "queue"
    assert "log pipe" in sup.snapshot()["pending_restart"]["reason"]
    pod.clear("busy")
    wait_for(lambda: running(sup) and sup.snapshot()["pid"] != pid, 15, tick=sup)
    new = json.loads((pod.state_dir / "comfyui.json").read_text())["log_pipe"]["pid"]
    assert new != pipe_pid and psutil.Process(new).is_running()
    _say(pod, "the new pipe works")
    wait_for(lambda: "the new pipe works" in pod.log.read_text(), 5)


def test_a_comfyui_that_cannot_exec_is_a_failed_start_with_the_reason_in_its_log(pod):
    from tests.test_supervisor import wait_for

    broken = pod.root / "python-with-a-bad-interpreter"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    sup = pod.supervisor(pod.settings(python=broken))
    sup.start()
    wait_for(lambda: sup.snapshot()["failures"] == 1, 5, tick=sup)
    assert sup.snapshot()["last_exit"]["code"] == 127
    text = pod.log.read_text()
    assert "pod-agent log pipe: cannot start" in text and "ComfyUI not started" in text
    sup.stop()
    assert not pod.procs()  # the redactor ended with the failed start (EOF)
