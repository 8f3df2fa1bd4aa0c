"""Bad config: a generated corpus of hostile configurations (hypothesis, seeded and
derandomized). Goal: 0 exit-3, 0 tracebacks, 0 hangs, every error one line.

Each case builds a config file (and sometimes an overlay `<workspace>/pod-agent.yaml`, or bad
POD_AGENT_CONFIG / POD_AGENT_WORKSPACE values) by mutating a valid one - config/default.yaml
plus an `agent:` section with every field and one more component of the kinds the default lacks,
so every field of every section is a target - or by generating YAML text. The classes:

- value / container: any field (or whole section, component, list) replaced by a hostile value:
  nan, inf, 10**400, negative numbers, bools, None, lists, mappings, NUL, lone surrogates,
  newlines, 300-character strings, bytes (!!binary), dates, sets, very long paths;
- number: a number field set to nan, +-inf, huge, negative, zero, tiny or any float/integer;
- name: a component renamed to a long, multi-line, NUL, non-identifier or random name;
- key: a key that is not text inserted anywhere (`? [a, b]`, `[1]: x`, `{a: 1}: x`, `null: x`);
- tag: a value replaced by a tagged scalar or node (`!!int 12abc`, `!!python/object`,
  `!!binary` garbage, `!!timestamp` nonsense, `!!set`, `!!omap`, unknown local tags ...);
- encoding: UTF-16/UTF-32, NUL-filled, bytes that are not UTF-8, NUL or control characters
  inserted, a UTF-8 BOM and CRLF line ends (both valid), truncation;
- nesting: flow, block and `- - -` nesting up to 6,000 deep placed as any field's value;
- chain: `depends_on` chains up to 4,000 long, with or without a cycle, fan-in, self-references;
- alias: billion laughs (levels x fan-out), recursive and undefined aliases, a long string
  aliased a thousand times, `<<` merges;
- file: a directory, a FIFO, a 1 MiB+ file, /dev/zero, /dev/null, missing, below a file, a symlink
  loop, dangling, empty, comments only;
- overlay: the classes above applied to the overlay instead, and the overlay as a special file;
- text: random YAML-ish text and random lines made of schema keys and hostile scalars;
- env: POD_AGENT_CONFIG and POD_AGENT_WORKSPACE with bad values (no flags given).

Each case runs `agent.config.load` in-process under a deadline (a hang fails the case); every
10th also runs the real CLI (`python -m agent status --json`). A case passes when: the load
ends with a ConfigError or a Config, nothing else (crash otherwise); the error is one line that
starts with the file it is about and, for content errors, names the line; an accepted config
keeps every limit (finite numbers in range, plain names of at most 64 characters, paths the
kernel takes, no NUL anywhere) and orders and plans without recursion (a lie otherwise); the
CLI exits 0, 1 or 2 (never 3), prints no traceback, and a config error is exactly one stderr
line, in agreement with the in-process result.

Size: about 110 cases in CI (8 per class), about 630 with POD_AGENT_RELIABILITY=full (50 per
class; hypothesis stops early for a class with fewer distinct cases, such as `file`).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import re
import shutil
import signal
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import config as cfg
from agent import plan
from agent.model import Config, ConfigError
from tests.helpers import ROOT, run_cli
from tests.reliability.conftest import size

SUITE = "bad config"
CASE_DEADLINE = 20.0  # seconds for one in-process load; a load takes ~0.05 s (4,000-chain: ~1 s)
CLI_EVERY = 10


# ----------------------------------------------------------------------------- the valid base
def _base() -> dict:
    data = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())
    data["agent"] = {k: default for k, (typ, default) in cfg.AGENT_FIELDS.items()}
    data["components"]["extra_cmd"] = {
        "kind": "command", "run": "true", "check": "true", "check_timeout": 30,
        "cwd": "{workspace}/extra", "env": {"EXTRA": "1"}, "version_cmd": "echo 1",
        "timeout": 60, "retries": 2, "retry_backoff": 1, "log": "{workspace}/extra.log",
        "description": "more fields", "depends_on": ["comfyui_core"], "enabled": True}
    data["components"]["extra_nodes"] = {
        "kind": "nodes", "dest": "{comfyui}/custom_nodes", "depth": 1, "update": False,
        "requirements": "none", "depends_on": ["comfyui_core"],
        "nodes": ["file:///upstream/node-a",
                  {"repo": "file:///upstream/node-b", "ref": "main", "name": "node_b",
                   "enabled": False}]}
    return data


BASE = _base()
OVERLAY_BASE = {"comfyui": {"args": ["--listen", "127.0.0.1", "--port", "8188"]},
                "agent": {"reconcile_interval": 60},
                "components": {"ffmpeg_source": {"enabled": False},
                               "mine": {"kind": "command", "run": "true", "timeout": 30,
                                        "depends_on": ["comfyui_core"]}}}


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indexes) into `data`, containers included."""
    out, stack = [], [(data, prefix)]
    while stack:
        node, path = stack.pop()
        if path:
            out.append(path)
        items = node.items() if isinstance(node, dict) else \
            enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            stack.append((v, path + (k,)))
    return sorted(out, key=repr)


def _get(data: Any, path: tuple) -> Any:
    for k in path:
        data = data[k]
    return data


def _set(data: Any, path: tuple, value: Any) -> None:
    _get(data, path[:-1])[path[-1]] = value


def _copy(data: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(data))


ALL_PATHS = _paths(BASE)
LEAVES = [p for p in ALL_PATHS if not isinstance(_get(BASE, p), (dict, list))]
NUMBERS = [p for p in LEAVES if isinstance(_get(BASE, p), (int, float))
           and not isinstance(_get(BASE, p), bool)] + [("agent", "poll"),
                                                        ("health", "checks", "comfyui_process",
                                                         "max_rss_gb")]


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=False, width=10 ** 6)


PLACEHOLDER = "XPLACEHOLDERX"


def with_snippet(data: dict, path: tuple, snippet: str) -> str:
    """The config with the value at `path` replaced by raw YAML text (a tag, a nested flow)."""
    data = _copy(data)
    _set(data, path, PLACEHOLDER)
    return dump(data).replace(PLACEHOLDER, snippet, 1)


# ----------------------------------------------------------------------------- hostile values
SPECIAL = [math.nan, math.inf, -math.inf, -1, 0, 10 ** 400, -(10 ** 400), 2 ** 63, 1e308, 1e-300,
           True, False, None, "", " ", "x" * 300, "a\nb", "a\rb", "a\0b", "\0", "\ud800",
           "\x1b[31m", "\u2028", b"\x00\xff", b"", datetime.date(2020, 1, 1),
           datetime.datetime(2020, 1, 1, 1, 1), [], {}, [1, [2, [3]]], {"k": [None]},
           {"kind": "git"}, {1, 2}, "{workspace}" * 40, "../" * 1500, "/" + "d" * 300,
           "é" * 100, "-" * 64, "--help", "~", "~nobody/x", "~nosuchuser/x", "*", "&a", "!!int 1"]
hostile = st.one_of(
    st.sampled_from(SPECIAL), st.integers(), st.floats(), st.text(max_size=80),
    st.binary(max_size=16), st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
hostile_number = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 10 ** 400, -(10 ** 400), 10 ** 19, -1, 0,
                     1e-9, 0.04, 1e12, 65536, 604801, 101, 3601, True, "10", "1e3", None]),
    st.floats(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70))
hostile_name = st.one_of(
    st.sampled_from(["a" * 65, "a" * 300, "b" * 5000, "a\n", "\na", "a\nb", "1abc", "a-b", "",
                     " ", "a\0", "a b", "é", "a.b", "None", "true", "_", "A" * 64, "ab\u2028",
                     "a\t", "../x", "x/y"]),
    st.text(max_size=100))
KEY_SNIPPETS = ["? [a, b]\n{ind}: x", "[1]: x", "{{a: 1}}: x", "null: x", "1: x", "true: x",
                "2020-01-01: x", '"a\\0": x', '"\\ud800": x', "? !!binary AAAA\n{ind}: x",
                "? !!set {{a}}\n{ind}: x", "? [[[[a]]]]\n{ind}: x", "~: x", "1.5: x",
                '"{long}": x', "? |\n{ind}  multi\n{ind}  line\n{ind}: x"]
TAG_SNIPPETS = [
    "!!int 12abc", "!!int ''", "!!int 0x", "!!int 0b2", "!!int 1_", "!!float abc", "!!float ''",
    "!!float .nan", "!!float -.inf", "!!timestamp nonsense", "!!timestamp 2020-13-45",
    "!!timestamp 2020-01-01T99:99:99", "!!binary '@@@'", "!!binary 'AAA'", "!!binary AAAA",
    "!!bool maybe", "!!null x", "!!str [a]", "!!map [a]", "!!seq {a: 1}", "!!set [a]",
    "!!set {a, b}", "!!omap {a: 1}", "!!omap [a]", "!!omap [{a: 1}]", "!!pairs [a]",
    "!!pairs [{a: 1, b: 2}]", "!!merge x", "!!value x", "!!python/object:os.system {}",
    "!!python/object/apply:os.system ['true']", "!!python/name:os.system ''",
    "!!python/tuple [1, 2]", "!<tag:yaml.org,2002:int> x", "!custom x", "!! x", "!x!y z",
    "!<!> x", "!!int 1" + "0" * 5000]
tag_text = st.text(alphabet=string.ascii_letters + string.digits + "-:.+_ ", max_size=20)
YAML_CHARS = "{}[]:,-?&*!|>'\"#%@`\\ \n\t.abc019_=~<+"


def nested(kind: str, n: int) -> str:
    if kind == "flow-seq":
        return "[" * n + "]" * n
    if kind == "flow-map":
        return "{a: " * n + "1" + "}" * n
    if kind == "dash":
        return "\n" + "- " * n + "x"  # block sequences nested on one line
    return "{" + "[" * (n // 2) + "]" * (n // 2) + "}"


def chain_text(n: int, cycle: bool, fan: bool, self_dep: bool, unknown: bool) -> str:
    lines = ["installer: pip", "comfyui: {venv: null, python: /usr/bin/python3}", "components:"]
    for i in range(n):
        deps = []
        if i + 1 < n:
            deps.append(f"c{i + 1}")
        elif cycle:
            deps.append("c0")
        if fan and i > 1:
            deps.append(f"c{(i * 7919) % i}")
        if self_dep and i == n // 2:
            deps.append(f"c{i}")
        if unknown and i == n - 1:
            deps.append("nosuch")
        lines.append(f"  c{i}: {{kind: command, run: x, depends_on: [{', '.join(deps)}]}}")
    return "\n".join(lines) + "\n"


def laughs_text(levels: int, fan: int, where: str) -> str:
    rows = [f"  L0: &L0 [{', '.join(['lol'] * fan)}]"]
    for i in range(1, levels):
        rows.append(f"  L{i}: &L{i} [{', '.join([f'*L{i - 1}'] * fan)}]")
    head = "installer: pip\ncomfyui: {venv: null, python: /usr/bin/python3}\n"
    if where == "env":
        return head + "installer_env:\n" + "\n".join(rows) + "\n"
    if where == "args":
        return head + "x_anchors:\n" + "\n".join(rows) + f"\ninstaller_args: *L{levels - 1}\n"
    items = ["      - " + r.split(": ", 1)[1] for r in rows]  # the anchors as list items
    return head + "components:\n  c:\n    kind: pip\n    packages:\n" + "\n".join(items) + "\n"


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    cls: str
    what: str
    config: bytes | str | None = None  # text/bytes, or "<dir>", "<fifo>", ... (special files)
    overlay: bytes | str | None = None
    env: dict = field(default_factory=dict)  # only with the env class: no --config/-w given
    content: bool = True  # a content error must name its line


SPECIAL_FILES = ["<dir>", "<fifo>", "<big>", "<devzero>", "<devnull>", "<missing>",
                 "<below-file>", "<loop>", "<dangling>", "<empty>", "<comments>"]


@st.composite
def mutated_text(draw, cls: str, base: dict) -> tuple[str | bytes, str]:
    """A mutation of `base` of class `cls`: (file content, description)."""
    paths = _paths(base)
    leaves = [p for p in paths if not isinstance(_get(base, p), (dict, list))]
    if cls == "value":
        path = draw(st.sampled_from(leaves))
        value = draw(hostile)
        data = _copy(base)
        _set(data, path, value)
        return dump(data), f"{'.'.join(map(str, path))} = {value!r:.60}"
    if cls == "container":
        path = draw(st.sampled_from(paths))
        value = draw(hostile)
        data = _copy(base)
        _set(data, path, value)
        return dump(data), f"{'.'.join(map(str, path))} = {value!r:.60}"
    if cls == "number":
        numbers = [p for p in leaves if isinstance(_get(base, p), (int, float))
                   and not isinstance(_get(base, p), bool)] or leaves
        path = draw(st.sampled_from(numbers if base is not BASE else NUMBERS))
        value = draw(hostile_number)
        data = _copy(base)
        _set(data, path, value)
        return dump(data), f"{'.'.join(map(str, path))} = {value!r:.60}"
    if cls == "name":
        old = draw(st.sampled_from(list(base["components"])))
        new = draw(hostile_name)
        data = _copy(base)
        data["components"] = {(new if k == old else k): v for k, v in data["components"].items()}
        return dump(data), f"component {old} renamed {new!r:.60}"
    if cls == "key":
        text = dump(base).splitlines()
        candidates = [i for i, line in enumerate(text) if re.match(r"^ *[A-Za-z_]\w*:", line)]
        at = draw(st.sampled_from(candidates))
        ind = " " * (len(text[at]) - len(text[at].lstrip()))
        snippet = draw(st.sampled_from(KEY_SNIPPETS)).format(ind=ind, long="k" * 400)
        text.insert(at, ind + snippet)
        return "\n".join(text) + "\n", f"key {snippet!r:.60} before line {at + 1}"
    if cls == "tag":
        path = draw(st.sampled_from(leaves))
        snippet = draw(st.one_of(st.sampled_from(TAG_SNIPPETS), st.builds(
            lambda tag, text: f"!!{tag} {json.dumps(text)}",
            st.sampled_from(["int", "float", "timestamp", "binary", "bool", "null", "str"]),
            tag_text)))
        return with_snippet(base, path, snippet), f"{'.'.join(map(str, path))}: {snippet:.60}"
    if cls == "encoding":
        text = dump(base)
        raw = text.encode()
        how = draw(st.sampled_from(["utf16", "utf16-le", "utf16-be", "utf32", "latin1",
                                    "byte", "nul", "nul-filled", "control", "bom8", "crlf",
                                    "truncate", "cp1252"]))
        pos = draw(st.integers(0, len(raw)))
        if how == "utf16":
            return text.encode("utf-16"), how
        if how in ("utf16-le", "utf16-be"):
            return text.encode(how.replace("16-", "-16-")), how
        if how == "utf32":
            return text.encode("utf-32"), how
        if how in ("latin1", "cp1252"):
            return text.replace("comfyui", "comfyüi€" if how == "cp1252" else "comfyüi", 1) \
                .encode(how if how == "cp1252" else "latin-1"), how
        if how == "byte":
            byte = draw(st.integers(0x80, 0xFF))
            return raw[:pos] + bytes([byte]) + raw[pos:], f"byte 0x{byte:02x} at {pos}"
        if how == "nul":
            return raw[:pos] + b"\0" + raw[pos:], f"NUL at {pos}"
        if how == "nul-filled":
            return b"\0" * draw(st.integers(1, 70000)), how
        if how == "control":
            char = draw(st.sampled_from(["\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b",
                                         "\x7f", "\x9b", "\ufffe", "\uffff"]))
            return text[:pos] + char + text[pos:], f"{char!r} at {pos}"
        if how == "bom8":
            return b"\xef\xbb\xbf" + raw, how
        if how == "crlf":
            return raw.replace(b"\n", b"\r\n"), how
        return raw[:pos], f"truncated at {pos}"
    if cls == "nesting":
        path = draw(st.sampled_from(leaves))
        kind = draw(st.sampled_from(["flow-seq", "flow-map", "dash", "mixed"]))
        n = draw(st.one_of(st.integers(20, 40), st.integers(40, 6000)))
        if kind == "dash":
            data = _copy(base)
            _set(data, path, PLACEHOLDER)
            text = dump(data)
            line = next(x for x in text.splitlines() if PLACEHOLDER in x)
            ind = len(line) - len(line.lstrip()) + 2
            return text.replace(PLACEHOLDER, "\n" + " " * ind + "- " * n + "x", 1), \
                f"{'.'.join(map(str, path))}: {kind} x{n}"
        return with_snippet(base, path, nested(kind, n)), f"{'.'.join(map(str, path))}: " \
                                                          f"{kind} x{n}"
    raise AssertionError(cls)


@st.composite
def cases(draw, cls: str) -> Case:
    if cls in ("value", "container", "number", "name", "key", "tag", "encoding", "nesting"):
        content, what = draw(mutated_text(cls, BASE))
        return Case(cls, what, config=content)
    if cls == "chain":
        n = draw(st.one_of(st.integers(2, 50), st.integers(1000, 4000)))
        flags = draw(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()))
        return Case(cls, f"chain of {n} cycle/fan/self/unknown={flags}",
                    config=chain_text(n, *flags))
    if cls == "alias":
        how = draw(st.sampled_from(["laughs", "recursive", "undefined", "long-string", "merge",
                                    "self-merge", "duplicate-anchor"]))
        head = "installer: pip\ncomfyui: {venv: null, python: /usr/bin/python3}\n"
        if how == "laughs":
            levels, fan = draw(st.integers(2, 12)), draw(st.integers(2, 12))
            where = draw(st.sampled_from(["env", "args", "packages"]))
            return Case(cls, f"laughs {levels}x{fan} in {where}",
                        config=laughs_text(levels, fan, where))
        if how == "recursive":
            return Case(cls, how, config=head + draw(st.sampled_from(
                ["x: &a [*a]\n", "x: &a {b: *a}\n", "components: &c {a: *c}\n",
                 "installer_args: &a [1, [2, *a]]\n"])))
        if how == "undefined":
            return Case(cls, how, config=head + "installer_args: [*nope]\n")
        if how == "long-string":
            n = draw(st.integers(100, 3000))
            return Case(cls, f"{how} x{n}", config=head + "installer_env: {A: &s " + "s" * 10000
                        + "}\ninstaller_args: [" + ", ".join(["*s"] * n) + "]\n")
        if how == "merge":
            k = draw(st.integers(1, 8))
            return Case(cls, f"{how} {k}", config=head + "x_base: &b {kind: command, run: x}\n"
                        "components:\n" + "".join(f"  c{i}: {{<<: *b, timeout: {i + 1}}}\n"
                                                  for i in range(k)))
        if how == "self-merge":
            return Case(cls, how, config=head + "components: &c {<<: *c}\n")
        return Case(cls, how, config=head + "a: &x 1\nb: &x 2\ninstaller_args: [*x]\n")
    if cls == "file":
        return Case(cls, draw(st.sampled_from(SPECIAL_FILES)), content=False,
                    config=None)
    if cls == "overlay":
        if draw(st.booleans()):
            special = draw(st.sampled_from(SPECIAL_FILES))
            return Case(cls, f"overlay {special}", overlay=special, content=False)
        sub = draw(st.sampled_from(["value", "container", "number", "name", "key", "tag",
                                    "encoding", "nesting"]))
        content, what = draw(mutated_text(sub, OVERLAY_BASE))
        return Case(cls, f"overlay {sub}: {what}", overlay=content)
    if cls == "text":
        if draw(st.booleans()):
            text = draw(st.text(alphabet=YAML_CHARS, max_size=300))
        else:
            keys = list(cfg.TOP_FIELDS) + list(cfg.AGENT_FIELDS) + list(cfg.COMMON_FIELDS) + [
                "components", "kind", "nodes", "repo", "checks", "-", "? ", "<<"]
            scalars = ["", "1", "-1", ".nan", "[", "]", "{", "}", "&a", "*a", "!!int x", "|",
                       ">", "'", '"', "~", "[a, b]", "{a: 1}", "git", "command", "- x"]
            lines = draw(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(keys),
                                            st.sampled_from(scalars)), max_size=40))
            text = "".join(" " * i + f"{k}: {v}\n" for i, k, v in lines)
        return Case(cls, f"text {text!r:.60}", config=text)
    if cls == "env":
        which = draw(st.sampled_from(["POD_AGENT_CONFIG", "POD_AGENT_WORKSPACE"]))
        value = draw(st.sampled_from(["<dir>", "<fifo>", "<missing>", "<long>", "<part>",
                                      "<below-file>", "<relative>", "<tilde>", "<dots>"]))
        return Case(cls, f"{which}={value}", env={which: value}, content=False)
    raise AssertionError(cls)


# ----------------------------------------------------------------------------- running a case
def make_special(path: Path, kind: str) -> None:
    if kind == "<dir>":
        path.mkdir()
    elif kind == "<fifo>":
        os.mkfifo(path)
    elif kind == "<big>":
        path.write_text("# padding\n" * 110_000)  # 1.1 MB
    elif kind == "<devzero>":
        path.symlink_to("/dev/zero")
    elif kind == "<devnull>":
        path.symlink_to("/dev/null")
    elif kind == "<below-file>":
        pass  # the caller uses <file>/below
    elif kind == "<loop>":
        path.symlink_to(path)
    elif kind == "<dangling>":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "<empty>":
        path.write_text("")
    elif kind == "<comments>":
        path.write_text("# only a comment\n\n   \n")
    elif kind != "<missing>":
        raise AssertionError(kind)


def write(folder: Path, name: str, content: bytes | str | None) -> Path:
    path = folder / name
    if content is None:
        content = dump(BASE)
    if isinstance(content, str) and content.startswith("<") and content.endswith(">") \
            and content in SPECIAL_FILES:
        if content == "<below-file>":
            (folder / "a-file").write_text("{}\n")
            return folder / "a-file" / name
        make_special(path, content)
        return path
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogatepass")
    path.write_bytes(content)
    return path


def env_value(folder: Path, value: str) -> str:
    return {"<dir>": str(folder / "a-dir"), "<fifo>": str(folder / "a-fifo"),
            "<missing>": str(folder / "missing"), "<long>": str(folder / ("x" * 5000)),
            "<part>": str(folder / ("p" * 300)), "<below-file>": str(folder / "a-file" / "x"),
            "<relative>": "relative/dir", "<tilde>": "~nosuchuser/x",
            "<dots>": str(folder / "a" / ".." / ".." / "ws")}[value]


class Deadline(Exception):
    pass


def _alarm(signum, frame):
    raise Deadline()


def load_in_process(case: Case, folder: Path) -> tuple[str, Any, float]:
    """("ok", Config) | ("config error", message) | ("crash", description)."""
    ws = folder / "ws"
    ws.mkdir()
    saved = {k: os.environ.get(k) for k in ("POD_AGENT_CONFIG", "POD_AGENT_WORKSPACE")}
    if case.env:
        (folder / "a-dir").mkdir()
        os.mkfifo(folder / "a-fifo")
        (folder / "a-file").write_text("{}\n")
        for k, v in case.env.items():
            os.environ[k] = env_value(folder, v)
        if "POD_AGENT_WORKSPACE" in case.env:
            os.environ["POD_AGENT_CONFIG"] = str(write(folder, "config.yaml", None))
        else:
            os.environ["POD_AGENT_WORKSPACE"] = str(ws)
        args: tuple = (None, None)
    else:
        config = write(folder, "config.yaml", case.config)
        if case.overlay is not None:
            write(ws, "pod-agent.yaml", case.overlay)
        args = (config, ws)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_DEADLINE)
    started = time.monotonic()
    cwd = os.getcwd()
    os.chdir(folder)  # relative paths stay inside the case's folder
    try:
        result: tuple[str, Any] = ("ok", cfg.load(*args))
    except ConfigError as exc:
        result = ("config error", str(exc))
    except Deadline:
        result = ("crash", f"hang: still loading after {CASE_DEADLINE}s")
    except BaseException as exc:  # noqa: BLE001 - anything else is the crash we look for
        if isinstance(exc, KeyboardInterrupt):
            raise
        result = ("crash", f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return result[0], result[1], time.monotonic() - started


def error_problem(case: Case, folder: Path, message: str) -> str | None:
    """Why a config error message breaks the rules, or None."""
    if "\n" in message or "\r" in message or not message.isprintable():
        return "the error is not one printable line"
    files = [str(folder / "config.yaml"), str(folder / "ws" / "pod-agent.yaml"),
             str(folder / "a-file"), str(folder / "a-dir"), str(folder / "a-fifo"),
             str(folder / "missing"), "relative/", "~nosuchuser/", "'", "workspace "]
    if not any(message.startswith(f) for f in files) and not message.startswith("/"):
        return "the error does not start with the file it is about"
    if case.content and not re.match(r"^[^:]+:\d+: ", message):
        return "the error does not name the line"
    return None


def walk_values(conf: Config):
    stack = [conf.__dict__, conf.comfyui.__dict__] + [c.__dict__ for c in
                                                      conf.components.values()]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
        else:
            yield node


def config_problem(conf: Config) -> str | None:
    """Why an accepted Config breaks a limit, or None."""
    for value in walk_values(conf):
        if isinstance(value, float) and not math.isfinite(value):
            return f"accepted a non-finite number {value}"
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10 ** 9:
            return f"accepted a huge number {value}"
        if isinstance(value, str) and re.search("[\0\ud800-\udfff]", value):
            return f"accepted a string with NUL or a surrogate {value!r:.60}"
        if isinstance(value, Path):
            problem = cfg._path_problem(str(value))
            if problem:
                return f"accepted a bad path: {problem}"
    for name, comp in conf.components.items():
        if not (cfg.NAME_RE.fullmatch(name) and len(name) <= cfg.MAX_NAME):
            return f"accepted the component name {name!r:.60}"
        for key, rng in cfg.COMPONENT_LIMITS.items():
            value = comp.spec.get(key) if key in ("check_timeout", "depth") else \
                getattr(comp, key)
            if value is not None and not rng.lo <= value <= rng.hi:
                return f"accepted {name}.{key} = {value}"
    sections = [(conf.agent, cfg.AGENT_LIMITS), (conf.health, cfg.HEALTH_LIMITS)] + [
        (check, cfg.CHECK_LIMITS) for check in conf.health.get("checks", {}).values()]
    for values, limits in sections:
        for key, rng in limits.items():
            value = values.get(key)
            if value is not None and not (rng.lo <= value <= rng.hi
                                          and (value > 0 or not rng.positive)):
                return f"accepted {key} = {value}"
    if not 1 <= conf.comfyui.port <= 65535 or not 0 <= conf.http["port"] <= 65535:
        return "accepted a port out of range"
    order = conf.order()
    if sorted(order) != sorted(conf.components):
        return "order() lost components"
    plan.closure(conf.components, list(conf.components))
    return None


def run_cli_check(case: Case, folder: Path, outcome: str) -> str | None:
    """Run the real CLI on the same case; why it breaks the rules, or None."""
    ws = folder / "ws"
    if case.env:
        env = {k: env_value(folder, v) for k, v in case.env.items()}
        if "POD_AGENT_WORKSPACE" in case.env:
            env["POD_AGENT_CONFIG"] = str(folder / "config.yaml")
        else:
            env["POD_AGENT_WORKSPACE"] = str(ws)
        args: list[str] = []
    else:
        config = folder / "config.yaml" if case.config != "<below-file>" else \
            folder / "a-file" / "config.yaml"
        args, env = ["-w", str(ws), "--config", str(config)], {}
    try:
        proc = run_cli("status", "--json", *args, env=env, timeout=120, cwd=folder)
    except Exception as exc:  # noqa: BLE001 - subprocess.TimeoutExpired: a hang
        return f"CLI: {type(exc).__name__}"
    out = proc.stdout + proc.stderr
    if proc.returncode not in (0, 1, 2):
        return f"CLI exit {proc.returncode}: {proc.stderr.strip()[:200]}"
    if "Traceback" in out:
        return "CLI printed a traceback"
    if proc.returncode == 2:
        lines = proc.stderr.splitlines()
        if len(lines) != 1 or not lines[0].startswith("config error: "):
            return f"CLI config error is not one line: {proc.stderr[:200]!r}"
    if (proc.returncode == 2) != (outcome == "config error"):
        return f"CLI exit {proc.returncode} but in-process {outcome}: {proc.stderr[:200]!r}"
    if proc.returncode in (0, 1):
        try:
            json.loads(proc.stdout)
        except ValueError:
            return f"CLI exit {proc.returncode} without a JSON status: {proc.stderr[:200]!r}"
    return None


COUNTER = itertools.count()
CLASSES = ["value", "container", "number", "name", "key", "tag", "encoding", "nesting", "chain",
           "alias", "file", "overlay", "text", "env"]
PER_CLASS = size(8, 50)


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_config_corpus(cls, tmp_path, tally):
    seen: list[str] = []

    @settings(max_examples=PER_CLASS, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases(cls))
    def one(case: Case) -> None:
        number = next(COUNTER)
        folder = tmp_path / f"case{number}"
        folder.mkdir()
        try:
            outcome, value, took = load_in_process(case, folder)
            problem = None
            crash = outcome == "crash"
            if crash:
                problem = value
            elif outcome == "config error":
                problem = error_problem(case, folder, value)
            else:
                problem = config_problem(value)
            if problem is None and number % CLI_EVERY == 0:
                problem = run_cli_check(case, folder, outcome)
                crash = problem is not None and ("exit 3" in problem or "traceback" in problem
                                                 or "Timeout" in problem)
            note = f"{case.cls}: {case.what}: {problem} ({outcome}: {str(value)[:120]!r})"
            seen.append(outcome)
            assert tally.case(SUITE, crash=crash, lie=problem is not None and not crash,
                              note=note), note
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    one()
    assert len(seen) >= min(PER_CLASS, 4), seen  # hypothesis really ran the cases
