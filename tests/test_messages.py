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
    from runner.state import Store

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
    ({"customer": "ACME Corp"}, "debtor", "ACME Corp", "from customer"),
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
        e = Env(tmp_path, monkeypatch, dest_env="production", dest_extra=f"\n  base_url: {srv.url('debitura')}")
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

    cfg = stripe_workspace(tmp_path, edit=no_account)
    c = _check(_doctor(cfg), "s", "account")
    assert "account 's'" not in c["message"], c
    assert "does not report which account" in c["message"], c
