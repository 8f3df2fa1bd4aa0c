"""The supervisor's HTTP reads of ComfyUI survive a reply cut short (ComfyUI killed in the
middle of an answer): found by the soak suite, where it logged a traceback per occurrence."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from agent.config import AGENT_FIELDS
from agent.supervisor import Supervisor
from tests.test_supervisor import Pod


def test_a_reply_cut_short_is_an_oserror_not_a_traceback(tmp_path: Path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def answer_then_die() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 42\r\n\r\n")  # ... and no body: the process died
        conn.close()

    thread = threading.Thread(target=answer_then_die)
    thread.start()
    pod = Pod(tmp_path)
    values = {k: default for k, (_typ, default) in AGENT_FIELDS.items()}
    sup = Supervisor(pod.settings(port=port), values, pod.state_dir, http_timeout=5)
    try:
        with pytest.raises(OSError, match="incomplete reply"):
            sup._get_json("/queue")
    finally:
        thread.join(10)
        server.close()
