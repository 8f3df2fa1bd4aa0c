"""Resumable, verified downloads: the engine behind the `download` kind.

One file at a time (`fetch`): the bytes go to `<file>.part`, with `<file>.part.json` beside it
recording what the part is a prefix of (source, size, validators); an interrupted download
resumes with `Range: bytes=N-` (and `If-Range`), a server that answers 200 instead of 206 is
detected and the part restarts from 0 on that same response, a part that does not belong to the
same source/size/validators is discarded. The sha256 is computed while the bytes arrive (the
prefix of a resumed part is hashed first); the part is renamed onto the file only after its size
and, when known, its sha256 match. A mismatch discards the part.

Plain URLs use httpx (streaming, per-phase timeouts, redirects; already a dependency of
huggingface_hub). Hugging Face sources are resolved with huggingface_hub: the resolve URL (which
honours HF_ENDPOINT), the auth headers and the file's metadata (size; the sha256 of LFS files),
then transferred by the same resumable code, so both kinds of source share one `.part` format
and one set of guarantees.

Errors are one line: 401/403 -> "token missing or not accepted for <repo or URL>", 404 -> the
URL, a full disk -> the space needed vs available. The token is read from the environment at
download time, registered with agent/redact.py and never written anywhere.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

from agent.kinds.base import InstallError
from agent.model import AgentError

CHUNK = 1 << 20  # bytes read from the socket and written at a time
RESUME_TRIES = 5  # consecutive failed attempts (each resuming from the part) before giving up
RESUME_DELAY = 1.0  # seconds before the first resume; doubled each time, at most 30 s


class FetchError(InstallError):
    """A transient failure (connection cut, timeout, 5xx): the component's retries apply."""


class FetchFatal(AgentError):
    """A failure that retrying cannot fix (401/403/404, full disk, wrong hash of a fixed
    source): one line, no retry."""


class HashMismatch(FetchError):
    """The downloaded bytes do not match the expected sha256 (retried: the source may have
    been cut mid-way by a proxy)."""


@dataclass(frozen=True)
class Item:
    """One file to download."""

    dest: Path  # the final file
    url: str | None = None
    repo: str | None = None
    file: str | None = None
    revision: str = "main"
    sha256: str | None = None
    size: int | None = None
    token_env: str | None = None
    gated: bool = False

    @property
    def source(self) -> str:
        """What the file is, in messages and in the part's record (never a token)."""
        if self.repo:
            return f"hf://{self.repo}/{self.file}@{self.revision}"
        return shown_url(self.url or "")

    @property
    def label(self) -> str:
        return self.repo or shown_url(self.url or "")

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")

    @property
    def part_meta(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part.json")

    def token(self) -> str | None:
        if not self.token_env:
            return None
        value = os.environ.get(self.token_env) or None
        if value:
            from agent.redact import register

            register(value)
        return value


@dataclass
class Resolved:
    url: str
    headers: dict[str, str]
    size: int | None
    sha256: str | None


@dataclass
class Result:
    size: int
    sha256: str
    transferred: int  # bytes received over the network in this call
    resumed_from: int  # the part's size when the transfer began (0: from the start)
    restarted: bool  # the server ignored Range (or the part did not match): started over


def shown_url(url: str) -> str:
    """A URL safe to show: no user:password, no query string (signed CDN URLs carry
    signatures there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def free_bytes(folder: Path) -> int:
    """Free space for an unprivileged writer in folder (or its nearest existing ancestor)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


def disk_full(folder: Path, needed: int | None, available: int) -> FetchFatal:
    need = f"{human(needed)} needed" if needed is not None else "more space needed"
    return FetchFatal(f"not enough free space in {folder}: {need}, {human(available)} "
                      "available; free some space (`df -h`, `du -sh`) and install again (the "
                      "part downloaded so far is kept)")


def check_space(needs: Mapping[Path, int]) -> None:
    """needs: folder -> bytes still to write there. Folders on one filesystem are summed."""
    by_dev: dict[int, tuple[Path, int]] = {}
    for folder, n in needs.items():
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        dev = os.stat(probe).st_dev
        first, total = by_dev.get(dev, (folder, 0))
        by_dev[dev] = (first, total + n)
    for folder, total in by_dev.values():
        free = free_bytes(folder)
        if total > free:
            raise disk_full(folder, total, free)


# --------------------------------------------------------------------------- resolving
def resolve(item: Item, timeout: float = 30.0, client: Any = None) -> Resolved:
    """The URL to GET, its headers (with the token), and what the source says of the file.
    A plain URL's size comes from a HEAD request when the config gives none (best effort:
    signed URLs often refuse HEAD; the GET then says what is wrong)."""
    token = item.token()
    if not item.repo:
        headers = {"User-Agent": "comfy-pod-agent", "Accept-Encoding": "identity"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        size = item.size
        if size is None and client is not None:
            try:
                resp = client.head(item.url or "", headers=headers, timeout=timeout)
                length = resp.headers.get("content-length", "")
                if resp.status_code == 200 and length.isdigit():
                    size = int(length)
            except Exception:  # noqa: BLE001 - best effort
                pass
        return Resolved(item.url or "", headers, size, item.sha256)
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError,
                                        RepositoryNotFoundError)

    endpoint = os.environ.get("HF_ENDPOINT") or None
    url = hf_hub_url(item.repo, item.file or "", revision=item.revision, endpoint=endpoint)
    headers = dict(build_hf_headers(token=token or False, library_name="comfy-pod-agent"))
    headers["Accept-Encoding"] = "identity"
    try:
        meta = get_hf_file_metadata(url, token=token or False, timeout=timeout,
                                    endpoint=endpoint)
    except HfHubHTTPError as exc:
        code = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, RepositoryNotFoundError) and not isinstance(exc, GatedRepoError) \
                and code != 403:
            # the hub answers 401 for a repo that does not exist as for a private one
            need = f"; a private repo needs a token in {item.token_env}" if item.token_env \
                and not item.token() else ""
            raise FetchFatal(f"repository not found or not accessible: {item.repo}{need} "
                             f"({shown_url(url)})") from None
        raise _http_error(code, item, url) from None
    except Exception as exc:  # noqa: BLE001 - a network error, a timeout: transient
        raise FetchError(f"{item.label}: cannot reach {shown_url(url)}: "
                         f"{type(exc).__name__}") from None
    etag = (meta.etag or "").strip('"').lower()
    sha = item.sha256 or (etag if len(etag) == 64 and all(c in "0123456789abcdef"
                                                           for c in etag) else None)
    return Resolved(url, headers, item.size or meta.size, sha)


def _http_error(code: int | None, item: Item, url: str) -> Exception:
    if code in (401, 403):
        hint = f" (set {item.token_env})" if item.token_env and not item.token() else ""
        return FetchFatal(f"token missing or not accepted for {item.label}{hint}")
    if code == 404:
        return FetchFatal(f"not found (404): {shown_url(url)}")
    return FetchError(f"{item.label}: HTTP {code} from {shown_url(url)}")


# --------------------------------------------------------------------------- the transfer
def _read_part_meta(item: Item) -> dict[str, Any]:
    try:
        data = json.loads(item.part_meta.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_part_meta(item: Item, data: dict[str, Any]) -> None:
    tmp = item.part_meta.with_name(item.part_meta.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, item.part_meta)


def discard(item: Item) -> None:
    for path in (item.part, item.part_meta):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def sha256_file(path: Path, limit: int | None = None,
                on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as fh:
        while left is None or left > 0:
            chunk = fh.read(CHUNK * 8 if left is None else min(CHUNK * 8, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


def _content_range(value: str) -> tuple[int, int | None] | None:
    """`bytes START-END/TOTAL` -> (START, TOTAL or None)."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total.strip() == "*" else int(total))
    except ValueError:
        return None


class _Hasher:
    """sha256 in a thread of its own, fed the chunks as they are written: the network read,
    the write and the hash overlap (hashlib releases the GIL on large buffers)."""

    SYNC_EVERY = 128 << 20  # flush written data to disk as it goes: the final fsync is short

    def __init__(self, h: "hashlib._Hash", fd: int | None = None):
        import queue

        self.h, self.fd, self.unsynced = h, fd, 0
        self.q: "queue.Queue[bytes | None]" = queue.Queue(maxsize=64)
        self.t = threading.Thread(target=self._run, name="sha256", daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            chunk = self.q.get()
            if chunk is None:
                return
            self.h.update(chunk)
            self.unsynced += len(chunk)
            if self.fd is not None and self.unsynced >= self.SYNC_EVERY:
                self.unsynced = 0
                try:
                    os.fdatasync(self.fd)
                except OSError:
                    pass  # the final fsync reports it

    def update(self, chunk: bytes) -> None:
        self.q.put(chunk)

    def finish(self) -> str:
        self.q.put(None)
        self.t.join()
        return self.h.hexdigest()

    def abandon(self) -> None:
        self.q.put(None)
        self.t.join()


def fetch(item: Item, client: Any, resolved: Resolved | None = None,
          on_bytes: Callable[[int], None] | None = None,
          note: Callable[[str], None] | None = None,
          stop: threading.Event | None = None) -> Result:
    """Download item.dest through its .part, resuming; verify; rename. Transient failures are
    retried here (RESUME_TRIES attempts in a row without progress, each resuming from the
    part); what is left raises FetchError or FetchFatal."""
    note = note or (lambda text: None)
    resolved = resolved or resolve(item)
    item.dest.parent.mkdir(parents=True, exist_ok=True)
    transferred, first_start, restarted = 0, None, False
    failures, delay = 0, RESUME_DELAY
    while True:
        if stop is not None and stop.is_set():
            raise FetchError(f"{item.label}: stopped (the part is kept)")
        before = transferred
        try:
            result = _attempt(item, client, resolved, on_bytes, note)
        except _Progress as p:  # a transient failure after some bytes arrived
            transferred += p.received
            first_start = p.start if first_start is None else first_start
            restarted = restarted or p.restarted
            error = p.error
        except HashMismatch:
            raise
        except FetchError as exc:  # nothing arrived: a refused connection, a 5xx, a timeout
            error = exc
        else:
            first_start = result.resumed_from if first_start is None else first_start
            return Result(result.size, result.sha256, transferred + result.transferred,
                          first_start, restarted or result.restarted)
        failures = 0 if transferred > before else failures + 1
        if failures >= RESUME_TRIES:
            raise error
        note(f"{item.dest.name}: {error}; resuming in {delay:g}s")
        if stop is not None:
            stop.wait(delay)
        else:
            time.sleep(delay)
        delay = min(delay * 2, 30.0)


class _Progress(Exception):
    def __init__(self, error: Exception, received: int, start: int, restarted: bool):
        super().__init__(str(error))
        self.error, self.received, self.start, self.restarted = error, received, start, restarted


def _attempt(item: Item, client: Any, resolved: Resolved, on_bytes, note) -> Result:
    import httpx

    expected = resolved.size
    record = _read_part_meta(item)
    have = item.part.stat().st_size if item.part.exists() else 0
    if have and (record.get("source") != item.source
                 or (expected is not None and record.get("size") not in (None, expected))
                 or (resolved.sha256 and record.get("sha256") not in (None, resolved.sha256))
                 or (expected is not None and have > expected)):
        note(f"{item.dest.name}: the part ({human(have)}) is not a prefix of this source: "
             "discarded")
        discard(item)
        have = 0
    if expected is not None and have == expected:
        return _finish(item, resolved, None, have, 0, False, note)
    if expected is not None:
        check_space({item.dest.parent: expected - have})
    headers = dict(resolved.headers)
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = record.get("etag") if not str(record.get("etag", "")).startswith("W/") \
            else None
        validator = validator or record.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    received, restarted, start = 0, False, have
    try:
        with client.stream("GET", resolved.url, headers=headers) as resp:
            code = resp.status_code
            if code == 416 and have:
                cr = _content_range(resp.headers.get("content-range", ""))
                total = cr[1] if cr else None
                if total is not None and total == have:
                    return _finish(item, resolved, None, have, 0, False, note)
                note(f"{item.dest.name}: the server refused the range ({have} bytes already): "
                     "starting over")
                discard(item)
                raise FetchError(f"{item.label}: the part did not fit the file (416)")
            if code >= 400:
                raise _http_error(code, item, resolved.url)
            if code not in (200, 206):
                raise FetchError(f"{item.label}: unexpected HTTP {code}")
            start, total = 0, None
            if code == 206:
                cr = _content_range(resp.headers.get("content-range", ""))
                if cr is None or cr[0] != have:
                    raise FetchError(f"{item.label}: a 206 answer for the wrong range "
                                     f"({resp.headers.get('content-range')!r})")
                start, total = have, cr[1]
            else:
                if have:
                    note(f"{item.dest.name}: the server ignored the Range request (answered "
                         f"200): restarting from 0 ({human(have)} discarded)")
                    restarted = True
                length = resp.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
            if expected is not None and total is not None and total != expected:
                discard(item)
                raise FetchFatal(f"{item.label}: the server's file has {total} bytes, "
                                 f"{expected} expected (size in the config or the hub's "
                                 "metadata)")
            size = expected if expected is not None else total
            if size is not None:
                check_space({item.dest.parent: size - start})
            _write_part_meta(item, {"source": item.source, "size": size,
                                    "sha256": resolved.sha256,
                                    "etag": resp.headers.get("etag"),
                                    "last_modified": resp.headers.get("last-modified")})
            h = hashlib.sha256()
            if start:
                h = _prefix_hash(item.part, start)
            with open(item.part, "r+b" if start else "wb") as out:
                hasher: _Hasher | None = _Hasher(h, out.fileno())
                try:
                    if start:
                        out.seek(start)
                        out.truncate()
                    for chunk in resp.iter_raw():
                        out.write(chunk)
                        hasher.update(chunk)
                        received += len(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
                    out.flush()
                    digest = hasher.finish()
                    hasher = None
                    os.fsync(out.fileno())
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        left = None if size is None else size - start - received
                        raise disk_full(item.dest.parent, left,
                                        free_bytes(item.dest.parent)) from None
                    raise
                finally:
                    if hasher is not None:
                        hasher.abandon()
            got = start + received
            if size is not None and got < size:
                raise _Progress(FetchError(f"{item.label}: the connection closed after "
                                           f"{human(got)} of {human(size)}"), received, start,
                                restarted)
            return _finish(item, resolved, digest, got, received, restarted, note,
                           resumed_from=start)
    except (httpx.TransportError, httpx.StreamError) as exc:
        if received:
            raise _Progress(FetchError(f"{item.label}: connection lost after "
                                       f"{human(received)} ({type(exc).__name__})"),
                            received, start, restarted) from None
        raise FetchError(f"{item.label}: cannot download {shown_url(resolved.url)}: "
                         f"{type(exc).__name__}: {str(exc)[:120]}") from None


def _prefix_hash(path: Path, n: int) -> "hashlib._Hash":
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        left = n
        while left:
            chunk = fh.read(min(CHUNK * 8, left))
            if not chunk:
                raise FetchError(f"{path}: the part shrank while resuming")
            h.update(chunk)
            left -= len(chunk)
    return h


def _finish(item: Item, resolved: Resolved, digest: str | None, size: int, received: int,
            restarted: bool, note, resumed_from: int | None = None) -> Result:
    if resolved.size is not None and size != resolved.size:
        discard(item)
        raise FetchError(f"{item.label}: {size} bytes downloaded, {resolved.size} expected")
    if digest is None:
        digest = sha256_file(item.part)
    if resolved.sha256 and digest != resolved.sha256:
        discard(item)
        raise HashMismatch(f"{item.dest.name}: sha256 mismatch: expected "
                           f"{resolved.sha256[:12]}..., got {digest[:12]}... (the download "
                           "was discarded)")
    os.replace(item.part, item.dest)
    try:
        item.part_meta.unlink()
    except FileNotFoundError:
        pass
    return Result(size, digest, received, size - received if resumed_from is None
                  else resumed_from, restarted)


READ_BYTES = 1 << 20  # one socket read of the body (httpcore reads 64 KiB at a time)


def _larger_reads() -> None:
    """httpcore parses every 64 KiB read of a body with h11: at loopback or datacentre speed
    that Python work, not the network, is the limit. One read of 1 MiB does the same work once
    per MiB (README: Model files, Measured). Best effort: another httpcore keeps its own size."""
    try:
        from httpcore._sync.http11 import HTTP11Connection
    except ImportError:  # pragma: no cover - httpcore's layout changed
        return
    if getattr(HTTP11Connection, "READ_NUM_BYTES", 0) < READ_BYTES:
        HTTP11Connection.READ_NUM_BYTES = READ_BYTES


def make_client(timeout: float = 60.0) -> Any:
    import logging

    import httpx

    # httpx logs each request at INFO, with the full URL: a redirect's signed CDN URL does not
    # belong in the agent's log (and one line per request is noise)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _larger_reads()

    return httpx.Client(follow_redirects=True, timeout=httpx.Timeout(timeout, connect=30.0),
                        limits=httpx.Limits(max_connections=32))
