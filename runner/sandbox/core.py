"""Framework-free plumbing shared by the sandbox simulators.

A simulator is any object with ``async def handle(request: httpx.Request) -> httpx.Response``.
Simulators built on :class:`Simulator` also carry ``faults`` (:class:`Faults`), a request counter and a
bounded request log, and answer ``state()`` / ``reset()`` / ``set_faults()``.

Two adapters expose a simulator:

* :func:`transport` - an ``httpx.AsyncBaseTransport`` for ``httpx.AsyncClient(transport=...)`` (in-process).
* :class:`SandboxServer` - a real HTTP/1.1 server on 127.0.0.1 mounting several simulators under path
  prefixes (``/stripe``, ``/debitura``...). All simulator code runs on one asyncio loop owned by the
  server (a background thread), so simulator state is only touched from that loop.

The server also answers ``GET /_sandbox/state``, ``POST /_sandbox/faults/{name}`` (JSON body with
fault fields) and ``POST /_sandbox/reset``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping

import httpx

REQUEST_LOG_MAX = 1000
FAULT_FIELDS = ("latency_s", "rate_limit_per_s", "fail_next")


@dataclass
class Faults:
    """Fault-injection knobs plus request accounting for one simulator.

    latency_s        -- asyncio.sleep this long before answering every request.
    rate_limit_per_s -- None: the provider's real default limit; a number: token bucket with that rate
                        (burst = max(1, rate)) replacing the default. 429s use the provider's real body.
    fail_next        -- status codes; each of the next len(fail_next) requests is answered with the
                        first remaining code, using the provider's real error body for that status.
    requests         -- number of requests received (all of them, including failed/limited ones).
    request_log      -- (method, path_with_query) of the last 1000 requests.
    """

    latency_s: float = 0.0
    rate_limit_per_s: float | None = None
    fail_next: list[int] = field(default_factory=list)
    requests: int = 0
    request_log: list[tuple[str, str]] = field(default_factory=list)

    def record(self, method: str, path_with_query: str) -> None:
        self.requests += 1
        self.request_log.append((method, path_with_query))
        if len(self.request_log) > REQUEST_LOG_MAX:
            del self.request_log[: len(self.request_log) - REQUEST_LOG_MAX]

    def update(self, values: Mapping[str, Any]) -> None:
        unknown = set(values) - set(FAULT_FIELDS)
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        if "latency_s" in values:
            v = float(values["latency_s"] or 0.0)
            if v < 0:
                raise ValueError("latency_s must be >= 0")
            self.latency_s = v
        if "rate_limit_per_s" in values:
            v = values["rate_limit_per_s"]
            if v is not None:
                v = float(v)
                if v <= 0:
                    raise ValueError("rate_limit_per_s must be > 0 or null")
            self.rate_limit_per_s = v
        if "fail_next" in values:
            codes = values["fail_next"] or []
            if not isinstance(codes, list) or not all(isinstance(c, int) and 100 <= c <= 599 for c in codes):
                raise ValueError("fail_next must be a list of HTTP status codes")
            self.fail_next = list(codes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "latency_s": self.latency_s,
            "rate_limit_per_s": self.rate_limit_per_s,
            "fail_next": list(self.fail_next),
            "requests": self.requests,
        }


class TokenBucket:
    """Token bucket; ``clock`` is injectable so tests need no sleeps."""

    def __init__(self, rate: float, capacity: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate)
        self.capacity = float(capacity if capacity is not None else max(1.0, rate))
        self.clock = clock
        self.tokens = self.capacity
        self.updated = clock()

    def try_take(self) -> tuple[bool, float]:
        """Take one token. Returns (allowed, seconds until a token is available)."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True, 0.0
        return False, (1.0 - self.tokens) / self.rate


class SlidingWindow:
    """At most ``limit`` events per ``window_s`` seconds (exact sliding log)."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.limit = int(limit)
        self.window_s = float(window_s)
        self.clock = clock
        self.events: list[float] = []

    def try_take(self) -> tuple[bool, float]:
        now = self.clock()
        cutoff = now - self.window_s
        i = 0
        while i < len(self.events) and self.events[i] <= cutoff:
            i += 1
        if i:
            del self.events[:i]
        if len(self.events) < self.limit:
            self.events.append(now)
            return True, 0.0
        return False, max(0.0, self.events[0] + self.window_s - now)


def json_response(status: int, body: Any, headers: Mapping[str, str] | None = None,
                  content_type: str = "application/json") -> httpx.Response:
    data = json.dumps(body, ensure_ascii=False).encode("utf-8")
    h = {"Content-Type": content_type}
    if headers:
        h.update(headers)
    return httpx.Response(status, content=data, headers=h)


def path_with_query(request: httpx.Request) -> str:
    raw = request.url.raw_path.decode("ascii", "replace")
    return raw


class Simulator:
    """Base class: accounting, latency, fail_next, then ``dispatch``.

    Subclasses implement ``dispatch`` (after faults) and ``fault_response(status)`` (the provider's
    real error body for an injected failure), and may override ``state``/``reset``.
    """

    name = "simulator"

    def __init__(self) -> None:
        self.faults = Faults()
        self.clock: Callable[[], float] = time.monotonic

    # convenience views of the accounting kept on ``faults``
    @property
    def requests(self) -> int:
        return self.faults.requests

    @property
    def request_log(self) -> list[tuple[str, str]]:
        return self.faults.request_log

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.faults.record(request.method, path_with_query(request))
        if self.faults.latency_s > 0:
            await asyncio.sleep(self.faults.latency_s)
        if self.faults.fail_next:
            status = self.faults.fail_next.pop(0)
            return self.fault_response(status)
        return await self.dispatch(request)

    async def dispatch(self, request: httpx.Request) -> httpx.Response:  # pragma: no cover - abstract
        raise NotImplementedError

    def fault_response(self, status: int) -> httpx.Response:
        return json_response(status, {"error": "injected_fault", "status": status})

    def set_faults(self, values: Mapping[str, Any]) -> None:
        self.faults.update(values)
        self.on_faults_changed()

    def on_faults_changed(self) -> None:
        """Hook: drop rate-limit state when the limit changes."""

    def state(self) -> dict[str, Any]:
        return {"requests": self.faults.requests, "faults": self.faults.as_dict()}

    def reset(self) -> None:
        self.faults = Faults()
        self.on_faults_changed()


# ----------------------------------------------------------------------------------------------
# In-process adapter


def _strip_prefix(request: httpx.Request, prefix: str) -> httpx.Request:
    path = request.url.path
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        new_path = path[len(prefix):] or "/"
        return httpx.Request(request.method, request.url.copy_with(path=new_path),
                             headers=request.headers, content=request.content)
    return request


def transport(sim: Any, prefix: str = "") -> httpx.AsyncBaseTransport:
    """An async transport answering from ``sim`` (for ``httpx.AsyncClient`` only).

    ``prefix`` (e.g. "/stripe") is stripped from request paths when present, so a client whose base URL
    carries a mount prefix works too.
    """
    prefix = prefix.rstrip("/")

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        return await sim.handle(_strip_prefix(request, prefix))

    return httpx.MockTransport(handler)


# ----------------------------------------------------------------------------------------------
# Real HTTP server adapter

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection",
                "te", "trailer", "upgrade", "content-encoding"}


class SandboxServer:
    """Real HTTP/1.1 server on ``host`` mounting simulators under path prefixes.

    ``mounts`` maps a prefix ("stripe" or "/stripe"; "" = root) to a simulator. ``start()`` returns the
    base URL (``http://127.0.0.1:<port>``); the simulator for prefix P lives at ``base_url + "/P"``.
    """

    def __init__(self, mounts: Mapping[str, Any] | None = None, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self.mounts: dict[str, Any] = {}
        for prefix, sim in (mounts or {}).items():
            self.mount(prefix, sim)
        self._httpd: ThreadingHTTPServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._http_thread: threading.Thread | None = None
        self.base_url: str | None = None

    def mount(self, prefix: str, sim: Any) -> None:
        p = prefix.strip("/")
        self.mounts["/" + p if p else ""] = sim

    def url(self, name: str) -> str:
        assert self.base_url, "server not started"
        p = name.strip("/")
        return f"{self.base_url}/{p}" if p else self.base_url

    # -- lifecycle
    def start(self) -> str:
        if self.base_url:
            return self.base_url
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="sandbox-loop", daemon=True)
        self._loop_thread.start()
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        plain_handle_error = self._httpd.handle_error

        def handle_error(request: Any, client_address: Any) -> None:
            import sys

            # A client that gave up (a timeout test, a killed runner) is not an error worth a stack trace.
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                plain_handle_error(request, client_address)

        self._httpd.handle_error = handle_error  # type: ignore[method-assign]
        self.port = self._httpd.server_address[1]
        self._http_thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                             name="sandbox-http", daemon=True)
        self._http_thread.start()
        self.base_url = f"http://{self.host}:{self.port}"
        return self.base_url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=5)
            self._loop.close()
            self._loop = None
            self._loop_thread = None
        self.base_url = None

    def serve_forever(self) -> None:
        """Block until interrupted (start() first)."""
        if not self.base_url:
            self.start()
        try:
            while self._http_thread is not None and self._http_thread.is_alive():
                self._http_thread.join(timeout=0.5)
        finally:
            self.stop()

    def __enter__(self) -> "SandboxServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- request routing (runs on the loop thread)
    def _find_mount(self, path: str) -> tuple[str, Any] | None:
        best: tuple[str, Any] | None = None
        for prefix, sim in self.mounts.items():
            if prefix == "" or path == prefix or path.startswith(prefix + "/"):
                if best is None or len(prefix) > len(best[0]):
                    best = (prefix, sim)
        return best

    async def _dispatch(self, method: str, raw_target: str, headers: list[tuple[str, str]],
                        body: bytes) -> httpx.Response:
        path, _, query = raw_target.partition("?")
        if path.startswith("/_sandbox/") or path == "/_sandbox":
            return self._control(method, path, body)
        if method == "GET" and path in ("/healthz", "/readyz"):  # as every runner server: for probes and scripts
            return json_response(200, {"ok": True, "simulators": sorted(p.strip("/") for p in self.mounts)})
        found = self._find_mount(path)
        if found is None:
            return json_response(404, {"error": "no_simulator", "message": f"No simulator mounted at {path}",
                                       "mounts": sorted(self.mounts)})
        prefix, sim = found
        sub = path[len(prefix):] or "/"
        url = f"http://{self.host}:{self.port}{sub}" + (f"?{query}" if query else "")
        req = httpx.Request(method, url, headers=headers, content=body)
        try:
            resp = await sim.handle(req)
            await resp.aread()
            return resp
        except Exception as exc:  # surface simulator bugs as a 500 the client can read
            return json_response(500, {"error": "sandbox_internal_error", "message": repr(exc)})

    def _sim_by_name(self, name: str) -> Any:
        return self.mounts.get("/" + name.strip("/")) if name.strip("/") else self.mounts.get("")

    def _control(self, method: str, path: str, body: bytes) -> httpx.Response:
        if method == "GET" and path == "/_sandbox/state":
            out = {}
            for prefix, sim in self.mounts.items():
                st = sim.state() if hasattr(sim, "state") else {}
                out[prefix.strip("/") or "/"] = st
            return json_response(200, {"simulators": out})
        if method == "POST" and path == "/_sandbox/reset":
            for sim in self.mounts.values():
                if hasattr(sim, "reset"):
                    sim.reset()
            return json_response(200, {"reset": True})
        if method == "POST" and path.startswith("/_sandbox/faults/"):
            name = path[len("/_sandbox/faults/"):]
            sim = self._sim_by_name(name)
            if sim is None or not hasattr(sim, "set_faults"):
                return json_response(404, {"error": "unknown_simulator", "message": name})
            try:
                values = json.loads(body or b"{}")
                if not isinstance(values, dict):
                    raise ValueError("body must be a JSON object")
                sim.set_faults(values)
            except (ValueError, TypeError) as exc:
                return json_response(400, {"error": "bad_faults", "message": str(exc)})
            return json_response(200, {"faults": sim.faults.as_dict()})
        return json_response(404, {"error": "unknown_control_endpoint", "message": f"{method} {path}"})


def _make_handler(server: SandboxServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "runner-sandbox/1"
        # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the client's
        # delayed ACK add ~40 ms to every keep-alive response.
        disable_nagle_algorithm = True
        timeout = 120

        def log_message(self, format: str, *args: Any) -> None:  # silence stderr access log
            pass

        def _read_body(self) -> bytes:
            te = (self.headers.get("Transfer-Encoding") or "").lower()
            if "chunked" in te:
                chunks = []
                while True:
                    line = self.rfile.readline()
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _handle(self) -> None:
            body = self._read_body()
            headers = [(k, v) for k, v in self.headers.items()
                       if k.lower() not in ("transfer-encoding",)]
            loop = server._loop
            try:
                if loop is None or loop.is_closed():
                    raise RuntimeError("sandbox loop stopped")
                fut = asyncio.run_coroutine_threadsafe(
                    server._dispatch(self.command, self.path, headers, body), loop)
                resp = fut.result(timeout=300)
                status, content, resp_headers = resp.status_code, resp.content, resp.headers
            except Exception as exc:
                status = 503
                content = json.dumps({"error": "sandbox_unavailable", "message": repr(exc)}).encode()
                resp_headers = httpx.Headers({"Content-Type": "application/json"})
            self.send_response(status)
            for k, v in resp_headers.multi_items():
                if k.lower() not in _HOP_HEADERS:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    return Handler
