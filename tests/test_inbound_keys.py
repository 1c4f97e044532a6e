"""API keys (`runner keys`), inbound-only specs in the spec language, and configs mixing pull and inbound."""
from __future__ import annotations

import json

import pytest

from runner.inbound import apikeys
from runner.spec import config
from runner.spec import loader as specs
from runner.errors import ConfigError
from runner.state import open_store
from runner.spec.yamlfile import loads as load_text

try:
    from conftest import DEBITURA_KEY, STRIPE_KEY, query, run_cli, store_of, use_backend
except ModuleNotFoundError:  # tests/ as a package
    from tests.conftest import DEBITURA_KEY, STRIPE_KEY, query, run_cli, store_of, use_backend

CONFIG = """
state: state/state.db
destination: {type: debitura, environment: sandbox, api_key: "${DEBITURA_API_KEY}"}
connections:
  - {name: zaps, integration: zapier, environment: production, account_id: acme-crm}
"""


def test_keys_are_stored_only_as_hashes_and_carry_their_environment(tmp_path, backend):
    store = open_store(tmp_path / "state.db" if backend == "sqlite" else backend)
    try:
        prod, info = apikeys.create(store, "production", "billing zap")
        test, _ = apikeys.create(store, "test")
        assert prod.startswith(f"rnr_prod_{info.id}_") and test.startswith("rnr_test_")
        assert apikeys.verify(store, prod).status == "ok" and apikeys.verify(store, prod).key.environment == "production"
        assert apikeys.verify(store, test).key.environment == "test"
        # a right id with a wrong secret, a malformed key, nothing at all: unknown
        forged = prod[:-1] + ("0" if prod[-1] != "0" else "1")
        assert [apikeys.verify(store, k).status for k in (forged, "x", "", None)] == ["unknown"] * 4
        # the environment that counts is the stored one, not the tag in the text
        retagged = prod.replace("rnr_prod_", "rnr_test_")
        assert apikeys.verify(store, retagged).status == "unknown"
        assert apikeys.revoke(store, info.id).revoked is not None
        assert apikeys.verify(store, prod).status == "revoked"
        assert apikeys.revoke(store, "deadbeef") is None
        stored = repr(query(store, "SELECT * FROM api_keys")).encode()
    finally:
        store.close()
    raw = stored if backend != "sqlite" else (tmp_path / "state.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("state.db-*") if p.is_file())
    secret_part = prod.rsplit("_", 1)[1].encode()
    assert secret_part not in raw and test.rsplit("_", 1)[1].encode() not in raw


def test_keys_cli_shows_a_key_once_and_never_again(tmp_path, backend):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    use_backend(cfg, backend)
    # No secret is set: managing keys needs only the state store.
    out = run_cli("keys", "create", str(cfg), "--environment", "test", "--label", "crm zap", "-o", "json",
                  env={"DEBITURA_API_KEY": ""})
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    assert created["environment"] == "test" and created["key"].startswith("rnr_test_")
    assert "no inbound connection in the test environment" in out.stderr
    listed = run_cli("keys", "list", str(cfg))
    assert listed.returncode == 0 and created["id"] in listed.stdout and "crm zap" in listed.stdout
    assert created["key"] not in listed.stdout and created["key"].rsplit("_", 1)[1] not in listed.stdout
    assert run_cli("keys", "revoke", str(cfg), created["id"]).returncode == 0
    assert created["id"] not in run_cli("keys", "list", str(cfg)).stdout
    assert "revoked" in run_cli("keys", "list", str(cfg), "--all").stdout
    missing = run_cli("keys", "revoke", str(cfg), "nope1234")
    assert missing.returncode == 2 and "no API key with id" in missing.stderr
    bad = run_cli("keys", "create", str(cfg), "--environment", "staging")
    assert bad.returncode == 2


PULL_WITHOUT_REQUEST = """
id: broken
name: Broken
auth: {type: none}
environments: {production: {}}
invoices:
  map: {external_id: id}
  unpaid: "`true`"
"""


def test_only_inbound_specs_may_leave_out_the_request_and_base_url():
    with pytest.raises(ConfigError) as exc:
        specs.parse(load_text(PULL_WITHOUT_REQUEST, "<broken>"))
    text = exc.value.render()
    assert "request" in text and "base_url" in text
    ok = specs.parse(load_text(PULL_WITHOUT_REQUEST + "inbound: {records: '@'}\n", "<broken>"))
    assert not ok.pull and ok.inbound["records"].source == "@"
    assert specs.load_spec("stripe").pull and not specs.load_spec("zapier").pull
    assert specs.load_spec("zapier").environments["test"].test_cases
    assert not specs.load_spec("zapier").environments["production"].test_cases


def test_apply_leaves_inbound_connections_to_the_server(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG + """  - name: acme-stripe
    integration: stripe
    environment: sandbox
    credentials: {api_key: "${STRIPE_API_KEY}"}
    window: {last: 90d}
""")
    env = {"DEBITURA_API_KEY": DEBITURA_KEY, "STRIPE_API_KEY": STRIPE_KEY}
    out = run_cli("apply", str(cfg), "-o", "json", env=env)
    assert out.returncode == 0, out.stderr
    assert [c["name"] for c in json.loads(out.stdout)["connections"]] == ["acme-stripe"]
    assert json.loads(out.stdout)["inbound_connections"] == ["zaps"]
    text = run_cli("plan", str(cfg), env=env)
    assert "zaps (inbound)" in text.stdout and "runner serve" in text.stdout
    loaded = config.load(cfg, environ=env)
    zaps = loaded.connection("zaps")
    assert zaps.window.source == "from 1970-01-01 to now"  # no window needed for what a Zap posts


def test_doctor_runs_the_inbound_checks_for_an_inbound_connection(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    env = {"DEBITURA_API_KEY": DEBITURA_KEY}
    out = run_cli("doctor", str(cfg), "-o", "json", env=env)
    checks = {c["check"]: c for c in json.loads(out.stdout)["checks"] if c["scope"] == "zaps"}
    assert out.returncode == 1 and checks["api_key"]["status"] == "failed"
    assert "--environment production" in checks["api_key"]["fix"]
    assert checks["last_call"]["status"] == "warning"
    assert run_cli("keys", "create", str(cfg), "-e", "production", env=env).returncode == 0
    out = run_cli("doctor", str(cfg), "-o", "json", env=env)
    checks = {c["check"]: c for c in json.loads(out.stdout)["checks"] if c["scope"] == "zaps"}
    assert checks["api_key"]["status"] == "ok" and out.returncode == 0, out.stdout


def test_empty_batch_is_refused_as_empty_not_as_a_bad_invoice(tmp_path, monkeypatch, backend):
    from starlette.testclient import TestClient

    from runner.inbound import apikeys
    from runner.inbound import server as inbound
    path = use_backend(tmp_path / "config.yaml", "sqlite")
    path.write_text(CONFIG)
    use_backend(path, backend)
    monkeypatch.setenv("DEBITURA_API_KEY", DEBITURA_KEY)
    cfg = config.load(path)
    store = store_of(path)
    key = apikeys.create(store, "production", "zap")[0]
    store.close()
    with TestClient(inbound.create_app(cfg, cfg.connection("zaps"))) as client:
        r = client.post("/v1/invoices", json={"invoices": []}, headers={"XApiKey": key})
    assert r.status_code == 422
    assert r.json()["message"] == "the payload holds no invoices"


ZAP_CONFIG = """
state: state/state.db
destination: {type: debitura, environment: sandbox, api_key: "${DEBITURA_API_KEY}"}
connections:
  - {name: zaps, integration: zapier, environment: production, account_id: acme-crm, window: {last: 180d}}
"""


def _zap_invoice() -> dict:
    from datetime import date, timedelta

    today = date.today()
    return {"id": "INV-1", "number": "Z-001", "issue_date": (today - timedelta(days=60)).isoformat(),
            "due_date": (today - timedelta(days=30)).isoformat(), "currency": "EUR", "amount_due": "100.50",
            "customer": {"name": "Customer GmbH", "email": "ap@example.de",
                         "address": {"street": "Hauptstr. 1", "city": "Berlin", "postal_code": "10115",
                                     "country": "Germany"}}}


@pytest.mark.parametrize("failure", ["runner_error", "bug"])
def test_a_failure_while_importing_finishes_the_run_and_answers_json(tmp_path, monkeypatch, failure, backend):
    """An error after the run row was begun: the row is finished 'failed' (never left 'running'), the answer
    is JSON (never Starlette's plain-text traceback page), and the secret in the error text is redacted."""
    from starlette.testclient import TestClient

    from runner.inbound import server as inbound
    from runner.engine import pipeline
    from runner.errors import RunnerError
    from runner.sandbox import debitura as dsim

    path = tmp_path / "config.yaml"
    path.write_text(ZAP_CONFIG)
    use_backend(path, backend)
    monkeypatch.setenv("DEBITURA_API_KEY", dsim.PRODUCTION_KEY)
    cfg = config.load(path)
    store = store_of(path)
    key = apikeys.create(store, "production", "zap")[0]
    store.close()

    async def broken(*a, **kw):
        text = f"delivery broke while using {dsim.PRODUCTION_KEY}"
        raise RunnerError(text, fix="try again") if failure == "runner_error" else KeyError(text)

    monkeypatch.setattr(pipeline, "_deliver_page", broken)
    with TestClient(inbound.create_app(cfg, cfg.connection("zaps")), raise_server_exceptions=False) as client:
        r = client.post("/v1/invoices", json=_zap_invoice(), headers={"XApiKey": key})
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert "delivery broke" in body["message"] and dsim.PRODUCTION_KEY not in r.text
    assert body["error"] == ("failed" if failure == "runner_error" else "internal_error")
    store = store_of(path)
    try:
        runs = store.last_runs()
        assert [x["status"] for x in runs] == ["failed"]
        assert runs[0]["finished"] is not None and "delivery broke" in runs[0]["summary"]["error"]
        assert dsim.PRODUCTION_KEY not in json.dumps(runs[0]["summary"])
        conn = store.connection("zaps")
        assert "delivery broke" in conn["last_error"] and conn["last_error_at"]
    finally:
        store.close()
