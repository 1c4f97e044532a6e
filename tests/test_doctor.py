"""`runner doctor` and `runner explain`: the fault matrix of the seed's troubleshooting page.

Each test puts the sandbox into one seed cause (starting from a clean account: only open, complete, recent
invoices) and asserts that doctor flags exactly the matching check and no other, and that explain on a
sample invoice names the cause. Everything runs in-process through the CLI (click's runner), so the
simulators the tests mutate are the ones the commands talk to.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.spec import config as config_mod
from runner import sandbox
from runner.cli.main import main
from runner.sandbox import debitura as dsim
from runner.sandbox import stripe as ssim

CONFIG = """
state: state/state.db
destination:
  type: debitura
  environment: {dest_env}
  api_key: "${{DEBITURA_API_KEY}}"{dest_extra}
connections:
  - name: acme-stripe
    integration: stripe
    environment: {env}
    credentials: {{api_key: "${{STRIPE_API_KEY}}"}}
    window: {{last: 90d}}
    server_filters: true{conn_extra}
"""
CLEAN_KINDS = {"open", "open_address_on_customer"}
SECRETS = [ssim.TEST_SECRET_KEY, ssim.TEST_REVOKED_KEY, ssim.TEST_RESTRICTED_NO_INVOICES_KEY, ssim.LIVE_SECRET_KEY,
           dsim.PRODUCTION_KEY, dsim.TEST_KEY, dsim.REVOKED_KEY]


class Env:
    """One config + state folder + the sandbox simulators it talks to (in-process, cached per data dir)."""

    # The state store: "sqlite", or a PostgreSQL URL (a module's autouse fixture sets it from conftest's backend).
    backend = "sqlite"

    def __init__(self, tmp_path: Path, monkeypatch, *, env="sandbox", dest_env="sandbox", dest_extra="",
                 conn_extra="", stripe_key=ssim.TEST_SECRET_KEY, debitura_key=dsim.PRODUCTION_KEY, kinds=()):
        self.path = tmp_path / "config.yaml"
        self.path.write_text(CONFIG.format(env=env, dest_env=dest_env, dest_extra=dest_extra, conn_extra=conn_extra))
        monkeypatch.setenv("STRIPE_API_KEY", stripe_key)
        monkeypatch.setenv("DEBITURA_API_KEY", debitura_key)
        from conftest import use_backend

        use_backend(self.path, self.backend)
        self.data_dir = config_mod.load(self.path, strict=False, resolve=False).state_path.parent / "sandbox"
        self.stripe = sandbox.get_simulator("stripe", self.data_dir)
        self.all_invoices = list(self.stripe.data["test"]["invoices"])
        keep = CLEAN_KINDS | set(kinds)
        self.stripe.data["test"]["invoices"] = [i for i in self.all_invoices if i["_sandbox_kind"] in keep]
        self.runner = CliRunner()
        self.outputs: list[str] = []

    def number_of(self, kind: str) -> str:
        return next(i["number"] for i in self.all_invoices if i["_sandbox_kind"] == kind and i["number"])

    def cli(self, *args) -> tuple[int, str]:
        res = self.runner.invoke(main, list(args), catch_exceptions=False)
        self.outputs.append(res.output)
        return res.exit_code, res.output

    def doctor(self) -> tuple[int, dict]:
        code, out = self.cli("doctor", str(self.path), "--output", "json")
        return code, json.loads(out)

    def explain(self, key: str) -> tuple[int, str]:
        return self.cli("explain", str(self.path), key)

    def apply(self) -> None:
        code, out = self.cli("apply", str(self.path))
        assert code == 0, out


def flagged(report: dict) -> dict:
    """(scope, check) -> status for every check that is neither ok nor skipped."""
    return {(c["scope"], c["check"]): c["status"] for c in report["checks"] if c["status"] not in ("ok", "skipped")}


def check(report: dict, scope: str, cid: str) -> dict:
    return next(c for c in report["checks"] if c["scope"] == scope and c["check"] == cid)


def assert_no_secret(outputs: list[str]) -> None:
    blob = "\n".join(outputs)
    for s in SECRETS:
        assert s not in blob


def test_clean_account_passes_every_check(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    code, rep = e.doctor()
    assert code == 0 and rep["ok"] is True
    assert flagged(rep) == {}
    assert not [c for c in rep["checks"] if c["status"] == "skipped"]
    assert "13 unpaid invoice(s) in the window are ready to import" in rep["summaries"]["acme-stripe"]
    code, text = e.cli("doctor", str(e.path))
    assert code == 0 and "0 failed" in text and "nothing was created" in text
    # doctor only reads: no case, no ledger row
    assert sandbox.get_simulator("debitura", e.data_dir).cases() == []
    assert_no_secret(e.outputs)


def test_revoked_stripe_key(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    e.stripe.revoke(ssim.TEST_SECRET_KEY)
    code, rep = e.doctor()
    assert code == 1
    assert flagged(rep) == {("acme-stripe", "auth"): "failed"}
    c = check(rep, "acme-stripe", "auth")
    assert "401" in c["message"] and "revoked" in c["message"] and "${STRIPE_API_KEY}" in c["fix"]
    code, text = e.explain(e.number_of("open"))
    assert code == 1 and "credentials were refused" in text and "HTTP 401" in text and "revoked" in text
    assert_no_secret(e.outputs)


def test_key_without_permission_to_read_invoices(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, stripe_key=ssim.TEST_RESTRICTED_NO_INVOICES_KEY)
    code, rep = e.doctor()
    assert code == 1
    assert flagged(rep) == {("acme-stripe", "permission"): "failed"}
    assert check(rep, "acme-stripe", "auth")["status"] == "ok"
    assert "403" in check(rep, "acme-stripe", "permission")["message"]
    code, text = e.explain(e.number_of("open"))
    assert "may not read invoices" in text and "HTTP 403" in text
    assert_no_secret(e.outputs)


def test_live_key_where_test_is_expected(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, stripe_key=ssim.LIVE_SECRET_KEY)
    code, rep = e.doctor()
    assert code == 1
    assert flagged(rep) == {("acme-stripe", "environment"): "failed"}
    assert "test-mode" in check(rep, "acme-stripe", "environment")["message"]
    code, text = e.explain(e.number_of("open"))
    assert "test-mode keys" in text
    assert_no_secret(e.outputs)


def test_test_key_where_live_is_expected(tmp_path, monkeypatch):
    from runner.sandbox.core import SandboxServer

    stripe = ssim.StripeSimulator()
    with SandboxServer({"stripe": stripe}) as srv:
        e = Env(tmp_path, monkeypatch, env="live", conn_extra=f"\n    base_url: {srv.url('stripe')}")
        code, rep = e.doctor()
    assert code == 1
    assert flagged(rep) == {("acme-stripe", "environment"): "failed"}
    c = check(rep, "acme-stripe", "environment")
    assert "not a live-mode Stripe key" in c["message"] and "'live'" in c["message"]
    code, text = e.explain(e.number_of("open"))
    assert "not a live-mode Stripe key" in text
    assert_no_secret(e.outputs)


def test_missing_customer_address(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, kinds={"open_incomplete_address"})
    code, rep = e.doctor()
    assert code == 1
    assert flagged(rep) == {("acme-stripe", "addresses"): "failed"}
    c = check(rep, "acme-stripe", "addresses")
    assert "Bergmann Elektro GmbH" in c["message"] and "postal code" in c["message"]
    assert {"invoice", "debtor", "missing"} <= set(c["detail"]["invoices"][0])
    inv = next(i for i in e.all_invoices if i["customer_name"] == "Bergmann Elektro GmbH"
               and i["_sandbox_kind"] == "open_incomplete_address")
    code, text = e.explain(inv["number"])
    assert code == 0
    assert (f"{inv['number']} was not imported because the customer 'Bergmann Elektro GmbH' has no postal code"
            in text)
    assert "add it in Stripe" in text and "runner apply" in text
    assert_no_secret(e.outputs)


def test_date_window_too_narrow(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, kinds={"open_old"})
    code, rep = e.doctor()
    assert code == 0  # a warning: old invoices may be left out on purpose
    assert flagged(rep) == {("acme-stripe", "window"): "warning"}
    c = check(rep, "acme-stripe", "window")
    assert c["detail"]["before"] == 3 and c["detail"]["after"] == 0
    assert c["detail"]["config_line"].startswith("window: {from: ")
    assert "config.yaml:" in c["fix"]  # the line of the config to change
    code, text = e.explain(e.number_of("open_old"))
    assert "outside the date window" in text and "window: {from:" in text
    assert_no_secret(e.outputs)


def test_window_line_from_doctor_includes_the_old_invoices(tmp_path, monkeypatch):
    """The config line doctor suggests really does bring the invoices into the window."""
    e = Env(tmp_path, monkeypatch, kinds={"open_old"})
    _, rep = e.doctor()
    line = check(rep, "acme-stripe", "window")["detail"]["config_line"]
    e.path.write_text(e.path.read_text().replace("window: {last: 90d}", line))
    _, rep2 = e.doctor()
    assert flagged(rep2) == {}
    assert "16 unpaid invoice(s) in the window are ready to import" in rep2["summaries"]["acme-stripe"]


def test_paid_and_partially_paid(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, kinds={"paid", "open_partial"})
    code, rep = e.doctor()
    assert code == 0
    assert flagged(rep) == {("acme-stripe", "status_filter"): "warning"}
    c = check(rep, "acme-stripe", "status_filter")
    assert c["detail"]["statuses"] == {"paid": 3, "open, partially paid": 2}
    # explain finds a paid invoice although the status filter hides it from the list
    code, text = e.explain(e.number_of("paid"))
    assert "its status in Stripe is paid" in text
    code, text = e.explain(e.number_of("open_partial"))
    assert "partially paid" in text
    assert_no_secret(e.outputs)


def test_invoice_already_imported(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    e.apply()
    cases = sandbox.get_simulator("debitura", e.data_dir).cases()
    assert len(cases) == 13
    code, rep = e.doctor()
    assert code == 0
    assert flagged(rep) == {("acme-stripe", "duplicates"): "warning"}
    assert check(rep, "acme-stripe", "duplicates")["detail"]["count"] == 13
    assert "last successful sync" in check(rep, "acme-stripe", "last_sync")["message"]
    assert len(sandbox.get_simulator("debitura", e.data_dir).cases()) == 13  # doctor created nothing
    number = e.number_of("open")
    code, text = e.explain(number)
    case = next(c for c in cases if c["creditorReference"] == number)
    assert f"{number} was imported on " in text and f"as case {case['reference']}" in text
    assert "verdict history" in text
    assert_no_secret(e.outputs)


def test_bad_debitura_key(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, debitura_key=dsim.REVOKED_KEY)
    code, rep = e.doctor()
    assert code == 1
    assert flagged(rep) == {("destination", "key"): "failed"}
    assert "401" in check(rep, "destination", "key")["message"]
    code, text = e.explain(e.number_of("open"))
    assert "eligible but has not been imported because" in text and "refused the API key" in text
    assert_no_secret(e.outputs)


def test_debitura_test_key_against_production(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch, debitura_key=dsim.TEST_KEY)
    code, rep = e.doctor()
    assert code == 1
    assert flagged(rep) == {("destination", "environment"): "failed"}
    c = check(rep, "destination", "environment")
    assert "belongs to the test environment" in c["message"]
    assert "testapp.debitura.com" in c["fix"]
    code, text = e.explain(e.number_of("open"))
    assert "belongs to the test environment" in text
    assert_no_secret(e.outputs)


def test_debitura_production_key_against_test(tmp_path, monkeypatch):
    from runner.sandbox.core import SandboxServer

    with SandboxServer({"debitura-test": dsim.DebituraSimulator("test")}) as srv:
        e = Env(tmp_path, monkeypatch, dest_env="test", dest_extra=f"\n  base_url: {srv.url('debitura-test')}")
        code, rep = e.doctor()
    assert code == 1
    assert flagged(rep) == {("destination", "environment"): "failed"}
    assert "production" in check(rep, "destination", "environment")["message"]
    assert_no_secret(e.outputs)


def test_missing_secret_is_the_credentials_check(tmp_path, monkeypatch):
    e = Env(tmp_path, monkeypatch)
    monkeypatch.delenv("STRIPE_API_KEY")
    code, rep = e.doctor()
    assert code == 1
    assert flagged(rep) == {("acme-stripe", "credentials"): "failed"}
    assert "STRIPE_API_KEY" in check(rep, "acme-stripe", "credentials")["message"]


def test_doctor_over_real_sockets(tmp_path, monkeypatch):
    """The same checks against the simulators served over HTTP, with `base_url` overrides."""
    from runner.sandbox.core import SandboxServer

    stripe = ssim.StripeSimulator()
    stripe.data["test"]["invoices"] = [i for i in stripe.data["test"]["invoices"]
                                       if i["_sandbox_kind"] in CLEAN_KINDS | {"open_incomplete_address"}]
    deb = dsim.DebituraSimulator("production")
    with SandboxServer({"stripe": stripe, "debitura": deb}) as srv:
        e = Env(tmp_path, monkeypatch, dest_env="production",
                dest_extra=f"\n  base_url: {srv.url('debitura')}",
                env="test", conn_extra=f"\n    base_url: {srv.url('stripe')}\n    allow_test_source: true")
        code, rep = e.doctor()
        assert flagged(rep) == {("acme-stripe", "addresses"): "failed"}
        assert stripe.requests > 0 and deb.requests > 0
        stripe.revoke(ssim.TEST_SECRET_KEY)
        deb.revoke(dsim.PRODUCTION_KEY)
        code, rep = e.doctor()
        assert flagged(rep) == {("acme-stripe", "auth"): "failed", ("destination", "key"): "failed"}
        assert deb.cases() == []
    assert_no_secret(e.outputs)


def test_doctor_api_is_read_only_and_generic(tmp_path, monkeypatch):
    """The library call: every check has a title, and the report's JSON carries no secret."""
    from runner.diagnostics import checks as diagnostics
    from runner.state.sqlite import Store

    e = Env(tmp_path, monkeypatch, kinds={"open_incomplete_address", "open_old", "paid"})
    cfg = config_mod.load(e.path, strict=False)
    store = Store(cfg.state_path)
    rep = asyncio.run(diagnostics.doctor(cfg, store))
    store.close()
    ids = [(c.scope, c.id) for c in rep.checks]
    assert len(ids) == len(set(ids)) == len(diagnostics.CONNECTION_CHECKS) + len(diagnostics.DESTINATION_CHECKS) + len(
        diagnostics.AFTER_CASE_CHECKS)
    assert {k for k, v in flagged(rep.as_dict()).items()} == {("acme-stripe", "addresses"), ("acme-stripe", "window"),
                                                               ("acme-stripe", "status_filter")}
    assert not rep.ok
    assert_no_secret([json.dumps(rep.as_dict())])


# --- OAuth2 connections: revoked grants, wrong company / organization ---------------------------------------

OAUTH_CONFIG = """
state: state/state.db
destination: {{type: debitura, environment: sandbox, api_key: "${{DEBITURA_API_KEY}}"}}
defaults: {{window: {{last: 90d}}}}
connections:
  - name: acme-qbo
    integration: quickbooks_online
    environment: sandbox
    credentials: {{client_id: "${{QBO_CLIENT_ID}}", client_secret: "${{QBO_CLIENT_SECRET}}",
                  refresh_token: "${{QBO_REFRESH_TOKEN}}"}}
    options: {{realm_id: "{realm}"}}
    expect: {{account_id: "{realm}", account_name: "{company}"}}
  - name: acme-zoho
    integration: zoho_books
    environment: sandbox
    credentials: {{client_id: "${{ZOHO_CLIENT_ID}}", client_secret: "${{ZOHO_CLIENT_SECRET}}",
                  refresh_token: "${{ZOHO_REFRESH_TOKEN}}"}}
    {zoho_options}
"""


class OAuthEnv(Env):
    def __init__(self, tmp_path: Path, monkeypatch, *, company=None, zoho_options='options: {organization_id: "60001"}'):
        from runner.sandbox import quickbooks as qb
        from runner.sandbox import zoho as zs

        self.path = tmp_path / "config.yaml"
        self.path.write_text(OAUTH_CONFIG.format(realm=qb.REALM_US, company=company or qb.COMPANY[qb.REALM_US][0],
                                                 zoho_options=zoho_options))
        for k, v in {"QBO_CLIENT_ID": qb.CLIENT_ID, "QBO_CLIENT_SECRET": qb.CLIENT_SECRET,
                     "QBO_REFRESH_TOKEN": qb.BOOTSTRAP_REFRESH_TOKEN, "ZOHO_CLIENT_ID": zs.CLIENT_ID,
                     "ZOHO_CLIENT_SECRET": zs.CLIENT_SECRET, "ZOHO_REFRESH_TOKEN": zs.BOOTSTRAP_REFRESH_TOKEN,
                     "DEBITURA_API_KEY": dsim.PRODUCTION_KEY}.items():
            monkeypatch.setenv(k, v)
        self.data_dir = tmp_path / "state" / "sandbox"
        self.qbo = sandbox.get_simulator("quickbooks", self.data_dir)
        self.zoho = sandbox.get_simulator("zoho", self.data_dir)
        self.secrets = SECRETS + [qb.CLIENT_SECRET, qb.BOOTSTRAP_REFRESH_TOKEN, zs.CLIENT_SECRET,
                                  zs.BOOTSTRAP_REFRESH_TOKEN]
        self.runner = CliRunner()
        self.outputs = []

    def doctor(self, *conns) -> tuple[int, dict]:
        args = [a for c in conns for a in ("--connection", c)]
        code, out = self.cli("doctor", str(self.path), "--output", "json", *args)
        return code, json.loads(out)

    def explain_in(self, conn: str, key: str) -> tuple[int, str]:
        return self.cli("explain", str(self.path), key, "--connection", conn)

    def no_secret(self) -> None:
        blob = "\n".join(self.outputs)
        for s in self.secrets:
            assert s not in blob
        for tok in self.qbo.oauth.access:  # access tokens issued during the test
            assert tok not in blob


def test_oauth_connections_active_and_accounts_match(tmp_path, monkeypatch):
    e = OAuthEnv(tmp_path, monkeypatch)
    code, rep = e.doctor("acme-qbo", "acme-zoho")
    for name in ("acme-qbo", "acme-zoho"):
        assert check(rep, name, "auth")["status"] == "ok"
        assert "refresh works" in check(rep, name, "auth")["message"]
        assert check(rep, name, "account")["status"] == "ok"
    assert "Sandbox Company_US_1" in check(rep, "acme-qbo", "account")["message"]
    assert "Sam's Shop LLC" in check(rep, "acme-zoho", "account")["message"]
    e.no_secret()


def test_revoked_quickbooks_grant(tmp_path, monkeypatch):
    e = OAuthEnv(tmp_path, monkeypatch)
    e.qbo.oauth.revoke_user("alice")
    code, rep = e.doctor("acme-qbo")
    assert code == 1
    assert flagged(rep) == {("acme-qbo", "auth"): "failed"}
    c = check(rep, "acme-qbo", "auth")
    assert "revoked" in c["message"] and "runner connect acme-qbo" in c["fix"]
    code, text = e.explain_in("acme-qbo", "1001")
    assert code == 1 and "not active" in text and "runner connect acme-qbo" in text
    code, text = e.cli("status", str(e.path))
    assert "needs_reconnect → runner connect acme-qbo" in text
    e.no_secret()


def test_wrong_quickbooks_company(tmp_path, monkeypatch):
    from runner.sandbox import quickbooks as qb

    e = OAuthEnv(tmp_path, monkeypatch, company=qb.COMPANY[qb.REALM_DK][0])
    code, rep = e.doctor("acme-qbo")
    assert code == 1
    assert flagged(rep) == {("acme-qbo", "account"): "failed"}
    c = check(rep, "acme-qbo", "account")
    assert "Sandbox Company_US_1" in c["message"] and "Nordlys Consulting ApS" in c["message"]
    code, text = e.explain_in("acme-qbo", "1001")
    assert "Sandbox Company_US_1" in text and "Nordlys Consulting ApS" in text
    e.no_secret()


def test_revoked_zoho_grant(tmp_path, monkeypatch):
    e = OAuthEnv(tmp_path, monkeypatch)
    e.zoho.oauth.revoke_user("sam")
    code, rep = e.doctor("acme-zoho")
    assert code == 1
    assert flagged(rep) == {("acme-zoho", "auth"): "failed"}
    assert "runner connect acme-zoho" in check(rep, "acme-zoho", "auth")["fix"]
    code, text = e.explain_in("acme-zoho", "INV-000001")
    assert code == 1 and "runner connect acme-zoho" in text
    e.no_secret()


def test_wrong_zoho_organization(tmp_path, monkeypatch):
    e = OAuthEnv(tmp_path, monkeypatch, zoho_options='options: {organization_id: "20002"}')
    code, rep = e.doctor("acme-zoho")
    assert code == 1
    assert flagged(rep) == {("acme-zoho", "account"): "failed"}
    c = check(rep, "acme-zoho", "account")
    assert "20002" in c["message"] and "60001 (Sam's Shop LLC)" in c["message"]
    code, text = e.explain_in("acme-zoho", "INV-000001")
    assert "20002" in text and "cannot see" in text
    e.no_secret()


def test_zoho_organization_not_pinned_lists_the_choices(tmp_path, monkeypatch):
    e = OAuthEnv(tmp_path, monkeypatch, zoho_options="")
    code, rep = e.doctor("acme-zoho")
    assert flagged(rep) == {("acme-zoho", "account"): "failed"}
    c = check(rep, "acme-zoho", "account")
    assert "Sam's Side Hustle" in c["message"] and 'options: {organization_id: "60001"}' in c["fix"]
    e.no_secret()



def test_wrong_oauth_client_secret_shows_the_fix_as_a_sentence(tmp_path, monkeypatch):
    e = OAuthEnv(tmp_path, monkeypatch)
    monkeypatch.setenv("ZOHO_CLIENT_SECRET", "not-the-secret-of-this-app")
    code, rep = e.doctor("acme-zoho")
    assert code == 1
    c = check(rep, "acme-zoho", "auth")
    assert c["status"] == "failed" and "invalid_client" in c["message"]
    # The client id/secret sentence as it is, not wrapped as a command to run.
    assert c["fix"] == "check credentials client_id and client_secret of 'acme-zoho'"
    e.no_secret()


def test_an_unknown_company_id_is_not_called_a_network_problem(tmp_path, monkeypatch):
    """Opening the connection fails before any request (no realm id learned, none set): doctor says the
    connection could not be opened, with the error's own fix, not "could not reach QuickBooks"."""
    e = OAuthEnv(tmp_path, monkeypatch)
    e.path.write_text(e.path.read_text().replace('options: {realm_id: "9130357766961111"}', "options: {}"))
    code, rep = e.doctor("acme-qbo")
    assert code == 1
    c = check(rep, "acme-qbo", "auth")
    assert c["status"] == "failed"
    assert c["message"].startswith("the QuickBooks Online connection could not be opened: ")
    assert "could not reach" not in c["message"] and "realm_id" in c["message"]
    assert "runner connect acme-qbo" in c["fix"]
    assert check(rep, "acme-qbo", "account")["message"] == "not checked: the connection could not be opened"
    e.no_secret()


def test_an_unreachable_provider_is_called_unreachable():
    from runner.diagnostics import checks as diagnostics
    from runner.errors import ProviderError, RunnerError

    down = ProviderError("QuickBooks Online could not be reached after 5 attempts: ConnectError: refused")
    assert diagnostics._transport_failure(down)
    assert not diagnostics._transport_failure(RunnerError("RUNNER_SECRET_KEY is not set"))
    assert not diagnostics._transport_failure(ProviderError("the answer is not JSON (HTTP 200)", status=200))

# --- Zapier (inbound: the Zap calls `runner serve`) --------------------------------------------------------

ZAP_CONFIG = """
state: state/state.db
destination: {type: debitura, environment: sandbox, api_key: "${DEBITURA_API_KEY}"}
connections:
  - {name: zaps, integration: zapier, environment: production, account_id: acme-crm, window: {last: 180d}}
"""


def _zap_invoice(n: int, **extra) -> dict:
    from datetime import date, timedelta

    today = date.today()
    inv = {"id": f"INV-{n}", "number": f"Z-{n:03d}", "issue_date": (today - timedelta(days=60)).isoformat(),
           "due_date": (today - timedelta(days=30)).isoformat(), "currency": "EUR", "amount_due": f"{100 + n}.50",
           "customer": {"name": f"Customer {n} GmbH", "email": f"ap{n}@example.de",
                        "address": {"street": f"Hauptstr. {n}", "city": "Berlin", "postal_code": "10115",
                                    "country": "Germany"}}}
    inv.update(extra)
    return inv


def test_zap_with_a_test_key_against_production(tmp_path, monkeypatch):
    """Seed, Zapier cause 2: the wrong environment. The call is refused, doctor names it, explain too."""
    from starlette.testclient import TestClient

    from runner.inbound import apikeys
    from runner.inbound import server as inbound
    from runner.state.sqlite import Store

    path = tmp_path / "config.yaml"
    path.write_text(ZAP_CONFIG)
    monkeypatch.setenv("DEBITURA_API_KEY", dsim.PRODUCTION_KEY)
    cfg = config_mod.load(path)
    store = Store(cfg.state_path)
    prod_key = apikeys.create(store, "production", "zap")[0]
    test_key = apikeys.create(store, "test", "zap being built")[0]
    store.close()
    with TestClient(inbound.create_app(cfg, cfg.connection("zaps"))) as client:
        ok = client.post("/v1/invoices", json=_zap_invoice(1), headers={"XApiKey": prod_key})
        assert ok.status_code == 200, ok.text
        missing = _zap_invoice(3)
        del missing["customer"]["address"]["postal_code"]
        assert client.post("/v1/invoices", json=missing, headers={"XApiKey": prod_key}).status_code == 422
        refused = client.post("/v1/invoices", json=_zap_invoice(2), headers={"XApiKey": test_key})
        assert refused.status_code == 401
    e = Env.__new__(Env)
    e.path, e.runner, e.outputs = path, CliRunner(), []
    code, rep = e.doctor()
    assert code == 1
    assert flagged(rep) == {("zaps", "key_environment"): "failed"}
    assert "test key against this" in check(rep, "zaps", "key_environment")["message"]
    code, text = e.explain("Z-002")
    assert code == 1 and "has not arrived" in text and "test key against this" in text
    code, text = e.explain("Z-001")
    assert code == 0 and "Z-001 was imported on " in text and "as case " in text
    code, text = e.explain("INV-3")
    assert "Z-003 was not imported because the customer 'Customer 3 GmbH' has no postal code" in text
    assert_no_secret(e.outputs)
    assert prod_key not in "\n".join(e.outputs) and test_key not in "\n".join(e.outputs)
