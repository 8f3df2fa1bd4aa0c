"""The one client of ComfyUI's HTTP API (the supervisor's readiness, liveness and queue reads, and
the `comfyui_http` health check).

No proxy (a pod's HTTP_PROXY must not carry loopback traffic), a timeout on every call, a body
read capped at `limit` bytes, and a reply cut short (ComfyUI killed in the middle of an answer)
raised as an OSError like every other transport failure, never as http.client's exceptions.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any, Callable, Union

from agent.model import ComfyUISettings

BODY_LIMIT = 1 << 20


def connect_host(settings: ComfyUISettings) -> str:
    """Where to reach ComfyUI: a wildcard listen address is reached on loopback."""
    host = settings.host or "127.0.0.1"
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def comfyui_url(settings: ComfyUISettings, path: str) -> str:
    host = connect_host(settings)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}{path}"


class ComfyClient:
    """GET requests to one ComfyUI. `settings` may be a callable (read at every call, so a
    reloaded config's port is used at once)."""

    def __init__(self, settings: Union[ComfyUISettings, Callable[[], ComfyUISettings]],
                 timeout: float = 2.0) -> None:
        self._settings = settings
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def settings(self) -> ComfyUISettings:
        s = self._settings
        return s() if callable(s) else s

    def url(self, path: str) -> str:
        return comfyui_url(self.settings, path)

    def get(self, path: str, timeout: float | None = None, limit: int = BODY_LIMIT
            ) -> tuple[int, bytes]:
        """(HTTP status, body). Raises urllib.error.HTTPError for an error status, OSError
        (urllib.error.URLError included) for anything else that failed."""
        try:
            with self._opener.open(self.url(path), timeout=self.timeout if timeout is None
                                   else timeout) as resp:
                body = resp.read(limit)
                left = getattr(resp, "length", None)
                if isinstance(left, int) and left > 0 and len(body) < limit:
                    raise http.client.IncompleteRead(body, left)
                return resp.status, body
        except http.client.HTTPException as exc:  # a reply cut short: ComfyUI died mid-answer
            raise OSError(f"{path}: incomplete reply ({type(exc).__name__})") from None

    def get_json(self, path: str, timeout: float | None = None) -> Any:
        """The JSON body of a 200 answer. Raises OSError (transport, non-200) or ValueError
        (not JSON)."""
        status, body = self.get(path, timeout)
        if status != 200:
            raise OSError(f"HTTP {status}")
        return json.loads(body)

    def system_stats(self, timeout: float | None = None) -> Any:
        return self.get_json("/system_stats", timeout)

    def queue_idle(self, timeout: float | None = None) -> bool | None:
        """True when nothing runs or waits; None when the queue cannot be read."""
        try:
            data = self.get_json("/queue", timeout)
            return not data.get("queue_running") and not data.get("queue_pending")
        except (OSError, ValueError, AttributeError, urllib.error.URLError):
            return None
