"""End to end over real sockets: `runner sandbox serve` in one process, `runner apply` in others."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from conftest import DEBITURA_KEY, ROOT, free_port, run_cli, wait_for_port


@pytest.fixture
def served(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runner", "sandbox", "serve", "--port", str(port),
                             "--data-dir", str(tmp_path / "sim")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _config(tmp_path, base):
    path = tmp_path / "config.yaml"
    path.write_text(f"""
state: state.db
destination:
  type: debitura
  environment: production
  base_url: {base}/debitura
  api_key: "${{DEBITURA_API_KEY}}"
connections:
  - name: acme-stripe
    integration: stripe
    environment: test
    allow_test_source: true          # the production simulator stands in for Debitura production
    base_url: {base}/stripe
    credentials: {{api_key: "${{STRIPE_API_KEY}}"}}
    window: {{last: 90d}}
""")
    return path


def _cases(base):
    r = httpx.get(f"{base}/debitura/cases", params={"PageSize": 100}, headers={"XApiKey": DEBITURA_KEY})
    r.raise_for_status()
    return r.json()["cases"]


def test_apply_over_sockets_then_again(tmp_path, served, sandbox_env):
    cfg = _config(tmp_path, served)
    plan = run_cli("plan", str(cfg), "--output", "json", env=sandbox_env)
    assert plan.returncode == 0, plan.stderr
    would = json.loads(plan.stdout)["totals"]["imported"]
    assert would > 0 and _cases(served) == []

    first = run_cli("apply", str(cfg), "--auto-approve", "--output", "json", env=sandbox_env)
    assert first.returncode == 0, first.stderr
    totals = json.loads(first.stdout)["totals"]
    assert totals["imported"] == would
    # server-side filters on (the default): only open invoices in the window came back
    assert set(totals["skipped"]) <= {"not_unpaid", "incomplete_address"}
    cases = _cases(served)
    assert len(cases) == would
    assert len({c["creditorReference"] for c in cases}) == would

    second = run_cli("apply", "--full", str(cfg), "--auto-approve", env=sandbox_env)  # the whole window: duplicates
    assert second.returncode == 0, second.stderr
    assert f"skipped {would + sum(totals['skipped'].values())}" in second.stdout
    assert "duplicate" in second.stdout
    assert len(_cases(served)) == would


def test_revoked_destination_key_fails_cleanly(tmp_path, served, sandbox_env):
    env = {**sandbox_env, "DEBITURA_API_KEY": "dbt_sandbox_revoked_Aa0Bb1"}
    r = run_cli("apply", str(_config(tmp_path, served)), "--auto-approve", env=env)
    assert r.returncode == 1
    assert "refused the API key" in r.stdout
    assert "dbt_sandbox_revoked_Aa0Bb1" not in r.stdout + r.stderr
    assert _cases(served) == []
