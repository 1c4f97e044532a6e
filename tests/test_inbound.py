"""`runner serve` end to end, over real sockets: a real `runner serve` process on 127.0.0.1, real HTTP requests,
the state store and the Debitura simulator (persisted in <state dir>/sandbox) checked afterwards."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import httpx
import pytest

from runner import sandbox
from runner.inbound import apikeys
from runner.spec import config
from runner.inbound import server as inbound

try:
    from conftest import DEBITURA_KEY, ROOT, query, run_cli, store_of, use_backend
except ModuleNotFoundError:  # tests/ as a package
    from tests.conftest import DEBITURA_KEY, ROOT, query, run_cli, store_of, use_backend

_BACKEND = ["sqlite"]


@pytest.fixture(autouse=True)
def _on_both_stores(backend):
    """Every server here keeps its keys, answers and ledger on both state stores (conftest: backend)."""
    _BACKEND[0] = backend
    yield
    _BACKEND[0] = "sqlite"

CONFIG = """
state: state/state.db
destination:
  type: debitura
  environment: sandbox
  api_key: "${{DEBITURA_API_KEY}}"
connections:
  - name: zaps
    integration: zapier
    environment: {environment}
    account_id: acme-crm
"""


def write(tmp_path: Path, environment: str = "production") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(environment=environment))
    return use_backend(path, _BACKEND[0])


def make_key(cfg_path: Path, environment: str) -> str:
    store = store_of(cfg_path, resolve=False)
    try:
        return apikeys.create(store, environment, f"{environment} zap")[0]
    finally:
        store.close()


class Server:
    """`runner serve CONFIG --port 0` in a subprocess; the URL is read from the line it prints once listening."""

    def __init__(self, cfg_path: Path, *args: str):
        env = {**os.environ, "DEBITURA_API_KEY": DEBITURA_KEY, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "runner", "serve", str(cfg_path), "--port", "0", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"runner serve did not start: {line}{self.proc.stderr.read()}")
        self.url = line.strip().rsplit(" ", 1)[-1]
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def post(self, key: str | None, payload=None, *, content: bytes | None = None, headers: dict | None = None):
        h = {**({"XApiKey": key} if key else {}), **(headers or {})}
        if content is not None:
            return self.http.post("/v1/invoices", content=content, headers={"Content-Type": "application/json", **h})
        return self.http.post("/v1/invoices", json=payload, headers=h)

    def get(self, path: str, key: str | None):
        return self.http.get(path, headers={"XApiKey": key} if key else {})

    def stop(self):
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def serve():
    servers = []

    def start(cfg_path):
        s = Server(cfg_path)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def invoice(n: int, **extra) -> dict:
    today = date.today()
    inv = {"id": f"INV-{n}", "number": f"10{n:02d}", "issue_date": (today - timedelta(days=60)).isoformat(),
           "due_date": (today - timedelta(days=30)).isoformat(), "currency": "EUR", "amount_due": f"{100 + n}.50",
           "customer": {"name": f"Customer {n} GmbH", "email": f"ap{n}@example.de",
                        "address": {"street": f"Hauptstr. {n}", "city": "Berlin", "postal_code": "10115",
                                    "country": "Germany"}}}
    inv.update(extra)
    return inv


def cases(cfg_path: Path) -> list[dict]:
    sandbox.reset_cache()  # read what the server process persisted, not a cached copy
    local = config.load(cfg_path, strict=False, resolve=False).state_path.parent
    return sandbox.get_simulator("debitura", local / "sandbox").cases()


def ledger(cfg_path: Path) -> dict:
    store = store_of(cfg_path, resolve=False)
    try:
        return {r[0]: r[1] for r in query(store, "SELECT invoice_id, status FROM ledger")}
    finally:
        store.close()


def test_batch_is_imported_with_verdicts_and_a_retry_creates_nothing(tmp_path, serve):
    cfg = write(tmp_path)
    key = make_key(cfg, "production")
    srv = serve(cfg)
    batch = {"invoices": [invoice(1), invoice(2), invoice(3, status="paid"),
                          invoice(4, customer={"name": "No Address AB", "address": {"street": "x", "country": "SE"}})]}
    r = srv.post(key, batch)
    # INV-4 needs its address completed by the sender: a 4xx, so a Zap step fails and shows why.
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "not_imported" and [e["invoice_id"] for e in body["errors"]] == ["INV-4"]
    got = {i["invoice_id"]: (i["verdict"], i["reason"]) for i in body["invoices"]}
    assert got == {"INV-1": ("imported", None), "INV-2": ("imported", None), "INV-3": ("skipped", "not_unpaid"),
                   "INV-4": ("skipped", "incomplete_address")}
    assert body["imported"] == 2 and body["skipped"] == {"not_unpaid": 1, "incomplete_address": 1}
    missing = next(i for i in body["invoices"] if i["invoice_id"] == "INV-4")["missing"]
    assert missing == ["city", "postal_code"]
    created = cases(cfg)
    assert sorted(c["creditorReference"] for c in created) == ["1001", "1002"]
    by_ref = {c["creditorReference"]: c for c in created}
    assert by_ref["1001"]["debtor"]["countryAlpha2"] == "DE" and by_ref["1001"]["grossAmount"] == 101.5
    assert {i["case_id"] for i in body["invoices"] if i["verdict"] == "imported"} == {c["id"] for c in created}

    # The same batch again (a Zap replay without an idempotency key): nothing new, every import a duplicate.
    again = srv.post(key, batch).json()
    assert {i["invoice_id"]: i["reason"] for i in again["invoices"] if i["verdict"] == "skipped"}["INV-1"] == "duplicate"
    assert again["imported"] == 0 and again["skipped"]["duplicate"] == 2
    # One invoice of it in a new request, with an Idempotency-Key, sent twice: answered the same, still one case.
    first = srv.post(key, invoice(5), headers={"Idempotency-Key": "zap-run-77"})
    replay = srv.post(key, invoice(5), headers={"Idempotency-Key": "zap-run-77"})
    assert first.status_code == replay.status_code == 200
    assert replay.headers.get("Idempotent-Replayed") == "true" and replay.json() == first.json()
    assert first.json()["invoices"][0]["verdict"] == "imported"
    conflict = srv.post(key, invoice(6), headers={"Idempotency-Key": "zap-run-77"})
    assert conflict.status_code == 409 and "different payload" in conflict.json()["message"]
    assert len(cases(cfg)) == 3
    assert ledger(cfg) == {"INV-1": "delivered", "INV-2": "delivered", "INV-5": "delivered"}


def test_keys_of_the_other_environment_and_revoked_keys_are_refused_distinctly(tmp_path, serve):
    cfg = write(tmp_path)
    prod, test_key = make_key(cfg, "production"), make_key(cfg, "test")
    revoked = make_key(cfg, "production")
    out = run_cli("keys", "revoke", str(cfg), revoked.split("_")[2])
    assert out.returncode == 0 and "revoked production API key" in out.stdout
    srv = serve(cfg)

    me = srv.get("/v1/me", prod)
    assert me.status_code == 200
    assert me.json()["environment"] == "production" and me.json()["connection"] == "zaps"

    wrong = srv.post(test_key, {"invoices": [invoice(1)]})
    assert wrong.status_code == 401
    assert wrong.json()["message"].startswith("this is a test API key, but this is the production server")
    for bad in (revoked, "rnr_prod_00000000_" + "0" * 64, "garbage"):
        r = srv.post(bad, {"invoices": [invoice(1)]})
        assert r.status_code == 401 and r.json()["message"] == "invalid API key", bad
    assert srv.get("/v1/triggers/cases", test_key).status_code == 401
    assert srv.post(None, invoice(1)).status_code == 401
    assert cases(cfg) == [] and ledger(cfg) == {}

    # Recorded for doctor: the refusals, the last accepted call, and what the checks say about them.
    loaded = config.load(cfg, strict=False, resolve=False)
    store = store_of(cfg, resolve=False)
    try:
        data = store.connection("zaps")["data"]
        assert data["inbound_last_call"]["endpoint"] == "me"
        assert data["inbound_refused_count"] == 6
        assert data["inbound_last_refused"]["reason"] == "missing_key"
        checks = {c["check"]: c for c in inbound.doctor_checks(loaded, store)}
    finally:
        store.close()
    assert checks["api_key"]["ok"] and checks["last_call"]["ok"]
    assert not checks["key_environment"]["ok"] and "sent no API key" in checks["key_environment"]["message"]

    srv.post(test_key, invoice(1))  # the most recent refusal: a test key on the production server
    store = store_of(cfg, resolve=False)
    try:
        checks = {c["check"]: c for c in inbound.doctor_checks(loaded, store)}
        assert store.connection("zaps")["data"]["inbound_last_refused"]["reason"] == "wrong_environment"
    finally:
        store.close()
    assert "test key against this production server" in checks["key_environment"]["message"]
    assert "--environment production" in checks["key_environment"]["fix"]


def test_malformed_payloads_get_422_naming_every_bad_field_and_nothing_is_imported(tmp_path, serve):
    cfg = write(tmp_path)
    key = make_key(cfg, "production")
    srv = serve(cfg)

    r = srv.post(key, content=b'{"invoices": [{"id": "INV-1",')
    assert r.status_code == 422 and r.json()["error"] == "invalid_json"
    assert "not valid JSON" in r.json()["message"] and r.json()["errors"][0]["field"] == "body"

    bad = invoice(2, currency="EURO", amount_due="-5")
    del bad["due_date"]
    no_id = invoice(3)
    del no_id["id"], no_id["number"]
    r = srv.post(key, {"invoices": [invoice(1), bad, no_id]})
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    fields = {(e["invoice"], e["field"]) for e in errors}
    assert {(1, "due_date"), (1, "currency"), (1, "amount"), (2, "external_id")} <= fields
    assert not any(e["invoice"] == 0 for e in errors)
    by_field = {e["field"]: e for e in errors if e["invoice"] == 1}
    assert by_field["due_date"]["mapped_from"] == "to_date(due_date)"
    assert "nothing was imported" in r.json()["message"]
    r = srv.post(key, ["not an invoice"])
    assert r.status_code == 422 and r.json()["errors"][0]["invoice"] == 0
    assert srv.post(key, []).status_code == 422
    assert cases(cfg) == [] and ledger(cfg) == {}


def test_polling_triggers_list_newest_first_with_stable_ids(tmp_path, serve):
    cfg = write(tmp_path)
    key = make_key(cfg, "production")
    srv = serve(cfg)
    for n in (1, 2, 3):
        assert srv.post(key, invoice(n)).json()["imported"] == 1
    srv.post(key, invoice(4, amount_paid="10"))  # partially paid
    srv.post(key, invoice(5, status="void"))
    srv.post(key, invoice(2))  # a retry: a duplicate, neither a new case nor a skip worth triggering on

    first = srv.get("/v1/triggers/cases", key).json()
    assert [c["invoice_id"] for c in first] == ["INV-3", "INV-2", "INV-1"]
    assert len({c["id"] for c in first}) == 3 and all(c["case_id"] and c["created_at"] for c in first)
    srv.post(key, invoice(6))
    second = srv.get("/v1/triggers/cases", key).json()
    assert [c["invoice_id"] for c in second] == ["INV-6", "INV-3", "INV-2", "INV-1"]
    assert [c["id"] for c in second[1:]] == [c["id"] for c in first], "ids are stable between polls"
    assert srv.get("/v1/triggers/cases?limit=1", key).json() == second[:1]

    skipped = srv.get("/v1/triggers/skipped", key).json()
    assert [(s["invoice_id"], s["reason"]) for s in skipped] == [("INV-5", "not_unpaid"), ("INV-4", "not_unpaid")]
    assert "partially paid" in skipped[1]["message"] and "void" in skipped[0]["message"]
    srv.post(key, invoice(5, status="void"))  # the same skip again is not a new item
    assert [s["id"] for s in srv.get("/v1/triggers/skipped", key).json()] == [s["id"] for s in skipped]


def test_a_server_killed_right_after_answering_has_kept_every_accepted_invoice(tmp_path, serve):
    cfg = write(tmp_path)
    key = make_key(cfg, "production")
    srv = serve(cfg)
    batch = {"invoices": [invoice(n) for n in range(1, 21)]}
    r = srv.post(key, batch)
    srv.proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: only what was committed before the answer
    srv.proc.wait()
    assert r.status_code == 200 and r.json()["imported"] == 20
    assert ledger(cfg) == {f"INV-{n}": "delivered" for n in range(1, 21)}
    assert len(cases(cfg)) == 20
    store = store_of(cfg, resolve=False)
    try:
        runs = store.last_runs()
        verdicts = [v["verdict"] for v in store.run_verdicts(runs[0]["id"])]
    finally:
        store.close()
    assert verdicts == ["imported"] * 20 and runs[0]["command"] == "serve" and runs[0]["status"] == "ok"
    # A new server, and the Zap retries the same batch: still 20 cases.
    again = serve(cfg).post(key, batch).json()
    assert again["imported"] == 0 and again["skipped"] == {"duplicate": 20}
    assert len(cases(cfg)) == 20


def test_test_environment_server_creates_test_cases_and_refuses_production_keys(tmp_path, serve):
    cfg = write(tmp_path, "test")
    key, prod = make_key(cfg, "test"), make_key(cfg, "production")
    srv = serve(cfg)
    r = srv.post(prod, invoice(1))
    assert r.status_code == 401 and "production API key, but this is the test server" in r.json()["message"]
    r = srv.post(key, invoice(1))
    assert r.status_code == 200 and r.json()["imported"] == 1
    (case,) = cases(cfg)
    assert case["isTestCase"] is True


def test_a_jsonl_destination_gets_each_posted_invoice_once(tmp_path, serve):
    """`runner serve` writing to a jsonl file: on PostgreSQL in the same turns at the file as the runs and
    workers that may write it at the same moment (runner/engine/localsink.py), so the file's mark stays true
    to the file; on SQLite with a pending row before each write. A batch posted twice is in the file once."""
    cfg = write(tmp_path)
    cfg.write_text(cfg.read_text().replace(
        'destination:\n  type: debitura\n  environment: sandbox\n  api_key: "${DEBITURA_API_KEY}"\n',
        "destination: {type: jsonl, path: out/cases.jsonl}\n"))
    assert "jsonl" in cfg.read_text()
    key = make_key(cfg, "production")
    srv = serve(cfg)
    batch = {"invoices": [invoice(1), invoice(2), invoice(3, status="paid")]}
    first = srv.post(key, batch).json()
    again = srv.post(key, batch).json()
    assert first["imported"] == 2 and again["imported"] == 0 and again["skipped"]["duplicate"] == 2, (first, again)
    out = tmp_path / "out" / "cases.jsonl"
    lines = [json.loads(line)["invoice"]["external_id"] for line in out.read_text().splitlines()]
    assert sorted(lines) == ["INV-1", "INV-2"]
    assert ledger(cfg) == {"INV-1": "delivered", "INV-2": "delivered"}
    if _BACKEND[0] != "sqlite":
        store = store_of(cfg, resolve=False)
        try:
            assert query(store, "SELECT recorded FROM sink_marks")[0][0] == out.stat().st_size
        finally:
            store.close()
