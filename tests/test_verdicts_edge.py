"""The verdicts the sandbox data set does not produce by itself: failed (and retried), invalid, not_yet_due."""
from __future__ import annotations

import asyncio
import json
from datetime import date, timedelta

import httpx

from runner import sandbox
from runner.spec import config
from runner.engine import pipeline
from runner.sandbox.core import SandboxServer
from runner.state.sqlite import Store


def _apply(path):
    cfg = config.load(path)
    store = Store(cfg.state_path)
    try:
        return cfg, asyncio.run(pipeline.sync(cfg, mode="apply", store=store, details=True))
    finally:
        store.close()


def test_a_refused_case_fails_and_is_retried_by_the_next_run(sandbox_config):
    cfg = config.load(sandbox_config)
    sim = sandbox.get_simulator("debitura", cfg.state_path.parent / "sandbox")
    real = sim.handle
    armed = {"on": True, "target": None}

    async def refusing(request: httpx.Request):
        if request.method == "POST" and armed["on"]:
            body = json.loads(request.content)
            if armed["target"] in (None, body["creditorReference"]):
                armed["target"] = body["creditorReference"]
                return httpx.Response(400, json={
                    "title": "One or more validation errors occurred.", "status": 400,
                    "errors": {"Debtor.Name": ["The Name field is required."]}})
        return await real(request)

    sim.handle = refusing
    _, first = _apply(sandbox_config)
    conn = first.connections[0]
    failed = [v for v in conn.verdicts if v.verdict == "failed"]
    assert [v.number for v in failed] == [armed["target"]]
    assert failed[0].reason == "delivery_failed"
    assert "Debtor.Name: The Name field is required." in failed[0].message
    assert not first.ok
    n_imported = conn.imported

    armed["on"] = False
    _, second = _apply(sandbox_config)
    conn2 = second.connections[0]
    assert [v.number for v in conn2.verdicts if v.verdict == "imported"] == [armed["target"]]
    assert conn2.skipped()["duplicate"] == n_imported
    assert sorted(c["creditorReference"] for c in sim.cases()) == sorted(
        {v.number for v in conn.verdicts + conn2.verdicts if v.verdict == "imported"})


class Api:
    def __init__(self, records):
        self.records = records

    async def handle(self, request):
        return httpx.Response(200, json={"items": self.records})


SPEC = """
id: tiny
name: Tiny
auth: {type: none}
environments: {local: {base_url: "http://127.0.0.1:1"}}
invoices:
  request: {path: /invoices}
  records: items
  unpaid: "status == 'unpaid'"
  map:
    external_id: id
    number: "no"
    issue_date: to_date(issued)
    due_date: to_date(due)
    currency: upper(cur)
    amount: to_decimal(total)
    debtor:
      type: kind
      name: name
      address: {street: street, postal_code: zip, city: city, country: country_code(country), state: state}
"""


def test_invalid_and_not_yet_due(tmp_path):
    today = date.today()
    good = {"status": "unpaid", "issued": (today - timedelta(days=30)).isoformat(),
            "due": (today - timedelta(days=1)).isoformat(), "cur": "eur", "total": "10.00", "kind": "Company",
            "name": "Acme GmbH", "street": "Hauptstr. 1", "zip": "10115", "city": "Berlin", "country": "Deutschland"}
    records = [
        {**good, "id": "1", "no": "OK-1"},
        {**good, "id": "2", "no": "NEG-2", "total": "-5"},
        {**good, "id": "3", "no": "CUR-3", "cur": "xyz"},
        {**good, "id": "4", "no": "US-4", "country": "USA"},  # no state for a US debtor
        {**good, "id": "5", "no": "TYPE-5", "kind": "Person"},
        {**good, "id": "6", "no": "DUE-6", "due": (today + timedelta(days=14)).isoformat()},
        {**good, "id": "7", "no": "LAND-7", "country": "Narnia"},
        {**good, "no": "NOID-8"},
        {**good, "id": "9", "no": "DATE-9", "issued": "31/12/2025"},
    ]
    srv = SandboxServer({"api": Api(records)})
    base = srv.start()
    try:
        (tmp_path / "integrations.d").mkdir()
        (tmp_path / "integrations.d" / "tiny.yaml").write_text(SPEC)
        (tmp_path / "config.yaml").write_text(f"""
destination: {{type: jsonl, path: out.jsonl}}
connections:
  - {{name: tiny, integration: tiny, account_id: tiny, base_url: "{base}/api", window: {{last: 1y}}}}
""")
        _, result = _apply(tmp_path / "config.yaml")
    finally:
        srv.stop()
    v = {x.number: x for x in result.connections[0].verdicts}
    assert (v["OK-1"].verdict, v["OK-1"].reason) == ("imported", None)
    assert v["NEG-2"].reason == "invalid" and "amount must be more than 0" in v["NEG-2"].message
    assert v["CUR-3"].reason == "invalid" and "'XYZ' is not an ISO 4217 currency code" in v["CUR-3"].message
    assert v["US-4"].reason == "incomplete_address" and v["US-4"].detail["missing"] == ["state"]
    assert v["TYPE-5"].reason == "invalid" and "debtor.type 'Person'" in v["TYPE-5"].message
    assert v["DUE-6"].reason == "not_yet_due" and v["DUE-6"].detail["due_date"] > today.isoformat()
    assert v["LAND-7"].reason == "incomplete_address" and v["LAND-7"].detail["missing"] == ["country"]
    assert v["NOID-8"].reason == "invalid" and "no id" in v["NOID-8"].message
    assert v["DATE-9"].reason == "invalid"
    assert result.connections[0].seen == len(records)


def test_same_invoice_number_in_two_accounts_is_not_taken_for_a_duplicate(tmp_path, sandbox_env):
    today = date.today()
    base_inv = {"status": "unpaid", "no": "1001", "issued": (today - timedelta(days=30)).isoformat(),
                "due": (today - timedelta(days=1)).isoformat(), "cur": "eur", "total": "10.00", "kind": "Company",
                "street": "Hauptstr. 1", "zip": "10115", "city": "Berlin", "country": "DE"}
    srv = SandboxServer({"a": Api([{**base_inv, "id": "a-1", "name": "Alpha GmbH"}]),
                         "b": Api([{**base_inv, "id": "b-1", "name": "Beta GmbH"}])})
    base = srv.start()
    try:
        (tmp_path / "integrations.d").mkdir()
        (tmp_path / "integrations.d" / "tiny.yaml").write_text(SPEC)
        (tmp_path / "config.yaml").write_text(f"""
state: state/state.db
destination: {{type: debitura, environment: sandbox, api_key: "${{DEBITURA_API_KEY}}"}}
connections:
  - {{name: books-a, integration: tiny, account_id: books-a, base_url: "{base}/a", window: {{last: 1y}}}}
  - {{name: books-b, integration: tiny, account_id: books-b, base_url: "{base}/b", window: {{last: 1y}}}}
""")
        cfg, result = _apply(tmp_path / "config.yaml")
    finally:
        srv.stop()
    verdicts = [v for c in result.connections for v in c.verdicts]
    assert sorted(v.verdict for v in verdicts) == ["failed", "imported"]
    failed = next(v for v in verdicts if v.verdict == "failed")
    assert "already has a case with creditor reference '1001' for another invoice" in failed.message
    assert len(sandbox.get_simulator("debitura", cfg.state_path.parent / "sandbox").cases()) == 1


def test_an_html_answer_from_the_destination_stops_the_run_cleanly(sandbox_config):
    cfg = config.load(sandbox_config)
    sim = sandbox.get_simulator("debitura", cfg.state_path.parent / "sandbox")

    async def proxy_page(request):
        return httpx.Response(200, text="<html><body>Sign in to the Wi-Fi</body></html>",
                              headers={"content-type": "text/html"})

    sim.handle = proxy_page
    _, result = _apply(sandbox_config)
    assert not result.ok and "HTML page" in result.destination_error
    assert result.connections[0].imported == 0
    store = Store(cfg.state_path)
    (status,) = store.db.execute("SELECT status FROM runs WHERE id=?", (result.run_id,)).fetchone()
    store.close()
    assert status == "failed"


def test_a_store_from_before_the_ledger_kept_runs_keeps_its_history(tmp_path, sandbox_config):
    """Stores written before imported verdicts became ledger rows have a ledger without run_id and a verdict
    row for each import. Opened now, the ledger gains the column; an old import shows once in the history,
    a new run's duplicate after it."""
    import sqlite3

    cfg = config.load(sandbox_config)
    _, first = _apply(sandbox_config)
    imported = [v for v in first.connections[0].verdicts if v.verdict == "imported"]
    assert imported
    # Turn the store into one from before: drop ledger.run_id, give each import its verdict row.
    db = sqlite3.connect(cfg.state_path)
    cols = "account_key, invoice_id, connection, number, status, idempotency_key, case_id, case_reference, " \
           "destination, error, first_seen, updated"
    db.executescript(f"""
        CREATE TABLE old_ledger AS SELECT {cols} FROM ledger;
        DROP TABLE ledger;
        CREATE TABLE ledger (account_key TEXT NOT NULL, invoice_id TEXT NOT NULL, connection TEXT NOT NULL,
            number TEXT, status TEXT NOT NULL, idempotency_key TEXT NOT NULL, case_id TEXT, case_reference TEXT,
            destination TEXT NOT NULL, error TEXT, first_seen REAL NOT NULL, updated REAL NOT NULL,
            PRIMARY KEY (destination, account_key, invoice_id));
        INSERT INTO ledger SELECT * FROM old_ledger;
        DROP TABLE old_ledger;
        INSERT INTO verdicts (run_id, connection, account_key, invoice_id, number, verdict, reason, detail, at)
            SELECT {first.run_id}, connection, account_key, invoice_id, number, 'imported', NULL,
                   json_object('message', 'imported as case ' || case_reference), updated FROM ledger;
        PRAGMA user_version=0;  -- stores from before numbered their schema's versions
    """)
    db.close()

    _, second = _apply(sandbox_config)
    assert second.connections[0].skipped()["duplicate"] == len(imported)
    store = Store(cfg.state_path)
    try:
        assert "run_id" in {r[1] for r in store.db.execute("PRAGMA table_info(ledger)")}
        account = store.db.execute("SELECT account_key FROM ledger LIMIT 1").fetchone()[0]
        history = store.verdict_history(account, imported[0].invoice_id)
        by_run = store.run_verdicts(first.run_id, limit=10_000)
    finally:
        store.close()
    assert [(h["run_id"], h["verdict"], h["reason"]) for h in history] == [
        (second.run_id, "skipped", "duplicate"), (first.run_id, "imported", None)]
    assert sum(v["verdict"] == "imported" for v in by_run) == len(imported), "each old import once"


def test_a_store_whose_crashed_run_left_a_mark_from_before_recorded_lengths_is_repaired_from_it(tmp_path):
    """A mark of a local sink left by a run of the version before `sink_marks.recorded`: opened now, the table
    gains the column and the mark's offset stands for what is recorded."""
    import sqlite3

    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE sink_marks (destination TEXT PRIMARY KEY, offset INTEGER NOT NULL,
                        run_id INTEGER, at REAL NOT NULL);
                        INSERT INTO sink_marks VALUES ('jsonl:/x/cases.jsonl', 1234, 7, 0);""")
    db.close()
    store = Store(path, "jsonl:/x/cases.jsonl")
    try:
        from runner.state import sqlite as state

        assert "recorded" in {r[1] for r in store.db.execute("PRAGMA table_info(sink_marks)")}
        assert state.sink_recorded(store.db, "jsonl:/x/cases.jsonl") == (1234, 7)
        assert store.sink_mark() == (1234, 7)
    finally:
        store.close()
