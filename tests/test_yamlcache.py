"""A parsed config file is kept in <workspace>/.pod-agent/cache/ (agent/yamlcache.py): the next
command reads it without PyYAML, and never a stale or damaged copy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent import config as cfg
from agent.model import ConfigError


def _same(a, b) -> bool:
    """Equal values, and the same lines for every key and item (what error messages name)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return (a.where == b.where and a.src == b.src and list(a) == list(b)
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, list):
        return a.lines == b.lines and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.fixture
def ws(tmp_path):
    (tmp_path / ".pod-agent").mkdir()
    return tmp_path


def _cached(ws):
    return sorted((ws / ".pod-agent" / "cache").glob("config-*.json"))


def test_the_cached_parse_is_the_parse_with_its_lines(ws):
    path = cfg.default_config_path()
    fresh = cfg.load_yaml(path)
    first = cfg.load_yaml(path, cache_ws=ws)
    assert len(_cached(ws)) == 1
    again = cfg.load_yaml(path, cache_ws=ws)
    assert _same(fresh, first) and _same(fresh, again)
    assert cfg.load(None, ws) == cfg.load(None, ws)


def test_a_second_command_does_not_import_pyyaml(ws):
    code = ("import sys; from agent import config as c; c.load(None, sys.argv[1]); "
            "print('yaml' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code, str(ws)], capture_output=True,
                           text=True, check=True).stdout.strip() for _ in range(2)]
    assert runs == ["True", "False"]


def test_an_edit_is_seen_and_its_error_names_the_new_line(ws):
    overlay = ws / cfg.OVERLAY_NAME
    overlay.write_text("agent:\n  reconcile_interval: 30\n")
    assert cfg.load(None, ws).agent["reconcile_interval"] == 30
    assert cfg.load(None, ws).agent["reconcile_interval"] == 30  # from the cache
    overlay.write_text("agent:\n  reconcile_interval: 45\n")
    assert cfg.load(None, ws).agent["reconcile_interval"] == 45
    overlay.write_text("agent:\n\n\n  reconcile_interval: -1\n")
    with pytest.raises(ConfigError, match=r"pod-agent\.yaml:4:"):
        cfg.load(None, ws)


def test_a_damaged_or_foreign_cache_file_is_a_miss(ws):
    overlay = ws / cfg.OVERLAY_NAME
    overlay.write_text("agent:\n  reconcile_interval: 30\n")
    cfg.load(None, ws)
    for damage in ("{not json", json.dumps({"v": 1, "sha": "0" * 64, "path": "x", "data": 1}),
                   "[]", ""):
        for file in _cached(ws):
            file.write_text(damage)
        assert cfg.load(None, ws).agent["reconcile_interval"] == 30
    # the one for the overlay, rewritten with another file's data but this file's digest
    file = next(f for f in _cached(ws) if json.loads(f.read_text())["path"] == str(overlay))
    doc = json.loads(file.read_text())
    doc["path"] = "/elsewhere/pod-agent.yaml"
    file.write_text(json.dumps(doc))
    assert cfg.load(None, ws).agent["reconcile_interval"] == 30


def test_only_plain_data_is_cached(ws):
    overlay = ws / cfg.OVERLAY_NAME
    overlay.write_text("x: &a {k: 1}\ny: *a\n")  # an alias: shared object
    cfg.load_yaml(overlay, cache_ws=ws)
    overlay.write_text("when: 2024-01-01\n")  # a date
    cfg.load_yaml(overlay, cache_ws=ws)
    assert _cached(ws) == []
    overlay.write_text("plain: [1, 2.5, true, null, text]\n")
    data = cfg.load_yaml(overlay, cache_ws=ws)
    assert len(_cached(ws)) == 1
    assert _same(cfg.load_yaml(overlay, cache_ws=ws), data)


def test_nothing_is_created_on_a_fresh_volume(tmp_path):
    cfg.load(None, tmp_path)
    assert not (tmp_path / ".pod-agent").exists()


def test_a_file_with_a_secret_is_never_copied_into_the_cache(ws):
    overlay = ws / cfg.OVERLAY_NAME
    for text in ("http:\n  token: s3cr3t-t0ken-value\n",
                 "custom_nodes:\n  nodes: [https://user:hunter2pass@example.com/x.git]\n",
                 "comfyui:\n  args: [--api-key, abcdef123456]\n"):
        overlay.write_text(text)
        cfg.load_yaml(overlay, cache_ws=ws)
        assert _cached(ws) == [], text
    overlay.write_text('comfyui:\n  env: {HF_TOKEN: "${HF_TOKEN}"}\n')  # a reference only
    cfg.load_yaml(overlay, cache_ws=ws)
    assert len(_cached(ws)) == 1
