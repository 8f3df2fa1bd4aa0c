"""Load: 200 concurrent requests to each GET endpoint (/healthz, /readyz, /status, /metrics) of a
real `pod-agent run` (fake ComfyUI, loopback only). Goals per endpoint: every request answered
(200, a complete body), p99 under 1 s on the 2-core machine, the agent's threads bounded during
the burst (a fixed worker pool, never a thread per request), and its RSS, threads and open fds
back to normal afterwards. /status must not run a probe per request: a component's `check`
counts its own runs. One burst per endpoint in CI; 5 with POD_AGENT_RELIABILITY=full.

The latencies (p50/p99/max per endpoint) are printed: run with `-s` to see them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import psutil

from agent.endpoints import STATUS_FRESH
from tests.helpers import wait_for
from tests.reliability.conftest import size
from tests.test_daemon import aws, install_all, running  # noqa: F401 - fixture

ENDPOINTS = ("/healthz", "/readyz", "/status", "/metrics")
CONCURRENCY = 200
TIMEOUT = 15.0  # one request, connect to last byte
P99_GOAL = 1.0
THREADS_DURING = 6  # the agent may run this many threads more than at rest during a burst
THREADS_AFTER = 2  # ...and afterwards (a status refresh, a scheduler worker)
FDS_AFTER = 4
RSS_AFTER_MB = 15.0
# the checks that first run 10 s after the start (`components` waits its whole interval)
FIRST_ROUND = {"comfyui_http", "comfyui_process", "sageattention", "disk", "gpu", "agent"}


async def _one(port: int, path: str) -> tuple[int | None, float, str]:
    """(status code or None, seconds, what went wrong)."""
    start = time.perf_counter()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), TIMEOUT)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())

        async def answer() -> tuple[int, bytes, int]:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(v) for k, _, v in (x.partition(":") for x in lines[1:])
                           if k.lower() == "content-length"), -1)
            body = await reader.readexactly(length) if length >= 0 else await reader.read()
            return int(lines[0].split(" ")[1]), body, length

        left = TIMEOUT - (time.perf_counter() - start)
        code, body, length = await asyncio.wait_for(answer(), max(0.1, left))
        took = time.perf_counter() - start
        if length < 0:
            return None, took, "no Content-Length"
        return code, took, ""
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError, ValueError, IndexError) as exc:
        return None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()


async def _burst(port: int, path: str, n: int) -> list[tuple[int | None, float, str]]:
    return await asyncio.gather(*(_one(port, path) for _ in range(n)))


def burst(port: int, path: str, n: int = CONCURRENCY) -> list[tuple[int | None, float, str]]:
    return asyncio.run(_burst(port, path, n))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Peak:
    """The agent's highest thread count while a burst runs (sampled every 10 ms)."""

    def __init__(self, proc: psutil.Process):
        self.proc, self.peak = proc, proc.num_threads()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thread-sampler")

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak = max(self.peak, self.proc.num_threads())
            except psutil.Error:
                return

    def __enter__(self) -> "Peak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def resources(proc: psutil.Process) -> dict:
    return {"threads": proc.num_threads(), "fds": proc.num_fds(),
            "rss_mb": proc.memory_info().rss / 2**20}


def probe_runs(ws) -> int:
    try:
        return len((ws.root / "probes.txt").read_text().splitlines())
    except FileNotFoundError:
        return 0


def fresh_age(url: str) -> tuple[float] | None:
    """(age,) of the agent's cached status when it is well within STATUS_FRESH, else None."""
    from tests.test_http import call

    code, _, body = call(url)
    age = json.loads(body).get("age") if code == 200 else None
    return (age,) if age is not None and age < STATUS_FRESH - 1 else None


def test_load_every_get_endpoint(aws, tally):  # noqa: F811
    ws = aws
    # a component whose probe counts its own runs: /status must not probe per request
    ws.config["components"]["counted"] = {
        "kind": "command", "run": "true", "check": "echo probe >> {workspace}/probes.txt"}
    ws.save()
    install_all(ws)
    agent_run = ws.start_agent()
    agent = psutil.Process(agent_run.proc.pid)
    wait_for(lambda: running(ws), 60, what="ComfyUI running")
    from tests.test_http import _health, _http_info

    port = wait_for(lambda: (i := _http_info(ws)) and i.get("state") == "listening"
                    and i["port"], 20, what="the endpoint listening")
    # warm-up: the first round of health checks done (APScheduler starts its pool threads
    # then), every endpoint answered (lazy imports, the first observation, allocator
    # arenas); then the agent at rest
    wait_for(lambda: FIRST_ROUND <= set(_health(ws)), 60, interval=0.5,
             what="the first round of health checks")
    for path in ENDPOINTS:
        wait_for(lambda: all(c == 200 for c, _, _ in burst(port, path, 20)), 30,
                 interval=0.5, what=f"{path} answering 200")
    seen: list[int] = []

    def steady() -> dict | None:  # the same thread count three polls in a row
        r = resources(agent)
        seen.append(r["threads"])
        return r if len(seen) >= 3 and len(set(seen[-3:])) == 1 else None

    rest = wait_for(steady, 20, interval=0.3, what="the agent at rest")

    failures, report = [], []
    for path in ENDPOINTS:
        results: list[tuple[int | None, float, str]] = []
        if path == "/status":  # the burst finds the cached copy stale: one observation
            (age,) = wait_for(lambda: fresh_age(f"http://127.0.0.1:{port}/status"), 30,
                              interval=0.5, what="a fresh cached status")
            stale_at = time.monotonic() - age + STATUS_FRESH + 0.3
            wait_for(lambda: time.monotonic() >= stale_at, 10, what="the cached copy to age")
        probes_before = probe_runs(ws)
        with Peak(agent) as peak:
            for _ in range(size(1, 5)):
                results += burst(port, path)
        if path == "/status":
            wait_for(lambda: fresh_age(f"http://127.0.0.1:{port}/status"), 30, interval=0.5,
                     what="the new observation")
        probes = probe_runs(ws) - probes_before
        lat = [t for _, t, _ in results]
        bad = [(c, e) for c, _, e in results if c != 200]
        p50, p99 = pct(lat, 0.50), pct(lat, 0.99)

        def back() -> dict | None:
            now = resources(agent)
            ok = now["threads"] <= rest["threads"] + THREADS_AFTER and \
                now["fds"] <= rest["fds"] + FDS_AFTER and \
                now["rss_mb"] <= rest["rss_mb"] + RSS_AFTER_MB
            return now if ok else None

        try:
            after = wait_for(back, 15, interval=0.2, what="threads, fds and RSS back")
        except AssertionError:
            after = resources(agent)
        leak = back() is None or peak.peak > rest["threads"] + THREADS_DURING
        # /status: one observation per few seconds, whatever the load (a health check or a
        # reconcile may add one of its own)
        if path == "/status" and not 1 <= probes <= size(1, 5) + 2:
            bad.append((None, f"{probes} probe runs during {len(results)} requests"))
        slow = p99 >= P99_GOAL
        line = (f"{path}: {len(results)} requests, {len(results) - len(bad)} answered 200, "
                f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(lat) * 1000:.0f} "
                f"ms; threads {rest['threads']} at rest, {peak.peak} at peak, "
                f"{after['threads']} after; fds {rest['fds']} -> {after['fds']}; RSS "
                f"{rest['rss_mb']:.1f} -> {after['rss_mb']:.1f} MB"
                + (f"; probe runs {probes}" if path == "/status" else ""))
        print(f"load: {line}")
        report.append(line)
        note = line + (f"; not answered: {bad[:3]}" if bad else "") + \
            ("; p99 over 1 s" if slow else "")
        # an unanswered or too slow request is a hang (crash column); resources that do not
        # come back, or threads that grow with the load, are leaks
        if not tally.case("load", crash=bool(bad) or slow or agent_run.proc.poll() is not None,
                          leak=leak, note=note):
            failures.append(note)
    assert agent_run.stop() == 0
    assert not failures, "\n".join(failures)
