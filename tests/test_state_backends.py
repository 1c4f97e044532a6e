"""The state store on either backend: choosing it from `state:`, migrations, copying SQLite into PostgreSQL,
the apply lock and single-flight token refresh on a real PostgreSQL server (tests/pgserver.py)."""
from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading

import psycopg
import pytest

from conftest import ROOT, SANDBOX_CONFIG, query, run_cli, store_of, use_backend, write_config


def _sandbox_copy(where):
    """The README's sample config with its sandbox secrets, as a fresh clone of the repository holds them."""
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "sample-config.yaml", where / "sample-config.yaml")
    shutil.copytree(ROOT / "sandbox-secrets", where / "sandbox-secrets")
    return where / "sample-config.yaml"


def test_a_postgresql_url_is_a_server_not_a_folder_named_postgresql(tmp_path, pg_url):
    """`state: postgresql://...` used to be taken as a file path: the run succeeded and left a folder named
    `postgresql:` beside the config. It is the server's database now, and a fresh copy of the repository in
    another folder (as a CI job has) imports nothing again."""
    first = use_backend(_sandbox_copy(tmp_path / "one"), pg_url)
    out = run_cli("apply", str(first), cwd=first.parent)
    assert out.returncode in (0, 1), out.stderr
    assert "imported 0" not in out.stdout
    assert not any(p.name.startswith("postgres") for p in first.parent.rglob("*")), "no folder named after the URL"
    store = store_of(first)
    try:
        assert store.kind == "postgresql"
        delivered = query(store, "SELECT count(*) FROM ledger WHERE status='delivered'")[0][0]
    finally:
        store.close()
    assert delivered > 0
    again = use_backend(_sandbox_copy(tmp_path / "two"), pg_url)  # another checkout: no local state at all
    out = run_cli("apply", str(again), "--connection", "acme-stripe", "--output", "json", cwd=again.parent)
    import json

    data = json.loads(out.stdout)
    assert data["totals"]["imported"] == 0 and data["totals"]["skipped"]["duplicate"] > 0, out.stdout


def test_a_password_in_the_url_is_refused_and_a_referenced_one_never_shown(tmp_path, sandbox_env, pg_server):
    cfg = write_config(tmp_path, SANDBOX_CONFIG.format(server_filters="false").replace(
        "state: state/state.db", "state: postgresql://runner:Sup3rSecretPw@127.0.0.1:1/runner"))
    out = run_cli("validate", str(cfg))
    assert out.returncode == 2 and "password written in the config" in out.stdout + out.stderr
    assert "Sup3rSecretPw" not in out.stdout + out.stderr
    # By reference: a server that does not answer; the error names it without the password.
    cfg.write_text(cfg.read_text().replace("state: postgresql://runner:Sup3rSecretPw@127.0.0.1:1/runner",
                                           'state: {type: postgresql, url: "${DATABASE_URL}"}'))
    out = run_cli("apply", str(cfg), env={"DATABASE_URL": "postgresql://runner:Sup3rSecretPw@127.0.0.1:1/runner"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "postgresql://runner:***@127.0.0.1:1/runner" in out.stderr and "fix:" in out.stderr
    assert "Sup3rSecretPw" not in out.stdout + out.stderr
    assert not (tmp_path / "postgresql:").exists()
    missing = run_cli("apply", str(cfg), env={"DATABASE_URL": ""})
    assert missing.returncode == 2 and "DATABASE_URL" in missing.stdout + missing.stderr


def test_runners_starting_at_once_on_a_new_database_migrate_it_once(pg_url):
    code = ("import sys; from runner.state import open_store; s = open_store(sys.argv[1]); "
            "s.close(); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for _ in range(6)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    with psycopg.connect(pg_url) as db:
        from runner.state import postgres

        assert db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall() == [
            (n,) for n, _ in postgres.MIGRATIONS]


def test_an_sqlite_store_from_before_numbered_migrations_keeps_everything(tmp_path):
    """A store the runner wrote before its schema had versions (user_version 0, no run_id, no keys table)
    is brought to the current version in place at open; nothing it held is lost."""
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE ledger (account_key TEXT NOT NULL, invoice_id TEXT NOT NULL, connection TEXT NOT NULL,
            number TEXT, status TEXT NOT NULL, idempotency_key TEXT NOT NULL, case_id TEXT, case_reference TEXT,
            destination TEXT NOT NULL, error TEXT, first_seen REAL NOT NULL, updated REAL NOT NULL,
            PRIMARY KEY (destination, account_key, invoice_id));
        CREATE TABLE sink_marks (destination TEXT PRIMARY KEY, offset INTEGER NOT NULL, run_id INTEGER, at REAL NOT NULL);
        CREATE TABLE tokens (connection TEXT PRIMARY KEY, token TEXT NOT NULL, updated REAL NOT NULL);
        INSERT INTO ledger VALUES ('acct', 'in_1', 'c', 'N1', 'delivered', 'k1', 'case1', 'R1', 'd', NULL, 1.0, 2.0);
        INSERT INTO sink_marks VALUES ('jsonl:x', 10, NULL, 1.0);
        INSERT INTO tokens VALUES ('c', '{"refresh_token": "r1"}', 1.0);
    """)
    db.close()
    from runner.state import open_store, sqlite as backend

    store = open_store(path, destination="d")
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == backend.VERSION
        row = store.ledger_lookup("acct", ["in_1"])["in_1"]
        assert (row.status, row.case_id, row.run_id) == ("delivered", "case1", None)
        assert store.get_token("c") == {"refresh_token": "r1"}
        assert store.sink_mark() is None and store.db.execute("SELECT recorded FROM sink_marks").fetchone() == (None,)
        assert store.add_api_key("k1", "test", None, "h", 1.0)  # a table the old store did not have
    finally:
        store.close()


def test_state_migrate_copies_everything_and_nothing_is_imported_again(tmp_path, pg_url):
    """An SQLite store with a ledger, tokens (QuickBooks' OAuth), keys and history, copied with `runner state
    migrate`; the config pointed at PostgreSQL; the next apply imports nothing and finds the tokens."""
    cfg = _sandbox_copy(tmp_path)
    first = run_cli("apply", str(cfg), "--output", "json", cwd=tmp_path)
    import json

    imported = json.loads(first.stdout)["totals"]["imported"]
    assert imported > 0
    keys = run_cli("keys", "create", str(cfg), "--environment", "test", cwd=tmp_path)
    assert keys.returncode == 0, keys.stderr
    before = store_of(cfg)
    # Debitura's side of the cases, a change-feed cursor and what happened after a case, as the runner records them.
    case_id = query(before, "SELECT case_id FROM ledger WHERE status='delivered' AND case_id IS NOT NULL")[0][0]
    account, invoice = query(before, "SELECT account_key, invoice_id FROM ledger WHERE case_id=?", (case_id,))[0]
    before.save_webhook_subscription("sub_1", "https://runner.example/webhooks", ["case.closed"], False, "s3cret")
    before.record_case_event("evt_1", "case.closed", case_id, "REF1", "2026-12-01T00:00:00Z", "webhook", {"a": 1})
    before.note_webhook_refused("bad signature")
    before.save_case_poll_state(case_id, {"lifecycle": "Closed"})
    before.save_cursor("acme-stripe", "invoices", 1765000000.25, "scope-1", 1764000000.5)
    before.record_source_change(account, invoice, "ev1", case_id, "paid", True, {"status": "paid"}, "PAID", None)
    before.set_source_change(account, invoice, "ev1", "told", chat_id="chat_1")
    before.mark_checked(account, [invoice])
    before.set_document(account, invoice, case_id, "uploaded", file_name="invoice.pdf", size=10, file_id="f1",
                        attempt=True)
    after_case = ("webhook_subscriptions", "case_events", "webhook_refusals", "case_poll_state", "cursors",
                  "source_changes", "case_checks", "case_documents")
    tables = {t: query(before, f"SELECT count(*) FROM {t}")[0][0] for t in
              ("ledger", "verdicts", "runs", "tokens", "connections", "api_keys", *after_case)}
    token = before.get_token("acme-quickbooks")
    kept = {"subscription": before.webhook_subscription(), "events": before.case_events([case_id]),
            "refusals": before.webhook_refusals(), "poll": before.case_poll_state(case_id),
            "cursor": before.cursor("acme-stripe", "invoices"), "changes": before.source_changes(),
            "document": before.case_document(account, invoice), "documents": before.document_counts()}
    before.close()
    assert tables["tokens"] and tables["api_keys"] == 1 and all(tables[t] >= 1 for t in after_case)
    out = run_cli("state", "migrate", str(cfg), "--to", pg_url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"{tables['ledger']} ledger" in out.stdout
    use_backend(cfg, pg_url)
    after = store_of(cfg)
    try:
        assert {t: query(after, f"SELECT count(*) FROM {t}")[0][0] for t in tables} == tables
        assert after.get_token("acme-quickbooks") == token
        assert {"subscription": after.webhook_subscription(), "events": after.case_events([case_id]),
                "refusals": after.webhook_refusals(), "poll": after.case_poll_state(case_id),
                "cursor": after.cursor("acme-stripe", "invoices"), "changes": after.source_changes(),
                "document": after.case_document(account, invoice), "documents": after.document_counts()} == kept
    finally:
        after.close()
    second = run_cli("apply", str(cfg), "--output", "json", cwd=tmp_path)
    data = json.loads(second.stdout)
    assert data["totals"]["imported"] == 0 and all(c["status"] == "ok" for c in data["connections"]), second.stdout
    # The change-feed cursors came along: a connection with one reads only what changed since the SQLite run.
    assert any(c["scan"]["mode"] == "changes" for c in data["connections"]), second.stdout
    whole = run_cli("apply", str(cfg), "--full", "--output", "json", cwd=tmp_path)
    data = json.loads(whole.stdout)
    assert data["totals"]["imported"] == 0 and data["totals"]["skipped"]["duplicate"] >= imported, whole.stdout
    assert all(c["status"] == "ok" for c in data["connections"]), whole.stdout
    again = run_cli("state", "migrate", str(cfg.with_name("sample-config.yaml")), "--to", pg_url, cwd=tmp_path)
    assert again.returncode == 2  # the config now keeps its state there: nothing to copy


def test_one_apply_per_postgresql_store(tmp_path, sandbox_env, pg_url):
    cfg = use_backend(write_config(tmp_path, SANDBOX_CONFIG.format(server_filters="false")), pg_url)
    holder = store_of(cfg)
    try:
        assert holder.lock()
        out = run_cli("apply", str(cfg))
        assert out.returncode == 3 and "another `runner apply`" in out.stderr, out.stderr
    finally:
        holder.close()  # the server lets the lock go with the session
    out = run_cli("apply", str(cfg))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_a_token_refresh_is_single_flight_across_stores(tmp_path, backend):
    """Two runners (two stores on one database) refreshing one connection's token: the second waits for
    the first's block to end and reads the token it saved, so a rotating refresh token is spent once."""
    from runner.state import open_store

    target = tmp_path / "state.db" if backend == "sqlite" else backend
    one, two = open_store(target), open_store(target)
    one.save_token("qbo", {"refresh_token": "r0"})
    seen = []
    entered = threading.Event()

    def second():
        entered.wait()
        with two.refreshing("qbo") as (token, save):
            seen.append(token["refresh_token"])

    t = threading.Thread(target=second)
    t.start()
    with one.refreshing("qbo") as (token, save):
        assert token["refresh_token"] == "r0"
        entered.set()
        t.join(0.5)
        assert t.is_alive(), "the second runner waits while the first refreshes"
        save({"refresh_token": "r1"})
    t.join(30)
    assert seen == ["r1"]
    one.close()
    two.close()


def _plan_nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


def test_ledger_lookups_probe_each_invoice_before_the_server_has_analyzed_the_ledger(pg_url):
    """During a first import, and in a re-run started before autovacuum has come by, the server has no
    statistics of the ledger. A lookup written as `invoice_id = ANY(...)` was then planned as a scan of all
    the account's rows (15 ms a page at 70,000 rows, the PostgreSQL store 3x slower than SQLite); each
    looked-up invoice must be one primary-key probe whatever the statistics say."""
    from runner.state import postgres

    store = postgres.Store(pg_url, destination="d")
    try:
        with store._db() as db:
            db.execute("ALTER TABLE ledger SET (autovacuum_enabled = false)")  # no statistics, as right after a run
        run = store.begin_run("apply", "config.yaml")
        ids = [f"in_{i:06d}" for i in range(5000)]
        for k in range(0, len(ids), 1000):
            store.record_imported([("acct_1", i, "c", i, "key-" + i, "case-" + i, "ref-" + i) for i in ids[k:k + 1000]],
                                  run)
        wanted = ids[2000:2100] + ["in_missing"]
        assert set(store.ledger_lookup("acct_1", wanted)) == set(ids[2000:2100])
        with store._db() as db:
            (plan,), = db.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + postgres.LOOKUP_SQL,
                                  (wanted, "d", "acct_1")).fetchone()
        nodes = list(_plan_nodes(plan["Plan"]))
        assert sum(n.get("Rows Removed by Filter", 0) for n in nodes) == 0, nodes
        ledger_reads = [n for n in nodes if n.get("Relation Name") == "ledger"]
        assert ledger_reads and all(n["Node Type"] == "Index Scan" for n in ledger_reads), nodes
    finally:
        store.close()


def test_a_page_a_worker_wrote_is_recorded_once_whatever_the_ledger_held(tmp_path, backend):
    """A classification worker records a page it wrote to a local sink in one write (on PostgreSQL one
    statement: a plain insert, made again as an upsert when an invoice is in the ledger after all). An
    invoice left pending by an unfinished delivery becomes delivered by this run, one already delivered
    keeps its case and run, and the page's verdicts and the sink's recorded length are written once."""
    from runner import state

    target = str(tmp_path / "state.db") if backend == "sqlite" else backend
    store = state.open_store(target, destination="jsonl:out/cases.jsonl")
    try:
        first = store.begin_run("apply", "config.yaml")
        store.mark_pending([("acct", "in_pending", "c", "P-1", "key-old")])
        store.record_imported([("acct", "in_done", "c", "D-1", "key-done", "case-done", "ref-done")], first)
        store.mark_sink(0, first)
        second = store.begin_run("apply", "config.yaml")
        db = state.connect(store.reader_target()[0])
        verdict = ("c", "acct", "in_bad", "B-1", "skipped", "incomplete_address", '{"message": "no city"}')

        def page(*ids):
            return [("acct", i, "c", i.upper(), f"key-{i}", f"case-{i}", None) for i in ids]

        state.record_written(db, store.destination, second, page("in_new1", "in_new2"), 100, [verdict])
        state.record_written(db, store.destination, second, page("in_pending", "in_done", "in_new3"), 250, [])
        mark, rows = state.sink_lookup(db, store.destination, "acct",
                                       ["in_new1", "in_new2", "in_pending", "in_done", "in_new3", "in_absent"])
        db.close()
        assert mark == (250, first)
        assert {i: (r.status, r.case_id, r.run_id) for i, r in rows.items()} == {
            "in_new1": ("delivered", "case-in_new1", second), "in_new2": ("delivered", "case-in_new2", second),
            "in_pending": ("delivered", "case-in_pending", second), "in_new3": ("delivered", "case-in_new3", second),
            "in_done": ("delivered", "case-done", first)}
        assert [(v["invoice_id"], v["reason"]) for v in store.run_verdicts(second, not_imported=True)] == [
            ("in_bad", "incomplete_address")]
    finally:
        store.close()


def test_a_page_claimed_before_it_is_written_is_recorded_whole_or_not_at_all(pg_url):
    """PostgreSQL's writers of a local sink record a page before writing it (runner/engine/localsink.py), in
    one statement that also moves the sink's mark: nothing is recorded if an invoice of the page is delivered
    already, or if the mark is not where the writer found the file's end; a row left pending by an unfinished
    delivery is taken over when asked. settle_sink takes back the rows of a page never written."""
    from runner import state

    store = state.open_store(pg_url, destination="jsonl:out/cases.jsonl")
    try:
        run = store.begin_run("apply", "config.yaml")
        store.mark_pending([("acct", "in_pending", "c", "P-1", "key-old")])
        store.mark_sink(0, run)
        db = state.connect(store.reader_target()[0])

        def page(*ids):
            return [("acct", i, "c", i.upper(), f"key-{i}", f"key-{i}", None) for i in ids]

        skipped = ("c", "acct", "in_bad", "B-1", "skipped", "incomplete_address", '{"message": "no city"}')
        assert state.claim_written(db, store.destination, run, page("in_1", "in_2"), 0, 100, [skipped]) == "claimed"
        assert state.claim_written(db, store.destination, run, page("in_3"), 0, 150, []) == "moved"
        assert state.claim_written(db, store.destination, run, page("in_3", "in_2"), 100, 200, [skipped]) == "conflict"
        assert state.claim_written(db, store.destination, run, page("in_pending"), 100, 180, []) == "conflict"
        assert state.claim_written(db, store.destination, run, page("in_pending", "in_4"), 100, 180, [],
                                   upsert=True) == "claimed"
        assert state.sink_state(db, store.destination) == (180, run, 100, "acct", ["in_pending", "in_4"])
        rows = state.lookup(db, store.destination, "acct", ["in_1", "in_2", "in_3", "in_4", "in_pending"])
        assert {i: r.status for i, r in rows.items()} == {
            "in_1": "delivered", "in_2": "delivered", "in_4": "delivered", "in_pending": "delivered"}
        assert [v["invoice_id"] for v in store.run_verdicts(run, not_imported=True)] == ["in_bad"]
        # That last page never reached the file (its writer died): its rows are taken back, not the others'
        state.settle_sink(db, store.destination, 100, ("acct", ["in_pending", "in_4"], run), [], run)
        assert set(state.lookup(db, store.destination, "acct", ["in_1", "in_2", "in_4", "in_pending"])) == {
            "in_1", "in_2"}
        assert state.sink_state(db, store.destination) == (100, run, None, None, None)
        db.close()
    finally:
        store.close()
