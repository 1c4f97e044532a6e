"""The real Stripe fixture objects (shared/reference/stripe) map correctly through integrations.d/stripe.yaml."""
from __future__ import annotations

import copy
import json
from decimal import Decimal
from pathlib import Path

import pytest

from runner.spec import config
from runner.engine import pipeline
from runner.net.http import Clients

REF = Path(__file__).resolve().parent / "fixtures" / "stripe"  # copies of shared/reference/stripe (see README)


@pytest.fixture
def fixture_invoice():
    return json.loads((REF / "fixture-invoice.json").read_text())


@pytest.fixture
def fixture_customer():
    return json.loads((REF / "fixture-customer.json").read_text())


@pytest.fixture
def source(tmp_path, sandbox_env):
    (tmp_path / "config.yaml").write_text("""
destination: {type: jsonl, path: out.jsonl}
connections:
  - name: fx
    integration: stripe
    environment: test
    credentials: {api_key: "${STRIPE_API_KEY}"}
    window: {from: "2009-01-01", to: "2009-12-31"}
""")
    cfg = config.load(tmp_path / "config.yaml")
    src = pipeline.Source(cfg.connections[0], Clients())
    src.account_id = "acct_fixture"
    return src


def test_fixture_invoice_maps_field_by_field(source, fixture_invoice):
    rec = source.stream.prepare(copy.deepcopy(fixture_invoice))
    inv = source.stream.mapping.apply(rec)
    assert inv["external_id"] == "in_1Pgc6tB7WZ01zgkWu9fdqL6I"
    assert inv["amount"] == Decimal("10.00")  # 1000 cents of usd
    assert inv["currency"] == "USD"
    assert inv["issue_date"] == "2009-02-13" and inv["due_date"] == "2009-02-13"  # 1234567890
    assert inv["debtor"]["id"] == "cus_QXg1o8vcGmoR32"
    assert "address" not in inv["debtor"]  # all-null customer_address maps to nothing, not to empty strings
    assert "number" not in inv  # a draft has no number yet


def test_fixture_draft_is_not_unpaid(source, fixture_invoice):
    v = source.evaluate(copy.deepcopy(fixture_invoice))
    assert (v.verdict, v.reason) == ("skipped", "not_unpaid")
    assert "draft" in v.message


def test_fixture_open_with_expanded_customer(source, fixture_invoice, fixture_customer):
    inv = copy.deepcopy(fixture_invoice)
    inv.update(status="open", number="7FE1103-0001", customer_name="Example Company ApS")
    cust = copy.deepcopy(fixture_customer)
    cust["address"] = {"line1": "Vesterbrogade 1", "line2": "2. sal", "city": "København", "postal_code": "1620",
                       "country": "DK", "state": None}
    inv["customer"] = cust  # expand[]=data.customer
    v = source.evaluate(inv)
    assert v.verdict == "eligible", v
    mapped = v.invoice
    assert mapped["debtor"]["address"] == {"street": "Vesterbrogade 1, 2. sal", "city": "København",
                                           "postal_code": "1620", "country": "DK"}
    assert mapped["number"] == "7FE1103-0001"
    assert mapped["source"] == {"connection": "fx", "integration": "stripe", "account_id": "acct_fixture"}


def test_fixture_open_without_address_is_incomplete(source, fixture_invoice, fixture_customer):
    inv = copy.deepcopy(fixture_invoice)
    inv.update(status="open", number="7FE1103-0002", customer_name="No Address Ltd")
    inv["customer"] = copy.deepcopy(fixture_customer)  # its address is all null too
    v = source.evaluate(inv)
    assert (v.verdict, v.reason) == ("skipped", "incomplete_address")
    assert v.detail["missing"] == ["street", "city", "postal_code", "country"]
    assert "street, city, postal code, country" in v.message
