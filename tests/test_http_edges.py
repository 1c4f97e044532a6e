"""Edges of the HTTP layer found in review, over a real socket: header values HTTP cannot carry, empty
compressed answers, header names in another case, Retry-After dates without a zone, and the rate limiter
after a 429 pause or at a quota."""
from __future__ import annotations

import asyncio
import email.utils
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runner.errors import UnsafeRequest
from runner.net.http import Clients, Http, Limiter, Policy


@pytest.fixture
def server():
    seen: list[dict] = []
    script: dict[str, list] = {}  # path -> statuses still to answer, in order

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append({"path": self.path, "headers": list(self.headers.items())})
            statuses = script.get(self.path.split("?")[0]) or [200]
            status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
            self.send_response(status)
            # An empty body that says it is compressed (a proxy's 503, a 204): httpx reads it as empty.
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", "0")
            if status == 503:
                self.send_header("Retry-After", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen, script
    finally:
        httpd.shutdown()
        httpd.server_close()


def _get(base, path, **kw):
    async def go():
        clients = Clients()
        try:
            http = Http(clients, base, label="Debitura", policy=Policy(attempts=3, backoff_s=0.01),
                        headers=kw.pop("default_headers", None))
            return http, await http.request("GET", path, **kw)
        finally:
            await clients.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("bad, what", [("dk_live_Abc123\r", "a carriage return"), ("dk_live_Ab\nc123", "a line break"),
                                       ("dk_live_Abc123\u2019", "a non-ASCII character")])
def test_a_header_value_http_cannot_carry_is_refused_by_name_and_never_sent_or_shown(server, bad, what):
    base, seen, _ = server
    with pytest.raises(UnsafeRequest) as caught:
        _get(base, "/me", headers={"XApiKey": bad})
    message = caught.value.message
    assert f"the XApiKey header holds {what}" in message and "dk_live" not in message and "Abc" not in message
    assert seen == []  # not sent, and not retried as if the network had failed


def test_an_empty_compressed_answer_is_empty_and_a_503_so_answered_is_retried(server):
    base, seen, script = server
    script["/flaky"] = [503, 503, 204]
    http, resp = _get(base, "/flaky")
    assert resp.status == 204 and resp.content == b""
    assert len(seen) == 3 and http.retries == 2


def test_a_header_in_another_case_replaces_the_default_instead_of_going_out_twice(server):
    base, seen, _ = server
    _get(base, "/x", default_headers={"accept": "application/json"}, headers={"user-agent": "zap/1"})
    names = [k.lower() for k, _ in seen[0]["headers"]]
    assert names.count("accept") == 1 and names.count("user-agent") == 1
    sent = {k.lower(): v for k, v in seen[0]["headers"]}
    assert sent["accept"] == "application/json" and sent["user-agent"] == "zap/1"


def test_a_retry_after_date_without_a_zone_is_utc(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        from runner.net.http import Response

        in_30s = email.utils.formatdate(time.time() + 30, usegmt=False).rsplit(" ", 1)[0] + " -0000"
        http = Http(Clients(), "http://127.0.0.1:9")
        wait = http._wait_for(Response(status=503, headers={"retry-after": in_30s}, content=b"", url=""), 1)
        assert 25 <= wait <= 31
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_after_a_429_pause_requests_resume_at_the_limit_not_in_a_burst():
    async def go():
        lim = Limiter(20.0, None)
        lim.pause(0.5)
        started = time.monotonic()
        stamps = []

        async def one():
            await lim.acquire()
            stamps.append(time.monotonic() - started)

        await asyncio.gather(*(one() for _ in range(10)))
        return sorted(stamps)

    stamps = asyncio.run(go())
    assert stamps[0] >= 0.5
    # 10 requests at 20/s after the pause: the last no sooner than ~0.45 s after it ends, not all at once
    assert stamps[-1] - 0.5 >= 0.4


def test_a_full_quota_window_is_said_in_the_log_not_waited_out_in_silence():
    from loguru import logger

    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        async def go():
            lim = Limiter(None, None, windows=[(2, 6.0)])
            await lim.acquire()
            await lim.acquire()
            try:
                await asyncio.wait_for(lim.acquire(), 0.2)
            except asyncio.TimeoutError:
                pass

        asyncio.run(go())
    finally:
        logger.remove(sink)
    assert any("quota of 2 requests is used up: waiting 6 s" in line for line in lines), lines


def test_a_server_that_drips_its_answer_is_given_up_on_as_a_whole_not_per_byte():
    """The timeout is per read: a server (or a middlebox) sending one byte every 0.2 s never trips a 0.5 s
    read timeout, and held a request for as long as it liked. A request as a whole now has 4 timeouts."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def drip():
        while not stop.is_set():
            try:
                listener.settimeout(0.2)
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            try:
                while not stop.is_set():
                    conn.sendall(b"x")
                    time.sleep(0.2)
            except OSError:
                pass
            conn.close()

    threading.Thread(target=drip, daemon=True).start()
    try:
        async def go():
            clients = Clients()
            try:
                http = Http(clients, f"http://127.0.0.1:{listener.getsockname()[1]}", label="Zoho Books",
                            policy=Policy(attempts=1, timeout_s=0.5))
                await http.request("GET", "/invoices")
            finally:
                await clients.aclose()

        started = time.monotonic()
        from runner.errors import ProviderError

        with pytest.raises(ProviderError, match="Zoho Books could not be reached after 1 attempts: ReadTimeout"):
            asyncio.run(go())
        assert time.monotonic() - started < 3.5
    finally:
        stop.set()
        listener.close()


@pytest.mark.parametrize("path", ["/v1/invoices/../../admin", "/v1/invoices/%2e%2e/%2E%2e/admin", "/v1/./x",
                                  "http://127.0.0.1:9/v1/../admin"])
def test_a_path_with_dot_segments_is_refused_before_it_is_sent(path):
    """A server resolves `..`: an invoice id from the provider or the command line, or a next-page link, must
    not take the runner's credentials outside the declared address."""
    http = Http(Clients(), "http://127.0.0.1:9/v1")
    with pytest.raises(UnsafeRequest):
        http.url(path)


def test_a_query_value_with_a_scheme_in_it_is_a_path_not_a_link():
    http = Http(Clients(), "http://127.0.0.1:9/v1")
    assert http.url("/search?q=https://example.com") == "http://127.0.0.1:9/v1/search?q=https://example.com"
    assert http.url("/invoices/in..1") == "http://127.0.0.1:9/v1/invoices/in..1"  # dots inside a segment are fine
