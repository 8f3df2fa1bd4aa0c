"""Hostile configurations, one regression test per class the fuzzer found (issue 7): each is a
one-line config error naming the file, the line and the key, never a traceback, a hang or a
recursion error; the limits on numbers, names, nesting and paths hold at their edges.

The generated corpus over the same classes is tests/reliability/test_bad_config.py."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

from agent import config as cfg
from agent import plan
from agent.model import ConfigError
from tests.helpers import run_cli

HEAD = "installer: pip\ncomfyui: {venv: null, python: /usr/bin/python3}\n"  # lines 1-2
COMP = HEAD + "components:\n"  # components start on line 4


@contextlib.contextmanager
def deadline(seconds: float = 20.0):
    """A load that takes longer is a hang: the test fails instead of waiting forever."""
    def expired(signum, frame):
        raise AssertionError(f"config.load still running after {seconds}s (a hang)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load_error(path: Path, workspace: Path | str) -> str:
    with deadline(), pytest.raises(ConfigError) as err:
        cfg.load(path, workspace)
    message = str(err.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.isprintable(), message
    assert len(message) <= ConfigError.MAX_LEN
    return message


def chain(n: int, cycle: bool = False) -> str:
    """n command components, c0 depends on c1 ... on c(n-1) (and back on c0 with cycle)."""
    lines = []
    for i in range(n):
        dep = f"c{i + 1}" if i + 1 < n else ("c0" if cycle else None)
        lines.append(f"  c{i}: {{kind: command, run: x" + (f", depends_on: [{dep}]" if dep
                                                           else "") + "}\n")
    return COMP + "".join(lines)


def laughs(levels: int = 9, fan: int = 9) -> str:
    """The "billion laughs": each level a list of `fan` aliases of the previous one."""
    env = ["  L0: &L0 [" + ", ".join(["lol"] * fan) + "]\n"]
    for i in range(1, levels):
        env.append(f"  L{i}: &L{i} [" + ", ".join([f"*L{i - 1}"] * fan) + "]\n")
    return HEAD + "installer_env:\n" + "".join(env)


# (id, file content, line of the error or None, text the error must contain)
CASES = [
    # keys that are not text
    ("unhashable-key", COMP + "  ? [a, b]\n  : {kind: command, run: x}\n", 4,
     "a key must be text, got ['a', 'b']"),
    ("unhashable-flow-key", HEAD + "components: {[1]: x}\n", 3, "a key must be text"),
    ("mapping-key", COMP + "  ? {a: 1}\n  : x\n", 4, "a key must be text"),
    ("null-key", COMP + "  null: {kind: command, run: x}\n", 4, "a key must be text, got None"),
    # NUL and lone surrogates, in values, paths and keys
    ("nul-in-string", COMP + '  a: {kind: command, run: "x\\0y"}\n', 4,
     "'run': the value 'x\\x00y' contains a NUL character"),
    ("nul-in-path", HEAD + 'markers_dir: "/tmp/m\\0"\n', 3, "'markers_dir'"),
    ("nul-in-list", COMP + '  a:\n    kind: pip\n    packages:\n      - ok\n      - "b\\0"\n', 8,
     "contains a NUL character"),
    ("nul-in-key", COMP + '  "a\\0": {kind: command, run: x}\n', 4,
     "the key 'a\\x00' contains a NUL character"),
    ("surrogate", COMP + '  a: {kind: command, run: "\\ud800"}\n', 4, "a lone surrogate"),
    # numbers out of any sensible range
    ("400-digit-int", COMP + "  a: {kind: command, run: x, timeout: " + "9" * 400 + "}\n", 4,
     "'timeout' must be a number of seconds from 1 to 604800"),
    ("5000-digit-int", COMP + "  a: {kind: command, run: x, retries: " + "9" * 5000 + "}\n", 4,
     "invalid value"),
    ("huge-retries", COMP + "  a: {kind: command, run: x, retries: 1" + "0" * 400 + "}\n", 4,
     "'retries' must be a whole number 0-100"),
    ("nan-timeout", COMP + "  a: {kind: command, run: x, timeout: .nan}\n", 4,
     "'timeout' must be a number of seconds from 1 to 604800, got nan"),
    ("inf-backoff", HEAD + "defaults: {retry_backoff: .inf}\n", 3,
     "'retry_backoff' must be a number of seconds from 0 to 3600, got inf"),
    ("1e400-interval", HEAD + "agent: {reconcile_interval: 1e400}\n", 3,
     "'reconcile_interval' must be > 0"),
    ("negative-interval", HEAD + "health: {checks: {disk: {interval: -.inf}}}\n", 3,
     "'interval' must be > 0"),
    ("zero-poll", HEAD + "agent: {poll: 0}\n", 3, "'poll' must be > 0"),
    ("bool-as-number", HEAD + "agent: {liveness_failures: true}\n", 3,
     "'liveness_failures' must be a whole number 1-1000, got True"),
    ("comfyui-port-0", HEAD.replace("python3}", "python3, port: 0}"), 2,
     "'port' must be 1-65535"),
    ("http-port", HEAD + "http: {port: 65536}\n", 3, "'port' must be 0-65535"),
    ("report-size", HEAD + "health: {report_max_size: 99999999999 GB}\n", 3,
     "'report_max_size' must be a size"),
    # names
    ("300-char-name", COMP + "  " + "a" * 300 + ": {kind: command, run: x}\n", 4,
     "a component name is at most 64 characters, this one has 300"),
    ("name-with-newline", COMP + '  "ab\\n": {kind: command, run: x}\n', 4,
     "component 'ab\\n': a component name must be a plain identifier"),
    ("node-name-newline", COMP + '  n:\n    kind: nodes\n    nodes:\n      - {repo: "file:///x",'
     ' name: "a\\n"}\n', 7, "cannot use 'a\\n' as a folder name"),
    # bad tags
    ("int-12abc", COMP + "  a: {kind: command, run: x, retries: !!int 12abc}\n", 4,
     "invalid value '12abc' for !!int"),
    ("float-abc", HEAD + "agent: {poll: !!float abc}\n", 3, "invalid value 'abc' for !!float"),
    ("python-object", COMP + "  a: !!python/object:os.system {}\n", 4,
     "could not determine a constructor"),
    ("python-name", COMP + "  a: !!python/name:os.system ''\n", 4,
     "could not determine a constructor"),
    ("binary-garbage", COMP + "  a: {kind: command, run: !!binary '@@@'}\n", 4, "'run'"),
    ("timestamp-nonsense", HEAD + "agent: {poll: !!timestamp nonsense}\n", 3,
     "invalid value 'nonsense' for !!timestamp"),
    ("bool-maybe", HEAD + "agent: {start_comfyui: !!bool maybe}\n", 3,
     "invalid value 'maybe' for !!bool"),
    ("set-as-list", COMP + "  a: {kind: command, run: x, depends_on: !!set {b, c}}\n", 4,
     "'depends_on' must be a list of strings"),
    # encodings
    ("bad-utf8", (COMP + "  a: {kind: command, run: 'caf\xe9'}\n").encode("latin-1"), 4,
     "not valid UTF-8 (byte 0xe9)"),
    ("utf16", (HEAD + "components: {}\n").encode("utf-16"), 1, "UTF-16 text; save it as UTF-8"),
    ("utf16-no-bom", (HEAD + "components: {}\n").encode("utf-16-le"), 1, "contains NUL bytes"),
    ("utf32", (HEAD + "components: {}\n").encode("utf-32"), 1, "UTF-32 text"),
    ("nul-filled", b"\0" * 4096, 1, "contains NUL bytes"),
    ("nul-on-line-3", (HEAD + "x\0y: 1\n").encode(), 3, "contains NUL bytes"),
    ("escape-char", HEAD + "agent: {}\x1b[31m\n", 3, "control character U+001B"),
    # nesting, chains, aliases
    ("deep-flow", HEAD + "x: " + "[" * 5000 + "]" * 5000 + "\n", 3, "nested deeper than 32"),
    ("deep-block", HEAD + "".join("  " * i + f"k{i}:\n" for i in range(500)), None,
     "nested deeper than 32"),
    ("deep-through-aliases", HEAD + "x: &a " + "[" * 30 + "]" * 30 + "\ny: " + "[" * 30 + "*a"
     + "]" * 30 + "\n", 4, "nested deeper than 32 levels (aliases included)"),
    ("chain-cycle-3000", chain(3000, cycle=True), None, "dependency cycle: c0 -> c1"),
    ("billion-laughs", laughs(), None, "expands to more than"),
    ("recursive-alias", HEAD + "x: &a [*a]\n", 3, "recursive"),
    ("undefined-alias", HEAD + "x: *nope\n", 3, "undefined alias"),
    ("merge-bomb", HEAD + "x: {<<: [&m0 {a: 1}, " + ", ".join(
        f"&m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: 1}}" for i in range(1, 40)) + "]}\n", 3,
     "unknown field 'x'"),  # PyYAML >= 6.0.2 merges each aliased node once: no blow-up
    ("merge-too-many-keys", HEAD + "a: &a {" + ", ".join(f"a{i}: 1" for i in range(6000))
     + "}\nb: &b {" + ", ".join(f"b{i}: 1" for i in range(6000)) + "}\nx: {<<: [*a, *b]}\n", 5,
     "more than 10000 keys (`<<` merges included)"),
    ("duplicate-key", HEAD + "agent: {poll: 1}\nagent: {poll: 2}\n", 4, "duplicate key 'agent'"),
    # wrong types everywhere
    ("env-list-value", HEAD + "installer_env: {A: [1, 2]}\n", 3,
     "'installer_env': the value of 'A' must be a string"),
    ("env-name-equals", HEAD + "installer_env: {'A=B': x}\n", 3, "not a valid environment"),
    ("kind-list", COMP + "  a: {kind: [git]}\n", 4, "unknown kind ['git']"),
    ("components-list", HEAD + "components: [a]\n", 3, "'components' must be a mapping"),
    ("health-number", HEAD + "health: 5\n", 3, "'health' must be a mapping"),
    ("checks-list", HEAD + "health: {checks: [disk]}\n", 3, "'checks' must be a mapping"),
    ("depends-on-string", COMP + "  a: {kind: command, run: x, depends_on: b}\n", 4,
     "'depends_on' must be a list of strings"),
    ("args-string", HEAD + "installer_args: --no-index\n", 3,
     "'installer_args' must be a list of strings"),
    ("nodes-mapping", COMP + "  n: {kind: nodes, nodes: {a: b}}\n", 4, "'nodes' must be a list"),
    ("workspace-list", HEAD + "workspace: [a]\n", 3, "'workspace' must be a string"),
    # paths the kernel cannot take
    ("path-newline", COMP + '  g: {kind: git, repo: "file:///x", dest: "/tmp/a\\nb"}\n', 4,
     "'dest': a path cannot contain the control character"),
    ("path-too-long", COMP + "  g: {kind: git, repo: r, dest: /" + "a/" * 2100 + "}\n", 4,
     "a path is at most 4095 bytes long"),
    ("path-part-too-long", HEAD + "state_dir: /tmp/" + "s" * 300 + "\n", 3,
     "each part of a path is at most 255 bytes"),
    ("multi-document", HEAD + "---\nx: 1\n", 3, "invalid YAML"),
    ("unknown-user", COMP + '  g: {kind: git, repo: r, dest: "~nosuchuser/x"}\n', 4,
     "'dest': cannot expand '~nosuchuser/x': no such user"),
]


@pytest.mark.parametrize("name, content, line, problem", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_naming_file_and_line(tmp_path, name, content, line, problem):
    path = tmp_path / "config.yaml"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    message = load_error(path, tmp_path / "ws")
    assert message.startswith(f"{path}:"), message
    if line is not None:
        assert message.startswith(f"{path}:{line}: "), message
    assert problem in message, message
    assert not (tmp_path / "ws").exists()  # nothing touched


CLI_SAMPLE = ["unhashable-key", "nul-in-string", "400-digit-int", "huge-retries", "nan-timeout",
              "300-char-name", "name-with-newline", "int-12abc", "timestamp-nonsense",
              "utf16", "nul-filled", "bad-utf8", "deep-flow", "chain-cycle-3000",
              "billion-laughs", "merge-too-many-keys", "path-newline"]


@pytest.mark.parametrize("name", CLI_SAMPLE)
def test_bad_config_through_the_cli_is_exit_2_and_one_line(tmp_path, name):
    content = dict((c[0], c[1]) for c in CASES)[name]
    path = tmp_path / "config.yaml"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    (tmp_path / "ws").mkdir()
    proc = run_cli("status", "--json", "-w", str(tmp_path / "ws"), "--config", str(path),
                   timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"config error: {path}:")
    assert list((tmp_path / "ws").iterdir()) == []


# ----------------------------------------------------------------------------- edges that load
def test_3000_long_dependency_chain_loads_orders_and_plans_without_recursion(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(chain(3000))
    assert sys.getrecursionlimit() < 3000  # a recursive walk would fail here
    with deadline():
        conf = cfg.load(path, tmp_path / "ws")
        order = conf.order()
        needed = plan.closure(conf.components, ["c0"])
    assert order == [f"c{i}" for i in reversed(range(3000))]
    assert len(needed) == 3000


def test_cycle_in_a_long_chain_names_it_briefly(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(chain(3000, cycle=True))
    message = load_error(path, tmp_path / "ws")
    assert "(2992 more)" in message and len(message) < 400, message


@pytest.mark.parametrize("field, good, bad", [
    ("timeout", [1, 604800, 1.5], [0.5, 604801, -1]),
    ("retries", [0, 100], [101, -1, 1.5]),
    ("retry_backoff", [0, 3600, 0.25], [3601, -0.1]),
    ("check_timeout", [1, 604800], [0, 604801]),
])
def test_component_number_limits_at_their_edges(tmp_path, field, good, bad):
    path = tmp_path / "config.yaml"
    for value in good:
        path.write_text(COMP + f"  a: {{kind: command, run: x, {field}: {value}}}\n")
        conf = cfg.load(path, tmp_path / "ws")
        got = conf.components["a"].spec[field] if field == "check_timeout" else \
            getattr(conf.components["a"], field)
        assert got == value
    for value in bad:
        path.write_text(COMP + f"  a: {{kind: command, run: x, {field}: {value}}}\n")
        assert f"'{field}' must be" in load_error(path, tmp_path / "ws")


def test_other_limits_at_their_edges(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(HEAD + "http: {port: 0}\nagent: {poll: 0.05, marker_debounce: 0}\n"
                    "health: {report_max_size: 1 KiB, checks: {disk: {timeout: 0.05}}}\n"
                    "components:\n  " + "a" * 64 + ": {kind: command, run: x}\n")
    conf = cfg.load(path, tmp_path / "ws")
    assert conf.http["port"] == 0 and conf.agent["poll"] == 0.05
    assert "a" * 64 in conf.components
    for text, problem in [("agent: {poll: 0.04}\n", "'poll' must be > 0"),
                          ("agent: {poll: 3601}\n", "'poll' must be > 0"),
                          ("health: {report_max_size: 1000 B}\n", "'report_max_size'"),
                          ("components:\n  " + "a" * 65 + ": {kind: command, run: x}\n",
                           "at most 64 characters")]:
        path.write_text(HEAD + text)
        assert problem in load_error(path, tmp_path / "ws")


def test_a_long_bad_value_is_shown_cut_short(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(COMP + "  a: {kind: command, run: x, timeout: " + "z" * 10000 + "}\n")
    message = load_error(path, tmp_path / "ws")
    assert "'timeout' must be" in message and len(message) < 250, message


def test_config_error_is_always_one_line():
    err = ConfigError("f.yaml:3: component 'a\nb': bad\r\x1b[31mvalue\u2028" + "x" * 5000)
    text = str(err)
    assert text.isprintable() and "\\n" in text and "\\x1b" in text
    assert len(text) == ConfigError.MAX_LEN and text.endswith("...")


# ----------------------------------------------------------------------------- files and places
def test_config_paths_that_are_not_yaml_files(tmp_path):
    ws = tmp_path / "ws"
    folder = tmp_path / "folder"
    folder.mkdir()
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it for reading would block forever
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 120_000)
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling.yaml"
    dangling.symlink_to(tmp_path / "nowhere")
    cases = [(folder, "is a directory"), (fifo, "is not a regular file"),
             (Path("/dev/zero"), "is not a regular file"), (big, "larger than 1024 KiB"),
             (loop, "cannot read config file"), (dangling, "not found"),
             (tmp_path / "missing.yaml", "not found"),
             (tmp_path / "file.yaml" / "below", "not found")]
    (tmp_path / "file.yaml").write_text("{}\n")
    for path, problem in cases:
        message = load_error(path, ws)
        assert message.startswith(f"{path}: ") and problem in message, message


def test_empty_and_comment_only_files_are_empty_configs(tmp_path):
    for text in ("", "# nothing\n", "\ufeff# a UTF-8 BOM is fine\n"):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        assert cfg.load(path, tmp_path / "ws").components == {}


@pytest.mark.parametrize("overlay, problem", [
    ("dir", "is a directory"),
    ((HEAD + "components: {}\n").encode("utf-16"), "UTF-16"),
    ('workspace: "/tmp/w\\0"\n', "contains a NUL character"),
    ("components: {? [a]\n  : x}\n", "a key must be text"),
    ("agent: {backoff_max: .nan}\n", "'backoff_max' must be"),
], ids=["directory", "utf16", "nul-workspace", "unhashable", "nan"])
def test_bad_overlay_is_one_line_naming_the_overlay(tmp_path, overlay, problem):
    ws = tmp_path / "ws"
    ws.mkdir()
    base = tmp_path / "config.yaml"
    base.write_text(HEAD + "components: {}\n")
    target = ws / "pod-agent.yaml"
    if overlay == "dir":
        target.mkdir()
    else:
        (target.write_bytes if isinstance(overlay, bytes) else target.write_text)(overlay)
    message = load_error(base, ws)
    assert message.startswith(f"{target}") and problem in message, message


def test_bad_workspace_values(tmp_path):
    base = tmp_path / "config.yaml"
    base.write_text(HEAD + "components: {}\n")
    for workspace, problem in [("/tmp/a\0b", "control character"),
                               ("/tmp/" + "w" * 300, "at most 255 bytes"),
                               ("/tmp/" + "w/" * 2100, "at most 4095 bytes"),
                               ("/tmp/a\nb", "control character"),
                               ("~nosuchuser/ws", "cannot expand '~': no such user")]:
        message = load_error(base, workspace)
        assert message.startswith("workspace ") and problem in message, message
    base.write_text(HEAD + 'workspace: "/tmp/\\x1b"\n')
    assert "control character" in load_error(base, None)


def test_bad_environment_values_through_the_cli(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for env, problem in [({"POD_AGENT_CONFIG": str(folder)}, "is a directory"),
                         ({"POD_AGENT_CONFIG": str(tmp_path / ("x" * 5000))}, "at most 4095 bytes"),
                         ({"POD_AGENT_WORKSPACE": "/tmp/" + "w" * 300}, "at most 255 bytes")]:
        proc = run_cli("status", env=env, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
        assert proc.stderr.startswith("config error: ") and problem in proc.stderr, proc.stderr


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "-inf", "abc", "1e9", "0.01", ""])
def test_run_poll_must_be_a_sensible_number_of_seconds(tmp_path, value):
    proc = run_cli("run", "--poll", value, "-w", str(tmp_path / "ws"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("config error: --poll must be a number of seconds from 0.05 "
                                  "to 3600")
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "ws").exists()


def test_merge_keys_follow_yaml_explicit_keys_win_first_merged_wins(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(HEAD + "components:\n"
                    "  a: &base {kind: command, run: x, timeout: 10, retries: 2}\n"
                    "  b: {<<: *base, timeout: 20}\n"
                    "  c: {<<: [{retries: 5}, *base]}\n")
    conf = cfg.load(path, tmp_path / "ws")
    assert (conf.components["b"].timeout, conf.components["b"].retries) == (20, 2)
    assert (conf.components["c"].timeout, conf.components["c"].retries) == (10, 5)
