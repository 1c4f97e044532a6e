"""Review, then apply: `runner plan --out FILE` and `runner apply FILE` against the built-in sandbox.

Plan and apply run in this process (click's runner), so the simulators the runs talk to can change between
them, as a source changes between a pull request's review and its merge."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from runner import sandbox
from runner.cli.main import main

from conftest import SANDBOX_CONFIG, ROOT, run_cli


def cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def workdir(tmp_path, sandbox_env, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(SANDBOX_CONFIG.format(server_filters="false"))
    return tmp_path


def _sims(workdir):
    data = workdir / "state" / "sandbox"
    return sandbox.get_simulator("stripe", data), sandbox.get_simulator("debitura", data)


def _planned(plan_file) -> dict:
    doc = json.loads(plan_file.read_text())
    (conn,) = doc["connections"]
    return {e["number"]: e for e in conn["invoices"]}


def test_apply_of_a_plan_delivers_exactly_the_planned_invoices(workdir):
    r = cli("plan", "config.yaml", "--out", "plan.json")
    assert r.exit_code == 0, r.output
    planned = _planned(workdir / "plan.json")
    doc = json.loads((workdir / "plan.json").read_text())
    assert doc["format"] == "runner-plan" and doc["version"] == 1 and len(doc["config_sha256"]) == 64
    assert set(doc["specs"]) == {"stripe"} and doc["connections"][0]["window"]["source"] == "last 90d"
    some = next(iter(planned.values()))
    assert some["case"]["creditorReference"] == some["number"] and len(some["fingerprint"]) == 64
    assert DEBITURA_SECRET_NOT_IN(workdir / "plan.json")
    stripe, debitura = _sims(workdir)
    assert planned and debitura.cases() == []
    stripe.set_synthetic(4)  # four new unpaid invoices arrive after the review: not in the plan
    r = cli("apply", "plan.json")
    assert r.exit_code == 0, r.output
    sent = {c["creditorReference"] for c in debitura.cases()}
    assert sent == set(planned)
    again = cli("plan", "config.yaml", "-o", "json")
    assert json.loads(again.output)["totals"]["imported"] == 4, "the unplanned ones wait for the next plan"


def DEBITURA_SECRET_NOT_IN(path) -> bool:
    from conftest import DEBITURA_KEY, STRIPE_KEY

    text = path.read_text()
    return DEBITURA_KEY not in text and STRIPE_KEY not in text


def test_an_invoice_paid_at_the_source_after_the_plan_is_not_delivered(workdir):
    assert cli("plan", "config.yaml", "--out", "plan.json").exit_code == 0
    planned = _planned(workdir / "plan.json")
    stripe, debitura = _sims(workdir)
    number, entry = sorted(planned.items())[0]
    stripe.pay(entry["invoice_id"])  # POST /v1/invoices/{id}/pay, as the customer paying meanwhile
    r = cli("apply", "plan.json")
    assert r.exit_code == 1, r.output
    assert f"{number}: not sent: it is no longer unpaid at the source (now paid" in r.output
    sent = {c["creditorReference"] for c in debitura.cases()}
    assert sent == set(planned) - {number}


def test_an_invoice_whose_amount_changed_after_the_plan_is_not_delivered_and_the_change_is_named(workdir):
    assert cli("plan", "config.yaml", "--out", "plan.json").exit_code == 0
    planned = _planned(workdir / "plan.json")
    stripe, debitura = _sims(workdir)
    number, entry = sorted(planned.items())[0]
    inv = next(i for i in stripe.data["test"]["invoices"] if i["id"] == entry["invoice_id"])
    inv["amount_due"] = inv["amount_remaining"] = inv["amount_due"] // 2
    r = cli("apply", "plan.json", "--details")
    assert r.exit_code == 1, r.output
    assert "changed at the source since the plan: amount" in r.output
    assert number not in {c["creditorReference"] for c in debitura.cases()}
    assert len(debitura.cases()) == len(planned) - 1


def test_a_plan_is_refused_when_the_config_or_a_spec_changed_since(workdir):
    assert cli("plan", "config.yaml", "--out", "plan.json").exit_code == 0
    cfg = workdir / "config.yaml"
    cfg.write_text(cfg.read_text().replace("last: 90d", "last: 120d"))
    r = run_cli("apply", "plan.json", cwd=workdir)
    assert r.returncode == 1
    assert "the plan is stale, nothing was sent" in r.stderr and "config.yaml changed since" in r.stderr
    assert "fix: review a new plan" in r.stderr
    _, debitura = _sims(workdir)
    assert debitura.cases() == []


def test_a_plan_is_refused_when_the_integration_spec_changed(workdir):
    import shutil

    (workdir / "integrations.d").mkdir()
    shutil.copy(ROOT / "integrations.d" / "stripe.yaml", workdir / "integrations.d" / "stripe.yaml")
    assert cli("plan", "config.yaml", "--out", "plan.json").exit_code == 0
    spec = workdir / "integrations.d" / "stripe.yaml"
    spec.write_text(spec.read_text() + "\n# edited\n")
    r = cli("apply", "plan.json")
    assert r.exit_code == 1
    assert "stripe.yaml ('stripe') changed since this plan" in r.output


def test_detailed_exitcode_tells_pending_from_nothing_to_do_and_errors(workdir):
    assert cli("plan", "config.yaml", "--detailed-exitcode").exit_code == 2
    assert cli("plan", "config.yaml").exit_code == 0  # without the flag: 0 as before
    assert cli("apply", "config.yaml").exit_code == 0
    assert cli("plan", "config.yaml", "--detailed-exitcode").exit_code == 0
    (workdir / "broken.yaml").write_text("destination: {type: jsonl}\nconnections: []\n")
    assert cli("plan", "broken.yaml", "--detailed-exitcode").exit_code == 1
    assert cli("plan", "broken.yaml").exit_code == 2


def test_plan_fails_on_a_refused_destination_key(workdir, monkeypatch):
    from runner.sandbox.debitura import REVOKED_KEY

    monkeypatch.setenv("DEBITURA_API_KEY", REVOKED_KEY)
    r = cli("plan", "config.yaml", "--detailed-exitcode")
    assert r.exit_code == 1, r.output
    assert "refused the API key (HTTP 401)" in r.output


def test_plan_fails_on_an_unsigned_contract_unless_pending_contracts_are_allowed(workdir):
    _, debitura = _sims(workdir)
    debitura.contract = {"signed": False, "requiresResigning": False, "invalidationReason": "None",
                         "termsUrl": None, "solutionUrl": "https://app.debitura.com/contracts/sign"}
    r = cli("plan", "config.yaml")
    assert r.exit_code == 1, r.output
    assert "debt collection agreement is not signed" in r.output
    assert "https://app.debitura.com/contracts/sign" in r.output
    cfg = workdir / "config.yaml"
    cfg.write_text(cfg.read_text().replace("  environment: sandbox\n  api_key",
                                           "  environment: sandbox\n  allow_pending_contracts: true\n  api_key", 1))
    r = cli("plan", "config.yaml")
    assert r.exit_code == 0, r.output
    assert "warning: Debitura's debt collection agreement is not signed" in r.output


def test_preview_is_opt_in_bounded_and_shows_eligibility_and_fee(workdir):
    _, debitura = _sims(workdir)
    assert cli("plan", "config.yaml", "--out", "a.json").exit_code == 0
    assert not any("/cases/preview" in p for _, p in debitura.request_log)
    r = cli("plan", "config.yaml", "--out", "b.json", "--preview", "--preview-limit", "3")
    assert r.exit_code == 0, r.output
    previews = [p for m, p in debitura.request_log if p.startswith("/cases/preview")]
    assert len(previews) == 3
    with_preview = [e for e in _planned(workdir / "b.json").values() if "preview" in e]
    assert len(with_preview) == 3 and all(e["preview"]["fee_percent"] >= 10 for e in with_preview)
    assert "[eligible, fee 10.0 %]" in json.loads((workdir / "b.json").read_text())["summary"]


def test_a_plan_whose_destination_check_failed_is_not_applied(workdir):
    _, debitura = _sims(workdir)
    debitura.contract = {**debitura.contract, "signed": False, "solutionUrl": "https://app.debitura.com/contracts/sign"}
    assert cli("plan", "config.yaml", "--out", "plan.json").exit_code == 1
    debitura.contract = {**debitura.contract, "signed": True}
    r = cli("apply", "plan.json")
    assert r.exit_code == 1
    assert "the plan's destination check failed, so nothing was sent" in r.output
    assert debitura.cases() == []
