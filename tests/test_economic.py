"""Visma e-conomic: the built-in spec (integrations.d/economic.yaml) against its simulator."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml

from runner.sandbox import economic as sim_mod

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ROOT / "sandbox-secrets"


def _config(tmp: Path, *, server_filters: bool = False, grant: str | None = None, extra: str = "",
            integrations_dir: str | None = None, name: str = "eco") -> Path:
    grant_ref = f'"{grant}"' if grant is not None else f'"${{file:{SECRETS}/economic_agreement_grant_token}}"'
    if grant is not None:  # a literal secret is refused: give it through a file, as a user would
        (tmp / "grant").write_text(grant)
        grant_ref = f'"${{file:{tmp / "grant"}}}"'
    cfg = tmp / "config.yaml"
    cfg.write_text(f"""version: 1
state: state.db
destination: {{type: jsonl, path: out.jsonl}}
{f'integrations_dir: {integrations_dir}' if integrations_dir else ''}
connections:
  - name: {name}
    integration: economic
    environment: sandbox
    server_filters: {str(server_filters).lower()}
    credentials:
      app_secret_token: "${{file:{SECRETS}/economic_app_secret_token}}"
      agreement_grant_token: {grant_ref}
    window: {{last: 1y}}{extra}
""")
    return cfg


def _sync(cfg_path: Path, mode: str = "apply"):
    from runner.engine import pipeline
    from runner.spec import config
    from runner.state.sqlite import Store

    cfg = config.load(cfg_path)
    store = Store(cfg.state_path)
    try:
        return asyncio.run(pipeline.sync(cfg, mode=mode, store=store, details=True)), cfg
    finally:
        store.close()


def _verdicts(result) -> dict[str, tuple]:
    """invoice id -> (verdict, reason, detail) of the run's first connection."""
    return {v.invoice_id: (v.verdict, v.reason, v.detail or {}) for v in result.connections[0].verdicts}


def _simulator(cfg_path: Path):
    from runner import sandbox

    return sandbox.get_simulator("economic", cfg_path.parent / "sandbox")


def test_apply_imports_unpaid_and_skips_paid_partial_credit_notes_and_incomplete_addresses(tmp_path):
    cfg = _config(tmp_path)
    result, _ = _sync(cfg)
    conn = result.connections[0]
    assert conn.error is None, conn.error
    verdicts = _verdicts(result)
    assert len(verdicts) == 32  # every booked invoice has a verdict, the credit note too
    imported = {k for k, v in verdicts.items() if v[0] == "imported"}
    assert {"20001", "20002", "20003", "20005"} <= imported and len(imported) == 27
    assert verdicts["20006"][:2] == ("skipped", "not_unpaid") and verdicts["20006"][2]["status"] == "partially paid"
    assert verdicts["20007"][:2] == ("skipped", "not_unpaid") and verdicts["20007"][2]["status"] == "paid"
    assert verdicts["20008"][:2] == ("skipped", "credit_note")
    assert verdicts["20004"][:2] == ("skipped", "incomplete_address")
    assert "postal_code" in verdicts["20004"][2]["missing"]
    cases = {json.loads(line)["invoice"]["external_id"]: json.loads(line)["invoice"]
             for line in (tmp_path / "out.jsonl").read_text().splitlines()}
    # Free-text countries as typed in e-conomic: "Denmark", "Sverige"
    assert cases["20002"]["debtor"]["address"]["country"] == "DK"
    assert cases["20003"]["debtor"]["address"]["country"] == "SE"
    assert cases["20003"]["amount"] == 4300.5 and cases["20003"]["currency"] == "DKK"
    # The invoice's recipient had no address: the customer record's is used (fetched once per customer).
    assert cases["20005"]["debtor"]["address"] == {"street": "Nørregade 40", "city": "Odense C", "postal_code": "5000",
                                                   "country": "DK"}
    # The ledger keys invoices by the agreement (/self), not by the connection's name.
    assert cases["20001"]["source"]["account_id"] == "7001234"
    assert conn.account_name == "Nordisk Tømrer ApS"


def test_both_tokens_travel_as_headers_and_a_wrong_grant_is_refused_with_the_specs_advice(tmp_path):
    cfg = _config(tmp_path, grant="not-a-grant-token")
    result, _ = _sync(cfg, mode="plan")
    conn = result.connections[0]
    assert conn.error is not None
    text = f"{conn.error} {conn.fix}"
    assert "HTTP 401" in text and "GET " in text and "/self" in text
    assert "E04010" in text  # the start of e-conomic's answer is shown
    assert "agreement_grant_token" in conn.fix  # the spec's advice, not another provider's
    assert "not-a-grant-token" not in text  # a secret never appears


def test_server_filter_and_skippages_paging_with_next_page(tmp_path):
    spec = yaml.safe_load((ROOT / "integrations.d" / "economic.yaml").read_text())
    spec["invoices"]["paginate"]["size"] = 10
    spec["invoices"]["max_page_size"] = 10
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "economic.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    cfg = _config(tmp_path, server_filters=True, integrations_dir="specs")
    result, _ = _sync(cfg, mode="plan")
    assert result.connections[0].error is None
    log = [p for m, p in _simulator(cfg).faults.request_log if p.startswith("/invoices/booked")]
    # remainder > 0 leaves out the paid invoice and the credit note: 30 invoices, pages 0..2 of 10
    assert [p.split("skippages=")[1].split("&")[0] for p in log] == ["0", "1", "2"]
    assert all("remainder%24gt%3A0" in p or "remainder$gt:0" in p for p in log)
    verdicts = _verdicts(result)
    assert len(verdicts) == 30 and "20007" not in verdicts and "20008" not in verdicts


def test_explain_names_the_missing_postal_code(tmp_path):
    from runner.diagnostics import checks
    from runner.spec import config
    from runner.state.sqlite import Store

    cfg_path = _config(tmp_path)
    cfg = config.load(cfg_path)
    store = Store(cfg.state_path)
    try:
        [ex] = asyncio.run(checks.explain(cfg, store, "20004"))
    finally:
        store.close()
    assert ex.found and ex.error is None
    validation = next(s for s in ex.stages if s["stage"] == "validation")
    assert validation["result"] == "skipped" and "postal" in validation["text"]


def test_simulator_refuses_requests_without_both_tokens():
    import httpx

    sim = sim_mod.EconomicSimulator()
    resp = asyncio.run(sim.handle(httpx.Request("GET", "http://economic.sandbox.invalid/self",
                                                headers={"X-AppSecretToken": sim_mod.APP_SECRET_TOKEN})))
    assert resp.status_code == 401 and json.loads(resp.content)["errorCode"] == "E04010"


def test_doctor_counts_credit_notes_apart_and_does_not_call_them_invalid(tmp_path):
    from runner.diagnostics import checks
    from runner.spec import config
    from runner.state.sqlite import Store

    cfg = config.load(_config(tmp_path))
    store = Store(cfg.state_path)
    try:
        report = asyncio.run(checks.doctor(cfg, store))
    finally:
        store.close()
    assert report.get("eco", "invoice_data").status == checks.OK
    assert "1 set aside as credit_note" in report.summaries["eco"]
    addresses = report.get("eco", "addresses")
    assert addresses.status == checks.FAILED and "Eventyr Rejser" in addresses.message and "postal code" in addresses.message
