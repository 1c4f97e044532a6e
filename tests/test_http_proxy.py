"""Requests go through the proxy the environment names (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY), as
httpx's clients do by default: on a machine whose only way out is a company's proxy, the providers are
reached through it. A real forwarding proxy on a local socket, in front of a real server."""
from __future__ import annotations

import asyncio
import base64
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runner.net.http import Clients, Http


def _serve(handler):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


class _Answering(BaseHTTPRequestHandler):
    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def target_and_proxy():
    class Target(_Answering):
        def do_GET(self):
            self.answer(b'{"ok": true}')

    through: list[dict] = []

    class Proxy(_Answering):
        def do_GET(self):  # a forwarding proxy: the request line holds the whole URL
            through.append({"line": self.requestline, "auth": self.headers.get("Proxy-Authorization")})
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(self.path) as r:
                self.answer(r.read())

    target, proxy = _serve(Target), _serve(Proxy)
    try:
        yield f"http://127.0.0.1:{target.server_address[1]}", f"127.0.0.1:{proxy.server_address[1]}", through
    finally:
        for s in (target, proxy):
            s.shutdown()
            s.server_close()


def _get(base: str):
    async def go():
        clients = Clients()
        try:
            return await Http(clients, base).request("GET", "/v1/invoices", params={"limit": 1})
        finally:
            await clients.aclose()

    return asyncio.run(go())


def test_requests_go_through_the_proxy_the_environment_names_with_its_credentials(target_and_proxy, monkeypatch):
    base, proxy, through = target_and_proxy
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://finance:s%40cret@{proxy}")
    resp = _get(base)
    assert resp.status == 200 and resp.json() == {"ok": True}
    assert through[0]["line"] == f"GET {base}/v1/invoices?limit=1 HTTP/1.1"
    assert through[0]["auth"] == "Basic " + base64.b64encode(b"finance:s@cret").decode()


def test_no_proxy_sends_the_request_straight_to_the_server(target_and_proxy, monkeypatch):
    base, proxy, through = target_and_proxy
    monkeypatch.setenv("HTTP_PROXY", f"http://{proxy}")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert _get(base).json() == {"ok": True}
    assert through == []
