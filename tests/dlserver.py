"""A local HTTP file server for the download tests and bench: Range on or off, a connection cut
after N bytes, a wrong body, a token, 404, and Hugging Face's resolve URLs
(`/<repo>/resolve/<revision>/<file>`, with the X-Linked-Size / X-Linked-Etag headers that
huggingface_hub reads), so HF_ENDPOINT can point huggingface_hub at it. Every request is logged
(method, path, Range, status, body bytes sent, Authorization) for the tests' assertions."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class Entry:
    data: bytes | Path
    sha256: str = ""
    gated: bool = False  # needs the server's token
    body: bytes | None = None  # served instead of data (a wrong body), same length

    def __post_init__(self) -> None:
        if not self.sha256:
            h = hashlib.sha256()
            if isinstance(self.data, Path):
                with open(self.data, "rb") as fh:
                    while chunk := fh.read(1 << 22):
                        h.update(chunk)
            else:
                h.update(self.data)
            self.sha256 = h.hexdigest()

    @property
    def size(self) -> int:
        return self.data.stat().st_size if isinstance(self.data, Path) else len(self.data)


@dataclass
class Server:
    files: dict[str, Entry] = field(default_factory=dict)
    ranges: bool = True
    token: str | None = None
    cuts: list[int] = field(default_factory=list)  # next GETs: close after this many bytes
    log: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    redirect: bool = False  # resolve URLs answer 302 to /cdn/<key> on "localhost", as the hub
    #                         redirects LFS files to its CDN (another host: no Authorization)
    barrier: int = 0  # hold body GETs until this many are in flight (once; 10 s at most)
    active: int = 0
    max_active: int = 0

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)

    def add(self, key: str, data: bytes | Path, **kw) -> Entry:
        self.files[key] = Entry(data, **kw)
        return self.files[key]

    def url(self, key: str) -> str:
        return f"http://127.0.0.1:{self.port}/{key}"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gets(self, path_part: str = "") -> list[dict]:
        with self.lock:
            return [r for r in self.log if r["method"] == "GET" and path_part in r["path"]]

    def start(self) -> "Server":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _record(self, status: int, sent: int) -> None:
                with server.lock:
                    server.log.append({"method": self.command, "path": self.path,
                                       "range": self.headers.get("Range"), "status": status,
                                       "sent": sent,
                                       "auth": self.headers.get("Authorization")})

            def _error(self, code: int, head: bool, extra: dict | None = None) -> None:
                body = f"error {code}; you sent {self.headers.get('Authorization')}".encode()
                self.send_response(code)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                self._record(code, 0)

            def _serve(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                m = _RESOLVE.match(path)
                cdn = path.startswith("/cdn/")
                key = f"{m['repo']}/{m['file']}" if m else path[5 if cdn else 1:]
                entry = server.files.get(key)
                if entry is None and m and not any(k.startswith(m["repo"] + "/")
                                                   for k in server.files):
                    return self._error(401, head, {"X-Error-Code": "RepoNotFound"})  # as the hub
                if entry is None:
                    return self._error(404, head, {"X-Error-Code": "EntryNotFound"} if m else {})
                if entry.gated and not cdn:
                    auth = self.headers.get("Authorization")
                    if auth != f"Bearer {server.token}":
                        return self._error(401 if not auth else 403, head,
                                           {"X-Error-Code": "GatedRepo",
                                            "X-Error-Message": "Access restricted"})
                size = entry.size
                if m and server.redirect:
                    self.send_response(302)
                    self.send_header("Location", f"http://localhost:{server.port}/cdn/{key}"
                                                 "?X-Amz-Signature=s1gn")
                    self.send_header("X-Repo-Commit", "0" * 40)
                    self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
                    self.send_header("X-Linked-Size", str(size))
                    self.send_header("ETag", f'"{entry.sha256[:16]}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return self._record(302, 0)
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and server.ranges:
                    mm = re.fullmatch(r"bytes=(\d+)-", rng.strip())
                    if mm:
                        start = int(mm.group(1))
                        if start >= size:
                            self.send_response(416)
                            self.send_header("Content-Range", f"bytes */{size}")
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return self._record(416, 0)
                        status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(size - start))
                self.send_header("ETag", f'"{entry.sha256[:16]}"')
                if server.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                if m:
                    self.send_header("X-Repo-Commit", "0" * 40)
                    self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
                    self.send_header("X-Linked-Size", str(size))
                self.end_headers()
                if head:
                    return self._record(status, 0)
                with server.cond:
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                    server.cond.notify_all()
                    if server.barrier:
                        server.cond.wait_for(lambda: server.active >= server.barrier, 10)
                        server.barrier = 0
                try:
                    self._send(entry, start, size)
                finally:
                    with server.cond:
                        server.active -= 1

            def _send(self, entry: Entry, start: int, size: int) -> None:
                status = 206 if start else 200
                limit = size - start
                with server.lock:
                    if server.cuts:
                        limit = min(limit, max(server.cuts.pop(0) - start, 0))
                        self.close_connection = True
                sent = self._body(entry, start, limit)
                self._record(status, sent)
                if self.close_connection:
                    try:
                        self.connection.shutdown(2)
                    except OSError:
                        pass

            def _body(self, entry: Entry, start: int, count: int) -> int:
                try:
                    if entry.body is not None or not isinstance(entry.data, Path):
                        data = entry.body if entry.body is not None else entry.data
                        self.wfile.write(data[start:start + count])
                        return count
                    self.wfile.flush()
                    with open(entry.data, "rb") as fh:
                        return self.connection.sendfile(fh, start, count)
                except (BrokenPipeError, ConnectionResetError):
                    return 0

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # a client hung up
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={
            "poll_interval": 0.05}, daemon=True, name="dlserver")
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def blob(n: int, seed: int = 1) -> bytes:
    """n pseudo-random bytes (incompressible, reproducible)."""
    out = bytearray()
    h = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out += h * 64
    return bytes(out[:n])


if __name__ == "__main__":  # python tests/dlserver.py FILE: serve it (manual checks)
    import sys
    import time

    srv = Server()
    srv.add(Path(sys.argv[1]).name, Path(sys.argv[1]))
    srv.start()
    print(srv.url(Path(sys.argv[1]).name), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
    os._exit(0)
