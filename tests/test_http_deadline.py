"""One overall deadline per request (issue 19.7).

A server that answers a byte at a time never trips the per-read timeout; before the deadline each attempt was
cut only at 4 × timeout_s, so one request took attempts × 4 × timeout_s plus the backoff between them. The
server here is a real socket on 127.0.0.1 that drips one byte of its body per interval.
"""
from __future__ import annotations

import socket
import threading
import time

try:
    from tests.conftest import run_cli, stripe_workspace
except ImportError:  # tests/ without __init__.py
    from conftest import run_cli, stripe_workspace

DRIP_S = 0.05  # well inside the per-read timeout below: only an overall bound stops the answer


class DripServer:
    """Answers every connection with a 200 whose body of 10,000 bytes comes one byte per DRIP_S."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n")
                for _ in range(10000):
                    if self.stop.wait(DRIP_S):
                        return
                    conn.sendall(b" ")
            except OSError:  # the runner gave up on the answer and closed the connection
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def _retry(**policy):
    def edit(spec: dict) -> None:
        spec["retry"] = policy
    return edit


def test_a_dripping_answer_is_given_up_on_at_the_requests_deadline(tmp_path):
    server = DripServer()
    try:
        # Per attempt 4 × 0.2 s; 5 attempts would hold the request for more than 4 s. The deadline is 1 s.
        cfg = stripe_workspace(tmp_path, _retry(attempts=5, backoff_s=0.05, max_backoff_s=0.05, timeout_s=0.2,
                                                deadline_s=1),
                               extra=f"    base_url: http://127.0.0.1:{server.port}\n")
        started = time.monotonic()
        out = run_cli("plan", str(cfg), cwd=tmp_path)
        took = time.monotonic() - started
    finally:
        server.close()
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert "within 1 s" in text and "deadline" in text, text
    assert "retry.deadline_s" in text, text
    assert "Traceback" not in text
    # The request: 1 s; the rest is the interpreter starting. Without the deadline it is over 4 s.
    assert took < 3.5, f"plan took {took:.1f} s"
    assert server.connections <= 2, server.connections


def test_deadline_s_is_checked_when_the_spec_loads(tmp_path):
    cfg = stripe_workspace(tmp_path, _retry(attempts=2, deadline_s=0))
    out = run_cli("validate", str(cfg), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "deadline_s" in out.stderr


def test_the_default_deadline_bounds_a_request_at_the_default_policy():
    """At the defaults (5 attempts of 30 s) a request ends within 120 s, not 12.5 min."""
    from runner.net.http import DEADLINE_S, Policy

    assert Policy().deadline_s == DEADLINE_S == 120.0
    assert Policy.from_spec({"deadline_s": 7}).deadline_s == 7
