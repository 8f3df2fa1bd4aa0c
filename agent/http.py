"""The agent's HTTP endpoint for orchestrators (stdlib ThreadingHTTPServer, one thread owned by
the daemon, stopped on shutdown). 127.0.0.1 by default: pods publish ports through proxies.

    GET  /healthz                    200 while the agent's main loop runs, else 503
    GET  /readyz                     200 when ComfyUI is running and answered, else 503
    GET  /status                     the `pod-agent status --json` object
    GET  /metrics                    Prometheus text format
    POST /components/NAME/reinstall  remove NAME's marker and reconcile (202)
    POST /comfyui/restart[?urgent=1] queue-aware restart of ComfyUI, urgent: at once (202)

POST endpoints need `Authorization: Bearer <token>` (http.token or env POD_AGENT_HTTP_TOKEN;
compared with hmac.compare_digest). Without a configured token they are off (403); a missing or
wrong token is 401. Neither headers nor the token are ever logged.
"""

from __future__ import annotations

import hmac
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from loguru import logger

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_BODY = 64 * 1024


@dataclass
class Api:
    """What the endpoint may ask of the agent (the daemon provides it)."""

    alive: Callable[[], tuple[bool, dict]]
    ready: Callable[[], tuple[bool, dict]]
    status: Callable[[], dict]
    metrics: Callable[[], tuple[bytes, str]]  # (body, content type)
    reinstall: Callable[[str], tuple[int, dict]]  # component -> (HTTP status, body)
    restart: Callable[[bool], dict]  # urgent -> body
    token: Callable[[], str | None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: Api


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "pod-agent"
    sys_version = ""
    timeout = 15  # a client that stalls cannot hold a thread for long

    def log_message(self, fmt: str, *args: Any) -> None:  # never the stdlib's stderr lines
        pass

    # -------------------------------------------------------------- responses
    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self.command == "POST" or code >= 500:  # probes and scrapes are not worth a line
            logger.info(f"http: {self.command} {urlsplit(self.path).path} -> {code}")

    def _json(self, code: int, data: Any, headers: dict | None = None) -> None:
        body = (json.dumps(data, indent=1, default=str) + "\n").encode()
        self._send(code, body, "application/json", headers)

    def _drain(self) -> bool:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._json(413 if length > MAX_BODY else 400, {"error": "bad request body"})
            return False
        if length:
            self.rfile.read(length)
        return True

    # -------------------------------------------------------------- routes
    def do_GET(self) -> None:  # noqa: N802
        api = self.server.api
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            if path == "/healthz":
                ok, body = api.alive()
                self._json(200 if ok else 503, body)
            elif path == "/readyz":
                ok, body = api.ready()
                self._json(200 if ok else 503, body)
            elif path == "/status":
                self._json(200, api.status())
            elif path == "/metrics":
                body, ctype = api.metrics()
                self._send(200, body, ctype)
            elif path in ("/components", "/comfyui") or path.startswith(("/components/",
                                                                         "/comfyui/")):
                self._json(405, {"error": "use POST"}, {"Allow": "POST"})
            else:
                self._json(404, {"error": "not found", "endpoints": [
                    "GET /healthz", "GET /readyz", "GET /status", "GET /metrics",
                    "POST /components/NAME/reinstall", "POST /comfyui/restart"]})
        except Exception as exc:  # noqa: BLE001 - one request never takes the server down
            logger.warning(f"http: {path} failed: {type(exc).__name__}: {exc}")
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"[:300]})

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        api = self.server.api
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/")
        segs = path.split("/")
        is_reinstall = len(segs) == 4 and segs[1] == "components" and segs[3] == "reinstall"
        if not (is_reinstall or path == "/comfyui/restart"):
            self._drain()
            self._json(404, {"error": "not found"})
            return
        if not self._drain() or not self._authorized(api):
            return
        try:
            if is_reinstall:
                name = segs[2]
                if not NAME_RE.match(name):
                    self._json(404, {"error": "no such component"})
                    return
                code, body = api.reinstall(name)
                self._json(code, body)
            else:
                query = parse_qs(parts.query)
                urgent = (query.get("urgent") or ["0"])[-1].lower() in ("1", "true", "yes")
                self._json(202, api.restart(urgent))
        except Exception as exc:  # noqa: BLE001
            logger.warning(f"http: {path} failed: {type(exc).__name__}: {exc}")
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"[:300]})

    def _authorized(self, api: Api) -> bool:
        token = api.token()
        if not token:
            self._json(403, {"error": "mutating endpoints are off: set http.token in the config "
                                      "or POD_AGENT_HTTP_TOKEN"})
            return False
        scheme, _, given = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "replace"), token.encode("utf-8", "replace")):
            logger.warning(f"http: {self.command} {urlsplit(self.path).path} refused: missing "
                           f"or wrong bearer token (from {self.client_address[0]})")
            self._json(401, {"error": "missing or wrong bearer token"},
                       {"WWW-Authenticate": 'Bearer realm="pod-agent"'})
            return False
        return True

    def do_PUT(self) -> None:  # noqa: N802
        self._drain()
        self._json(405, {"error": "method not allowed"}, {"Allow": "GET, POST"})

    do_DELETE = do_PATCH = do_PUT


class HttpServer:
    def __init__(self, api: Api, address: str, port: int):
        self.api = api
        self.address = address
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve in a thread; returns the bound (address, port). Raises OSError."""
        cls = _Server6 if ":" in self.address else _Server
        server = cls((self.address, self.port), _Handler)
        server.api = self.api
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={
            "poll_interval": 0.2}, name="http-server", daemon=True)
        self._thread.start()
        logger.info(f"http: serving /healthz /readyz /status /metrics on "
                    f"{self.address}:{self.port}"
                    + ("" if self.api.token() else " (POST endpoints off: no token)"))
        return self.address, self.port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
