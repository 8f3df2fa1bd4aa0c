"""The agent's HTTP endpoint for orchestrators: a small stdlib server owned by the daemon,
stopped on shutdown. 127.0.0.1 by default: pods publish ports through proxies.

    GET  /  (and /index.html)        a read-only status page (HTML, agent/page.py)
    GET  /healthz                    200 while the agent's main loop runs, else 503
    GET  /readyz                     200 when ComfyUI is running and answered, else 503
    GET  /status                     the `pod-agent status --json` object (cached, with its age)
    GET  /metrics                    Prometheus text format
    POST /components/NAME/reinstall  remove NAME's marker and reconcile (202)
    POST /comfyui/restart[?urgent=1] queue-aware restart of ComfyUI, urgent: at once (202)

POST endpoints need `Authorization: Bearer <token>` (http.token or env POD_AGENT_HTTP_TOKEN;
compared with hmac.compare_digest). Without a configured token they are off (403); a missing or
wrong token is 401. Neither headers nor the token are ever logged.

How it holds under load (README "HTTP endpoint"):
- a listen backlog of BACKLOG; one accept thread hands connections to a fixed pool of WORKERS
  threads through a queue of at most QUEUE_MAX connections; beyond that a connection gets a
  canned 503 at once. Nothing here ever starts a thread per request.
- one request per connection (`Connection: close`): an idle keep-alive client holds no worker.
- every socket operation times out after SOCKET_TIMEOUT and the whole request after
  REQUEST_DEADLINE (the accept loop shuts the socket of an overdue request), so a client that
  trickles its headers or body cannot hold a worker for long.
- bodies are read or refused: Content-Length up to MAX_BODY is read; more is 413; a body
  without a valid Content-Length (`Transfer-Encoding: chunked` included) is 411/400; a refused
  body closes the connection (after a short lingering read, so the client sees the answer).
- a port that cannot be bound is retried in the background (RETRY_INITIAL doubling to
  RETRY_MAX, forever), logged once per change of state; `on_change` reports every state.
"""

from __future__ import annotations

import errno
import hmac
import json
import queue
import re
import selectors
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from loguru import logger

from agent.redact import redact

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LENGTH_RE = re.compile(r"^[0-9]{1,18}$")
MAX_BODY = 64 * 1024
BACKLOG = 512  # the stdlib's 5 made 91 of 200 concurrent requests time out; 128 still overflowed
# now and then while the workers held the GIL (a 1 s SYN retransmit for the client)
WORKERS = 8
QUEUE_MAX = 256  # accepted connections waiting for a worker; beyond: 503 at once
SOCKET_TIMEOUT = 5.0  # one read or write
REQUEST_DEADLINE = 10.0  # a whole request, from the moment a worker takes it
LINGER = 1.0  # after refusing a body: read and discard for at most this long...
LINGER_BYTES = 1 << 20  # ...or this much, then close
POLL = 0.2  # the accept loop's tick (stop, overdue requests)
ACCEPT_BATCH = 64  # connections taken from the backlog per wake-up
RETRY_INITIAL = 1.0
RETRY_MAX = 60.0
HTTP_FILE = "http.json"  # <runtime_dir>/http.json: the endpoint's state, written by the daemon

_BUSY_BODY = b'{"error": "busy: too many connections, retry shortly"}\n'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nRetry-After: 1\r\nCache-Control: no-store\r\n"
        b"Connection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))

# the status page runs nothing and loads nothing: a browser that honours these refuses any
# script, frame, form or remote asset even if some text escaped the escaping
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class Api:
    """What the endpoint may ask of the agent (the daemon provides it)."""

    alive: Callable[[], tuple[bool, dict]]
    ready: Callable[[], tuple[bool, dict]]
    status: Callable[[], tuple[int, dict]] | Callable[[], dict]  # a dict means 200
    metrics: Callable[[], tuple[bytes, str]]  # (body, content type)
    reinstall: Callable[[str], tuple[int, dict]]  # component -> (HTTP status, body)
    restart: Callable[[bool], dict]  # urgent -> body
    token: Callable[[], str | None]
    page: Callable[[], tuple[int, bytes]] | None = None  # -> (HTTP status, HTML)


class _Server(socketserver.TCPServer):
    """Accepts in one thread (`serve`), handles in a fixed pool of worker threads."""

    allow_reuse_address = True
    request_queue_size = BACKLOG
    api: Api

    def __init__(self, address: tuple, api: Api, workers: int, queue_max: int,
                 family: int = socket.AF_INET):
        self.address_family = family
        super().__init__(address, _Handler)
        self.api = api
        self._queue: queue.Queue = queue.Queue(max(queue_max, workers))  # room for the stops
        self._active: dict[socket.socket, float] = {}  # connection -> deadline
        self._lock = threading.Lock()
        self.counts = {"served": 0, "busy": 0, "overdue": 0}
        self._busy_logged = 0.0
        self._workers = [threading.Thread(target=self._work, name=f"http-worker-{i}",
                                          daemon=True) for i in range(workers)]

    def start_workers(self) -> None:
        for t in self._workers:
            t.start()

    # ------------------------------------------------------------ accept thread
    def serve(self, stop: threading.Event) -> None:
        """Accept until `stop`: every connection waiting in the backlog at each wake-up (one
        at a time would let a burst overflow the backlog while workers hold the GIL, and an
        overflow costs the client a 1 s SYN retransmit)."""
        self.socket.setblocking(False)
        emfile_logged = False
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            while not stop.is_set():
                if selector.select(POLL):
                    for _ in range(ACCEPT_BATCH):
                        try:
                            conn, client_address = self.socket.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:  # EMFILE and the like: retry shortly
                            if not emfile_logged:
                                logger.warning(f"http: cannot accept: {exc}")
                                emfile_logged = True
                            stop.wait(0.1)
                            break
                        conn.settimeout(None)
                        self.process_request(conn, client_address)
                self.service_actions()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        try:
            self._queue.put_nowait((request, client_address))
        except queue.Full:
            self._refuse_busy(request)

    def _refuse_busy(self, request: socket.socket) -> None:
        """All workers busy and QUEUE_MAX waiting: a canned 503, never blocking this thread."""
        self.counts["busy"] += 1
        try:
            request.setblocking(False)
            try:
                request.recv(65536)  # what has arrived, so that the close is not a reset
            except OSError:
                pass
            request.send(BUSY)
        except OSError:
            pass
        self.shutdown_request(request)
        now = time.monotonic()
        if now - self._busy_logged > 60:
            self._busy_logged = now
            logger.warning(f"http: overloaded: {self.counts['busy']} connection(s) answered "
                           f"503 so far ({len(self._workers)} workers busy, "
                           f"{self._queue.maxsize} waiting)")

    def service_actions(self) -> None:
        """Every accept-loop turn: end requests that ran past REQUEST_DEADLINE (a client that
        trickles bytes resets the socket timeout on every byte; this bounds the total)."""
        now = time.monotonic()
        with self._lock:
            overdue = [s for s, deadline in self._active.items() if deadline < now]
            for s in overdue:
                del self._active[s]
        for s in overdue:
            self.counts["overdue"] += 1
            try:
                s.shutdown(socket.SHUT_RDWR)  # the worker's blocked read or write returns
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug(f"http: connection from {client_address} failed")  # no stderr traceback

    # ------------------------------------------------------------ workers
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, client_address = item
            with self._lock:
                self._active[request] = time.monotonic() + REQUEST_DEADLINE
            handler = None
            try:
                handler = _Handler(request, client_address, self)
            except Exception as exc:  # noqa: BLE001 - one connection never ends a worker
                logger.debug(f"http: connection from {client_address[0]} ended: "
                             f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._active.pop(request, None)
                    self.counts["served"] += 1
                self._close(request, linger=bool(getattr(handler, "linger", False)))

    def _close(self, request: socket.socket, linger: bool) -> None:
        """Close a connection. After a refused (unread) body, send our FIN first and read what
        the client still sends for a moment: closing with unread data would reset the
        connection and the client might never see the answer."""
        if linger:
            try:
                request.shutdown(socket.SHUT_WR)
                end = time.monotonic() + LINGER
                left = LINGER_BYTES
                while left > 0:
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        break
                    request.settimeout(remaining)
                    data = request.recv(65536)
                    if not data:
                        break
                    left -= len(data)
            except OSError:
                pass
        self.shutdown_request(request)

    def stop_workers(self, timeout: float = 5.0) -> None:
        """After `serve` ended: close what waits, cut what runs, end the workers."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        with self._lock:
            active = list(self._active)
        for s in active:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _ in self._workers:
            self._queue.put(None)
        end = time.monotonic() + timeout
        for t in self._workers:
            if t.is_alive():
                t.join(max(0.0, end - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "pod-agent"
    sys_version = ""
    timeout = SOCKET_TIMEOUT  # each read and write; the server bounds the whole request
    linger = False  # a body was left unread: the close reads it away briefly
    _body_checked = False

    def handle(self) -> None:
        """One request per connection: a worker is never held by an idle keep-alive client."""
        self.close_connection = True
        self.handle_one_request()

    def log_message(self, fmt: str, *args: Any) -> None:  # never the stdlib's stderr lines
        pass

    def version_string(self) -> str:
        return self.server_version

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        self.linger = True  # malformed or unsupported: whatever body it had is unread
        super().send_error(code, message, explain)

    # -------------------------------------------------------------- responses
    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self.command == "POST" or code == 500:  # probes and scrapes are not worth a line
            logger.info(f"http: {self.command} {urlsplit(self.path).path[:100]} -> {code}")

    def _json(self, code: int, data: Any, headers: dict | None = None) -> None:
        self._send(code, _dumps(data), "application/json", headers)

    # -------------------------------------------------------------- bodies
    def _check_body(self) -> int | None:
        """The body's length from the headers, or None after refusing it (answered, and the
        connection will close). No body (no Content-Length, no Transfer-Encoding) is 0."""
        self._body_checked = True
        if self.headers.get("Transfer-Encoding") is not None:
            self.linger = True
            self._json(411, {"error": "a request body needs a Content-Length (chunked "
                                      "transfer encoding is not accepted)"})
            return None
        values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not values:
            return 0
        value = values.pop()
        if values or not value.isascii() or not value.isdigit():
            self.linger = True
            self._json(400, {"error": "bad Content-Length"})
            return None
        if not LENGTH_RE.match(value) or int(value) > MAX_BODY:
            self.linger = True
            self._json(413, {"error": f"request body too large (at most {MAX_BODY} bytes)"})
            return None
        return int(value)

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue`: refuse a body we would refuse before the client sends it."""
        if self._check_body() is None:
            return False
        return super().handle_expect_100()

    def _take_body(self) -> bool:
        """Read the request's body (bounded) or refuse it; False: answered, stop here."""
        length = self._check_body() if not self._body_checked else \
            self._length_known()
        if length is None:
            return False
        if length:
            data = self.rfile.read(length)
            if len(data) < length:  # the client went away mid-body
                self.close_connection = True
                return False
        return True

    def _length_known(self) -> int:
        value = (self.headers.get("Content-Length") or "0").strip()
        return int(value)  # validated by _check_body already

    # -------------------------------------------------------------- routes
    def do_GET(self) -> None:  # noqa: N802
        if not self._take_body():
            return
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            code, body, ctype, headers = self._route(path)
        except Exception as exc:  # noqa: BLE001 - one request never takes the server down
            logger.warning(f"http: {path[:100]} failed: {type(exc).__name__}: {exc}")
            code, ctype, headers = 500, "application/json", None
            body = _dumps({"error": redact(f"{type(exc).__name__}: {exc}")[:300]})
        self._send(code, body, ctype, headers)

    def _route(self, path: str) -> tuple[int, bytes, str, dict | None]:
        api = self.server.api
        js = "application/json"
        if path == "/healthz":
            ok, data = api.alive()
            return (200 if ok else 503), _dumps(data), js, None
        if path == "/readyz":
            ok, data = api.ready()
            return (200 if ok else 503), _dumps(data), js, None
        if path == "/status":
            answer = api.status()
            code, data = answer if isinstance(answer, tuple) else (200, answer)
            return code, _dumps(data), js, {"Retry-After": "2"} if code == 503 else None
        if path == "/metrics":
            body, ctype = api.metrics()
            return 200, body, ctype, None
        if path in ("/", "/index.html") and api.page is not None:
            code, body = api.page()
            return code, body, "text/html; charset=utf-8", dict(
                PAGE_HEADERS, **({"Retry-After": "2"} if code == 503 else {}))
        if path in ("/components", "/comfyui") or path.startswith(("/components/",
                                                                   "/comfyui/")):
            return 405, _dumps({"error": "use POST"}), js, {"Allow": "POST"}
        return 404, _dumps({"error": "not found", "endpoints": [
            "GET /", "GET /healthz", "GET /readyz", "GET /status", "GET /metrics",
            "POST /components/NAME/reinstall", "POST /comfyui/restart"]}), js, None

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        if not self._take_body():
            return
        api = self.server.api
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/")
        segs = path.split("/")
        is_reinstall = len(segs) == 4 and segs[1] == "components" and segs[3] == "reinstall"
        if not (is_reinstall or path == "/comfyui/restart"):
            self._json(404, {"error": "not found"})
            return
        if not self._authorized(api):
            return
        try:
            if is_reinstall:
                name = segs[2]
                code, data = api.reinstall(name) if NAME_RE.fullmatch(name) else \
                    (404, {"error": "no such component"})
            else:
                query = parse_qs(parts.query)
                urgent = (query.get("urgent") or ["0"])[-1].lower() in ("1", "true", "yes")
                code, data = 202, api.restart(urgent)
        except Exception as exc:  # noqa: BLE001
            logger.warning(f"http: {path[:100]} failed: {type(exc).__name__}: {exc}")
            code, data = 500, {"error": redact(f"{type(exc).__name__}: {exc}")[:300]}
        self._json(code, data)

    def _authorized(self, api: Api) -> bool:
        token = api.token()
        if not token:
            self._json(403, {"error": "mutating endpoints are off: set http.token in the config "
                                      "or POD_AGENT_HTTP_TOKEN"})
            return False
        scheme, _, given = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "replace"), token.encode("utf-8", "replace")):
            logger.warning(f"http: {self.command} {urlsplit(self.path).path[:100]} refused: "
                           f"missing or wrong bearer token (from {self.client_address[0]})")
            self._json(401, {"error": "missing or wrong bearer token"},
                       {"WWW-Authenticate": 'Bearer realm="pod-agent"'})
            return False
        return True

    def do_PUT(self) -> None:  # noqa: N802
        if self._take_body():
            self._json(405, {"error": "method not allowed"}, {"Allow": "GET, HEAD, POST"})

    do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = do_PUT


def _dumps(data: Any) -> bytes:
    return (json.dumps(data, indent=1, default=str) + "\n").encode()


def _url(address: str, port: int) -> str:
    return f"http://{'[' + address + ']' if ':' in address else address}:{port}"


class HttpServer:
    """The endpoint's lifecycle: `start` (bind now or raise OSError), `start_retrying` (bind
    now or keep trying in the background), `stop`."""

    def __init__(self, api: Api, address: str, port: int, workers: int = WORKERS,
                 queue_max: int = QUEUE_MAX):
        self.api = api
        self.address = address
        self.port = port
        self.workers = workers
        self.queue_max = queue_max
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._retry: threading.Thread | None = None
        self._stopping = threading.Event()
        self._mutex = threading.Lock()
        self.state: dict[str, Any] = {"state": "stopped", "address": address, "port": port}

    @property
    def counts(self) -> dict[str, int]:
        server = self._server
        return dict(server.counts) if server is not None else {}

    def start(self, log: bool = True) -> tuple[str, int]:
        """Bind and serve; returns the bound (address, port). Raises OSError."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        server = _Server((self.address, self.port), self.api, self.workers, self.queue_max,
                         family)
        with self._mutex:
            if self._stopping.is_set():
                server.server_close()
                raise OSError(errno.ECANCELED, "the endpoint is stopping")
            server.start_workers()
            self._server = server
            port = server.server_address[1]
            self._thread = threading.Thread(target=server.serve, args=(self._stopping,),
                                            name="http-server", daemon=True)
            self._thread.start()
        self.state = {"state": "listening", "address": self.address, "port": port,
                      "url": _url(self.address, port), "since": time.time()}
        if log:
            logger.info(self._serving())
        return self.address, port

    def _serving(self) -> str:
        return (f"http: serving {'/ ' if self.api.page else ''}/healthz /readyz /status "
                f"/metrics on "
                f"{self.address}:{self.state.get('port')}"
                + ("" if self.api.token() else " (POST endpoints off: no token)"))

    def start_retrying(self, on_change: Callable[[dict], None] | None = None) -> dict:
        """Bind now if possible; otherwise keep trying in a background thread (RETRY_INITIAL
        doubling to RETRY_MAX, until it binds or `stop`). Logs once per change of state;
        `on_change(state)` hears every state (each retry included, for its next time).
        Returns the state after the first attempt."""
        report = on_change or (lambda state: None)
        try:
            self.start()
        except OSError as exc:
            self._failed(exc, 1, RETRY_INITIAL, None)
            report(dict(self.state))
            self._retry = threading.Thread(target=self._retry_loop, args=(report,),
                                           name="http-bind", daemon=True)
            self._retry.start()
            return dict(self.state)
        report(dict(self.state))
        return dict(self.state)

    def _failed(self, exc: OSError, attempts: int, delay: float, before: str | None) -> None:
        taken = exc.errno == errno.EADDRINUSE
        error = "port taken" if taken else str(exc.strerror or exc)
        since = self.state.get("since") if self.state.get("state") == "retrying" \
            else time.time()
        self.state = {"state": "retrying", "address": self.address, "port": self.port,
                      "error": error, "errno": exc.errno, "attempts": attempts,
                      "retry_in": delay, "retry_at": time.time() + delay, "since": since}
        if error != before:
            what = f"port {self.port} is taken by another process" if taken else error
            logger.error(f"http: cannot listen on {self.address}:{self.port}: {what}; "
                         f"retrying in the background ({RETRY_INITIAL:g} s doubling to "
                         f"{RETRY_MAX:g} s) - `pod-agent status` shows it")

    def _retry_loop(self, report: Callable[[dict], None]) -> None:
        delay, attempts = RETRY_INITIAL, 1
        while not self._stopping.wait(delay):
            attempts += 1
            before = self.state.get("error")
            try:
                self.start(log=False)
            except OSError as exc:
                if self._stopping.is_set():
                    return
                delay = min(RETRY_MAX, delay * 2)
                self._failed(exc, attempts, delay, before)
                report(dict(self.state))
                continue
            logger.info(f"{self._serving()}: bound after {attempts} attempts (was: {before})")
            report(dict(self.state))
            return

    def stop(self) -> None:
        with self._mutex:
            self._stopping.set()
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
        if self._retry is not None:
            self._retry.join(5)
            self._retry = None
        self.state = {"state": "stopped", "address": self.address, "port": self.port}
        if server is None:
            return
        if thread is not None:
            thread.join(5)
        server.server_close()
        server.stop_workers()


def describe(info: dict | None, enabled: bool = True, now: float | None = None) -> dict:
    """The endpoint's state for `status` and health, from http.json (what the running agent
    wrote): {"state": listening|retrying|off|unknown, "detail": one line, ...}."""
    if not enabled:
        return {"state": "off", "detail": "off (http.enabled: false)"}
    if not info or not isinstance(info, dict):
        return {"state": "unknown", "detail": "not reported by the agent (no http.json)"}
    state = info.get("state", "listening")  # files of older agents have no state
    where = f"{info.get('address')}:{info.get('port')}"
    if state == "listening":
        return {"state": "listening", "url": info.get("url"),
                "detail": f"listening on {info.get('url') or where}"}
    if state == "retrying":
        now = time.time() if now is None else now
        try:
            left = max(0, round(float(info.get("retry_at") or 0) - now))
        except (TypeError, ValueError):
            left = 0
        error = str(info.get("error") or "cannot bind")
        return {"state": "retrying", "address": info.get("address"), "port": info.get("port"),
                "error": error, "retry_in": left, "attempts": info.get("attempts"),
                "detail": f"not listening on {where}: {error}, retrying in {left} s"}
    return {"state": str(state), "detail": f"{state} ({where})"}
