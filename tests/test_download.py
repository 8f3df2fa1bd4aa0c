"""Model downloads (`download` and `folders` kinds, `pod-agent verify`) against a local HTTP
server in the test process (tests/dlserver.py): plain URLs, and Hugging Face resolve URLs served
to huggingface_hub through HF_ENDPOINT. Each server records every request (Range, bytes sent,
Authorization), which is what the resume tests assert."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent import config as cfg
from agent import download as dl
from agent import markers
from agent.execute import Executor
from agent.model import State
from agent.observe import observe_one
from agent.kinds.base import Ctx
from tests.dlserver import Server, blob
from tests.helpers import run_cli, wait_for, write_yaml

SIZE = 3_000_000
DATA = blob(SIZE)
TOKEN = "zq8-unguessable-value-4711"  # recognised by no redaction pattern: registered only


@pytest.fixture
def server():
    with Server() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fast(monkeypatch, server):
    monkeypatch.setattr(dl, "RESUME_DELAY", 0.0)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("MY_HUB_VAR", raising=False)


class WS:
    def __init__(self, root: Path):
        self.root = root
        self.config_path = root / "config.yaml"
        self.models = root / "ComfyUI" / "models"

    def use(self, components: dict) -> None:
        write_yaml(self.config_path, {
            "comfyui": {"venv": None, "python": sys.executable},
            "defaults": {"retries": 0, "retry_backoff": 0, "timeout": 120},
            "components": components})

    def load(self):
        return cfg.load(self.config_path, self.root)

    def install(self, *names: str):
        return Executor(self.load(), gpu=False).run(list(names) or None)

    def observe(self, name: str):
        conf = self.load()
        return observe_one(conf.components[name], Ctx(conf, gpu=False))

    def marker(self, name: str):
        return markers.read(self.root / ".install_markers", name)

    def cli(self, *args: str, env: dict | None = None):
        return run_cli(*args, "-w", str(self.root), "-c", str(self.config_path), env=env)

    def texts(self) -> str:
        """Everything the agent wrote in the workspace (logs, markers, state), as text."""
        out = []
        for path in self.root.rglob("*"):
            if path.is_file() and "ComfyUI" not in path.parts:
                out.append(path.read_text(errors="replace"))
        return "\n".join(out)


@pytest.fixture
def ws(tmp_path) -> WS:
    root = tmp_path / "ws"
    root.mkdir()
    return WS(root)


def gets(server, part):
    return [(r["range"], r["status"], r["sent"]) for r in server.gets(part)]


# ----------------------------------------------------------------------------- resume
def test_a_cut_download_resumes_from_the_cut_in_the_next_install(ws, server, monkeypatch):
    """Every GET of the first install dies at 50 %: the install fails, keeping the part. The next
    install asks for the second half only (Range from the cut), and the file is whole."""
    server.add("m/model.bin", DATA)
    half = SIZE // 2
    server.cuts[:] = [half] * 20
    monkeypatch.setattr(dl, "RESUME_TRIES", 2)
    ws.use({"m": {"kind": "download", "url": server.url("m/model.bin"), "dest": "checkpoints"}})
    report = ws.install()
    assert not report.ok and ws.marker("m") is None
    dest = ws.models / "checkpoints" / "model.bin"
    assert not dest.exists() and (dest.parent / "model.bin.part").stat().st_size == half
    server.cuts.clear()
    server.log.clear()
    report = ws.install()
    assert report.ok, report.outcomes
    assert gets(server, "model.bin") == [(f"bytes={half}-", 206, SIZE - half)]
    assert dest.read_bytes() == DATA
    assert not (dest.parent / "model.bin.part").exists()
    assert not (dest.parent / "model.bin.part.json").exists()
    assert ws.marker("m").meta["version"] == "1 file, 3.0 MB"


def test_a_cut_mid_transfer_is_resumed_within_the_install(ws, server):
    server.add("m/a.bin", DATA)
    server.cuts[:] = [1_000_000]
    ws.use({"m": {"kind": "download", "url": server.url("m/a.bin"),
                  "dest": str(ws.root / "elsewhere")}})  # an absolute dest
    assert ws.install().ok
    assert gets(server, "a.bin") == [(None, 200, 1_000_000), ("bytes=1000000-", 206, 2_000_000)]
    assert (ws.root / "elsewhere" / "a.bin").read_bytes() == DATA


def test_a_server_ignoring_range_restarts_cleanly(ws, server):
    server.add("m/a.bin", DATA)
    server.ranges = False
    server.cuts[:] = [1_000_000]
    ws.use({"m": {"kind": "download", "url": server.url("m/a.bin"), "dest": "vae"}})
    assert ws.install().ok
    assert gets(server, "a.bin") == [(None, 200, 1_000_000), ("bytes=1000000-", 200, SIZE)]
    assert (ws.models / "vae" / "a.bin").read_bytes() == DATA
    assert "ignored the Range request" in (ws.root / "installation_progress.log").read_text()


def test_a_part_from_another_source_is_discarded(ws, server):
    server.add("m/a.bin", DATA)
    ws.use({"m": {"kind": "download", "url": server.url("m/a.bin"), "dest": "vae"}})
    folder = ws.models / "vae"
    folder.mkdir(parents=True)
    (folder / "a.bin.part").write_bytes(b"x" * 1000)
    (folder / "a.bin.part.json").write_text(json.dumps({"source": "http://other/a.bin"}))
    assert ws.install().ok
    assert gets(server, "a.bin") == [(None, 200, SIZE)]
    assert (folder / "a.bin").read_bytes() == DATA


# ----------------------------------------------------------------------------- verification
def test_wrong_bytes_leave_no_marker_and_no_file(ws, server):
    """A Hugging Face file whose body does not match the sha256 the hub publishes
    (X-Linked-Etag, read by huggingface_hub): failed, no marker, no file, no part."""
    server.add("org/repo/w.safetensors", DATA, body=blob(SIZE, seed=2))
    ws.use({"w": {"kind": "download", "repo": "org/repo", "file": "w.safetensors",
                  "dest": "unet"}})
    report = ws.install()
    (outcome,) = [o for o in report.outcomes if o.name == "w"]
    assert outcome.status == "failed" and "sha256 mismatch" in outcome.message
    assert ws.marker("w") is None
    assert sorted(p.name for p in (ws.models / "unet").iterdir()) == []
    assert ws.observe("w").state == State.FAILED
    assert gets(server, "/org/repo/resolve/main/w.safetensors")  # fetched through resolve


def test_a_missing_or_truncated_file_is_downloaded_again(ws, server):
    server.redirect = True  # the hub answers 302 to its CDN (metadata read from the 302)
    server.add("org/repo/w.safetensors", DATA)
    ws.use({"w": {"kind": "download", "repo": "org/repo", "file": "w.safetensors",
                  "dest": "unet"}})
    assert ws.install().ok
    dest = ws.models / "unet" / "w.safetensors"
    meta = ws.marker("w").meta
    assert f"{SIZE} {dl.sha256_file(dest)}" in meta.values()  # the recorded size and hash
    assert ws.observe("w").state == State.INSTALLED
    dest.unlink()
    obs = ws.observe("w")
    assert obs.state == State.BROKEN and "is missing" in obs.reason
    assert ws.install().ok and dest.read_bytes() == DATA
    with open(dest, "r+b") as fh:
        fh.truncate(SIZE // 3)
    obs = ws.observe("w")
    assert obs.state == State.BROKEN and f"{SIZE} expected" in obs.reason
    assert ws.install().ok and dest.read_bytes() == DATA
    assert len(gets(server, "/cdn/org/repo/w.safetensors")) == 3


@pytest.mark.slow  # five CLI runs
def test_verify_hash_finds_a_corrupt_file_the_cheap_probe_does_not(ws, server):
    server.add("m/a.bin", DATA)
    ws.use({"m": {"kind": "download", "url": server.url("m/a.bin"), "dest": "loras"}})
    assert ws.install().ok
    proc = ws.cli("verify", "--hash")
    assert proc.returncode == 0 and proc.stdout.startswith("ok "), proc.stdout + proc.stderr
    with open(ws.models / "loras" / "a.bin", "r+b") as fh:
        fh.write(b"\0")  # same size: the probe cannot tell
    assert ws.observe("m").state == State.INSTALLED
    assert ws.cli("verify", "m").returncode == 0
    proc = ws.cli("verify", "--hash", "--json", "m")
    assert proc.returncode == 1
    (entry,) = json.loads(proc.stdout)["files"]
    assert not entry["ok"] and "does not match" in entry["problem"]
    assert "pod-agent install --force m" in entry["problem"]
    assert ws.install().ok and len(server.gets("a.bin")) == 1  # the probe passes: kept
    proc = ws.cli("install", "--force", "m")  # re-hashed: the bad file is downloaded again
    assert proc.returncode == 0 and len(server.gets("a.bin")) == 2, proc.stdout + proc.stderr
    assert (ws.models / "loras" / "a.bin").read_bytes() == DATA
    assert ws.cli("install", "--force", "m").returncode == 0  # intact: re-hashed, kept
    assert len(server.gets("a.bin")) == 2


@pytest.mark.slow  # starts the agent
def test_the_running_agent_downloads_again_a_missing_file_or_marker(ws, server):
    server.add("m/a.bin", DATA)
    ws.use({"m": {"kind": "download", "url": server.url("m/a.bin"), "dest": "vae"}})
    conf = yaml.safe_load(ws.config_path.read_text())
    conf.update({"http": {"port": 0}, "health": {"enabled": False},
                 "agent": {"start_comfyui": False, "reconcile_interval": 1.0, "stop_timeout": 5}})
    write_yaml(ws.config_path, conf)
    dest, marker = ws.models / "vae" / "a.bin", ws.root / ".install_markers" / "m.done"
    out = open(ws.root / "agent.out", "w")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-w", str(ws.root), "-c",
                              str(ws.config_path)], stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(marker.exists, 60, what="first download")
        dest.unlink()  # the file goes: the periodic reconcile's probe sees it
        wait_for(lambda: len(server.gets("a.bin")) == 2 and dest.exists() and marker.exists(),
                 60, what="file downloaded again")
        marker.unlink()  # the marker goes (the file stays): the marker watch asks for it
        wait_for(lambda: marker.exists() and len(server.gets("a.bin")) == 3, 60,
                 what="downloaded again, marker rewritten")
        assert dest.read_bytes() == DATA
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        finally:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait(5)
            out.close()
    text = (ws.root / "agent.out").read_text()
    assert "m: reinstalling (marker present but broken: " in text and "HTTP Request" not in text


# ----------------------------------------------------------------------------- tokens, errors
@pytest.mark.slow
def test_token_is_sent_but_never_written_and_errors_say_what_to_do(ws, server):
    server.token = TOKEN
    server.redirect = True  # the hub's 302 to its CDN, another host
    server.add("org/gated/g.bin", DATA[:100_000], gated=True)
    ws.use({"g": {"kind": "download", "repo": "org/gated", "file": "g.bin", "dest": "unet",
                  "token_env": "MY_HUB_VAR", "gated": True},
            "n": {"kind": "download", "url": server.url("nothing/here.bin"), "dest": "vae"}})
    env = {"HF_ENDPOINT": server.endpoint}
    # no token: skipped, not failed
    proc = ws.cli("status", "--json", env=env)
    assert json.loads(proc.stdout)["components"]["g"]["reason"] == "skipped: MY_HUB_VAR not set"
    # a wrong token: the server answers 403 (its body quotes the Authorization header)
    proc = ws.cli("install", "g", env={**env, "MY_HUB_VAR": TOKEN + "x"})
    assert proc.returncode == 1
    assert "g: failed: token missing or not accepted for org/gated" in proc.stdout
    assert not server.gets("/org/")  # refused at the metadata request: no bytes asked for
    # the right token: sent to the hub, installed
    server.log.clear()
    proc = ws.cli("install", "g", env={**env, "MY_HUB_VAR": TOKEN})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r["auth"] for r in server.log if r["path"].startswith("/org/")} == \
        {f"Bearer {TOKEN}"}
    assert [r["auth"] for r in server.gets("/cdn/org/gated/g.bin")] == [None]  # not to the CDN
    # 404: the URL
    proc = ws.cli("install", "n", env=env)
    assert f"n: failed: not found (404): {server.url('nothing/here.bin')}" in proc.stdout
    status = ws.cli("status", "--json", env={**env, "MY_HUB_VAR": TOKEN})
    for text in (proc.stdout, proc.stderr, status.stdout, status.stderr, ws.texts()):
        assert TOKEN not in text


def test_hub_errors_name_the_repo_or_the_url(server):
    server.token = TOKEN
    server.add("org/gated/g.bin", b"x" * 10, gated=True)
    server.add("org/repo/a.bin", b"x" * 10)
    cases = [
        (dict(repo="org/gated", file="g.bin", token_env="MY_HUB_VAR"),
         "token missing or not accepted for org/gated (set MY_HUB_VAR)"),
        (dict(repo="org/repo", file="missing.bin"),
         f"not found (404): {server.endpoint}/org/repo/resolve/main/missing.bin"),
        (dict(repo="org/nothere", file="a.bin"),  # the hub answers 401 RepoNotFound
         "repository not found or not accessible: org/nothere"),
    ]
    for fields, message in cases:
        with pytest.raises(dl.FetchFatal) as info:
            dl.resolve(dl.Item(dest=Path("/nonexistent/x"), **fields))
        assert message in str(info.value)


def test_disk_full_says_needed_and_available(ws, server, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
            capture_output=True).returncode != 0:
        pytest.skip("needs a small real filesystem (tmpfs mount as root)")
    try:
        server.add("m/a.bin", DATA[:600_000])
        server.add("m/b.bin", DATA[:600_000])
        ws.use({"m": {"kind": "download", "dest": str(small), "files": [
            {"url": server.url("m/a.bin")}, {"url": server.url("m/b.bin")}]}})
        report = ws.install()
        (outcome,) = [o for o in report.outcomes if o.name == "m"]
        assert outcome.status == "failed"
        assert f"not enough free space in {small}: 1.2 MB needed, 1.0 MB available" \
            in outcome.message
        assert gets(server, "/m/") == []  # refused before the first byte
        assert ws.marker("m") is None
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_files_download_in_parallel_up_to_the_limit(ws, server):
    for i in range(3):
        server.add(f"m/{i}.bin", blob(500_000, seed=i))
    server.barrier = 2  # the first GET waits until a second one is in flight
    ws.use({"m": {"kind": "download", "dest": "checkpoints", "parallel": 2,
                  "files": [{"url": server.url(f"m/{i}.bin")} for i in range(3)]}})
    assert ws.install().ok
    assert server.max_active == 2
    for i in range(3):
        assert (ws.models / "checkpoints" / f"{i}.bin").read_bytes() == blob(500_000, seed=i)
    assert ws.marker("m").meta["version"] == "3 files, 1.5 MB"


def test_progress_lines_say_done_total_speed_and_eta(tmp_path, monkeypatch):
    """Without a terminal, a line per active file every progress_interval seconds, in the
    component's log and the progress log."""
    from types import SimpleNamespace

    from agent.kinds.download import Display

    monkeypatch.setenv("POD_AGENT_PROGRESS", "lines")
    comp = SimpleNamespace(name="m", log=tmp_path / "m.log")
    ctx = SimpleNamespace(config=SimpleNamespace(progress_log=tmp_path / "progress.log"))
    display = Display(comp, ctx, interval=0)
    display.start("model.bin", 4_000_000_000, 0)
    display.advance("model.bin", 1_000_000_000)
    display.end("model.bin")
    display.close()
    for log in (comp.log, ctx.config.progress_log):
        line = log.read_text()
        assert "m: model.bin: 1.0 GB of 4.0 GB (25 %), " in line and "/s, ETA " in line


# ----------------------------------------------------------------------------- folders, config
def test_model_folders_are_created_and_recreated_and_extra_paths_written(ws):
    ws.use({"model_folders": {"kind": "folders", "extra_model_paths": {
        "volume": {"base_path": "{workspace}/models", "checkpoints": "checkpoints"}}}})
    assert ws.install().ok
    names = sorted(p.name for p in ws.models.iterdir())
    assert names == sorted(["checkpoints", "loras", "vae", "clip", "text_encoders", "unet",
                            "diffusion_models", "clip_vision", "controlnet", "upscale_models",
                            "embeddings"])
    extra = ws.root / "ComfyUI" / "extra_model_paths.yaml"
    assert f"base_path: {ws.root}/models" in extra.read_text()
    (ws.models / "loras").rmdir()
    obs = ws.observe("model_folders")
    assert obs.state == State.BROKEN and "loras" in obs.reason
    assert ws.install().ok and (ws.models / "loras").is_dir()
    conf = ws.load()
    assert conf.components["model_folders"].restart_comfyui is False


def test_flux_preset_loads_and_skips_dev_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    root = tmp_path / "w"
    root.mkdir()
    preset = Path(cfg.default_config_path()).with_name("flux.yaml")
    (root / "pod-agent.yaml").write_text(preset.read_text())
    conf = cfg.load(None, root)
    flux = [n for n, c in conf.components.items() if c.kind == "download"]
    assert flux == ["flux_text_encoders", "flux_vae", "flux_schnell", "flux_dev"]
    assert all(conf.components[n].background and not conf.components[n].restart_comfyui
               for n in flux)
    ctx = Ctx(conf, gpu=False)
    obs = observe_one(conf.components["flux_dev"], ctx)
    assert (obs.state, obs.reason) == (State.SKIPPED, "skipped: HF_TOKEN not set")
    assert observe_one(conf.components["flux_schnell"], ctx).state == State.MISSING
    dev = conf.components["flux_dev"].spec["items"][0]
    assert dev.dest == root / "ComfyUI" / "models" / "diffusion_models" / "flux1-dev.safetensors"


@pytest.mark.parametrize("body, problem", [
    ({"url": "ftp://x/y.bin", "dest": "vae"}, "'url' must be an https://"),
    ({"url": "https://[::1/y.bin", "dest": "vae"}, "'url' must be an https://"),
    ({"url": "https://x/y.bin", "dest": "vae", "size": -1}, "'size' must be a whole number"),
    ({"repo": "noslash", "file": "a.bin", "dest": "vae"}, "'repo' must be a Hugging Face"),
    ({"url": "https://x/y.bin"}, "missing 'dest'"),
    ({"url": "https://x/y.bin", "dest": "vae", "sha256": "abc"}, "64 hex digits"),
    ({"dest": "vae", "files": [{"url": "https://x/a.bin"}, {"url": "https://y/a.bin"}]},
     "files[1]: "),
])
def test_bad_download_config_is_one_line_naming_the_line(ws, body, problem):
    ws.use({"m": {"kind": "download", **body}})
    with pytest.raises(cfg.ConfigError) as info:
        ws.load()
    text = str(info.value)
    assert text.startswith(f"{ws.config_path}:") and problem in text and "\n" not in text
