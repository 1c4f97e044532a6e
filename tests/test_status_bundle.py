"""`runner status`, `runner support-bundle`, and zero results that always say why."""
from __future__ import annotations

import asyncio
import json

from runner.spec import config as config_mod
from runner import sandbox
from runner.engine import pipeline
from runner.sandbox import debitura as dsim
from runner.sandbox import stripe as ssim
import pytest

from conftest import store_of
from tests.test_doctor import Env, assert_no_secret


@pytest.fixture(autouse=True)
def _on_both_stores(backend, monkeypatch):
    """Every test here runs on both state stores (tests/conftest.py: backend)."""
    monkeypatch.setattr(Env, "backend", backend)


def test_status_before_and_after_runs(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, kinds={"open_incomplete_address"})
    code, out = e.cli("status", str(e.path), "-o", "json")
    assert code == 0
    [c] = json.loads(out)["connections"]
    assert c["last_success"] is None and c["last_run"] is None and c["integration_name"] == "Stripe"
    code, text = e.cli("status", str(e.path))
    assert "last successful sync: never" in text and "no run recorded yet" in text
    e.apply()
    code, out = e.cli("status", str(e.path), "-o", "json")
    [c] = json.loads(out)["connections"]
    assert c["last_success"] and c["last_error"] is None
    assert c["last_run"]["imported"] == 13 and c["last_run"]["skipped"] == {"incomplete_address": 3}
    assert c["account"]["id"] == ssim.ACCOUNT_ID  # the Stripe account the key reads, not the connection's name
    # a failing run: the last error is shown, the last success kept
    e.stripe.revoke(ssim.TEST_SECRET_KEY)
    code, _ = e.cli("apply", str(e.path))
    assert code == 1
    code, text = e.cli("status", str(e.path))
    assert "last successful sync: 2" in text and "last error (" in text and "HTTP 401" in text
    assert "0 imported: nothing was imported because the connection failed" in text
    assert_no_secret(e.outputs)


def test_status_shows_credential_change_and_reconnect_state(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    e.apply()
    monkeypatch.setenv("STRIPE_API_KEY", ssim.TEST_RESTRICTED_KEY)  # the key was rotated
    e.apply()
    code, out = e.cli("status", str(e.path), "-o", "json")
    [c] = json.loads(out)["connections"]
    assert [ch["what"] for ch in c["changes"]] == ["credential_fingerprint"]
    cfg = config_mod.load(e.path)
    store = store_of(cfg.file)
    store.update_connection("acme-stripe", status="needs_reconnect", last_error="the grant was revoked",
                            last_error_at=9e9)
    store.close()
    code, text = e.cli("status", str(e.path))
    assert "state: needs_reconnect → runner connect acme-stripe" in text
    code, out = e.cli("doctor", str(e.path), "-o", "json")
    last = next(c for c in json.loads(out)["checks"] if c["check"] == "last_sync")
    assert last["status"] == "warning" and last["fix"] == "runner connect acme-stripe"
    auth = next(c for c in json.loads(out)["checks"] if c["check"] == "auth")
    assert auth["status"] == "failed" and "runner connect acme-stripe" in auth["fix"]
    assert_no_secret(e.outputs)


def test_support_bundle_has_what_support_asks_for_and_no_secret(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, kinds={"open_incomplete_address", "paid", "open_partial", "open_old"})
    e.apply()
    monkeypatch.setenv("STRIPE_API_KEY", ssim.TEST_RESTRICTED_KEY)
    e.apply()
    e.stripe.revoke(ssim.TEST_RESTRICTED_KEY)
    code, _ = e.cli("apply", str(e.path))
    assert code == 1
    out_file = tmp_path / "bundle.json"
    code, text = e.cli("support-bundle", str(e.path), "--out", str(out_file))
    assert code == 0 and "redacted" in text
    raw = out_file.read_text()
    e.outputs.append(raw)
    b = json.loads(raw)
    [c] = b["connections"]
    assert c["integration"] == "Stripe" and c["last_worked"]
    # the last run that saw invoices failed; samples come from the last run of this connection
    assert any("HTTP 401" in err for err in c["errors"])
    assert [ch["what"] for ch in c["recent_changes"]] == ["credential_fingerprint"]
    assert b["doctor"]["checks"] and any(ch["check"] == "auth" and ch["status"] == "failed"
                                         for ch in b["doctor"]["checks"])
    assert len(b["recent_runs"]) == 3
    assert "credentials_from" in b["config"]["connections"][0]
    assert_no_secret(e.outputs)


def test_support_bundle_samples_invoices_not_imported(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, kinds={"open_incomplete_address", "paid", "open_partial"})
    monkeypatch.chdir(tmp_path)
    e.path.write_text(e.path.read_text().replace("server_filters: true", "server_filters: false"))
    e.apply()
    code, text = e.cli("support-bundle", str(e.path), "--offline")
    assert code == 0
    [path] = list(tmp_path.glob("runner-support-*.json"))
    b = json.loads(path.read_text())
    e.outputs.append(path.read_text())
    assert "doctor" not in b
    samples = b["connections"][0]["sample_invoices_not_imported"]
    reasons = {s["reason"] for s in samples}
    assert reasons == {"incomplete_address", "not_unpaid"}
    assert all(s["invoice_id"] and s["message"] for s in samples)
    assert len([s for s in samples if s["reason"] == "not_unpaid"]) == 3  # a few per reason, not all
    assert_no_secret(e.outputs)


# --- zero results are never silent -------------------------------------------------------------------------

def _sync(e: Env, mode: str = "apply", full: bool = False):
    cfg = config_mod.load(e.path)
    store = store_of(cfg.file)
    try:
        return asyncio.run(pipeline.sync(cfg, mode=mode, store=store, full=full))
    finally:
        store.close()


def test_zero_because_nothing_unpaid_in_the_window(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    e.path.write_text(e.path.read_text().replace("window: {last: 90d}", 'window: {from: "2020-01-01", to: "2020-02-01"}'))
    res = _sync(e, "plan")
    [c] = res.connections
    assert c.imported == 0 and c.seen == 0
    assert "nothing unpaid was created in" in c.why_zero()
    code, text = e.cli("plan", str(e.path))
    assert "0 would import: the provider returned no invoices" in text


def test_zero_because_only_paid_and_old_ones(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, kinds={"paid", "open_old"})
    e.stripe.data["test"]["invoices"] = [i for i in e.stripe.data["test"]["invoices"]
                                         if i["_sandbox_kind"] in ("paid", "open_old")]
    e.path.write_text(e.path.read_text().replace("server_filters: true", "server_filters: false"))
    [c] = _sync(e, "plan").connections
    assert c.why_zero().startswith("nothing unpaid in the window")
    assert "3 not unpaid" in c.why_zero() and "3 outside the date window" in c.why_zero()


def test_zero_because_everything_was_imported_before(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    _sync(e)
    res = _sync(e, full=True)  # the whole window again (a run of only the changes since would see none)
    [c] = res.connections
    assert c.imported == 0 and "already imported before (duplicates)" in c.why_zero()
    # the stored run summary says it too (status and the bundle read it from there)
    code, out = e.cli("status", str(e.path), "-o", "json")
    assert "duplicates" in json.loads(out)["connections"][0]["last_run"]["why_zero"]


def test_zero_because_everything_was_skipped_for_a_reason(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    e.stripe.data["test"]["invoices"] = [i for i in e.all_invoices if i["_sandbox_kind"] == "open_incomplete_address"]
    [c] = _sync(e).connections
    why = c.why_zero()
    assert why.startswith("every invoice seen was skipped: 3 incomplete debtor address")
    assert "the debtor's address is missing" in why  # an example names the missing field


def test_zero_because_of_an_error(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, debitura_key=dsim.REVOKED_KEY)
    res = _sync(e)
    [c] = res.connections
    assert c.imported == 0
    assert "refused the API key" in c.why_zero()
    (tmp_path / "b").mkdir()
    e2 = Env(tmp_path / "b", monkeypatch)
    e2.stripe.revoke(ssim.TEST_SECRET_KEY)
    [c2] = _sync(e2).connections
    assert c2.why_zero().startswith("nothing was imported because the connection failed") and "401" in c2.why_zero()
    assert sandbox.get_simulator("debitura", e.data_dir).cases() == []


def test_switched_organization_shows_in_doctor_status_and_bundle(tmp_path, monkeypatch):
    """Seed escalation: 'switched accounts or organizations'. The runner sees it and says so."""
    from tests.test_doctor import OAuthEnv

    e = OAuthEnv(tmp_path, monkeypatch)
    code, _ = e.cli("apply", str(e.path), "--connection", "acme-zoho")
    assert code == 0
    e.path.write_text(e.path.read_text().replace('organization_id: "60001"', 'organization_id: "60002"'))
    code, out = e.cli("doctor", str(e.path), "--connection", "acme-zoho", "-o", "json")
    acct = next(c for c in json.loads(out)["checks"] if c["check"] == "account")
    assert acct["status"] == "warning"
    assert "Sam's Side Hustle" in acct["message"] and "Sam's Shop LLC" in acct["message"]
    code, _ = e.cli("apply", str(e.path), "--connection", "acme-zoho")
    code, out = e.cli("status", str(e.path), "-o", "json")
    zoho = next(c for c in json.loads(out)["connections"] if c["name"] == "acme-zoho")
    assert {(ch["what"], ch["old"], ch["new"]) for ch in zoho["changes"]} >= {("account_id", "60001", "60002")}
    bundle = tmp_path / "b.json"
    e.cli("support-bundle", str(e.path), "--out", str(bundle), "--offline")
    b = json.loads(bundle.read_text())
    e.outputs.append(bundle.read_text())
    z = next(c for c in b["connections"] if c["connection"] == "acme-zoho")
    assert any(ch["what"] == "account_name" and ch["new"] == "Sam's Side Hustle" for ch in z["recent_changes"])
    e.no_secret()


def test_status_reads_the_run_history_once_for_every_connection(tmp_path, backend):
    """Each connection's last run is its own latest one (a run of some connections only, as `--connection`
    makes, leaves the others on their earlier run), and status and the support bundle read the recent runs
    once for all connections: read again for each, 500 connections took 51 s (every run's summary holds every
    connection's part)."""
    from runner.diagnostics import checks as diagnostics

    from conftest import stripe_workspace

    more = "".join(f"  - name: {n}\n    integration: stripe\n    environment: sandbox\n"
                   f"    credentials: {{api_key: \"${{file:sandbox-secrets/stripe_api_key}}\"}}\n    window: {{last: 3y}}\n"
                   for n in ("b", "c"))
    from conftest import use_backend

    cfg = config_mod.load(use_backend(stripe_workspace(tmp_path, extra=more), backend))
    assert [c.name for c in cfg.connections] == ["s", "b", "c"]
    store = store_of(cfg.file)
    try:
        for names, imported in ((["s", "b", "c"], 5), (["s"], 7)):
            run_id = store.begin_run("apply", str(cfg.file))
            store.finish_run(run_id, "ok", {"totals": {"imported": imported * len(names)}, "connections": [
                {"name": n, "seen": imported, "imported": imported, "skipped": {}, "failed": 0, "status": "ok"}
                for n in names]})
        reads = []
        real = store.last_runs
        store.last_runs = lambda limit=10: reads.append(limit) or real(limit)
        st = diagnostics.status(cfg, store)
        assert {c["name"]: (c["last_run"]["id"], c["last_run"]["imported"]) for c in st["connections"]} == {
            "s": (run_id, 7), "b": (run_id - 1, 5), "c": (run_id - 1, 5)}
        assert len(reads) == 1
        reads.clear()
        bundle = diagnostics.support_bundle(cfg, store)
        assert [c["last_run"]["id"] for c in bundle["connections"]] == [run_id, run_id - 1, run_id - 1]
        assert len(reads) == 2  # the connections' last runs, and the ten most recent runs the bundle lists
    finally:
        store.close()
