"""A source is the provider's account, never the connection's name; test data never reaches production.

Renaming a connection (a normal pull request), rolling its key or moving it to another config must not import
an invoice a second time; a Stripe test-mode connection must not create real collection cases."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import orjson

from runner.sandbox import stripe as stripe_sim

from conftest import ROOT, query, run_cli, store_of, stripe_workspace, use_backend


def _apply(cfg: Path, *args: str) -> dict:
    out = run_cli("apply", str(cfg), "-o", "json", *args, cwd=cfg.parent)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def _plan(cfg: Path) -> dict:
    out = run_cli("plan", str(cfg), "-o", "json", cwd=cfg.parent)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def _rename(cfg: Path, old: str, new: str) -> None:
    cfg.write_text(cfg.read_text().replace(f"name: {old}\n", f"name: {new}\n"))


def _lines(cfg: Path) -> list[dict]:
    return [orjson.loads(line) for line in (cfg.parent / "out.jsonl").read_bytes().splitlines()]


def test_renaming_a_connection_imports_nothing_again(tmp_path):
    cfg = stripe_workspace(tmp_path)
    first = _apply(cfg)["connections"][0]
    assert first["imported"] > 5 and first["account_id"] == stripe_sim.ACCOUNT_ID
    assert first["account_name"] == stripe_sim.ACCOUNT_NAME
    written = len(_lines(cfg))
    _rename(cfg, "s", "acme-billing")
    plan = _plan(cfg)["connections"][0]
    assert plan["name"] == "acme-billing" and plan["imported"] == 0  # plan and apply agree
    again = _apply(cfg)["connections"][0]
    assert again["imported"] == 0 and again["skipped"]["duplicate"] == first["imported"]
    assert len(_lines(cfg)) == written


def test_rolling_the_key_of_the_same_account_imports_nothing_again(tmp_path):
    """The secret key replaced by a restricted key that may read invoices and customers only: Stripe refuses it
    the account (403) and names the account in the refusal, which is all the ledger needs."""
    cfg = stripe_workspace(tmp_path)
    first = _apply(cfg)["connections"][0]
    (tmp_path / "sandbox-secrets" / "stripe_api_key").write_text(stripe_sim.TEST_RESTRICTED_KEY)
    again = _apply(cfg)["connections"][0]
    assert again["status"] == "ok", again["error"]
    assert again["account_id"] == stripe_sim.ACCOUNT_ID
    assert again["imported"] == 0 and again["skipped"]["duplicate"] == first["imported"]


def test_moving_the_config_to_another_file_imports_nothing_again(tmp_path):
    cfg = stripe_workspace(tmp_path)
    first = _apply(cfg)["connections"][0]
    moved = tmp_path / "prod.yaml"
    moved.write_text(cfg.read_text().replace("name: s\n", "name: stripe-prod\n"))
    cfg.unlink()
    again = _apply(moved)["connections"][0]
    assert again["imported"] == 0 and again["skipped"]["duplicate"] == first["imported"]


def test_a_ledger_keyed_by_connection_name_is_adopted_without_importing_again(tmp_path, backend):
    """A store written when Stripe sources were keyed by the connection's name ('stripe:s'): the first run
    after moves its rows to the account's key, and nothing is imported or written again."""
    cfg = use_backend(stripe_workspace(tmp_path), backend)
    first = _apply(cfg)["connections"][0]
    _write(tmp_path, backend, "UPDATE ledger SET account_key='stripe:s'", "UPDATE verdicts SET account_key='stripe:s'")
    written = len(_lines(cfg))
    again = _apply(cfg, "--full")["connections"][0]  # the whole window, as a run before change feeds read it
    assert again["imported"] == 0 and again["skipped"]["duplicate"] == first["imported"]
    assert len(_lines(cfg)) == written
    store = store_of(cfg)
    try:
        keys = {k for (k,) in query(store, "SELECT DISTINCT account_key FROM ledger")}
    finally:
        store.close()
    assert keys == {f"stripe:{stripe_sim.ACCOUNT_ID}"}


def _write(tmp_path: Path, backend: str, *statements: str) -> None:
    """Statements run on the store as another program would (a store written by an older runner)."""
    if backend == "sqlite":
        db = sqlite3.connect(tmp_path / "state.db")
        with db:
            for sql in statements:
                db.execute(sql)
        db.close()
        return
    import psycopg

    with psycopg.connect(backend) as db:
        for sql in statements:
            db.execute(sql)


def test_expect_pins_the_stripe_account_and_a_mismatch_names_the_fix_for_an_api_key(tmp_path):
    ok = stripe_workspace(tmp_path / "a", extra=f"    expect: {{account_id: {stripe_sim.ACCOUNT_ID}}}\n")
    assert _apply(ok)["connections"][0]["status"] == "ok"
    wrong = stripe_workspace(tmp_path / "b", extra="    expect: {account_id: acct_1SomeoneElse}\n")
    conn = _apply(wrong)["connections"][0]
    assert conn["status"] == "failed" and conn["imported"] == 0
    assert stripe_sim.ACCOUNT_ID in conn["error"] and "acct_1SomeoneElse" in conn["error"]
    assert "runner connect" not in conn["fix"]  # Stripe uses API keys, not a connect flow
    assert "credentials of the account" in conn["fix"]


def _validate(cfg: Path, env=None):
    return run_cli("validate", str(cfg), cwd=cfg.parent, env=env)


def test_an_integration_that_cannot_name_its_account_needs_account_id(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("""version: 1
state: state.db
destination: {type: jsonl, path: out.jsonl}
connections:
  - name: zaps
    integration: zapier
    environment: production
""")
    out = _validate(cfg)
    assert out.returncode == 2
    assert "config.yaml:5" in out.stdout + out.stderr
    assert "cannot tell which account" in out.stdout + out.stderr and "account_id:" in out.stdout + out.stderr
    cfg.write_text(cfg.read_text() + "    account_id: acme-crm\n")
    assert _validate(cfg).returncode == 0


def test_an_inbound_ledger_keyed_by_connection_name_keeps_its_invoices(tmp_path):
    """Zapier's ledger account was '<connection>:<environment>'; it becomes '<account_id>:<environment>'."""
    from runner.spec import config as config_mod
    from runner.engine.pipeline import Source
    from runner.net.http import Clients
    from runner.state.sqlite import Store
    import asyncio

    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text("""version: 1
state: state.db
destination: {type: jsonl, path: out.jsonl}
connections:
  - name: zaps
    integration: zapier
    environment: production
    account_id: acme-crm
""")
    cfg = config_mod.load(cfg_path)
    store = Store(cfg.state_path, destination="jsonl:x")
    with store.tx() as db:
        db.execute("INSERT INTO ledger (destination, account_key, invoice_id, connection, number, status, "
                   "idempotency_key, first_seen, updated) VALUES ('jsonl:x', 'zapier:zaps:production', 'INV-1', "
                   "'zaps', '1', 'delivered', 'k', 0, 0)")
    source = Source(cfg.connection("zaps"), Clients(), store)
    asyncio.run(source.open())
    assert source.account_key == "zapier:acme-crm:production"
    assert set(store.ledger_lookup(source.account_key, ["INV-1"])) == {"INV-1"}
    store.close()


def _debitura_production(tmp: Path, environment: str, extra: str = "", destination: str = "") -> Path:
    cfg = stripe_workspace(tmp, extra=extra)
    text = cfg.read_text().replace(
        "destination: {type: jsonl, path: out.jsonl}",
        destination or 'destination:\n  type: debitura\n  environment: production\n  api_key: "${DEBITURA_API_KEY}"')
    cfg.write_text(text.replace("environment: sandbox", f"environment: {environment}"))
    (tmp / "sandbox-secrets" / "stripe_api_key").write_text("sk_test_4eC39HqLyjWDarjtT1zdp7dc")
    return cfg


def test_a_test_mode_source_delivering_to_production_is_refused_naming_both_lines(tmp_path):
    cfg = _debitura_production(tmp_path, "test")
    out = _validate(cfg, env={"DEBITURA_API_KEY": "dbt_real_key_for_test_only_x"})
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    lines = cfg.read_text().splitlines()
    conn_line = next(i for i, line in enumerate(lines, 1) if line.strip() == "environment: test")
    dest_line = next(i for i, line in enumerate(lines, 1) if line.strip() == "environment: production")
    assert f"config.yaml:{conn_line}" in text and f"config.yaml:{dest_line}" in text
    assert "test data" in text and "allow_test_source: true" in text and "is_test: true" in text
    # plan refuses too: nothing is fetched or would be imported
    plan = run_cli("plan", str(cfg), cwd=cfg.parent, env={"DEBITURA_API_KEY": "dbt_real_key_for_test_only_x"})
    assert plan.returncode == 2


def test_test_data_may_go_to_test_cases_a_file_or_with_an_explicit_override(tmp_path):
    env = {"DEBITURA_API_KEY": "dbt_real_key_for_test_only_x"}
    as_test_cases = _debitura_production(tmp_path / "a", "test", destination=(
        'destination:\n  type: debitura\n  environment: production\n  is_test: true\n  api_key: "${DEBITURA_API_KEY}"'))
    assert _validate(as_test_cases, env).returncode == 0
    overridden = _debitura_production(tmp_path / "b", "test", extra="    allow_test_source: true\n")
    assert _validate(overridden, env).returncode == 0
    live = _debitura_production(tmp_path / "c", "live")
    (tmp_path / "c" / "sandbox-secrets" / "stripe_api_key").write_text("sk_live_4eC39HqLyjWDarjtT1zdp7dc")
    assert _validate(live, env).returncode == 0
    to_file = stripe_workspace(tmp_path / "d")  # the sandbox (test data) into a jsonl file
    assert _validate(to_file).returncode == 0


def test_every_test_environment_of_the_built_in_specs_says_so():
    """The refusal relies on the spec declaring its test environments."""
    import yaml

    expected = {"stripe": {"test", "sandbox"}, "quickbooks_online": {"development", "sandbox"},
                "zoho_books": {"sandbox"}, "zapier": {"test"}}
    for spec_id, tests in expected.items():
        spec = yaml.safe_load((ROOT / "integrations.d" / f"{spec_id}.yaml").read_text())
        assert {n for n, e in spec["environments"].items() if e.get("test")} == tests, spec_id


def test_a_case_replayed_for_another_state_store_is_a_duplicate_not_an_import(tmp_path, sandbox_env):
    """A second state store (a CI job that lost its disk, another machine) sends the same invoices with the same
    derived idempotency keys: Debitura replays the first answers verbatim. Those cases were made an hour ago by
    another ledger's run, so this run reports them as cases Debitura already has, not as imports of its own."""
    from datetime import datetime, timedelta, timezone

    from conftest import SANDBOX_CONFIG, write_config

    first = write_config(tmp_path, SANDBOX_CONFIG.format(server_filters="false"))
    before = _apply(first)["connections"][0]
    assert before["imported"] > 5
    # The first run was an hour ago: Debitura's stored answers say when their cases were made.
    db = sqlite3.connect(next((tmp_path / "state" / "sandbox").glob("debitura-*.sqlite")))
    hour_ago = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with db:
        for key, response in db.execute("SELECT idem_key, response FROM idempotency").fetchall():
            body = json.loads(response)
            body["dateCreated"] = body["created"] = hour_ago
            db.execute("UPDATE idempotency SET response=? WHERE idem_key=?", (json.dumps(body), key))
    db.close()
    second = tmp_path / "other.yaml"
    second.write_text(first.read_text().replace("state: state/state.db", "state: state/other.db"))
    after = _apply(second)["connections"][0]
    assert after["imported"] == 0
    assert after["skipped"]["duplicate"] == before["imported"]
