"""The HTTP layer over a real socket: what every provider request carries and how its answer is read."""
from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpcore
import pytest

from runner import __version__
from runner.errors import ProviderError
from runner.net.http import BACKUP_CONNECT_S, CONNECTS_AT_ONCE, Clients, Connector, Http, Policy


@pytest.fixture
def server():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            got = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"path": self.path, "body": got, **{k.lower(): v for k, v in self.headers.items()}})
            body = json.dumps({"echo": json.loads(got)}).encode()
            # deflate as servers send it: with the zlib header (RFC 1950), or raw (RFC 1951)
            body = zlib.compress(body) if "zlib" in self.path else zlib.compress(body)[2:-4]
            self.send_response(201)
            self.send_header("Content-Encoding", "deflate")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            body = json.dumps({"data": [{"id": f"in_{i}"} for i in range(500)], "path": self.path}).encode()
            if "corrupt" in self.path:
                body = gzip.compress(body)[:40] + b"not gzip"
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
            elif "gzip" in self.headers.get("Accept-Encoding", ""):
                body = gzip.compress(body)
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
            else:
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_requests_ask_for_compression_say_who_calls_and_answers_are_decoded(server):
    base, seen = server

    async def go():
        clients = Clients()
        try:
            http = Http(clients, base + "/v1", headers={"Authorization": "Bearer sk_test_x"})
            first = await http.request("GET", "/invoices", params={"limit": 100, "expand[]": "data.customer"})
            second = await http.request("GET", "/invoices", params={"starting_after": "in_499"})
            return first, second
        finally:
            await clients.aclose()

    first, second = asyncio.run(go())
    assert first.status == 200 and len(first.json()["data"]) == 500  # gzip answer, decoded
    assert first.json()["path"] == "/v1/invoices?limit=100&expand%5B%5D=data.customer"
    assert second.json()["path"] == "/v1/invoices?starting_after=in_499"
    assert first.url == base + "/v1/invoices?limit=100&expand%5B%5D=data.customer"
    assert [s["accept-encoding"] for s in seen] == ["gzip, deflate"] * 2
    assert all(s["user-agent"] == f"runner/{__version__}" and s["authorization"] == "Bearer sk_test_x" for s in seen)
    # the answer's headers, by name in any case
    assert first.headers["Content-Type"] == first.headers.get("content-type") == "application/json"
    assert "CONTENT-ENCODING" in first.headers and first.headers.get("retry-after") is None


def test_bodies_links_and_odd_characters_go_out_as_httpx_would_send_them(server):
    base, seen = server

    async def go():
        clients = Clients()
        try:
            http = Http(clients, base + "/v1")
            posted = await http.request("POST", "/cases", json={"amount": 12.5, "name": "Ærø ApS"})
            raw_deflate = await http.request("POST", "/cases/zlib", json={"n": 1})
            # a next link keeps its own query; the spec's parameters are added to it
            linked = await http.request("GET", base + "/v1/invoices?page=2", params={"per_page": 100})
            # a space and non-ASCII in a path (an id from the provider) are percent-encoded
            odd = await http.request("GET", "/invoices/in 1/é", params={"flag": True, "none": None})
            return posted, raw_deflate, linked, odd
        finally:
            await clients.aclose()

    posted, raw_deflate, linked, odd = asyncio.run(go())
    assert posted.status == 201 and posted.json() == {"echo": {"amount": 12.5, "name": "Ærø ApS"}}
    assert raw_deflate.json() == {"echo": {"n": 1}}
    assert seen[0]["content-length"] == str(len(seen[0]["body"])) and seen[0]["content-type"] == "application/json"
    assert linked.json()["path"] == "/v1/invoices?page=2&per_page=100"
    assert odd.json()["path"] == "/v1/invoices/in%201/%C3%A9?flag=true&none="
    assert odd.url == base + "/v1/invoices/in%201/%C3%A9?flag=true&none="


def test_a_corrupt_compressed_answer_is_a_clear_provider_error(server):
    base, _ = server

    async def go():
        clients = Clients()
        try:
            return await Http(clients, base, label="Stripe").request("GET", "/corrupt")
        finally:
            await clients.aclose()

    with pytest.raises(ProviderError, match="Stripe's answer could not be decompressed"):
        asyncio.run(go())


def test_an_address_nothing_listens_on_is_retried_then_reported():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        clients = Clients()
        try:
            http = Http(clients, f"http://127.0.0.1:{port}", label="Stripe",
                        policy=Policy(attempts=2, backoff_s=0.01, max_backoff_s=0.01))
            try:
                await http.request("GET", "/v1/invoices")
            finally:
                assert (http.requests, http.retries) == (2, 1)
        finally:
            await clients.aclose()

    with pytest.raises(ProviderError, match="Stripe could not be reached after 2 attempts: ConnectError"):
        asyncio.run(go())


def test_a_connection_whose_first_syn_is_dropped_opens_in_a_quarter_second_not_a_second():
    """A server's full accept queue drops the next SYN; the kernel resends it only after a second. Fifty
    connections starting at once against a small Python server lost a second each that way (issue 7)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # a queue of one connection waiting to be accepted
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))  # ... and it is full: the next SYN is dropped
    accepted: list[socket.socket] = []

    def serve():
        time.sleep(0.1)  # the server gets round to accepting a moment later, after the first SYN was lost
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            if len(accepted) == 2:  # the filler, then the runner's connection: answer it
                conn.sendall(conn.recv(100).upper())

    threading.Thread(target=serve, daemon=True).start()

    async def go():
        started = time.monotonic()
        stream = await Connector().connect_tcp("127.0.0.1", port, timeout=5)
        took = time.monotonic() - started
        await stream.write(b"ping")
        echoed = await stream.read(100)
        await stream.aclose()
        return took, echoed

    try:
        took, echoed = asyncio.run(go())
    finally:
        filler.close()
        listener.close()
    assert echoed == b"PING"
    assert BACKUP_CONNECT_S <= took < 0.9, took  # the second attempt, not the kernel's retransmission at 1 s


class _Attempts(httpcore.AsyncNetworkBackend):
    """A network backend whose connection attempts the test decides: each waits for its own outcome."""

    def __init__(self):
        self.outcomes: list[asyncio.Future] = []
        self.cancelled = 0
        self.opening = self.most_opening = 0

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        outcome = asyncio.get_running_loop().create_future()
        self.outcomes.append(outcome)
        self.opening += 1
        self.most_opening = max(self.most_opening, self.opening)
        try:
            return await outcome
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.opening -= 1


async def _settle():
    """Let every task that can run, run (the attempts are tasks of their own)."""
    for _ in range(20):
        await asyncio.sleep(0)


class _Stream(httpcore.AsyncNetworkStream):
    closed = False

    async def aclose(self):
        self.closed = True


def test_an_unanswered_attempt_gets_a_second_beside_it_and_the_loser_is_stopped():
    async def go():
        inner = _Attempts()
        task = asyncio.ensure_future(Connector(inner).connect_tcp("api.example.com", 443))
        while len(inner.outcomes) < 2:  # the first has had no answer for BACKUP_CONNECT_S
            await asyncio.sleep(0.01)
        won = _Stream()
        inner.outcomes[1].set_result(won)
        assert await task is won
        return inner

    inner = asyncio.run(go())
    assert len(inner.outcomes) == 2 and inner.cancelled == 1


def test_of_two_attempts_that_connect_together_one_is_used_and_the_other_closed():
    async def go():
        inner = _Attempts()
        task = asyncio.ensure_future(Connector(inner).connect_tcp("api.example.com", 443))
        while len(inner.outcomes) < 2:
            await asyncio.sleep(0.01)
        both = [_Stream(), _Stream()]
        for outcome, stream in zip(inner.outcomes, both):
            outcome.set_result(stream)
        return await task, both

    used, both = asyncio.run(go())
    assert used in both and not used.closed
    assert [s.closed for s in both if s is not used] == [True]


def test_a_refused_connection_is_reported_at_once_without_a_second_attempt():
    async def go():
        inner = _Attempts()
        task = asyncio.ensure_future(Connector(inner).connect_tcp("api.example.com", 443))
        await _settle()
        inner.outcomes[0].set_exception(httpcore.ConnectError("[Errno 111] Connection refused"))
        with pytest.raises(httpcore.ConnectError, match="refused"):
            await task
        return inner

    assert len(asyncio.run(go()).outcomes) == 1


def test_connections_to_one_host_are_opened_a_few_at_a_time_and_other_hosts_do_not_wait():
    async def go():
        inner = _Attempts()
        connector = Connector(inner)
        many = [asyncio.ensure_future(connector.connect_tcp("api.stripe.com", 443)) for _ in range(20)]
        other = asyncio.ensure_future(connector.connect_tcp("books.zoho.com", 443))
        await _settle()
        assert len(inner.outcomes) == CONNECTS_AT_ONCE + 1  # eight to Stripe, and Zoho's at once
        while not all(t.done() for t in many + [other]):
            for o in inner.outcomes:
                if not o.done():
                    o.set_result(_Stream())
            await _settle()
        return inner

    inner = asyncio.run(go())
    assert inner.most_opening == CONNECTS_AT_ONCE + 1
    assert len(inner.outcomes) == 21  # every one answered at once: no second attempts


@pytest.mark.parametrize("base", ["https://api.stripe.com", "https://api.stripe.com:443/v1", "http://127.0.0.1:8080/x",
                                  "http://[::1]:9000", "https://user:pw@host.example:8443/a",
                                  "https://bücher.example/api", "HTTPS://API.Stripe.com", "http://h:80", "https://h:80"])
def test_requests_go_to_the_origin_httpx_would_address(base):
    import httpx
    from urllib.parse import urlsplit

    from runner.net.http import _address

    url = httpx.URL(base)
    assert _address(urlsplit(base)) == (url.raw_scheme, url.raw_host, url.port, url.netloc)


def test_a_run_against_the_network_does_not_import_httpx(server):
    """httpx is a tenth of a second of start-up; a run with an API key never needs it (issue 7, target 7), nor
    urllib.request (30 ms) when no variable names a proxy."""
    import subprocess
    import sys

    base, _ = server
    code = (
        "import asyncio, sys\n"
        "from runner.net.http import Clients, Http\n"
        "async def go():\n"
        "    clients = Clients()\n"
        f"    r = await Http(clients, {base!r}).request('GET', '/v1/invoices')\n"
        "    await clients.aclose()\n"
        "    return r.status\n"
        "print(asyncio.run(go()), 'httpx' in sys.modules, 'urllib.request' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.stdout.split() == ["200", "False", "False"], out.stderr
