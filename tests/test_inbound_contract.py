"""The inbound API's contract with the programs that call it (a Zap, Zapier's app tester, anything with a key):
typed and bounded payloads, statuses a Zap can act on, idempotency that lets a corrected invoice in, paged
polling triggers, bodies bounded while they are read, and logs that never hold a key. Real `runner serve`
processes over real sockets."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import httpx
import pytest

try:
    from conftest import DEBITURA_KEY, ROOT
    from test_inbound import Server, cases, invoice, ledger, make_key, write
except ModuleNotFoundError:  # tests/ as a package
    from tests.conftest import DEBITURA_KEY, ROOT
    from tests.test_inbound import Server, cases, invoice, ledger, make_key, write


class VerboseServer(Server):
    """`runner serve -vv`, its output collected for the log checks."""

    def __init__(self, cfg_path: Path, *args: str):
        env = {**os.environ, "DEBITURA_API_KEY": DEBITURA_KEY, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "runner", "serve", str(cfg_path), "--port", "0", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"runner serve did not start: {line}{self.proc.stderr.read()}")
        self.first_line = line
        self.url = line.strip().rsplit(" ", 1)[-1]
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def output(self) -> str:
        self.http.close()
        self.proc.terminate()
        out, err = self.proc.communicate(timeout=20)
        return self.first_line + out + err


@pytest.fixture
def srv(tmp_path):
    cfg = write(tmp_path)
    key = make_key(cfg, "production")
    s = Server(cfg)
    s.key, s.cfg = key, cfg
    yield s
    s.stop()


def verdict_rows(cfg: Path) -> int:
    from runner.state.sqlite import Store

    store = Store(cfg.parent / "state" / "state.db")
    try:
        return store.db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
    finally:
        store.close()


def rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# --- 18.4 types, 18.5 lengths --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [{"a": 1}, ["INV-1"], True])
def test_an_id_of_the_wrong_type_is_a_422_naming_the_field_and_nothing_is_stored(srv, value):
    inv = invoice(1, id=value)
    del inv["number"]
    r = srv.post(srv.key, {"invoices": [invoice(2), inv]})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_payload"
    assert [(e["invoice"], e["field"]) for e in body["errors"]] == [(1, "id")]
    assert "must be text or a number" in body["errors"][0]["message"]
    assert ledger(srv.cfg) == {} and cases(srv.cfg) == [] and verdict_rows(srv.cfg) == 0


def test_a_present_but_unreadable_customer_or_address_is_named_not_called_missing(srv):
    r = srv.post(srv.key, invoice(1, customer="Acme GmbH"))
    assert r.status_code == 422
    (err,) = r.json()["errors"]
    assert err["field"] == "customer" and err["invoice_id"] == "INV-1"
    assert "customer: could not read 'Acme GmbH' (text) as an object" in err["message"] and "missing" not in err["message"]
    inv = invoice(2)
    inv["customer"]["address"]["postal_code"] = {"code": "10115"}
    inv["amount_due"] = False
    fields = {e["field"] for e in srv.post(srv.key, inv).json()["errors"]}
    assert fields == {"customer.address.postal_code", "amount_due"}
    assert srv.post(srv.key, invoice(3, id=1003)).status_code == 200  # a number is a fine id


def test_long_fields_are_refused_before_anything_reads_them_and_the_server_stays_responsive(srv):
    started = time.monotonic()
    r = srv.post(srv.key, invoice(1, id="x" * 40_000))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "id", r.text[:500]
    assert "40,000 characters" in r.json()["message"]
    long_name = invoice(2)
    long_name["customer"]["name"] = "n" * 1500
    r = srv.post(srv.key, long_name)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "customer.name"
    assert time.monotonic() - started < 10  # a quadratic pass over 40,000 characters took 14 s
    assert srv.http.get("/healthz").status_code == 200
    assert verdict_rows(srv.cfg) == 0


# --- 18.7 statuses a Zap can act on ---------------------------------------------------------------------------

def test_one_invoice_gets_its_own_result_and_skips_the_sender_can_fix_are_4xx(srv):
    ok = srv.post(srv.key, invoice(1))
    assert ok.status_code == 200
    body = ok.json()
    assert body["id"] == "INV-1" and body["verdict"] == "imported" and body["case_id"]
    assert body["invoices"][0]["case_id"] == body["case_id"]

    incomplete = invoice(2)
    del incomplete["customer"]["address"]["city"]
    r = srv.post(srv.key, incomplete)
    assert r.status_code == 422
    body = r.json()
    assert body["id"] == "INV-2" and body["reason"] == "incomplete_address" and body["error"] == "not_imported"
    assert "missing city" in body["message"] and "send it again" in body["message"]

    later = (date.today() + timedelta(days=10)).isoformat()
    r = srv.post(srv.key, invoice(3, due_date=later))
    assert r.status_code == 422 and r.json()["reason"] == "not_yet_due"
    assert f"send it again after {later}" in r.json()["message"]

    paid = srv.post(srv.key, invoice(4, status="paid"))  # nothing to collect: a decision, not a problem
    assert paid.status_code == 200 and paid.json()["reason"] == "not_unpaid" and paid.json()["imported"] == 0
    again = srv.post(srv.key, invoice(1))  # a retry of an imported invoice: the case exists
    assert again.status_code == 200 and again.json()["reason"] == "duplicate"
    assert ledger(srv.cfg) == {"INV-1": "delivered"}


# --- 18.8 idempotency and corrections -------------------------------------------------------------------------

def test_a_corrected_invoice_sent_with_the_same_idempotency_key_is_imported(srv):
    """docs/zapier.md: Idempotency-Key = the trigger's invoice id. A skip is not final; an import is."""
    incomplete = invoice(7)
    del incomplete["customer"]["address"]["postal_code"]
    first = srv.post(srv.key, incomplete, headers={"Idempotency-Key": "INV-7"})
    assert first.status_code == 422 and first.json()["reason"] == "incomplete_address"
    fixed = srv.post(srv.key, invoice(7), headers={"Idempotency-Key": "INV-7"})
    assert fixed.status_code == 200, fixed.text
    assert fixed.json()["verdict"] == "imported" and "Idempotent-Replayed" not in fixed.headers
    replay = srv.post(srv.key, invoice(7), headers={"Idempotency-Key": "INV-7"})
    assert replay.headers.get("Idempotent-Replayed") == "true" and replay.json() == fixed.json()
    changed = srv.post(srv.key, invoice(7, amount_due="999.00"), headers={"Idempotency-Key": "INV-7"})
    assert changed.status_code == 409 and "already used" in changed.json()["message"]
    assert len(cases(srv.cfg)) == 1


def test_a_skip_kept_under_a_key_by_an_earlier_version_does_not_block_the_correction(srv):
    from runner.inbound import server as inbound
    from runner.state.sqlite import Store

    skipped = {"ok": True, "received": 1, "imported": 0, "invoices": [
        {"invoice_id": "INV-8", "verdict": "skipped", "reason": "incomplete_address", "message": "missing city"}]}
    store = Store(srv.cfg.parent / "state" / "state.db")
    try:
        inbound.ensure(store)
        with store.tx():
            store.db.execute("INSERT INTO inbound_requests VALUES ('zaps', 'INV-8', 'old-hash', 200, ?, 0)",
                             (json.dumps(skipped),))
    finally:
        store.close()
    r = srv.post(srv.key, invoice(8), headers={"Idempotency-Key": "INV-8"})
    assert r.status_code == 200 and r.json()["verdict"] == "imported", r.text


# --- 18.9 paged polling triggers ------------------------------------------------------------------------------

def _all_pages(srv, path: str, limit: int) -> list[dict]:
    items, url = [], f"{path}?limit={limit}"
    for _ in range(50):
        r = srv.get(url, srv.key)
        assert r.status_code == 200 and len(r.json()) <= limit
        items += r.json()
        cursor = r.headers.get("X-Next-Cursor")
        if not cursor:
            assert 'rel="next"' not in r.headers.get("Link", "")
            return items
        assert f"cursor={cursor}" in r.headers["Link"]
        url = f"{path}?limit={limit}&cursor={cursor}"
    raise AssertionError("the pages never end")


def test_polling_triggers_page_with_a_cursor_past_the_limit(srv):
    r = srv.post(srv.key, {"invoices": [invoice(n) for n in range(1, 8)]})
    assert r.json()["imported"] == 7
    first = srv.get("/v1/triggers/cases?limit=3", srv.key)
    assert len(first.json()) == 3 and first.headers.get("X-Next-Cursor")
    # More cases arrive between two polls than one page holds: the cursor still reaches every older one.
    srv.post(srv.key, {"invoices": [invoice(n) for n in range(8, 13)]})
    older = srv.get(f"/v1/triggers/cases?limit=3&cursor={first.headers['X-Next-Cursor']}", srv.key).json()
    assert [c["invoice_id"] for c in older] == [f"INV-{n}" for n in (4, 3, 2)] or len(older) == 3
    every = _all_pages(srv, "/v1/triggers/cases", 3)
    assert len(every) == 12 and len({c["id"] for c in every}) == 12
    assert {c["invoice_id"] for c in every} == {f"INV-{n}" for n in range(1, 13)}
    assert every[:3] == srv.get("/v1/triggers/cases?limit=3", srv.key).json()

    srv.post(srv.key, {"invoices": [invoice(n, status="void") for n in range(20, 25)]})
    skipped = _all_pages(srv, "/v1/triggers/skipped", 2)
    assert sorted(s["invoice_id"] for s in skipped) == [f"INV-{n}" for n in range(20, 25)]
    bad = srv.get("/v1/triggers/cases?cursor=not-a-cursor", srv.key)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "cursor"


# --- 19.6 bodies bounded while read ---------------------------------------------------------------------------

def _raw(url: str, head: str, timeout: float = 20.0) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall(head.encode())
    return sock


def _status(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(data.split(b" ", 2)[1]), head + b"\r\n\r\n" + body


def test_an_announced_huge_body_is_refused_without_reading_it(srv):
    sock = _raw(srv.url, f"POST /v1/invoices HTTP/1.1\r\nHost: x\r\nXApiKey: {srv.key}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: 300000000\r\n\r\n")
    try:
        status, data = _status(sock)  # no byte of the body was sent: the answer cannot wait for it
    finally:
        sock.close()
    assert status == 413 and b"too_large" in data


def test_a_chunked_body_over_the_limit_is_cut_off_while_it_is_read(srv):
    before = rss_peak_kb(srv.proc.pid)
    sock = _raw(srv.url, f"POST /v1/invoices HTTP/1.1\r\nHost: x\r\nXApiKey: {srv.key}\r\n"
                         f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"

    def drip():  # 150 MB, unless the server stops reading
        try:
            for _ in range(150):
                sock.sendall(chunk)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    sender = threading.Thread(target=drip, daemon=True)
    sender.start()
    try:
        status, _ = _status(sock)
        assert status == 413
        assert srv.http.get("/healthz").status_code == 200
    finally:
        sock.close()
        sender.join(timeout=20)
    grown_mb = (rss_peak_kb(srv.proc.pid) - before) / 1024
    assert grown_mb < 60, f"the server's peak memory grew {grown_mb:.0f} MB for a body cut off at 5 MB"


def test_many_empty_invoices_get_a_short_422_quickly(srv):
    started = time.monotonic()
    r = srv.post(srv.key, content=b"[" + b",".join([b"{}"] * 20_000) + b"]")
    assert r.status_code == 422 and r.json()["error"] == "too_many_invoices"
    assert "20,000 invoices" in r.json()["message"] and len(r.content) < 10_000
    r = srv.post(srv.key, content=b"[" + b",".join([b"{}"] * 1000) + b"]")
    assert r.status_code == 422, r.text[:300]
    body = r.json()
    assert len(body["errors"]) <= 50 and body["errors_total"] >= 1000 and len(r.content) < 100_000
    assert time.monotonic() - started < 30  # loosely: 20,000 took 4.8 s and answered 22 MB
    assert verdict_rows(srv.cfg) <= 1000


def test_deeply_nested_json_is_a_json_422(srv):
    r = srv.post(srv.key, content=b'{"invoices": ' + b"[" * 600 + b"]" * 600 + b"}")
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    assert "nested more than" in r.json()["message"]
    r = srv.post(srv.key, content=b"[" * 5000 + b"]" * 5000)
    assert r.status_code == 422 and r.json()["error"] in ("invalid_json", "invalid_payload")


# --- 18.6 logs ------------------------------------------------------------------------------------------------

def test_a_verbose_server_never_logs_a_key_in_any_position(tmp_path):
    cfg = write(tmp_path)
    key = make_key(cfg, "production")
    other = make_key(cfg, "test")  # refused here (wrong environment), and never printed either
    s = VerboseServer(cfg, "-vv")
    try:
        assert s.get("/v1/me", key).status_code == 200
        in_url = s.http.get(f"/v1/me?XApiKey={key}")  # the key where a careless client puts it: refused
        assert in_url.status_code == 401 and "sent in the URL" in in_url.json()["message"]
        assert s.http.get(f"/v1/triggers/cases?api_key={key}&token={other}&limit=2").status_code == 401
        assert s.post(key, invoice(1, id=key[:40], customer={"name": other})).status_code == 422
        assert s.post(other, invoice(2)).status_code == 401
        assert s.post(key, content=b'{"x": "' + key.encode() + b'"', headers={}).status_code == 422
    finally:
        out = s.output()
    assert "GET /v1/me?XApiKey=****" in out, out[-3000:]  # the request is logged, the key is not
    for secret in (key, other, DEBITURA_KEY):
        assert secret not in out and secret[-24:] not in out, out[-3000:]


def test_the_sandbox_server_logs_through_redaction(tmp_path):
    from conftest import free_port

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "runner", "sandbox", "serve", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    secret = "sk_live_" + "Zx9" * 10
    try:
        proc.stdout.readline()
        # A malformed chunked body makes the HTTP server report an error quoting what the client sent.
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"POST /stripe/v1/invoices HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     f"{secret}\r\n".encode())
        sock.recv(100)
        sock.close()
        with httpx.Client(timeout=10) as c:
            assert c.get(f"http://127.0.0.1:{port}/_sandbox/state").status_code == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert "Traceback" in err or "Error" in err or err == "", err[-2000:]
    assert secret not in out + err and secret[8:] not in out + err, err[-2000:]
