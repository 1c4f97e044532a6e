"""Messages and state that must not mislead: an unreadable value is not called missing, a saved error does not
grow run after run, a library's notice does not reach the terminal, doctor says what it did not check, and
explain shows what the last apply recorded."""
from __future__ import annotations

import json

import pytest

from oauth_helpers import Sandbox, load, qbo_connection, runner_cmd, write_config as oauth_config


@pytest.fixture
def sb():
    with Sandbox() as s:
        yield s


def _connection_row(cfg, name):
    from runner.state.sqlite import Store

    store = Store(load(cfg).state_path)
    try:
        return store.connection(name)
    finally:
        store.close()


# --- 19.13 / 19.14: OAuth runs ------------------------------------------------------------------------------

def test_an_oauth_run_prints_no_library_deprecation_notice(sb, tmp_path):
    cfg = oauth_config(tmp_path, qbo_connection(sb))
    r = runner_cmd("apply", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Deprecat" not in r.stderr and "httpx module" not in r.stderr, r.stderr


def test_a_revoked_grants_saved_error_does_not_grow_run_after_run(sb, tmp_path):
    cfg = oauth_config(tmp_path, qbo_connection(sb))
    assert runner_cmd("apply", str(cfg)).returncode == 0
    sb.qbo.oauth.revoke_user("alice")
    sb.qbo.oauth.expire_access_tokens()
    errors = []
    for _ in range(3):
        r = runner_cmd("apply", str(cfg))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "runner connect acme-qbo" in r.stdout + r.stderr
        errors.append(_connection_row(cfg, "acme-qbo")["last_error"])
    assert "revoked" in errors[-1]
    assert errors[1] == errors[2], errors
    assert errors[-1].count("needs to be reconnected") <= 1, errors[-1]


# --- 19.12: a value that is there but cannot be read is named, with the value, never called missing ----------

from test_inbound import Server, invoice, make_key, write as inbound_config  # noqa: E402


@pytest.fixture
def zap(tmp_path):
    cfg = inbound_config(tmp_path)
    key = make_key(cfg, "production")
    srv = Server(cfg)
    yield lambda payload: srv.post(key, payload)
    srv.stop()


@pytest.mark.parametrize("change, field, value, source", [
    ({"due_date": "31/31/2026"}, "due_date", "31/31/2026", "from due_date"),
    ({"amount_due": "lots"}, "amount", "lots", "from amount_due"),
    ({"customer": "ACME Corp"}, "customer", "ACME Corp", "as an object"),
])
def test_an_unreadable_field_is_named_with_its_value_not_called_missing(zap, change, field, value, source):
    r = zap(invoice(1, **change))
    assert r.status_code == 422, r.text
    body = r.json()
    errors = [e for e in body["errors"] if e["field"] == field]
    assert errors, body
    text = errors[0]["message"]
    assert f"could not read {value!r}" in text and source in text, text
    assert "missing" not in text and "missing" not in body["message"], body["message"]


def test_an_unreadable_amount_paid_is_not_silently_not_unpaid(zap):
    r = zap(invoice(1, status="open", amount_paid="none"))
    assert r.status_code == 422, r.text
    body = r.json()
    assert "could not read 'none'" in body["message"] and "amount_paid" in body["message"], body["message"]
    assert "unpaid" in body["message"]
    assert [e["field"] for e in body["errors"]] == ["amount_paid"]
    # A readable amount paid still decides the status as before.
    r = zap(invoice(2, status="open", amount_paid="10.00"))
    assert r.status_code == 200, r.text
    assert r.json()["invoices"][0]["reason"] == "not_unpaid"


def test_a_missing_field_is_still_called_missing(zap):
    inv = invoice(1)
    del inv["due_date"]
    r = zap(inv)
    assert r.status_code == 422, r.text
    assert "due_date is missing" in r.json()["message"]


# --- 19.15: doctor says what it did not check, and never shows a connection's name as an account -------------

from conftest import run_cli, stripe_workspace  # noqa: E402


def _doctor(cfg):
    r = run_cli("doctor", str(cfg), "--output", "json", cwd=cfg.parent)
    return json.loads(r.stdout)


def _check(report, scope, cid):
    return next(c for c in report["checks"] if c["scope"] == scope and c["check"] == cid)


def test_doctor_does_not_claim_the_destination_environment_behind_a_custom_base_url(tmp_path, monkeypatch):
    from test_doctor import Env

    from runner.sandbox import debitura as dsim
    from runner.sandbox.core import SandboxServer

    with SandboxServer({"debitura": dsim.DebituraSimulator("production")}) as srv:
        e = Env(tmp_path, monkeypatch, dest_env="production", dest_extra=f"\n  base_url: {srv.url('debitura')}",
                conn_extra="\n    allow_test_source: true")
        code, rep = e.doctor()
        _, text = e.cli("doctor", str(e.path))
    c = _check(rep, "destination", "environment")
    assert c["status"] == "skipped", c
    assert "not checked" in c["message"] and "base_url" in c["message"], c
    assert "[ok] destination key belongs to the configured environment" not in text
    assert _check(rep, "destination", "key")["status"] == "ok"


def test_doctor_does_not_show_the_connection_name_as_the_providers_account(tmp_path):
    def no_account(spec):
        spec.pop("account", None)  # a spec that does not ask the provider which account it is

    cfg = stripe_workspace(tmp_path, edit=no_account, extra="    account_id: acme-books\n")
    c = _check(_doctor(cfg), "s", "account")
    assert "account 's'" not in c["message"], c
    assert "does not report which account" in c["message"], c


# --- 19.16: explain shows what the last apply recorded, and asks the provider only where a key can be -------

def _bergmann(e):
    return next(i for i in e.all_invoices if i["customer_name"] == "Bergmann Elektro GmbH"
                and i["_sandbox_kind"] == "open_incomplete_address")


def test_explain_shows_the_recorded_verdict_when_the_invoice_is_no_longer_found(tmp_path, monkeypatch):
    from test_doctor import Env

    e = Env(tmp_path, monkeypatch, kinds={"open_incomplete_address"})
    e.apply()
    inv = _bergmann(e)
    e.stripe.data["test"]["invoices"].remove(inv)  # gone at the provider since (deleted, or another account)
    code, text = e.explain(inv["number"])
    assert "was not found" in text
    assert "incomplete_address" in text and "postal code" in text, text
    assert "the last apply" in text, text


def test_explain_shows_the_recorded_verdict_when_the_provider_cannot_be_asked(tmp_path, monkeypatch):
    from test_doctor import Env

    from runner.sandbox import stripe as ssim

    e = Env(tmp_path, monkeypatch, kinds={"open_incomplete_address"})
    e.apply()
    inv = _bergmann(e)
    e.stripe.revoke(ssim.TEST_SECRET_KEY)
    code, text = e.explain(inv["number"])
    assert "could not look up" in text
    assert "incomplete_address" in text and "postal code" in text, text


def test_explain_looks_an_id_up_by_id_only_and_a_number_by_number_only(tmp_path, monkeypatch):
    from test_doctor import Env

    e = Env(tmp_path, monkeypatch)
    log = e.stripe.faults.request_log
    log.clear()
    code, text = e.explain("in_1NotAnInvoiceAnywhere")
    assert "was not found" in text
    assert [p for _, p in log if "/search" in p] == [], log  # an id is never searched for as a number
    assert any(p.startswith("/v1/invoices/in_1NotAnInvoiceAnywhere") for _, p in log), log
    log.clear()
    number = e.number_of("open")
    code, text = e.explain(number)
    assert number in text and "was not found" not in text
    assert [p for _, p in log if p.startswith(f"/v1/invoices/{number}")] == [], log  # a number is not an id


def test_doctor_and_explain_name_an_unreadable_country_with_its_value(tmp_path, monkeypatch):
    from test_doctor import Env

    e = Env(tmp_path, monkeypatch)
    inv = next(i for i in e.stripe.data["test"]["invoices"] if i["_sandbox_kind"] == "open" and i["customer_address"])
    inv["customer_address"] = {**inv["customer_address"], "country": "Narnia"}
    code, rep = e.doctor()
    c = _check(rep, "acme-stripe", "addresses")
    assert "'Narnia'" in c["message"] and "no country" not in c["message"], c["message"]
    code, text = e.explain(inv["number"])
    assert "could not read 'Narnia' as a country" in text and "(from customer_address.country)" in text, text
    assert "no country" not in text and "missing country" not in text, text


def test_a_value_of_the_wrong_type_names_its_field(zap):
    r = zap(invoice(1, due_date=20260131))
    assert r.status_code == 422, r.text
    err = r.json()["errors"][0]
    assert err["field"] == "due_date" and "could not read 20260131" in err["message"], err


def test_an_unreadable_issue_date_is_named_with_the_other_bad_fields(zap):
    r = zap(invoice(1, issue_date="yesterday", amount_due="lots"))
    assert r.status_code == 422, r.text
    by_field = {e["field"]: e["message"] for e in r.json()["errors"]}
    assert "could not read 'yesterday'" in by_field["issue_date"], by_field
    assert "could not read 'lots'" in by_field["amount"], by_field
    inv = invoice(2)
    del inv["issue_date"]
    r = zap(inv)
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == ["issue_date"], r.json()
    assert "issue_date is missing" in r.json()["message"]


def test_a_huge_unreadable_value_is_shown_shortened(zap):
    r = zap(invoice(1, due_date="9" * 100_000))
    assert r.status_code == 422, r.text
    assert len(r.text) < 5_000 and "due_date is 100,000 characters long ('999" in r.json()["message"]
    r = zap(invoice(1, due_date="9" * 900))  # within the inbound API's bound: unreadable, shown shortened
    assert r.status_code == 422, r.text
    assert len(r.text) < 2_000 and "could not read '999" in r.json()["message"]


def test_a_status_of_the_wrong_type_names_the_field_not_the_record(zap):
    r = zap(invoice(1, status=5))
    assert r.status_code == 422, r.text
    err = r.json()["errors"][0]
    assert err["field"] == "status" and "could not read 5" in err["message"], err
