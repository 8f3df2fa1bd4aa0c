"""Secrets (HF tokens, credentials in URLs, secret environment values) never reach a file the
agent writes or its output."""

from __future__ import annotations

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
    assert "***@localhost" in (logs / "private_repo.log").read_text()
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
