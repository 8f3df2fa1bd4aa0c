"""`download` components: model files fetched into ComfyUI's models tree, resumed and verified.

One file (`url` or `repo`/`file`/`revision`, with `dest`, `sha256`, `size`, `token_env`) or a
list of them in `files:` (each item takes the same keys; the component's own values are the
items' defaults). The engine is agent/download.py; this module is the component contract:
validate, inputs (fingerprinted into the marker, never the token), a cheap probe (each file
exists with its recorded size), install (parallel, progress, space checked first).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import unquote, urlsplit

from agent import download as dl  # attributes read at call time: agent.download imports
# agent.kinds.base, which imports this package (a cycle at import time otherwise)
from agent.kinds.base import Ctx, Problem
from agent.model import Component, Marker, State

if TYPE_CHECKING:
    from agent.download import Item

FIELDS = {
    "url": ("opt_str", None),
    "repo": ("opt_str", None),
    "file": ("opt_str", None),
    "revision": ("str", "main"),
    "dest": ("opt_str", None),
    "filename": ("opt_str", None),
    "sha256": ("opt_str", None),
    "size": ("any", None),  # checked here: a model has more bytes than the generic limit
    "token_env": ("opt_str", None),
    "gated": ("bool", False),
    "files": ("any", None),
    "parallel": ("int", 3),
    "progress_interval": ("float", 30.0),
}
ITEM_KEYS = ("url", "repo", "file", "revision", "dest", "filename", "sha256", "size",
             "token_env", "gated")
RESTART_COMFYUI = False  # ComfyUI lists model files when asked: a new file needs no restart
# It draws its own progress bar on a terminal (Display): a CLI spinner for the same step would
# redraw the same line (agent/cli_core.py's Reporter can skip its spinner for such a kind).
OWN_PROGRESS = True

_SHA_RE = re.compile(r"[0-9a-fA-F]{64}")
_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _bad(text: str, key: str, index: int | None = None) -> ValueError:
    err = ValueError(text)
    err.key = key  # type: ignore[attr-defined]
    if index is not None:
        err.index = index  # type: ignore[attr-defined]
    return err


def _item(raw: Mapping[str, Any], where: str, key: str, index: int | None,
          expand: Callable[[str], str]) -> Item:
    def text(k: str) -> str | None:
        v = raw.get(k)
        if v is None:
            return None
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise _bad(f"{where}'{k}' must be a string, got {v!r:.60}", key if index is not None
                       else k, index)
        return expand(str(v))

    url, repo, file = text("url"), text("repo"), text("file")
    if bool(url) == bool(repo or file):
        raise _bad(f"{where}give either 'url' or 'repo' and 'file' (a Hugging Face file)",
                   key if index is not None else ("url" if url else "repo"), index)
    if url:
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:
            parts, host = None, None
        if parts is None or parts.scheme.lower() not in ("https", "http") or not host:
            raise _bad(f"{where}'url' must be an https:// (or http://) URL, got {url[:60]!r}",
                       key if index is not None else "url", index)
    if repo is not None or file is not None:
        if not repo or not _REPO_RE.fullmatch(repo):
            raise _bad(f"{where}'repo' must be a Hugging Face repo id such as 'owner/name', "
                       f"got {str(repo)[:60]!r}", key if index is not None else "repo", index)
        if not file or file.startswith("/") or ".." in file.split("/"):
            raise _bad(f"{where}'file' must be a path inside the repo, got {str(file)[:60]!r}",
                       key if index is not None else "file", index)
    sha = text("sha256")
    if sha is not None and not _SHA_RE.fullmatch(sha):
        raise _bad(f"{where}'sha256' must be 64 hex digits, got {sha[:70]!r}",
                   key if index is not None else "sha256", index)
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise _bad(f"{where}'size' must be a whole number of bytes >= 0, got {size!r:.40}",
                   key if index is not None else "size", index)
    token_env = text("token_env")
    if token_env is not None and not _ENV_RE.fullmatch(token_env):
        raise _bad(f"{where}'token_env' must be the name of an environment variable (such as "
                   f"HF_TOKEN), got {token_env[:60]!r}", key if index is not None else
                   "token_env", index)
    gated = raw.get("gated", False)
    if not isinstance(gated, bool):
        raise _bad(f"{where}'gated' must be true or false", key if index is not None
                   else "gated", index)
    name = text("filename") or (file.rsplit("/", 1)[-1] if file else
                                unquote(urlsplit(url or "").path).rsplit("/", 1)[-1])
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise _bad(f"{where}cannot tell the file name from the URL: set 'filename'",
                   key if index is not None else "filename", index)
    dest = text("dest")
    if not dest:
        raise _bad(f"{where}missing 'dest' (a folder under ComfyUI's models tree, such as "
                   "'checkpoints', or an absolute path)", key if index is not None else "dest",
                   index)
    folder = Path(dest).expanduser()
    if not folder.is_absolute():
        folder = Path(expand("{comfyui}")) / "models" / folder
    from agent.config import _path_problem  # the loader's own path limits
    from agent.redact import register, secrets_in_text

    register(*secrets_in_text(url or ""))  # user:password@, ?token=...: masked everywhere

    problem = _path_problem(str(folder / name))
    if problem:
        raise _bad(f"{where}'dest': {problem}", key if index is not None else "dest", index)
    revision = text("revision") or "main"
    if token_env:
        dl.Item(folder / name, token_env=token_env).token()  # registered as a secret now
    return dl.Item(dest=folder / name, url=url, repo=repo, file=file, revision=revision,
                sha256=sha.lower() if sha else None, size=size, token_env=token_env,
                gated=gated)


def validate(values: dict[str, Any], expand: Callable[[str], str]) -> dict[str, Any]:
    files = values.get("files")
    defaults = {k: values.get(k) for k in ITEM_KEYS if values.get(k) is not None}
    items: list[Item] = []
    if files is None:
        items.append(_item(defaults, "", "files", None, expand))
    else:
        if not isinstance(files, list) or not files:
            raise _bad("'files' must be a non-empty list of files (each with 'url' or "
                       "'repo'/'file', and 'dest')", "files")
        for k in ("url", "file", "filename", "sha256", "size"):
            if values.get(k) is not None:
                raise _bad(f"'{k}' belongs to each item of 'files' when 'files' is given", k)
        for i, raw in enumerate(files):
            if not isinstance(raw, dict):
                raise _bad(f"files[{i}]: must be a mapping, got {raw!r:.60}", "files", i)
            unknown = sorted(set(raw) - set(ITEM_KEYS))
            if unknown:
                raise _bad(f"files[{i}]: unknown field {unknown[0]!r} (known: "
                           f"{', '.join(ITEM_KEYS)})", "files", i)
            items.append(_item({**defaults, **raw}, f"files[{i}]: ", "files", i, expand))
    seen: dict[Path, int] = {}
    for i, item in enumerate(items):
        if item.dest in seen:
            raise _bad(f"files[{i}]: {item.dest} is also the destination of "
                       f"files[{seen[item.dest]}]", "files", i)
        seen[item.dest] = i
    if not 1 <= values["parallel"] <= 32:
        raise _bad(f"'parallel' must be a whole number 1-32, got {values['parallel']}",
                   "parallel")
    if not 1 <= values["progress_interval"] <= 3600:
        raise _bad("'progress_interval' must be a number of seconds from 1 to 3600",
                   "progress_interval")
    return {"items": tuple(items), "parallel": values["parallel"],
            "progress_interval": values["progress_interval"]}


def items(comp: Component) -> tuple[Item, ...]:
    return comp.spec["items"]


def inputs(comp: Component, ctx: Ctx) -> dict[str, Any]:
    return {"files": [{"source": it.source, "dest": str(it.dest), "sha256": it.sha256,
                       "size": it.size} for it in items(comp)]}


def record_key(item: Item) -> str:
    """The marker key of one file's record: stable for the same source and destination."""
    return "f_" + hashlib.sha256(f"{item.source}\0{item.dest}".encode()).hexdigest()[:10]


def recorded(marker: Marker | None, item: Item) -> tuple[int | None, str | None]:
    """(size, sha256) the marker recorded for the file, or (None, None)."""
    if marker is None:
        return None, None
    size, _, sha = (marker.meta.get(record_key(item)) or "").partition(" ")
    return (int(size) if size.isdigit() else None), (sha.strip() or None)


def skip_reason(comp: Component, ctx: Ctx) -> str | None:
    """`skipped: HF_TOKEN not set` for a component with a gated file whose token variable is
    empty (and that is not on disk already): not a failure, nothing to do without a token."""
    for it in items(comp):
        if it.gated and it.token_env and not os.environ.get(it.token_env) \
                and not it.dest.is_file():
            return f"skipped: {it.token_env} not set"
    return None


def _file_problem(item: Item, marker: Marker | None) -> str | None:
    try:
        st = item.dest.stat()
    except FileNotFoundError:
        return f"{item.dest} is missing"
    except OSError as exc:
        return f"{item.dest}: {exc.strerror}"
    if not os.path.isfile(item.dest):
        return f"{item.dest} is not a file"
    size = recorded(marker, item)[0] if marker is not None else None
    size = size if size is not None else item.size
    if size is not None and st.st_size != size:
        return f"{item.dest} has {st.st_size} bytes, {size} expected (truncated or replaced)"
    return None


def probe(comp: Component, ctx: Ctx, marker: Marker | None) -> Problem | None:
    """Cheap: each file exists with its recorded (or configured) size. The full hash is
    checked after each download and by `pod-agent verify --hash`."""
    for it in items(comp):
        problem = _file_problem(it, marker)
        if problem:
            return Problem(State.BROKEN, problem)
    return None


def current_meta(comp: Component, ctx: Ctx) -> dict[str, str]:
    meta = {"version": _version(comp)}
    for it in items(comp):
        if it.dest.is_file():
            meta[record_key(it)] = f"{it.dest.stat().st_size} -"
    return meta


def _version(comp: Component) -> str:
    total = sum(it.dest.stat().st_size for it in items(comp) if it.dest.is_file())
    n = len(items(comp))
    return f"{n} file{'s' if n != 1 else ''}, {dl.human(total)}"


# --------------------------------------------------------------------------- progress
class Display:
    """A rich progress bar (speed, ETA) on a terminal; otherwise a progress line per active file
    every `interval` seconds in the component's log and the progress log."""

    def __init__(self, comp: Component, ctx: Ctx, interval: float):
        self.comp, self.ctx, self.interval = comp, ctx, interval
        self.lock = threading.Lock()
        self.files: dict[str, list[float]] = {}  # name -> [done, total, start, start_done]
        self.bar = None
        mode = os.environ.get("POD_AGENT_PROGRESS", "auto")
        tty = mode == "bar" or (mode == "auto" and sys.stderr.isatty()
                                and threading.current_thread() is threading.main_thread())
        if tty:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=True)
            self.bar.start()
        self.tasks: dict[str, Any] = {}
        self.last = time.monotonic()

    def start(self, name: str, total: int | None, done: int) -> None:
        with self.lock:
            self.files[name] = [done, total or 0, time.monotonic(), done]
            if self.bar is not None:
                self.tasks[name] = self.bar.add_task(name, total=total, completed=done)

    def advance(self, name: str, n: int) -> None:
        with self.lock:
            self.files[name][0] += n
            if self.bar is not None:
                self.bar.advance(self.tasks[name], n)
            now = time.monotonic()
            if self.bar is None and now - self.last >= self.interval:
                self.last = now
                lines = [self._line(k, v, now) for k, v in self.files.items()]
            else:
                lines = []
        for line in lines:
            self.note(line)

    def end(self, name: str) -> None:
        with self.lock:
            self.files.pop(name, None)
            if self.bar is not None and name in self.tasks:
                self.bar.remove_task(self.tasks.pop(name))

    @staticmethod
    def _line(name: str, v: list[float], now: float) -> str:
        done, total, start, start_done = v
        speed = (done - start_done) / max(now - start, 1e-6)
        text = f"{name}: {dl.human(done)}"
        if total:
            text += f" of {dl.human(total)} ({100 * done / total:.0f} %)"
        text += f", {dl.human(speed)}/s"
        if total and speed > 0:
            left = int((total - done) / speed)
            text += f", ETA {left // 3600}h{left // 60 % 60:02d}m{left % 60:02d}s" if left >= 3600 \
                else f", ETA {left // 60}m{left % 60:02d}s"
        return text

    def note(self, text: str) -> None:
        """One line in the component's log and in the progress log (redacted)."""
        from agent import markers
        from agent.redact import redact

        line = f"[{markers.now_stamp()}] {self.comp.name}: {redact(text)}\n"
        for path in (self.comp.log, self.ctx.config.progress_log):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(line)
            except OSError:
                pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --------------------------------------------------------------------------- install
def _keep(item: Item, marker: Marker | None, note: Callable[[str], None],
          verify: bool = False) -> str | None:
    """The sha256 of a file already in place that can be kept, or None to download it.
    A file the previous marker recorded with this size is kept as it is (it was verified when
    it was downloaded), unless `verify` (a forced reinstall: its hash is checked again); a file
    put there otherwise is kept when its hash (or, without one, its size) matches."""
    if not item.dest.is_file():
        return None
    size, sha = recorded(marker, item)
    actual = item.dest.stat().st_size
    if size is not None and size == actual and (item.size in (None, actual)) \
            and (not item.sha256 or sha == item.sha256) and not verify:
        return sha or "-"
    expected = item.sha256 or (sha if verify and sha and sha != "-" else None)
    if expected:
        got = dl.sha256_file(item.dest)
        if got == expected:
            note(f"{item.dest.name}: already in place (sha256 verified)")
            return got
        note(f"{item.dest.name}: in place but its sha256 does not match: downloading it again")
        return None
    if verify:
        return None
    if item.size is not None and item.size == actual:
        note(f"{item.dest.name}: already in place ({dl.human(actual)}; no sha256 to verify)")
        return "-"
    return None


def install(comp: Component, ctx: Ctx, marker: Marker | None = None) -> dict[str, str]:
    display = Display(comp, ctx, comp.spec["progress_interval"])
    meta: dict[str, str] = {}
    todo: list[Item] = []
    # called while the marker is still on disk: a forced reinstall (`install --force`; the
    # executor removes the marker of a component that is not installed before reinstalling it)
    from agent import markers

    forced = marker is not None and markers.path_for(ctx.config.markers_dir,
                                                     comp.name).exists()
    try:
        for it in items(comp):
            kept = _keep(it, marker, display.note, verify=forced)
            if kept is not None:
                meta[record_key(it)] = f"{it.dest.stat().st_size} {kept}"
            else:
                todo.append(it)
        if todo:
            display.note(f"downloading {len(todo)} file(s), {comp.spec['parallel']} at a time")
            with dl.make_client() as client:
                meta.update(_download_all(comp, todo, client, display))
    finally:
        display.close()
    meta["version"] = _version(comp)
    return meta


def _download_all(comp: Component, todo: list[Item], client: Any,
                  display: Display) -> dict[str, str]:
    results: dict[str, str] = {}
    errors: list[tuple[Item, Exception]] = []
    lock = threading.Lock()

    def run_pool(work: list, fn: Callable[[Any], None]) -> None:
        queue = list(work)

        def worker() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    job = queue.pop(0)
                try:
                    fn(job)
                except Exception as exc:  # noqa: BLE001 - reported per file below
                    with lock:
                        errors.append((job if isinstance(job, dl.Item) else job[0], exc))

        threads = [threading.Thread(target=worker, name=f"download-{comp.name}-{i}",
                                    daemon=True)  # never keeps a stopping agent alive
                   for i in range(min(comp.spec["parallel"], len(queue)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    resolved: dict[Path, Any] = {}

    def do_resolve(it: Item) -> None:
        resolved[it.dest] = dl.resolve(it, client=client)

    run_pool(todo, do_resolve)
    if not errors:  # the space for every file, on each filesystem, before the first byte
        needs: dict[Path, int] = {}
        for it in todo:
            size = resolved[it.dest].size
            if size is not None:
                have = it.part.stat().st_size if it.part.exists() else 0
                needs[it.dest.parent] = needs.get(it.dest.parent, 0) + max(size - have, 0)
        dl.check_space(needs)

        def do_fetch(it: Item) -> None:
            res = resolved[it.dest]
            have = it.part.stat().st_size if it.part.exists() else 0
            display.start(it.dest.name, res.size, have)
            began = time.monotonic()
            try:
                out = dl.fetch(it, client, res, on_bytes=lambda n: display.advance(it.dest.name, n),
                            note=display.note)
            finally:
                display.end(it.dest.name)
            how = f"resumed from {dl.human(out.resumed_from)}, " if out.resumed_from else ""
            how += "restarted: the server ignored Range, " if out.restarted else ""
            took = max(time.monotonic() - began, 1e-6)
            display.note(f"{it.dest.name}: downloaded {dl.human(out.size)} ({how}"
                         f"{dl.human(out.transferred)} transferred in {took:.1f}s, "
                         f"{dl.human(out.transferred / took)}/s), sha256 {out.sha256[:12]}..."
                         + (" verified" if res.sha256 else ""))
            with lock:
                results[record_key(it)] = f"{out.size} {out.sha256}"

        run_pool(todo, do_fetch)
    if errors:
        for it, exc in errors:
            display.note(f"{it.dest.name}: failed: {exc}")
        fatal = [e for _, e in errors if not isinstance(e, dl.FetchError)]
        first = (fatal or [e for _, e in errors])[0]
        text = str(first) if len(errors) == 1 else \
            f"{len(errors)} of {len(todo)} files failed; first: {first}"
        raise (dl.FetchFatal(text) if fatal else dl.FetchError(text))
    return results
