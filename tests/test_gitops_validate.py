"""`runner validate` with no secret at all (a pre-commit hook, a fork's pull request), and its JSON errors."""
from __future__ import annotations

import json
import os

from conftest import SANDBOX_CONFIG, run_cli


def _no_secrets() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("STRIPE_API_KEY", "DEBITURA_API_KEY")}


def _run(*args, cwd):
    import subprocess
    import sys

    env = {**_no_secrets(), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=60)


def test_validate_passes_with_no_secret_set_and_check_secrets_reads_them(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(SANDBOX_CONFIG.format(server_filters="false"))
    ok = _run("validate", str(cfg), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout and "--check-secrets" in ok.stdout
    checked = _run("validate", "--check-secrets", str(cfg), cwd=tmp_path)
    assert checked.returncode == 2
    assert "STRIPE_API_KEY" in checked.stderr and "DEBITURA_API_KEY" in checked.stderr


def test_validate_without_secrets_still_checks_each_reference_form(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(SANDBOX_CONFIG.format(server_filters="false").replace("${STRIPE_API_KEY}", "${STRIPE-API KEY}"))
    r = _run("validate", str(cfg), cwd=tmp_path)
    assert r.returncode == 2, r.stdout
    assert f"{cfg}:11:" in r.stderr and "cannot be the name of an environment variable" in r.stderr
    assert "fix:" in r.stderr


def test_validate_output_json_prints_each_error_with_its_place_and_fix(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(SANDBOX_CONFIG.format(server_filters="false").replace("integration: stripe", "integration: strip"))
    r = _run("validate", "--output", "json", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    (err,) = doc["errors"]
    assert err["file"] == str(cfg) and err["line"] == 9 and isinstance(err["column"], int)
    assert "strip" in err["message"] and "stripe" in err["fix"]
    assert set(err) == {"file", "line", "column", "message", "fix", "where"}


def test_validate_json_on_a_valid_config_says_ok(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(SANDBOX_CONFIG.format(server_filters="false"))
    r = run_cli("validate", "-o", "json", str(cfg), env={"STRIPE_API_KEY": "", "DEBITURA_API_KEY": ""}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
