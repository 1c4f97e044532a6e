"""The HTTP layer over a real socket: what every provider request carries and how its answer is read."""
from __future__ import annotations

import asyncio
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runner import __version__
from runner.http import Clients, Http


@pytest.fixture
def server():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            body = json.dumps({"data": [{"id": f"in_{i}"} for i in range(500)], "path": self.path}).encode()
            if "gzip" in self.headers.get("Accept-Encoding", ""):
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
