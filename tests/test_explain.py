"""`runner explain INVOICE`: one invoice through every stage, by id or number, paid ones included."""
from __future__ import annotations

import json

from click.testing import CliRunner

from runner import sandbox
from runner.cli.main import main
from runner.sandbox import stripe as ssim
import pytest

from conftest import store_of
from tests.test_doctor import SECRETS, Env, assert_no_secret


@pytest.fixture(autouse=True)
def _on_both_stores(backend, monkeypatch):
    """Every test here runs on both state stores (tests/conftest.py: backend)."""
    monkeypatch.setattr(Env, "backend", backend)


def _inv(e: Env, kind: str, **match) -> dict:
    return next(i for i in e.all_invoices if i["_sandbox_kind"] == kind and i["number"]
                and all(i.get(k) == v for k, v in match.items()))


def test_stages_and_verdict_in_json(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, kinds={"open_incomplete_address"})
    inv = _inv(e, "open_incomplete_address", customer_name="Oakridge Supplies Ltd")
    code, out = e.cli("explain", str(e.path), inv["number"], "--output", "json")
    assert code == 0
    [ex] = json.loads(out)
    assert ex["found"] and ex["invoice_id"] == inv["id"] and ex["number"] == inv["number"]
    assert ex["verdict"] == "skipped" and ex["reason"] == "incomplete_address"
    stages = {s["stage"]: s["result"] for s in ex["stages"]}
    assert stages == {"fetch": "ok", "status filter": "ok", "date window": "ok", "validation": "skipped",
                      "due date": "ok", "dedupe": "ok"}
    assert "customer 'Oakridge Supplies Ltd' has no city" in ex["summary"]


def test_by_id_and_by_number_agree(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    inv = _inv(e, "open")
    _, by_id = e.cli("explain", str(e.path), inv["id"], "-o", "json")
    _, by_number = e.cli("explain", str(e.path), inv["number"], "-o", "json")
    a, b = json.loads(by_id)[0], json.loads(by_number)[0]
    assert a["invoice_id"] == b["invoice_id"] == inv["id"]
    assert a["verdict"] == b["verdict"] == "eligible"
    assert "the next `runner apply" in a["summary"]


def test_paid_invoice_hidden_by_the_status_filter_is_still_explained(tmp_path, monkeypatch):
    """The list request asks for open invoices only; explain asks the provider for the one invoice."""
    e = Env(tmp_path, monkeypatch, kinds={"paid", "void"})
    paid = _inv(e, "paid")
    sim = e.stripe
    before = len(sim.request_log)
    code, text = e.cli("explain", str(e.path), paid["number"])
    assert code == 0
    assert f"{paid['number']} was not imported because its status in Stripe is paid" in text
    assert any("/v1/invoices/search" in p for _, p in sim.request_log[before:])
    code, text = e.cli("explain", str(e.path), _inv(e, "void")["id"])
    assert "status in Stripe is void" in text


def test_outside_window_several_stages_shown(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, kinds={"open_old"})
    old = _inv(e, "open_old")
    code, text = e.cli("explain", str(e.path), old["number"])
    assert "[skip] date window" in text and "before the window" in text
    assert "window: {from: " in text


def test_imported_invoice_shows_case_and_history(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    e.apply()
    # a second run of the whole window: the invoice is a duplicate now; the history shows both verdicts
    assert e.cli("apply", "--full", str(e.path))[0] == 0
    inv = _inv(e, "open")
    code, out = e.cli("explain", str(e.path), inv["number"], "-o", "json")
    [ex] = json.loads(out)
    case = next(c for c in sandbox.get_simulator("debitura", e.data_dir).cases()
                if c["creditorReference"] == inv["number"])
    assert ex["verdict"] == "imported" and case["reference"] in ex["summary"]
    assert [h["verdict"] for h in ex["history"]] == ["skipped", "imported"]
    assert ex["history"][0]["reason"] == "duplicate"
    assert ex["ledger"][0]["status"] == "delivered" and ex["ledger"][0]["case_reference"] == case["reference"]


def test_unknown_invoice_is_not_found_and_exits_1(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    code, text = e.cli("explain", str(e.path), "SBX-9999")
    assert code == 1
    assert "SBX-9999 was not found in Stripe" in text


def test_config_from_option_and_environment(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    inv = _inv(e, "open")
    code, text = e.cli("explain", "--config", str(e.path), inv["number"])
    assert code == 0 and inv["number"] in text
    monkeypatch.setenv("RUNNER_CONFIG", str(e.path))
    code, text = e.cli("explain", inv["number"], "--connection", "acme-stripe")
    assert code == 0 and "has not been imported yet" in text
    code, text = e.cli("explain", inv["number"], "--connection", "nope")
    assert code == 2 and "no connection named 'nope'" in text


def test_explain_output_has_no_secret(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, kinds={"paid", "open_incomplete_address"})
    for kind in ("open", "paid", "open_incomplete_address"):
        e.cli("explain", str(e.path), _inv(e, kind)["number"])
        e.cli("explain", str(e.path), _inv(e, kind)["number"], "-o", "json")
    e.stripe.revoke(ssim.TEST_SECRET_KEY)
    code, text = e.cli("explain", str(e.path), _inv(e, "open")["number"], "-o", "json")
    assert code == 1 and "HTTP 401" in text
    assert_no_secret(e.outputs)
    assert SECRETS  # the list the grep uses is not empty
