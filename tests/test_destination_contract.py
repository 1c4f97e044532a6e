"""The Debitura contract beyond the request schema: test cases (isTest) never count for production (nor the
reverse), and the debtor of a case carries what the Customer API asks for (type, contactPerson). Driven through
the CLI and `runner serve` against the sandbox simulators, as a user would."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from runner import sandbox
from runner.state.sqlite import Store

try:
    from conftest import DEBITURA_KEY, STRIPE_KEY, run_cli, write_config
    from test_inbound import Server, invoice, make_key
except ModuleNotFoundError:  # tests/ as a package
    from tests.conftest import DEBITURA_KEY, STRIPE_KEY, run_cli, write_config
    from tests.test_inbound import Server, invoice, make_key

ENV = {"STRIPE_API_KEY": STRIPE_KEY, "DEBITURA_API_KEY": DEBITURA_KEY}

ZAPIER = """
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

STRIPE = """
state: state/{state}
destination:
  type: debitura
  environment: sandbox
  api_key: "${{DEBITURA_API_KEY}}"
{test_lines}
connections:
  - name: acme-stripe
    integration: stripe
    environment: sandbox
    credentials: {{api_key: "${{STRIPE_API_KEY}}"}}
    window: {{last: 90d}}
"""


def debitura(state_dir: Path):
    sandbox.reset_cache()  # read what the runner's process persisted, not a cached copy
    return sandbox.get_simulator("debitura", state_dir / "sandbox")


def debitura_call(state_dir: Path, method: str, path: str) -> httpx.Response:
    """A request to the (file-backed) Debitura simulator the runner used, as a user's own script would send it."""
    async def go():
        async with httpx.AsyncClient(transport=sandbox.get_transport("debitura", state_dir / "sandbox"),
                                     base_url="https://customer-api.debitura.com") as client:
            return await client.request(method, path, headers={"XApiKey": DEBITURA_KEY})

    sandbox.reset_cache()
    return asyncio.run(go())


def ledger_rows(state_dir: Path) -> list[tuple]:
    store = Store(state_dir / "state.db")
    try:
        return sorted(store.db.execute("SELECT destination, account_key, invoice_id, status, case_id FROM ledger"))
    finally:
        store.close()


def test_a_zapier_test_case_is_not_a_production_duplicate(tmp_path):
    """Issue 18.3: an invoice tried out on a test server (an isTest case), then posted to the production server,
    was answered `skipped / duplicate` with the test case's id and recorded as imported: no real case existed."""
    cfg = write_config(tmp_path, ZAPIER.format(environment="test"))
    test_key = make_key(cfg, "test")
    srv = Server(cfg)
    try:
        r = srv.post(test_key, invoice(1))
    finally:
        srv.stop()
    assert r.status_code == 200 and r.json()["imported"] == 1, r.text
    (test_case,) = debitura(tmp_path / "state").cases()
    assert test_case["isTestCase"] is True

    cfg = write_config(tmp_path, ZAPIER.format(environment="production"))
    prod_key = make_key(cfg, "production")
    srv = Server(cfg)
    try:
        r = srv.post(prod_key, invoice(1))
        body = r.json()
        (item,) = body["invoices"]
        # Debitura keeps one creditor reference per creditor across test and production cases: the production
        # case cannot be created while the test case holds "1001", and the Zap is told why and what to do.
        assert r.status_code == 502 and body["imported"] == 0 and item["verdict"] == "failed", r.text
        assert item.get("case_id") != test_case["id"]
        assert "TEST case with creditor reference '1001'" in item["message"]
        assert test_case["reference"] in item["message"]
        assert f"DELETE /test/cases/{test_case['id']}" in item["fix"]
        rows = [row for row in ledger_rows(tmp_path / "state") if "production" in row[1]]
        assert rows and all(row[3] != "delivered" for row in rows), rows

        # The user deletes the test case (as the fix says); the Zap's retry imports the invoice for real.
        for _ in range(2):  # idempotent, as documented
            assert debitura_call(tmp_path / "state", "DELETE", f"/test/cases/{test_case['id']}").status_code == 204
        r = srv.post(prod_key, invoice(1))
    finally:
        srv.stop()
    assert r.status_code == 200 and r.json()["imported"] == 1, r.text
    (case,) = debitura(tmp_path / "state").cases()
    assert case["isTestCase"] is False and case["creditorReference"] == "1001"
    assert r.json()["invoices"][0]["case_id"] == case["id"]
    delivered = [row for row in ledger_rows(tmp_path / "state") if row[3] == "delivered"]
    assert [(row[2], row[4]) for row in delivered if "production" in row[1]] == [("INV-1", case["id"])]


def _apply(cfg: Path) -> tuple[int, dict]:
    out = run_cli("apply", str(cfg), "--output", "json", "--details", env=ENV)
    return out.returncode, json.loads(out.stdout)["connections"][0]


def test_stripe_test_cases_then_production_cases_never_share_a_case(tmp_path):
    """The same invoices imported as test cases (destination is_test) and then for production: the same source
    account gives the same idempotency keys, and Debitura's IdempotencyConflict for them used to be taken as
    proof that the (test) case was this invoice's production case."""
    state = tmp_path / "state"
    test_cfg = STRIPE.format(state="state.db", test_lines="  is_test: true\n  tag: trial-1")
    code, first = _apply(write_config(tmp_path, test_cfg))
    assert code == 0 and first["imported"] > 0
    n = first["imported"]
    assert {c["isTestCase"] for c in debitura(state).cases()} == {True}

    code, prod = _apply(write_config(tmp_path, STRIPE.format(state="state.db", test_lines="")))
    assert code == 1 and prod["imported"] == 0 and prod["failed"] == n
    failed = [i for i in prod["invoices"] if i["verdict"] == "failed"]
    assert all("TEST case with creditor reference" in i["message"] for i in failed), failed[0]
    assert len(debitura(state).cases()) == n
    assert not [row for row in ledger_rows(state) if ":isTest" not in row[0] and row[3] == "delivered"]

    # The test run's tag removes its cases; production then gets cases of its own, with new idempotency keys.
    assert debitura_call(state, "DELETE", "/test/cases?tag=trial-1").status_code == 204
    code, prod = _apply(write_config(tmp_path, STRIPE.format(state="state.db", test_lines="")))
    assert code == 0 and prod["imported"] == n, prod
    cases = debitura(state).cases()
    assert len(cases) == n and {c["isTestCase"] for c in cases} == {False}
    assert all(i["message"] for i in prod["invoices"] if i["verdict"] == "imported")

    # And the reverse: a test run (a state store of its own, beside the same simulated Debitura) does not take
    # the production cases for its own.
    trial = STRIPE.format(state="trial.db", test_lines="  is_test: true\n  tag: trial-2")
    code, again = _apply(write_config(tmp_path, trial))
    assert code == 1 and again["imported"] == 0 and again["failed"] == n
    assert all("production case with creditor reference" in i["message"]
               for i in again["invoices"] if i["verdict"] == "failed")
    assert len(debitura(state).cases()) == n


def test_the_simulator_deletes_test_cases_only_as_documented(tmp_path):
    """DELETE /test/cases/{id}: 204, again 204 (idempotent), 400 for a production case, 404 for an unknown id."""
    code, out = _apply(write_config(tmp_path, STRIPE.format(state="state.db", test_lines="")))
    assert code == 0 and out["imported"] > 0
    state = tmp_path / "state"
    production = debitura(state).cases()[0]["id"]
    r = debitura_call(state, "DELETE", f"/test/cases/{production}")
    assert r.status_code == 400 and "only test cases" in r.json()["message"]
    assert debitura_call(state, "DELETE", "/test/cases/00000000-0000-0000-0000-000000000000").status_code == 404
    assert debitura_call(state, "DELETE", "/test/cases?tag=").status_code == 400


# --- issue 18.10: the debtor's type and contact person; the provider's API version --------------------------

ROOT = Path(__file__).resolve().parent.parent


def _sample(tmp_path: Path) -> Path:
    """The repository's sample config (Stripe, QuickBooks and Zoho simulators into the Debitura simulator)."""
    import shutil

    shutil.copy(ROOT / "sample-config.yaml", tmp_path / "sample-config.yaml")
    shutil.copytree(ROOT / "sandbox-secrets", tmp_path / "sandbox-secrets")
    return tmp_path / "sample-config.yaml"


def test_the_sample_config_sends_each_debtor_as_company_or_private_with_its_contact_person(tmp_path, monkeypatch):
    """Issue 18.10: every Stripe debtor was a Company unless metadata or tax ids said otherwise (private persons
    were sent as companies), no case had a contactPerson, and no Stripe-Version was sent. The documented rules
    (README, "Company or private person"), through the simulators' own data and a few customers edited the
    way a user would in the Stripe dashboard."""
    from runner.spec import config
    from runner.engine import pipeline

    monkeypatch.chdir(tmp_path)
    cfg = config.load(_sample(tmp_path))
    data_dir = cfg.state_path.parent / "sandbox"
    stripe = sandbox.get_simulator("stripe", data_dir)
    customers = {c["name"]: c for c in stripe.data["test"]["customers"].values()}
    customers["Nordlys ApS"]["metadata"] = {"debtor_type": "individual"}  # metadata decides, in any case
    customers["Boulangerie Dupont SARL"]["metadata"] = {"contact_person": "Marie Dupont"}
    customers["Pacific Trading LLC"]["metadata"] = {"debtor_type": "LLC"}  # not a type: reported, not guessed

    store = Store(cfg.state_path)
    try:
        result = asyncio.run(pipeline.sync(cfg, mode="apply", store=store, details=True))
    finally:
        store.close()
    assert not any(c.failed for c in result.connections)
    cases = {c["creditorReference"]: c["debtor"] for c in sandbox.get_simulator("debitura", data_dir).cases()}
    by_name = {}
    for debtor in cases.values():
        by_name.setdefault(debtor["name"], set()).add((debtor["type"], debtor["contactPerson"]))

    # Stripe: individual_name (no business_name) is a private person; business_name + individual_name is a
    # company and its contact person; metadata overrides both; nothing said means the connection's default.
    assert by_name["Jane Doe"] == {("Private", None)} and by_name["Lars Jensen"] == {("Private", None)}
    assert by_name["Müller Maschinenbau GmbH"] == {("Company", "Klaus Müller")}
    assert by_name["Nordlys ApS"] == {("Private", None)}
    assert by_name["Boulangerie Dupont SARL"] == {("Company", "Marie Dupont")}
    assert by_name["Acme Widgets Inc."] == {("Company", None)}
    stripe_conn = next(c for c in result.connections if c.integration == "stripe")
    (pacific,) = [v for v in stripe_conn.verdicts if v.reason == "invalid"]
    assert "debtor.type" in pacific.message and "LLC" in pacific.message
    # Every request to Stripe named the pinned API version (integrations.d/stripe.yaml).
    assert stripe.api_versions and set(stripe.api_versions) == {"2025-09-30.clover"}

    # QuickBooks: the customer record (read for a sparse invoice address) names the company's contact person.
    assert cases["1002"] == {**cases["1002"], "type": "Company", "contactPerson": "Bill Lucchini"}
    # Zoho: the contact's primary contact person, not the first one listed.
    assert by_name["Acme Corp"] == {("Company", "Wilma Coyote")}


def test_a_zap_sends_the_contact_person_and_a_private_debtor_gets_none(tmp_path):
    cfg = write_config(tmp_path, ZAPIER.format(environment="production"))
    key = make_key(cfg, "production")
    company = invoice(1)
    company["customer"]["contact_person"] = "Hans Mueller"
    private = invoice(2)
    private["customer"].update(type="Private", name="Erika Musterfrau", contact_person="Erika Musterfrau")
    srv = Server(cfg)
    try:
        r = srv.post(key, {"invoices": [company, private]})
    finally:
        srv.stop()
    assert r.status_code == 200 and r.json()["imported"] == 2, r.text
    debtors = {c["creditorReference"]: c["debtor"] for c in debitura(tmp_path / "state").cases()}
    assert (debtors["1001"]["type"], debtors["1001"]["contactPerson"]) == ("Company", "Hans Mueller")
    # DebtorDto: contactPerson is "required for companies, not used for persons".
    assert (debtors["1002"]["type"], debtors["1002"]["contactPerson"]) == ("Private", None)


def _debtor(spec_id: str, record: dict) -> dict:
    """The debtor the built-in spec maps from one record (its `let` values computed first, as in a sync)."""
    from runner.spec import loader as specs

    stream = specs.load_spec(spec_id).invoices
    return stream.mapping.apply(stream.prepare(record)).get("debtor", {})


def test_each_spec_states_company_or_private_and_the_contact_person():
    person = {"first_name": "Ola", "last_name": "Nordmann"}
    zoho = {"customer_id": "c9", "contact": {"company_name": "Fjord Fisk A/S", "customer_sub_type": "business",
                                             "contact_persons": [person, {"first_name": "Kari", "last_name": "Berg"}]}}
    # No primary contact person: the first one listed.
    assert _debtor("zoho_books", zoho) == {"id": "c9", "type": "Company", "name": "Fjord Fisk A/S",
                                          "contact_person": "Ola Nordmann"}
    zoho["contact"].update(customer_sub_type="individual", company_name=None, contact_name="Kari Berg")
    assert _debtor("zoho_books", zoho)["type"] == "Private"
    qbo = {"CustomerRef": {"value": "4", "name": "Diego Rodriguez"},
           "customer": {"DisplayName": "Diego Rodriguez", "GivenName": "Diego", "FamilyName": "Rodriguez"}}
    assert _debtor("quickbooks_online", qbo)["type"] == "Private"
    assert "contact_person" not in _debtor("quickbooks_online", qbo)
    # Nothing said: no type, so the connection's `debtor_type` (default Company) applies.
    assert "type" not in _debtor("stripe", {"customer": {"id": "cus_1", "name": "Acme"}, "customer_tax_ids": []})
    assert _debtor("stripe", {"customer": {"individual_name": "Jo Li"}, "customer_tax_ids": [{"type": "eu_vat"}]}
                   )["type"] == "Company"  # a tax id outweighs an individual name
    assert _debtor("zapier", {"customer": {"name": "X", "type": "Private"}})["type"] == "Private"
